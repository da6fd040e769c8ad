"""The per-VM lock (libvbackup.lock), with real processes and the real kernel: no mocks."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from libvbackup.errors import StateError
from libvbackup import lock as lock_mod
from libvbackup.lock import UNKNOWN_HOLDER, VmLock, holder, holds, is_held, signal_holder

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock + /proc")

# One contender in the race. argv: algorithm ("new" | "old"), lock path, work dir, start time,
# seconds to run. Prints {"ok": acquisitions, "overlap": times someone else was inside}.
WORKER = textwrap.dedent(r'''
    import contextlib, errno, fcntl, json, os, random, sys, time
    sys.path.insert(0, REPO_ROOT)
    from libvbackup.errors import StateError
    from libvbackup.lock import VmLock

    algo, lock_path, work = sys.argv[1:4]
    start, duration, backoff = map(float, sys.argv[4:7])
    marker = os.path.join(work, "inside")
    counter = os.path.join(work, "counter")

    @contextlib.contextmanager
    def old_lock(path):
        """COUNTER-EXAMPLE: the former Repository.lock, which unlinks the file while held."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise StateError("busy") from e
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        finally:
            os.close(fd)

    def critical_section():
        global overlap
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            mine = True
        except FileExistsError:
            overlap += 1          # someone else is inside "the" lock
            mine = False
        with open(counter) as f:  # non-atomic read-modify-write
            n = int(f.read() or 0)
        time.sleep(0.0002)
        with open(counter, "w") as f:
            f.write(str(n + 1))
        if mine:
            os.unlink(marker)

    ok = overlap = 0
    while time.time() < start:
        time.sleep(0.001)
    end = start + duration
    while time.time() < end:
        try:
            if algo == "old":
                with old_lock(lock_path):
                    critical_section()
            else:
                with VmLock(lock_path, vm="race"):
                    critical_section()
        except StateError:
            time.sleep(random.uniform(0, backoff))  # let the holder have a CPU
            continue
        ok += 1
    print(json.dumps({"ok": ok, "overlap": overlap}))
''').replace("REPO_ROOT", repr(str(REPO_ROOT)))

# Holds the lock until stdin closes (or it is killed). Prints "ready <pid>" once held.
# With "spawn-sleep", it first starts `sleep 30` with close_fds=False and prints its pid too.
HOLDER = textwrap.dedent(r'''
    import os, subprocess, sys
    sys.path.insert(0, REPO_ROOT)
    from libvbackup.lock import VmLock
    lk = VmLock(sys.argv[1], vm="web1").acquire()
    extra = ""
    if len(sys.argv) > 2 and sys.argv[2] == "spawn-sleep":
        extra = " %d" % subprocess.Popen(["sleep", "30"], close_fds=False).pid
    if len(sys.argv) > 2 and sys.argv[2] == "fork-and-exit":
        pid = os.fork()
        if pid == 0:             # the child shares the locked open file, no exec
            sys.stdin.read()
            os._exit(0)
        print("ready %d %d" % (os.getpid(), pid), flush=True)
        os._exit(0)              # the process that took the lock is gone; the child keeps it
    print("ready %d%s" % (os.getpid(), extra), flush=True)
    sys.stdin.read()
    lk.release()
