"""The per-VM lock: one libvbackup operation per VM per repository, and the only source of truth
about whether that operation is still alive.

*The unlink race.* A lock file unlinked while held (as the first version did, so that no file
outlived the operation) breaks mutual exclusion: B opens the old file and waits, A unlinks it
and exits, B locks the nameless file while C creates a new one and locks that. Here the file is
created once and **never unlinked**; after taking the flock the path must still name the inode
locked (else start over), so two processes can never both hold a lock reachable by the path.

*Pid reuse.* A pid written in a file proves nothing: the process may be long dead and its pid
given to another, which ``abort`` would then SIGTERM. So **a run holds its lock for its whole
life; lock free = the run is dead**, and a pid is trusted only once the kernel shows that this
very process holds the lock now: ``/proc/locks`` names candidates (the pid that *took* a flock,
possibly dead after a fork), and :func:`holds` accepts a pid only if one of its descriptors is
the lock file's inode and its ``/proc/<pid>/fdinfo`` shows the exclusive flock on it.
:func:`signal_holder` closes the window between proof and signal with a pidfd. Nothing is
written into the lock file (taking the lock changes no file); a pid found there (older
versions wrote one) is one more candidate to verify, never an answer.

The descriptor is ``O_CLOEXEC``: programs we start (qemu-nbd, qemu-img) never inherit the
lock, or a leftover child would keep a dead run "alive". A flock belongs to an open file, so a
second ``VmLock`` in the same process (another thread) is refused like another process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator

from .errors import StateError

#: :func:`holder`'s answer when the lock is certainly held but the kernel does not let us prove
#: by whom (no access to /proc/locks or to the holder's /proc/<pid>/fdinfo, another pid
#: namespace, or the process that took the lock has exited and a forked child keeps it).
UNKNOWN_HOLDER = -1

PROC_LOCKS = "/proc/locks"

# Whether taking the lock found it busy for a moment only (a LOCK_SH probe, a holder that was
# just leaving): so many tries at most, this far apart.
_BUSY_RETRIES = 20
_BUSY_PAUSE = 0.001
# How often we start over because the path stopped naming the inode we had locked.
_REPLACED_RETRIES = 100

# "12: FLOCK  ADVISORY  WRITE 4048 fe:00:1450032 0 EOF"; a blocked waiter has "-> " before the
# type; in fdinfo the same text follows "lock:\t". Types: FLOCK, POSIX, OFDLCK, LEASE, DELEG...
_LOCK_LINE = re.compile(
    r"^(?:lock:\s*)?\d+:\s+(?P<waiter>->\s+)?(?P<type>\S+)\s+\S+\s+(?P<access>\S+)\s+"
    r"(?P<pid>-?\d+)\s+(?P<major>[0-9a-fA-F]+):(?P<minor>[0-9a-fA-F]+):(?P<ino>\d+)\s"
)


def _flock_writers(lines: Iterable[str], ino: int) -> list[tuple[int, int, int]]:
    """(pid, major, minor) of the granted exclusive flocks on inode ``ino`` in ``lines``.

    Skipped: blocked waiters (``->``, they hold nothing), POSIX/OFD locks and leases (not ours:
    VmLock only ever uses flock), and shared flocks (a LOCK_SH probe is not a holder).
    """
    found = []
    for line in lines:
        m = _LOCK_LINE.match(line)
        if (not m or m["waiter"] or m["type"] != "FLOCK" or m["access"] != "WRITE"
                or int(m["ino"]) != ino):
            continue
        found.append((int(m["pid"]), int(m["major"], 16), int(m["minor"], 16)))
    return found


def _read(path: str, limit: int = 1 << 24) -> str:
    """A whole (small, /proc) file as text, with plain syscalls: this runs on every refusal.
    O_NONBLOCK: a FIFO planted where the lock file should be must not hang ``status``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        chunks = []
        size = 0
        while size < limit:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
            size += len(b)
        return b"".join(chunks).decode("ascii", errors="replace")
    finally:
        os.close(fd)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def holds(path: str | os.PathLike[str], pid: int) -> bool:
    """True only if the kernel shows that process ``pid`` holds the exclusive flock on ``path``.

    Proof: ``pid`` has a descriptor whose file is the inode ``path`` names now, and that
    descriptor's ``/proc/<pid>/fdinfo`` lists a granted exclusive FLOCK on that inode. A pid read
    from a file, reused by an unrelated process, has no such descriptor, so it is never "proven".
    When the proof cannot be made (no such process, no permission to read its fdinfo, no /proc),
    the answer is False: this is the test to pass before signalling anything.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        want = _ident(os.stat(path))
    except OSError:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if _ident(os.stat(f"{fd_dir}/{fd}")) != want:
                continue
            info = _read(f"/proc/{pid}/fdinfo/{fd}")
            # The fd may have been closed and reused in between: the lock line names its inode,
            # and the fd must still be that file after we read it.
            if (_flock_writers(info.splitlines(), want[1])
                    and _ident(os.stat(f"{fd_dir}/{fd}")) == want):
                return True
        except OSError:
            continue
    return False


def _recorded_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid the holder wrote into the lock file: a hint to verify, never an answer."""
    try:
        pid = int(_read(os.fspath(path), limit=64)[:64].strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _probe_busy(path: str | os.PathLike[str]) -> bool | None:
    """Whether the lock is held, by trying LOCK_SH on a separate open; None if we cannot open it.

    Only used when /proc/locks cannot be read. The probe itself holds a shared lock for a few
    microseconds; a VmLock.acquire() racing with it sees "busy, holder unknown" and retries.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # also releases the probe's shared lock
    return False


def holder(path: str | os.PathLike[str]) -> int | None:
    """The pid of the process holding the lock on ``path`` right now, proven by the kernel.

    * a pid > 0: that process holds it (:func:`holds` is true for it at the time of the call);
    * ``None``: nobody holds it (or the file does not exist) -- a run that wrote its pid
      somewhere is dead, whatever that pid names today;
    * :data:`UNKNOWN_HOLDER` (-1): it is held, but by whom cannot be proven (see there). Treat
      as "running", never signal it.

    Candidates come from the pid written in the file and from /proc/locks (granted exclusive
    FLOCKs on the path's device:inode); each is verified with :func:`holds`. If /proc/locks cannot
    be read, a non-blocking LOCK_SH on a separate open decides "held or not".
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    # Cheapest proof first: the pid the holder wrote, checked in its own fdinfo. /proc/locks is
    # one global list that every reader walks under the kernel's lock-list lock.
    recorded = _recorded_pid(path)
    if recorded is not None and holds(path, recorded):
        return recorded
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        entries = _flock_writers(_read(PROC_LOCKS).splitlines(), st.st_ino)
    except OSError:
        entries = None

    if entries is None:
        busy = _probe_busy(path)
        if not busy:
            return None
        return UNKNOWN_HOLDER

    exact = [pid for pid, ma, mi in entries if (ma, mi) == (major, minor)]
    # Same inode number, other device: either a file elsewhere, or a filesystem whose stat()
    # st_dev differs from the device /proc/locks prints (btrfs subvolumes, some overlays).
    other = [pid for pid, ma, mi in entries if (ma, mi) != (major, minor)]
    for pid in dict.fromkeys(p for p in exact + other if p != recorded):
        if holds(path, pid):
            return pid
    if exact:
        return UNKNOWN_HOLDER
    if other and _probe_busy(path):
        return UNKNOWN_HOLDER
    return None


def is_held(path: str | os.PathLike[str]) -> bool:
    """Whether any process (this one included) holds the lock on ``path`` right now."""
    return holder(path) is not None


def signal_holder(path: str | os.PathLike[str], pid: int, signum: int = signal.SIGTERM) -> bool:
    """Send ``signum`` to ``pid`` only if it is proven to hold the lock on ``path``.

    Returns whether the signal was sent. A pidfd is taken *before* the proof, so the process
    signalled is the one proven even if it exits and its pid is reused in between.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return False
    try:
        if not holds(path, pid):
            return False
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            return False
        return True
    finally:
        os.close(pidfd)


class VmLock:
    """An exclusive, non-blocking flock on a lock file that is never unlinked.

    ::

        with VmLock(repo_dir / vm / ".lock", vm=vm):
            ...                  # StateError on entry if another operation holds the VM

    Releasing closes the descriptor (that is what frees a flock); the file stays, mode 0600.
    It contains the pid of the last process that took the lock, for messages only. Keep the
    object referenced while the lock must be held: garbage-collecting it closes the descriptor.
    """

    def __init__(self, path: str | os.PathLike[str], vm: str | None = None) -> None:
        self.path = Path(path)
        self.vm = vm if vm is not None else self.path.parent.name
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        return self._fd

    def acquire(self) -> VmLock:
        """Take the lock or raise StateError naming the holder; returns self."""
        if self._fd is not None:
            raise StateError(f"VM {self.vm!r} is already locked by this VmLock ({self.path})")
        busy_tries = 0
        for _ in range(_REPLACED_RETRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StateError(f"lock file {self.path} is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    os.close(fd)
                    fd = -1
                    pid = holder(self.path)
                    if (pid is None or pid == UNKNOWN_HOLDER) and busy_tries < _BUSY_RETRIES:
                        # Freed meanwhile (or leaving while we looked), or only a LOCK_SH
                        # probe: try again for a few ms before calling it busy.
                        busy_tries += 1
                        time.sleep(_BUSY_PAUSE)
                        continue
                    raise self._busy_error(pid) from e
                # Someone may have removed or replaced the file between our open and our flock:
                # then a newcomer would lock the new file while we hold a nameless one.
                try:
                    now = os.stat(self.path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or _ident(now) != _ident(st):
                    os.close(fd)
                    fd = -1
                    continue
                if stat.S_IMODE(st.st_mode) != 0o600:
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, 0o600)
                # Nothing is written into the file: the kernel names the holder (holder()), and
                # taking the lock leaves the repository's files exactly as they were.
                self._fd, fd = fd, -1
                return self
            finally:
                if fd >= 0:
                    os.close(fd)
        raise StateError(f"lock file {self.path} of VM {self.vm!r} keeps being replaced",
                         hint="something other than libvbackup is removing it; find out what")

    def _busy_error(self, pid: int | None) -> StateError:
        if pid is not None and pid > 0:
            who = f"pid {pid}, this process" if pid == os.getpid() else f"pid {pid}"
        else:
            recorded = _recorded_pid(self.path)
            who = "a process that cannot be identified" + (
                f"; the lock file names pid {recorded}, unverified" if recorded else "")
        return StateError(
            f"another libvbackup operation ({who}) holds VM {self.vm!r} (lock {self.path})",
            hint="wait for it to finish, or stop it with 'libvbackup abort'",
        )

    def intact(self) -> bool:
        """Whether the path still names the inode we hold (False if not held)."""
        if self._fd is None:
            return False
        try:
            return _ident(os.stat(self.path, follow_symlinks=False)) == _ident(os.fstat(self._fd))
        except OSError:
            return False

    def release(self) -> None:
        """Free the lock by closing the descriptor. The file is left in place, never unlinked,
        empty (nothing is ever written into it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> VmLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"VmLock({str(self.path)!r}, vm={self.vm!r}, locked={self.locked})"


@contextlib.contextmanager
def vm_lock(path: str | os.PathLike[str], vm: str | None = None) -> Iterator[VmLock]:
    """``with vm_lock(path, vm):`` -- the same as ``with VmLock(path, vm):``."""
    with VmLock(path, vm) as lk:
        yield lk
