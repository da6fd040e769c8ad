"""Imports made in a thread while the command waits in a libvirt call.

``virDomainBackupBegin`` takes 40-100 ms here, and libvirt-python releases the GIL while it
waits; the modules that only the copy needs (libnbd's bindings, the engine, the qcow2 writer,
the digest extensions: 10-14 ms of a cold command's CPU) are imported in that time instead of
before it. Used as ``with Preload(names):`` around the call, which joins the thread on the
way out; an import that failed in the thread is made again by the caller's own ``import``
statement, which raises the real error where it is used.
"""

from __future__ import annotations

import importlib
import threading


class Preload:
    def __init__(self, names: tuple[str, ...]):
        self._thread = threading.Thread(target=self._run, args=(names,), name="preload", daemon=True)
        self._thread.start()

    @staticmethod
    def _run(names: tuple[str, ...]) -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - the caller's import raises it again
                return

    def join(self) -> None:
        self._thread.join()

    def __enter__(self) -> "Preload":
        return self

    def __exit__(self, *exc) -> None:
        self.join()
