"""The run journal: what a backup is about to create, written down before it creates it.

``<vm>/.run.json`` holds one ``RunRecord``. Each step of a run records its new state *before*
the step has any effect::

    PLANNED  nothing exists yet (a state of the record in memory; a run writes DIRS first)
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
import subprocess
import time

from lxml import etree

from . import checkpoints, domxml, quiesce
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
    frozen: bool = False  # the guest's file systems may be frozen (written before the freeze)

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
                   run_dir=text_field("run_dir"), partial=text_field("partial"), final=text_field("final"),
                   frozen=doc.get("frozen", False) is not False)


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


def _remove_tree(path: pathlib.Path) -> str | None:
    """Remove a directory tree; returns why it could not be removed, or None."""
    if not path.exists():
        return None
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        return f"cannot remove {path}"
    fsync_dir(path.parent)
    return None


class _Unfinished:
    """What a clean-up could not do, and the one hint that is true for all of it."""

    def __init__(self, vm: str):
        self.vm = vm
        self.failures: list[str] = []
        self.by_hand: list[str] = []  # steps for the admin: no later run would do them
        self.unreachable = False  # libvirt could not be asked: a later run or abort finishes it

    def hint(self) -> str:
        finish = f"libvbackup abort {self.vm}"
        if self.by_hand:
            return "; ".join(self.by_hand) + f"; then run: {finish}"
        if self.unreachable:
            return f"once libvirt answers, the next backup of {self.vm} or '{finish}' finishes it"
        return f"then run: {finish}"


def _bitmaps(checkpoint_xml: str) -> dict[str, str]:
    """disk -> bitmap name of a checkpoint's XML (the disks with checkpoint='bitmap')."""
    root = etree.fromstring(checkpoint_xml.encode())
    name = root.findtext("name") or ""
    return {d.get("name"): d.get("bitmap") or name for d in root.iterfind("./disks/disk")
            if d.get("checkpoint", "bitmap") == "bitmap" and d.get("name")}


def remove_bitmaps_offline(dom, checkpoint_xml: str) -> list[str]:
    """Remove a checkpoint's bitmaps from the images of a domain that is not running (QEMU stored
    them when it exited; libvirt 9.0 deletes checkpoints of running domains only). Returns the
    images whose bitmap could not be removed (as "disk (reason)")."""
    if not dom.local:
        return [f"{disk} (libvirt is remote: remove bitmap {b} with qemu-img bitmap --remove)"
                for disk, b in _bitmaps(checkpoint_xml).items()]
    sources = {d.target: d for d in domxml.parse_disks(dom.xml())}
    left = []
    for disk, bitmap in _bitmaps(checkpoint_xml).items():
        d = sources.get(disk)
        if d is None or d.format != "qcow2" or not d.source or not os.path.isfile(d.source):
            continue  # gone from the definition, or not an image file: nothing of ours is left in it
        p = subprocess.run(["qemu-img", "bitmap", "--remove", d.source, bitmap], capture_output=True, text=True)
        err = (p.stderr or p.stdout).strip()
        if p.returncode != 0 and "not found" not in err:  # not found: QEMU never stored it
            left.append(f"{disk} ({err.splitlines()[-1] if err else f'qemu-img exit {p.returncode}'})")
    return left


