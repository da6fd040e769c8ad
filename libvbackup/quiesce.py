"""Consistent points: the guest's file systems frozen through its agent while the job begins.

::

    plan (pure)      --quiesce auto|yes|no and the agent channel's state  ->  freeze or not, why
    guard            a child process that thaws the guest if this one dies (SIGKILL) while frozen
    journal          frozen=true is written before the freeze: the next run and abort thaw first
    freeze           virDomainFSFreeze, the agent's answer awaited 5 s at most (libvirt's own
                     default is to wait forever: virt.Domain.fs_freeze sets the domain's agent
                     timeout for the call)
    begin            virDomainBackupBegin: the point in time, job and checkpoint exist
    thaw             at once, in every path; retried, since a freeze that timed out may still land
    journal          frozen=false; the guard is told it is done

A guest left frozen is an outage, so there are three nets: the ``finally`` of this process
(errors, SIGINT, SIGTERM), the guard (this process killed), and the journal (both killed: the
next run or ``abort`` of the VM thaws before anything else). Thawing a guest that is not
frozen does nothing, so every net may act.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from typing import Callable

from .errors import Error, StateError, UsageError

log = logging.getLogger(__name__)

MODES = ("auto", "yes", "no")
THAW_DEADLINE = 20.0  # seconds of thaw attempts before the admin is told
GUARD_READY = 15.0


@dataclasses.dataclass(frozen=True)
class QuiescePlan:
    mode: str
    freeze: bool
    why_not: str | None = None  # why the point will be crash-consistent


def plan(vm: str, mode: str, agent_state: str | None) -> QuiescePlan:
    """Whether to freeze, from the channel state in the live domain XML (``domxml.agent_state``).
    ``yes`` without a connected agent is refused here, before anything exists."""
    if mode not in MODES:
        raise UsageError(f"unknown --quiesce {mode!r}; use one of {', '.join(MODES)}")
    if mode == "no":
        return QuiescePlan(mode, False, "--quiesce no")
    if agent_state == "connected":
        return QuiescePlan(mode, True)
    why = ("the VM has no guest agent channel (org.qemu.guest_agent.0)" if agent_state is None
           else "its guest agent is not connected (is qemu-guest-agent running in the guest?)")
    if mode == "yes":
        raise StateError(f"cannot quiesce VM {vm!r}: {why}",
                         "install and start qemu-guest-agent in the guest with a virtio channel "
                         "org.qemu.guest_agent.0, or use --quiesce auto")
    return QuiescePlan(mode, False, why)


class Freezer:
    """Freeze, run ``begin``, thaw: see the module docstring. After ``run``, ``consistency``
    is "quiesced" or "crash", ``frozen_seconds`` how long guest writes were held (freeze call
    to thaw answer), ``note`` why the point is only crash-consistent."""

    def __init__(self, dom, qplan: QuiescePlan, uri: str, on_frozen: Callable[[bool], None]):
        self._dom, self._plan, self._uri, self._on_frozen = dom, qplan, uri, on_frozen
        self.consistency = "crash"
        self.frozen_seconds: float | None = None
        self.note = qplan.why_not

    def run(self, begin: Callable[[], None]) -> None:
        if not self._plan.freeze:
            begin()  # (the result says why the point is crash-consistent; the CLI warns at the end)
            return
        guard = _Guard.start(self._uri, self._dom.name)
        self._on_frozen(True)  # recorded before the freeze has any effect
        t0 = time.monotonic()
        try:
            count = self._dom.fs_freeze()
        except StateError as e:
            self._after_failed_freeze(guard)
            if self._plan.mode == "yes":
                raise
            self.note = f"freezing failed: {e.message}"
            log.info("VM %r: the point will be crash-consistent only: %s", self._dom.name, self.note)
            begin()
            return
        try:
            begin()
        finally:
            self._thaw(guard)
            self.frozen_seconds = round(time.monotonic() - t0, 3)
        self.consistency = "quiesced"
        log.info("VM %r: %d file system(s) frozen for %.3f s", self._dom.name, count, self.frozen_seconds)

    def _after_failed_freeze(self, guard: "_Guard") -> None:
        """A freeze that timed out may still land (the agent answers late): thaw. An agent that
        is gone cannot have frozen anything on our behalf, nor thaw anything."""
        from .domxml import agent_state

        try:
            gone = agent_state(self._dom.xml()) != "connected"
        except Error:
            gone = False
        if gone:
            self._on_frozen(False)
            guard.done()
            return
        self._thaw(guard)

    def _thaw(self, guard: "_Guard | None") -> None:
        thaw(self._dom)  # raises with the VM still frozen: journal and guard stay armed
        self._on_frozen(False)
        if guard is not None:
            guard.done()


def thaw(dom, deadline: float | None = None) -> None:
    """Thaw the guest, retrying: an agent busy with a freeze that timed out answers later."""
    end = time.monotonic() + (THAW_DEADLINE if deadline is None else deadline)
    while True:
        try:
            dom.fs_thaw()
            return
        except StateError as e:
            if time.monotonic() > end or not _running(dom):
                if not _running(dom):
                    return  # QEMU is gone: nothing is frozen any more
                raise StateError(f"VM {dom.name!r} may still be frozen: {e.message}",
                                 f"thaw it now: virsh domfsthaw {dom.name}; then libvbackup abort "
                                 f"{dom.name}") from e
            time.sleep(0.5)


def _running(dom) -> bool:
    try:
        return dom.is_running()
    except Error:
        return True


class _Guard:
    """A child process that thaws the VM if this process dies while it is frozen.

    It runs in a session of its own (a Ctrl-C to our terminal does not reach it), holds the
    read end of a pipe and thaws when the pipe closes without "done": the kernel closes it when
    we die, however we die. It is never signalled; it ends when told or after thawing.
    """

    def __init__(self, proc: subprocess.Popen | None):
        self._proc = proc

    @classmethod
    def start(cls, uri: str, vm: str) -> "_Guard":
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__, uri, vm], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        except OSError as e:
            log.warning("no thaw guard (%s): a killed run leaves the thaw to the next run", e)
            return cls(None)
        if not _ready(proc):
            log.warning("the thaw guard did not start: a killed run leaves the thaw to the next run")
            proc.kill()  # our own child, just started
            proc.wait()
            return cls(None)
        return cls(proc)

    def done(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.stdin.write(b"done\n")
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("the thaw guard (pid %d) did not end", self._proc.pid)
        self._proc = None


def _ready(proc: subprocess.Popen) -> bool:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], GUARD_READY)
    return bool(ready) and proc.stdout.readline() == b"ready\n"


def _guard_main(uri: str, vm: str) -> int:
    from .virt import Connection

    with Connection(uri) as conn:
        dom = conn.domain(vm)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.buffer.readline() == b"done\n":
            return 0
        try:
            thaw(dom, deadline=60.0)
        except Error:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(_guard_main(sys.argv[1], sys.argv[2]))
