"""The run journal: what a backup is about to create, written down before it creates it.

``<vm>/.run.json`` holds one ``RunRecord``. Each step of a run records its new state *before*
the step has any effect::

    PLANNED  nothing exists yet
    DIRS     the run directory (scratch, socket, push targets) and <chk>.partial/ may exist
    JOB      the libvirt job and the new checkpoint may exist (backupBegin creates both)

A run holds the VM's lock (``lock.VmLock``) for its whole life, and the journal is written only
under that lock. So whoever holds the lock and finds a journal knows that the run which wrote
it is dead, whatever pid the journal names (pids are reused; the pid is kept for messages
only), and may undo what it recorded (``recover``). The point is complete only once it is in
the manifest; the journal is removed after that.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import os
import pathlib
import shutil

from .errors import Error, LibvirtError, StateError
from .repo import Repository, fsync_dir

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    PLANNED = "planned"
    DIRS = "dirs"
    JOB = "job"


@dataclasses.dataclass
class RunRecord:
    vm: str
    checkpoint: str | None
    mode: str = "pull"
    state: RunState = RunState.PLANNED
    started: str = ""
    pid: int | None = None  # of the process that wrote it: for messages, never for liveness
    run_dir: str | None = None
    partial: str | None = None
    final: str | None = None

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, vm: str, text: str) -> "RunRecord":
        """Lenient: a journal is read to clean up, so whatever it says is used; unreadable
        fields are left out (journals of earlier versions said ``"job": true``)."""
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}

        def text_field(key):
            v = doc.get(key)
            return v if isinstance(v, str) else None

        try:
            state = RunState(doc.get("state"))
        except ValueError:
            state = RunState.JOB if doc.get("job") else RunState.DIRS
        pid = doc.get("pid")
        return cls(vm=vm, checkpoint=text_field("checkpoint"), mode=text_field("mode") or "pull",
                   state=state, started=text_field("started") or "",
                   pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                   run_dir=text_field("run_dir"), partial=text_field("partial"), final=text_field("final"))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(repository: Repository, vm: str) -> RunRecord | None:
    try:
        text = repository.run_path(vm).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    return RunRecord.from_json(vm, text)


def write(repository: Repository, record: RunRecord) -> None:
    repository.write_run(record.vm, record.to_json())


def _remove_tree(path: pathlib.Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        fsync_dir(path.parent)


def cleanup(repository: Repository, dom, record: RunRecord) -> list[str]:
    """Undo what a run recorded, except what the manifest already holds; returns notes.

    Every step is tried even when an earlier one fails (QEMU gone, libvirtd restarted); the
    journal is removed only when all succeeded. A checkpoint whose bitmaps QEMU never stored
    or lost (QEMU was killed) cannot be deleted normally: its metadata alone is removed.
    """
    chk = record.checkpoint
    failures: list[str] = []
    notes: list[str] = []
    try:
        completed = chk is not None and repository.load(record.vm).find(chk) is not None
    except Error as e:
        failures.append(str(e))
        completed = True  # cannot tell: keep what might be a completed point
    # backupBegin creates the job and our (uniquely named) checkpoint together: the job is
    # ours only if that checkpoint exists. Another tool's job is never aborted.
    if record.state is RunState.JOB and chk and not completed:
        if dom is None:
            failures.append("libvirt could not be reached to end the job and delete the checkpoint")
        else:
            try:
                if dom.has_checkpoint(chk):
                    if dom.has_backup_job():
                        dom.abort_job()
                    log.info("deleting checkpoint %s of an incomplete backup", chk)
                    try:
                        dom.delete_checkpoint(chk)
                    except LibvirtError as e:
                        # QEMU never stored the bitmap or lost it: nothing to merge, drop the name.
                        dom.delete_checkpoint(chk, metadata_only=True)
                        notes.append(f"checkpoint {chk} removed from libvirt's metadata only ({e.message})")
                        log.warning("%s", notes[-1])
            except Error as e:
                failures.append(str(e))
    for path in (record.partial, None if completed else record.final, record.run_dir):
        if path:
            _remove_tree(pathlib.Path(path))
    if failures:
        raise StateError("clean-up of the interrupted backup is incomplete: " + "; ".join(failures),
                         f"once libvirt answers, run: libvbackup abort {record.vm}")
    repository.clear_run(record.vm)
    return notes


def recover(repository: Repository, vm: str, dom) -> RunRecord | None:
    """Finish the clean-up of a run that died; the caller holds the VM's lock (so that run is
    dead). Returns its record, or None if there was none."""
    record = read(repository, vm)
    if record is None:
        return None
    who = f"pid {record.pid}" if record.pid and record.pid != os.getpid() else "an earlier run"
    log.warning("cleaning up after an interrupted backup %s (%s)", record.checkpoint or "of unknown name", who)
    cleanup(repository, dom, record)
    return record
