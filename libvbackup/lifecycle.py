"""Checkpoints beside the repository's points; status and abort of a running backup."""

from __future__ import annotations

import logging
import os
import signal
import time

from .backup import _pid_alive, recover
from .errors import NotFound, StateError
from .repo import Repository
from .virt import Connection

log = logging.getLogger(__name__)


def checkpoints(vm: str, *, repo: str, uri: str | None = None) -> dict:
    """libvirt's checkpoints of ``vm`` beside the repository's points.

    Each checkpoint is marked ``point`` (a point of this repository), ``orphan`` (made by
    libvbackup for this repository but belonging to no point: a run that failed and could not
    clean up), ``other-repository`` (made by libvbackup for another repository), or ``foreign``
    (made by another tool: never touched). ``lost`` lists points whose checkpoint libvirt no
    longer has (they are redefined from the repository when an incremental needs them).
    """
    repository = Repository(repo)
    repository.check_readable()
    m = repository.load(vm)
    points = {p.checkpoint for p in m.points}
    with Connection(uri) as conn:
        dom = conn.domain(vm)
        out = []
        for name in dom.checkpoint_names():
            desc = _description(dom.checkpoint_xml(name))
            if name in points:
                owner = "point"
            elif desc.startswith("libvbackup ") and f"repository {repository.root}" in desc:
                owner = "orphan"
            elif desc.startswith("libvbackup ") or name.startswith("lvb-"):
                owner = "orphan" if name.startswith(repository.checkpoint_prefix + "-") else "other-repository"
            else:
                owner = "foreign"
            out.append({"name": name, "owner": owner, "description": desc})
        names = {c["name"] for c in out}
    return {"vm": vm, "repo": str(repository.root), "checkpoints": out,
            "lost": [p.checkpoint for p in m.points if p.checkpoint not in names]}


def _description(xml: str) -> str:
    from lxml import etree

    el = etree.fromstring(xml.encode()).find("description")
    return (el.text or "") if el is not None else ""


def status(vm: str, *, repo: str, uri: str | None = None) -> dict:
    """The backup running for ``vm`` in this repository, if any: who, what, how far."""
    repository = Repository(repo)
    repository.check_readable()
    state = repository.read_run(vm)
    if not state:
        return {"vm": vm, "running": False}
    pid = state.get("pid")
    alive = isinstance(pid, int) and _pid_alive(pid)
    result = {"vm": vm, "running": alive, "stale": not alive, "pid": pid, "mode": state.get("mode", "pull"),
              "checkpoint": state.get("checkpoint"), "started": state.get("started")}
    progress = repository.read_progress(vm)
    if progress:
        result.update(bytes_done=progress.get("done"), bytes_total=progress.get("total"),
                      disks=progress.get("disks"))
    try:
        with Connection(uri) as conn:
            stats = conn.domain(vm).job_stats()
        result["scratch_used"] = stats.get("disk_temp_used")
        result["job"] = bool(stats.get("type"))
    except Exception as e:  # noqa: BLE001 - status must still answer without libvirt
        result["libvirt_error"] = str(e)
    return result


def abort(vm: str, *, repo: str, uri: str | None = None, wait: float = 60.0) -> dict:
    """Stop the running backup (it aborts its job and cleans up), or clean up after a dead one."""
    repository = Repository(repo)
    repository.check_readable()
    state = repository.read_run(vm)
    if state is None:
        raise NotFound(f"no backup of VM {vm!r} is running in {repository.root}")
    pid = state.get("pid")
    if isinstance(pid, int) and _pid_alive(pid) and pid != os.getpid():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and repository.read_run(vm) is not None:
            if time.monotonic() > deadline:
                raise StateError(f"backup process {pid} did not stop within {wait:.0f} s")
            time.sleep(0.1)
        return {"vm": vm, "aborted": state.get("checkpoint"), "pid": pid}
    with Connection(uri) as conn, repository.lock(vm):
        recover(repository, vm, conn.domain(vm))
    return {"vm": vm, "aborted": state.get("checkpoint"), "pid": pid, "cleaned_up": True}
