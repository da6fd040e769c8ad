"""A worker of ``libvbackup serve`` becomes the command that asked for it, then runs it.

Forked from the server (which has closed what was its own in the child), it dies with the
server, leaves the server's session, takes the command's standard streams, working directory,
umask, nice value, environment and arguments, and runs ``main.main`` as the command would have:
it ends in ``os._exit`` with the command's status.
"""

from __future__ import annotations

import os
import signal
import sys


def become(request: dict, fds: list[int], server: int) -> None:
    """``fds``: the command's streams (``request["streams"]``), then its working directory."""
    from . import resident

    resident._in_worker = True
    _die_with(server)
    os.setsid()  # no controlling terminal (the server's, if it was started from one), a group of its own
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    streams = request["streams"]
    for fd, target in zip(fds, streams):
        os.dup2(fd, target, inheritable=True)
    for target in {0, 1, 2} - set(streams):
        try:
            os.close(target)
        except OSError:
            pass
    os.fchdir(fds[len(streams)])
    for fd in fds:  # received without O_CLOEXEC: no child of the command may inherit them
        os.close(fd)
    os.umask(request["umask"])
    try:  # the command's nice value (raising one's priority takes privilege: then the server's)
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
    except OSError:
        pass
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    _new_streams(streams, bool(request["env"].get("PYTHONUNBUFFERED")))
    from .main import main

    main()


def _die_with(server: int) -> None:
    """PR_SET_PDEATHSIG: the worker is killed when the server ends."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != server:  # it ended before the call
        os._exit(1)


def _new_streams(streams: list[int], unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr on the client's descriptors, buffered as Python buffers them."""
    import io

    def text(fd: int, mode: str, old):
        if fd not in streams:
            return None
        raw = io.open(fd, mode + "b", buffering=0 if unbuffered and mode == "w" else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding=old.encoding if old else "utf-8",
                                errors=old.errors if old else "strict",
                                line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
                                write_through=unbuffered and mode == "w")

    sys.stdin = sys.__stdin__ = text(0, "r", sys.__stdin__)
    sys.stdout = sys.__stdout__ = text(1, "w", sys.__stdout__)
    sys.stderr = sys.__stderr__ = text(2, "w", sys.__stderr__)
