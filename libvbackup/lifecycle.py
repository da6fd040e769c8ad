"""Checkpoints beside the repository's points; status and abort of a running backup.

Whether a backup is running is told by the VM's lock alone (a run holds it for its whole life):
the pid in the journal is never trusted, and ``abort`` signals only the process the kernel
shows holding the lock (``lock.signal_holder``).
"""

from __future__ import annotations

import logging
import os
import time

from . import checkpoints as chk_mod, journal, lock
from .errors import Error, NotFound, StateError
from .repo import Repository
from .outcomes import AbortResult, CheckpointInfo, CheckpointsResult, StatusResult
from .virt import Connection

log = logging.getLogger(__name__)


def checkpoints(vm: str, *, repo: str, uri: str | None = None) -> CheckpointsResult:
    """libvirt's checkpoints of ``vm`` beside the repository's points (see ``checkpoints.owner``).
    ``lost`` lists points whose checkpoint libvirt no longer has (an incremental that needs
    them redefines them from the repository)."""
    repository = Repository(repo)
    repository.check_readable()
    m = repository.load(vm)
    points = {p.checkpoint for p in m.points}
    with Connection(uri) as conn:
        dom = conn.domain(vm)
        out = []
        for name in dom.checkpoint_names():
            desc = chk_mod.description_of(dom.checkpoint_xml(name))
            out.append(CheckpointInfo(name, chk_mod.owner(name, desc, points, str(repository.root),
                                                          repository.checkpoint_prefix), desc))
    names = {c.name for c in out}
    return CheckpointsResult(vm, str(repository.root), tuple(out),
                             tuple(p.checkpoint for p in m.points if p.checkpoint not in names))


def status(vm: str, *, repo: str, uri: str | None = None) -> StatusResult:
    """The backup running for ``vm`` in this repository, if any: who, what, how far."""
    repository = Repository(repo)
    repository.check_readable()
    record = journal.read(repository, vm)
    if record is None:
        return StatusResult(vm, running=False)
    holder = repository.lock_holder(vm)
    alive = holder is not None
    progress = repository.read_progress(vm) or {}
    scratch_used = job = libvirt_error = None
    if alive:
        try:
            with Connection(uri) as conn:
                stats = conn.domain(vm).job_stats()
            scratch_used, job = stats.get("disk_temp_used"), bool(stats.get("type"))
        except Error as e:  # status must still answer without libvirt
            libvirt_error = str(e)
    return StatusResult(vm, running=alive, stale=not alive,
                        pid=(holder if holder and holder > 0 else None) if alive else record.pid,
                        mode=record.mode, checkpoint=record.checkpoint, started=record.started,
                        bytes_done=progress.get("done") if alive else None,
                        bytes_total=progress.get("total") if alive else None,
                        disks=progress.get("disks") if alive else None,
                        scratch_used=scratch_used, job=job, libvirt_error=libvirt_error)


def abort(vm: str, *, repo: str, uri: str | None = None, wait: float = 60.0) -> AbortResult:
    """Stop the running backup (it aborts its job and cleans up), or clean up after a dead one."""
    repository = Repository(repo)
    repository.check_readable()
    record = journal.read(repository, vm)
    if record is None:
        raise NotFound(f"no backup of VM {vm!r} is running in {repository.root}")
    holder = repository.lock_holder(vm)
    if holder is not None:
        if holder == os.getpid():
            raise StateError(f"the backup of VM {vm!r} runs in this process; stop it there")
        if holder == lock.UNKNOWN_HOLDER or not lock.signal_holder(repository.lock_path(vm), holder):
            raise StateError(f"a libvbackup operation holds VM {vm!r} but its process cannot be proven; "
                             "nothing was signalled")
        deadline = time.monotonic() + wait
        while repository.run_is_live(vm):
            if time.monotonic() > deadline:
                raise StateError(f"backup process {holder} did not stop within {wait:.0f} s")
            time.sleep(0.1)
        return AbortResult(vm, record.checkpoint, holder, cleaned_up=False)
    with Connection(uri) as conn, repository.lock(vm):
        journal.recover(repository, vm, conn.domain(vm))
    return AbortResult(vm, record.checkpoint, record.pid, cleaned_up=True)


