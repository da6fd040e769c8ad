"""Instant domains seen from the repository: which points each one reads, and its NBD servers.

``restore --instant`` runs a new domain on qcow2 overlays whose backing file is a read-only
NBD export of the point's chain, one ``qemu-nbd`` per disk, ours, detached (it outlives the
command) and serving on a unix socket in ``/run/libvbackup/instant/<name>/`` (0750
root:<QEMU's group>, the socket 0660): QEMU reaches the export, nobody but root reaches the
repository, which stays 0700/0600.

A *record* per instant domain, ``<repo>/<vm>/.instant/<name>.json`` (0600, replaced atomically),
says which points it reads and how each disk is served; it is written **before** anything it
describes exists, so a run that dies leaves a record naming everything to undo. ``prune``
refuses to remove a point a live record names; ``verify`` reports them; ``finalize`` removes
the record last.

*Which process is ours.* Each qemu-nbd inherits an open file description holding an
exclusive flock on ``<disk>.lock`` in the socket directory, and keeps it for its whole life
(our own descriptor is closed once it runs). A pid in the record is believed only when the
kernel shows that this very process holds that lock (``lock.holds``: its fd and fdinfo), and
it is signalled through a pidfd taken before the proof (``lock.signal_holder``): a pid reused
by an unrelated process is never signalled.

*Stale records.* A record whose domain is gone (no domain of that name and UUID in libvirt)
reads nothing: ``prune`` stops its servers (proven ours), removes the socket directory and the
record. A domain that is still defined keeps its points, whatever its state: its overlays name
the export (``finalize`` serves it again when the servers died, e.g. after a reboot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import grp
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

from . import lock
from .errors import Error, RepositoryError, StateError, ToolError
from .repo import Repository, write_atomic
from .virt import Connection

log = logging.getLogger(__name__)

FORMAT = 1
RUN_ROOT = pathlib.Path("/run/libvbackup/instant")
QEMU_CONF = "/etc/libvirt/qemu.conf"
DEFAULT_QEMU_GROUP = "libvirt-qemu"  # Debian's libvirt runs QEMU as libvirt-qemu:libvirt-qemu
STOP_WAIT = 10.0


@dataclasses.dataclass(frozen=True)
class ServedDisk:
    target: str
    image: str  # the point's image in the repository (absolute)
    size: int
    overlay: str  # the domain's disk
    socket: str
    lock: str  # held by the qemu-nbd serving it for as long as it runs
    pid: int | None = None  # None until it was started

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.target}?socket={self.socket}"


@dataclasses.dataclass(frozen=True)
class Record:
    name: str  # the instant domain
    uuid: str
    vm: str
    repo: str
    checkpoint: str
    points: tuple[str, ...]  # the chain it reads, oldest first
    run_dir: str
    uri: str  # the libvirt that runs it
    created: str
    disks: dict[str, ServedDisk]


def dumps(rec: Record) -> str:
    doc = dataclasses.asdict(rec)
    doc["format"] = FORMAT
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def loads(text: str, where: str) -> Record:
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise RepositoryError(f"{where} has format {doc.get('format')!r}; this libvbackup reads {FORMAT}",
                                  "upgrade libvbackup")
        disks = {t: ServedDisk(**d) for t, d in doc["disks"].items()}
        return Record(doc["name"], doc["uuid"], doc["vm"], doc["repo"], doc["checkpoint"], tuple(doc["points"]),
                      doc["run_dir"], doc["uri"], doc["created"], disks)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RepositoryError(f"instant-domain record {where} is malformed: {e}") from e


def directory(repository: Repository, vm: str) -> pathlib.Path:
    return repository.vm_dir(vm) / ".instant"


def path(repository: Repository, vm: str, name: str) -> pathlib.Path:
    return directory(repository, vm) / f"{name}.json"


def write(repository: Repository, rec: Record) -> None:
    d = directory(repository, rec.vm)
    try:
        repository.ensure_vm_dir(rec.vm)
        d.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise RepositoryError(f"cannot create {d}: {e.strerror}") from e
    write_atomic(path(repository, rec.vm, rec.name), dumps(rec))


def read(repository: Repository, vm: str, name: str) -> Record | None:
    p = path(repository, vm, name)
    try:
        return loads(p.read_text(), str(p))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RepositoryError(f"cannot read {p}: {e.strerror}") from e


def remove(repository: Repository, vm: str, name: str) -> None:
    p = path(repository, vm, name)
    try:
        p.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise RepositoryError(f"cannot remove {p}: {e.strerror}") from e
    with contextlib.suppress(OSError):
        os.rmdir(p.parent)  # (only when it was the last record)


def records(repository: Repository, vm: str) -> list[Record]:
    d = directory(repository, vm)
    if not d.is_dir():
        return []
    return [loads(p.read_text(), str(p)) for p in sorted(d.glob("*.json"))]


# -- the servers ---------------------------------------------------------------------------

def qemu_group() -> int:
    """The group QEMU runs as (qemu.conf's ``group``, else Debian's libvirt-qemu)."""
    name = DEFAULT_QEMU_GROUP
    try:
        with open(QEMU_CONF) as f:
            for line in f:
                m = re.match(r'\s*group\s*=\s*"([^"]+)"', line)
                if m:
                    name = m.group(1)
    except OSError:
        pass
    try:
        return int(name.lstrip("+")) if name.lstrip("+").isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise StateError(f"QEMU's group {name!r} does not exist; cannot give QEMU the instant export",
                         f"set group in {QEMU_CONF}") from None


def run_dir(name: str) -> pathlib.Path:
    return RUN_ROOT / name


def alive(d: ServedDisk) -> bool:
    """The qemu-nbd recorded for ``d`` runs, proven by the kernel (it holds ``d.lock``)."""
    return d.pid is not None and lock.holds(d.lock, d.pid)


def busy(directory_: pathlib.Path) -> bool:
    """Any lock file in a socket directory is held (by a qemu-nbd, whoever recorded it)."""
    return any(lock.is_held(p) for p in directory_.glob("*.lock"))


def make_run_dir(rec: Record, gid: int) -> pathlib.Path:
    """``/run/libvbackup/instant/<name>/``: root's, QEMU's group may enter and connect."""
    d = pathlib.Path(rec.run_dir)
    for parent in (RUN_ROOT.parent, RUN_ROOT):
        parent.mkdir(mode=0o755, exist_ok=True)
        os.chmod(parent, 0o755)
    try:
        d.mkdir(mode=0o750)
    except FileExistsError:
        pass
    os.chown(d, 0, gid)
    os.chmod(d, 0o750)
    return d


def serve(d: ServedDisk, gid: int) -> int:
    """Start the detached qemu-nbd for one disk (read-only, persistent, the point's chain
    exported raw); returns its pid once it accepts connections."""
    fd = os.open(d.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(f"disk {d.target} is served already (lock {d.lock} is held)") from e
            raise
        pid_file = pathlib.Path(d.lock).with_suffix(".pid")
        with contextlib.suppress(OSError):
            os.unlink(d.socket)
        argv = ["qemu-nbd", "--fork", "--pid-file", str(pid_file), "--read-only", "--persistent", "--shared=8",
                "-f", "qcow2", "-x", d.target, "--socket", d.socket, d.image]
        try:
            # --fork: qemu-nbd's parent exits once the server listens (its errors on stderr); the
            # server, in its own session, keeps the lock's file description open: fd passed on.
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, pass_fds=(fd,),
                               start_new_session=True, timeout=60)
        except FileNotFoundError as e:
            raise ToolError("qemu-nbd is not installed", "run scripts/setup") from e
        if p.returncode != 0:
            lines = (p.stderr or "").strip().splitlines()
            raise ToolError(f"qemu-nbd cannot serve {d.image}: {lines[-1] if lines else f'exit {p.returncode}'}")
        pid = int(pid_file.read_text().strip())
    finally:
        os.close(fd)  # the server holds the lock now
    if not lock.holds(d.lock, pid):
        raise ToolError(f"qemu-nbd for disk {d.target} (pid {pid}) is not running")
    os.chown(d.socket, 0, gid)
    os.chmod(d.socket, 0o660)
    return pid


def stop(d: ServedDisk) -> None:
    """Stop the disk's qemu-nbd if it is proven ours; wait until it has let go of its lock."""
    if d.pid is None:
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not lock.signal_holder(d.lock, d.pid, signum):
            return  # not running (or not provably ours): nothing to signal
        deadline = time.monotonic() + STOP_WAIT
        while lock.holds(d.lock, d.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return
    raise ToolError(f"qemu-nbd (pid {d.pid}) serving disk {d.target} does not stop")


def tear_down(repository: Repository, rec: Record) -> None:
    """Stop every server of the record, remove its socket directory, then the record."""
    for d in rec.disks.values():
        stop(d)
    rd = pathlib.Path(rec.run_dir)
    if rd.parent == RUN_ROOT:  # never anything else
        shutil.rmtree(rd, ignore_errors=True)
    remove(repository, rec.vm, rec.name)


# -- who uses which points -------------------------------------------------------------------

def _gone(rec: Record, conns: dict) -> bool | None:
    """The record's domain no longer exists (True), exists (False), or libvirt cannot say (None)."""
    try:
        conn = conns.get(rec.uri)
        if conn is None:
            conn = conns[rec.uri] = Connection(rec.uri)
        if not conn.has_domain(rec.name):
            return True
        return conn.domain(rec.name).uuid() != rec.uuid
    except Error as e:
        log.warning("cannot tell whether instant VM %r still exists: %s", rec.name, e)
        return None


def in_use(repository: Repository, vm: str, clean: bool = False) -> list[Record]:
    """The records of the instant domains that read ``vm``'s points now. ``clean``: a record
    whose domain is gone is torn down (its servers stopped, proven ours) and left out. A
    domain libvirt cannot be asked about counts as in use."""
    out = []
    conns: dict = {}
    try:
        for rec in records(repository, vm):
            if _gone(rec, conns):
                if clean:
                    log.warning("instant VM %r is gone: its NBD servers and record are removed", rec.name)
                    tear_down(repository, rec)
                continue
            out.append(rec)
    finally:
        for c in conns.values():
            c.close()
    return out


def refuse_removal(repository: Repository, vm: str, remove_points) -> None:
    """StateError naming the instant domain when one of ``remove_points`` is read by one."""
    remove_points = set(remove_points)
    for rec in in_use(repository, vm, clean=True):
        held = [p for p in rec.points if p in remove_points]
        if held:
            raise StateError(f"point(s) {', '.join(held)} of VM {vm!r} are in use by instant VM {rec.name!r} "
                             f"(restore --instant); prune removes nothing",
                             f"finalize it first: libvbackup finalize {rec.name}")
