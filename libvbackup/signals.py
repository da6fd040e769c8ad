"""Signals and the umask around a run: SIGINT/SIGTERM become an exception the run can clean up
after, and are held back while it does."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from .errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """SIGINT/SIGTERM raise Interrupted in the main thread, so the run can clean up.
    (In another thread of a program that embeds libvbackup, signals stay the program's.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[list]:
    """Hold SIGINT/SIGTERM while cleaning up; the caller re-raises what arrived."""
    got: list = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in _SIGNALS}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_umask_lock = threading.Lock()
_umask_holders = 0
_umask_saved = 0  # the umask before the first holder came in
_umask_held = 0  # the umask while there are holders: every holder's bits


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """At least ``mask`` as the process umask while any thread is inside (``libvbackup run``
    backs up several VMs at once in threads, and the umask is the process's): the first
    entrant sets it, a later one may only add bits (never, even for an instant, remove one),
    the last one out restores the old one."""
    global _umask_holders, _umask_saved, _umask_held
    with _umask_lock:
        if _umask_holders == 0:
            _umask_saved, _umask_held = os.umask(mask), mask
        elif mask & ~_umask_held:
            _umask_held |= mask
            os.umask(_umask_held)
        _umask_holders += 1
    try:
        yield
    finally:
        with _umask_lock:
            _umask_holders -= 1
            if _umask_holders == 0:
                os.umask(_umask_saved)