def _stays_running(dom, wait: float = 2.0) -> bool:
    deadline = time.monotonic() + wait
    while dom.is_running():
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def _delete_checkpoint(dom, chk: str, notes: list[str], todo: _Unfinished) -> None:
    """Delete the checkpoint of an incomplete backup, its bitmaps included.

    A running domain's checkpoint is deleted by libvirt. When that fails because QEMU never
    stored its bitmap or lost it (QEMU was killed; libvirt's validation says so), its metadata
    alone is removed: nothing is left to merge or delete. A checkpoint whose bitmaps are fine
    is never dropped that way. A domain that is not running (QEMU exited during the backup):
    libvirt cannot delete the checkpoint, so its metadata is removed and its bitmaps are
    removed from the images with qemu-img.
    """
    try:
        dom.delete_checkpoint(chk)
        return
    except LibvirtError as e:
        first = e.message
    if dom.is_running():
        why = dom.validate_checkpoint(chk)
        if why is not None and checkpoints.bitmap_lost(why):
            dom.delete_checkpoint(chk, metadata_only=True)
            notes.append(f"checkpoint {chk} removed from libvirt's metadata only: QEMU lost its bitmap ({why})")
            log.warning("%s", notes[-1])
            return
        if _stays_running(dom):  # (QEMU killed just now: libvirt notices within moments)
            todo.failures.append(f"cannot delete checkpoint {chk!r} of VM {dom.name!r}: {first}")
            todo.by_hand.append(f"find out why libvirt cannot delete it (virsh checkpoint-delete {dom.name} {chk})")
            return
    xml = dom.checkpoint_xml(chk)
    dom.delete_checkpoint(chk, metadata_only=True)
    left = remove_bitmaps_offline(dom, xml)
    notes.append(f"checkpoint {chk} removed from libvirt's metadata (VM {dom.name!r} is not running) "
                 "and its bitmaps from the images")
    log.info("%s", notes[-1])
    if left:
        todo.failures.append(f"bitmap {chk} is left in the images of disk(s) " + ", ".join(left))
        todo.by_hand.append(f"with the VM shut off, run qemu-img bitmap --remove IMAGE {chk} on each")


def cleanup(repository: Repository, dom, record: RunRecord) -> list[str]:
    """Undo what a run recorded, except what the manifest already holds; returns notes.

    Every step is tried even when an earlier one fails (QEMU gone, libvirtd restarted); the
    journal is removed only when all succeeded, and the error's hint says what finishes the
    clean-up: a later run (or ``abort``) only when libvirt could not be reached, otherwise the
    steps to take by hand. A checkpoint whose bitmaps QEMU never stored or lost (QEMU was
    killed) cannot be deleted normally: its metadata alone is removed (``_delete_checkpoint``).
    """
    chk = record.checkpoint
    todo = _Unfinished(record.vm)
    notes: list[str] = []
    if record.frozen:  # first of all: a frozen guest is an outage
        if dom is None:
            todo.failures.append(f"VM {record.vm!r} may still be frozen and libvirt could not be reached")
            todo.by_hand.append(f"thaw it now: virsh domfsthaw {record.vm}")
        else:
            try:
                quiesce.thaw(dom)
                record.frozen = False
                write(repository, record)
                notes.append(f"the file systems of VM {record.vm!r} were thawed")
                log.warning("%s", notes[-1])
            except Error as e:
                todo.failures.append(str(e.message))
                todo.by_hand.append(f"thaw it now: virsh domfsthaw {record.vm}")
    try:
        completed = chk is not None and repository.load(record.vm).find(chk) is not None
    except Error as e:
        todo.failures.append(str(e))
        todo.by_hand.append(f"repair {repository.manifest_path(record.vm)}")
        completed = True  # cannot tell: keep what might be a completed point
    # backupBegin creates the job and our (uniquely named) checkpoint together: the job is
    # ours only if that checkpoint exists. Another tool's job is never aborted.
    if record.state is RunState.JOB and chk and not completed:
        if dom is None:
            todo.failures.append("libvirt could not be reached to end the job and delete the checkpoint")
            todo.unreachable = True
        else:
            try:
                if dom.has_checkpoint(chk):
                    if dom.has_backup_job():
                        dom.abort_job()
                    log.info("deleting checkpoint %s of an incomplete backup", chk)
                    _delete_checkpoint(dom, chk, notes, todo)
            except Error as e:
                todo.failures.append(str(e))
                if dom.reachable():
                    todo.by_hand.append(f"end the job (virsh domjobabort {record.vm}) and delete checkpoint "
                                        f"{chk} (virsh checkpoint-delete {record.vm} {chk}) by hand")
                else:
                    todo.unreachable = True
    for path in (record.partial, None if completed else record.final, record.run_dir):
        if path:
            why = _remove_tree(pathlib.Path(path))
            if why:
                todo.failures.append(why)
                todo.by_hand.append(f"remove {path}")
    if todo.failures:
        raise StateError("clean-up of the interrupted backup is incomplete: " + "; ".join(todo.failures),
                         todo.hint())
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
