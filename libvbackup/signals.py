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


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