''').replace("REPO_ROOT", repr(str(REPO_ROOT)))


# 16 contenders retrying after 0-5 ms for 1.2 s: a few hundred acquisitions even on 2 vCPUs
# (each refused attempt reads /proc/locks and /proc/<pid>/fdinfo, which is not free), and
# the old algorithm overlaps dozens of times under exactly the same load.
WORKERS = 16
DURATION = 1.2
BACKOFF = 0.005


def _start_holder(path: pathlib.Path, *args: str) -> tuple[subprocess.Popen, list[int]]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    assert line and line[0] == "ready", f"holder did not start: {line}"
    return p, [int(x) for x in line[1:]]


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=5)


def _race(tmp_path: pathlib.Path, algo: str, workers: int, duration: float) -> list[dict]:
    lock_dir = tmp_path / algo
    lock_dir.mkdir()
    lock_path = lock_dir / ".lock"  # on the test's filesystem, like a repository
    # The counter and the marker are only the referee: in tmpfs when there is one, so that the
    # critical section costs microseconds, not ext4 journal commits (more rounds per second).
    shm = pathlib.Path("/dev/shm")
    work = pathlib.Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else tmp_path))
    try:
        return _run_race(algo, lock_path, work, workers, duration)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_race(algo: str, lock_path: pathlib.Path, work: pathlib.Path, workers: int,
              duration: float) -> list[dict]:
    (work / "counter").write_text("0")
    start = time.time() + 1.0  # let every interpreter start before anyone competes
    argv = [sys.executable, "-c", WORKER, algo, str(lock_path), str(work),
            repr(start), repr(duration), repr(BACKOFF)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        results.append(json.loads(out))
    return results + [{"counter": int((work / "counter").read_text())}]


def test_race_many_processes_never_overlap(tmp_path):
    *results, final = _race(tmp_path, "new", workers=WORKERS, duration=DURATION)
    acquisitions = sum(r["ok"] for r in results)
    assert sum(r["overlap"] for r in results) == 0
    assert final["counter"] == acquisitions
    assert acquisitions > 100, "the race did not run enough rounds to mean anything"
    assert sum(1 for r in results if r["ok"]) > 1, "only one contender ever got the lock"
    # The lock file is still there (never unlinked) and free.
    lock_path = tmp_path / "new" / ".lock"
    assert lock_path.exists() and holder(lock_path) is None


def test_race_old_unlink_while_held_algorithm_does_overlap(tmp_path):
    """Counter-example: the same race with the former unlink-while-held lock lets two in."""
    *results, final = _race(tmp_path, "old", workers=WORKERS, duration=DURATION)
    acquisitions = sum(r["ok"] for r in results)
    overlaps = sum(r["overlap"] for r in results)
    assert overlaps > 0, f"expected the old algorithm to overlap ({acquisitions} acquisitions)"


def test_holder_is_the_child_then_none_after_exit(tmp_path):
    path = tmp_path / "web1" / ".lock"
    path.parent.mkdir()
    child, (pid,) = _start_holder(path)
    try:
        assert pid == child.pid
        assert holder(path) == child.pid
        assert holds(path, child.pid) and is_held(path)
        assert not holds(path, os.getpid())
        assert path.read_text() == ""  # the kernel names the holder; the file says nothing
        with pytest.raises(StateError) as e:
            VmLock(path, vm="web1").acquire()
        assert f"pid {child.pid}" in str(e.value) and "'web1'" in str(e.value)
        assert str(path) in str(e.value)
        child.stdin.close()
        child.wait(timeout=5)
    finally:
        _stop(child)
    assert holder(path) is None and not is_held(path)
    assert not holds(path, child.pid)
    with VmLock(path, vm="web1") as lk:
        assert holder(path) == os.getpid() and lk.intact()


def test_holder_none_after_sigkill_and_lock_reusable(tmp_path):
    path = tmp_path / ".lock"
    child, _ = _start_holder(path)
    try:
        assert holder(path) == child.pid
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=5)
    finally:
        _stop(child)
    path.write_text(f"{child.pid}\n")  # even a pid written there is no proof: the kernel decides
    assert holder(path) is None and not holds(path, child.pid)
    with VmLock(path):
        assert holds(path, os.getpid())


def test_written_pid_of_a_live_unrelated_process_is_not_a_holder(tmp_path):
    path = tmp_path / ".lock"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (sleeper.pid, os.getppid(), os.getpid()):
            path.write_text(f"{pid}\n")  # what a crashed run plus pid reuse look like
            assert holder(path) is None
            assert not is_held(path)
            assert not holds(path, pid)
            assert not signal_holder(path, pid, signal.SIGTERM)
        assert sleeper.poll() is None, "an unrelated process was signalled"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_signal_holder_signals_only_the_proven_holder(tmp_path):
    path = tmp_path / ".lock"
    child, _ = _start_holder(path)
    try:
        assert signal_holder(path, child.pid, signal.SIGTERM)
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        _stop(child)
    assert not signal_holder(path, child.pid, signal.SIGTERM)  # dead: no longer proven
    assert holder(path) is None


def test_children_started_by_the_holder_do_not_inherit_the_lock(tmp_path):
    """O_CLOEXEC: a qemu-nbd left behind must not keep a dead run "alive"."""
    path = tmp_path / ".lock"
    child, (pid, sleep_pid) = _start_holder(path, "spawn-sleep")
    try:
        assert holder(path) == pid
        assert not holds(path, sleep_pid)
        child.kill()
        child.wait(timeout=5)
        os.kill(sleep_pid, 0)  # the grandchild lives on...
        assert holder(path) is None  # ...without the lock
    finally:
        _stop(child)
        _kill_quietly(sleep_pid)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_forked_child_keeps_lock_after_the_locker_exits(tmp_path):
    """/proc/locks names the process that *took* a flock, even once it is gone; holder() does
    not believe it (fdinfo proof fails) and answers UNKNOWN_HOLDER: held, holder unproven."""
    path = tmp_path / ".lock"
    parent, (locker, forked) = _start_holder(path, "fork-and-exit")
    try:
        parent.wait(timeout=5)
        locks = [ln for ln in open("/proc/locks") if f":{os.stat(path).st_ino} " in ln]
        assert any(f" {locker} " in ln for ln in locks)  # the dead locker's pid, still listed
        assert holder(path) == UNKNOWN_HOLDER
        assert is_held(path)
        assert not holds(path, locker)
        assert holds(path, forked)  # the fdinfo proof works for the real holder
        with pytest.raises(StateError, match="cannot be identified"):
            VmLock(path).acquire()
    finally:
        parent.stdin.close()  # the forked child shares this pipe and exits on EOF
        _stop(parent)
        deadline = time.time() + 5
        while is_held(path) and time.time() < deadline:
            time.sleep(0.01)
        _kill_quietly(forked)
    assert holder(path) is None


def test_same_process_second_open_and_other_thread_are_refused(tmp_path):
    path = tmp_path / "db1" / ".lock"
    path.parent.mkdir()
    errors: list[BaseException] = []
    with VmLock(path) as first:
        assert first.vm == "db1"
        with pytest.raises(StateError) as e:
            VmLock(path).acquire()  # same thread, separate open
        assert f"pid {os.getpid()}, this process" in str(e.value)

        def other_thread() -> None:
            try:
                VmLock(path, vm="db1").acquire()
            except BaseException as exc:  # noqa: BLE001 - examined below
                errors.append(exc)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        with pytest.raises(StateError):
            first.acquire()  # the same object twice
    assert len(errors) == 1 and isinstance(errors[0], StateError)
    assert "'db1'" in str(errors[0])
    # Released: another open now succeeds.
    with VmLock(path):
        pass


def test_lock_file_survives_release_with_mode_0600(tmp_path):
    path = tmp_path / ".lock"
    old_umask = os.umask(0)
    try:
        lk = VmLock(path)
        with lk:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            ino = os.stat(path).st_ino
            fd = lk.fd
            assert fd is not None and os.get_inheritable(fd) is False
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not lk.locked and lk.fd is None
    finally:
        os.umask(old_umask)
    assert path.exists() and os.stat(path).st_ino == ino  # never unlinked, never replaced
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == ""  # taking the lock changes no file content
    assert holder(path) is None and not holds(path, os.getpid())
    with VmLock(path):
        assert os.stat(path).st_ino == ino


def test_replaced_lock_file_is_noticed(tmp_path):
    path = tmp_path / ".lock"
    with VmLock(path) as lk:
        assert lk.intact()
        os.rename(path, tmp_path / "moved")  # someone replaces the file under us
        path.write_text("")
        assert not lk.intact()
        assert holder(path) is None  # the file the path names now is not locked
    assert holder(tmp_path / "moved") is None


def test_missing_file_and_bogus_pids(tmp_path):
    path = tmp_path / "nothing"
    assert holder(path) is None and not is_held(path)
    for pid in (0, -1, True):
        assert not holds(path, pid)
    assert not holds(path, 2**22 + 12345)  # no such process


def test_without_proc_locks_a_probe_decides_held_or_free(tmp_path, monkeypatch):
    """/proc/locks unreadable: a LOCK_SH probe says "held" (UNKNOWN_HOLDER) or "free" (None);
    a pid found written in the file (older versions wrote one) is verified through its fdinfo."""
    monkeypatch.setattr(lock_mod, "PROC_LOCKS", str(tmp_path / "no-proc-locks"))
    path = tmp_path / ".lock"
    child, _ = _start_holder(path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert holder(path) == UNKNOWN_HOLDER  # held, by nobody we can prove
        path.write_text(f"{child.pid}\n")
        assert holder(path) == child.pid  # proven via /proc/<pid>/fdinfo alone
        path.write_text(f"{sleeper.pid}\n")  # a lie (or a reused pid) in the file
        assert holder(path) == UNKNOWN_HOLDER and is_held(path)
        assert not holds(path, sleeper.pid)
        with pytest.raises(StateError, match=f"names pid {sleeper.pid}, unverified"):
            VmLock(path).acquire()
        child.stdin.close()
        child.wait(timeout=5)
        assert holder(path) is None  # free, whatever the file says
    finally:
        _stop(child)
        sleeper.kill()
        sleeper.wait()
