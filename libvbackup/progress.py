"""Progress of long copies: a live line on a terminal, periodic lines for logs, one JSON object
per line for a program, typed events for a caller of the API, or nothing.

``mode``: ``bar``, ``plain``, ``none``, ``json`` (lines on the stream, see
``libvbackup/schemas/progress.json``) or a callable that receives ``results.ProgressEvent``
about every second per disk, and once more per disk at the end (phase ``done`` or ``failed``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Callable, TextIO

from .results import FORMAT_VERSION, ProgressEvent

MODES = ("bar", "plain", "none", "json")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Thread-safe byte counters per disk; ``mode`` is ``bar``, ``plain`` or ``none``."""

    def __init__(self, mode="none", stream: TextIO = sys.stderr, interval: float | None = None,
                 sink: Callable[[dict], None] | None = None, vm: str = "", phase: str = "copy"):
        self.on_event: Callable[[ProgressEvent], None] | None = None
        if callable(mode):
            self.on_event, mode = mode, "events"
        elif mode == "json":
            self.on_event = self._write_json
        self.mode = mode
        self.stream = stream
        self.vm, self.phase = vm, phase
        default = 0.5 if mode == "bar" else 1.0 if self.on_event else 10.0
        self.interval = interval if interval is not None else default
        self.sink = sink  # called about every second with the counters (for `libvbackup status`)
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def add(self, disk: str, total: int) -> None:
        with self._lock:
            self.totals[disk] = total
            self.done.setdefault(disk, 0)

    def advance(self, disk: str, n: int) -> None:
        with self._lock:
            self.done[disk] = self.done.get(disk, 0) + n

    def callback(self, disk: str):
        return lambda n: self.advance(disk, n)

    def line(self) -> str:
        with self._lock:
            done, total = sum(self.done.values()), sum(self.totals.values())
            parts = [f"{d} {100 * self.done[d] / t:.0f}%" if t else f"{d} nothing to copy"
                     for d, t in self.totals.items()]
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = done / elapsed
        eta = f", ETA {max(total - done, 0) / rate:.0f} s" if rate > 0 and total else ""
        return f"{_human(done)} of {_human(total)} done at {_human(rate)}/s{eta} [{', '.join(parts)}]"

    def snapshot(self) -> dict:
        with self._lock:
            return {"done": sum(self.done.values()), "total": sum(self.totals.values()),
                    "disks": {d: {"done": self.done[d], "total": t} for d, t in self.totals.items()}}

    @property
    def shown(self) -> bool:
        """Someone reads these counters (a bar, lines, events, the sink of ``status``): only then
        is a true total worth a pass of block status (50 ms for a map of 1 GiB of image)."""
        return self.mode != "none" or self.sink is not None

    def __enter__(self) -> "Progress":
        if self.shown:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            if self.mode == "bar":
                self.stream.write("\r\x1b[K")
            self.stream.flush()
        if self.on_event:
            self._emit("done" if exc_type is None else "failed")

    def events(self, phase: str) -> list[ProgressEvent]:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        with self._lock:
            return [ProgressEvent(self.vm, d, phase, self.done.get(d, 0), t, round(self.done.get(d, 0) / elapsed),
                                  round(elapsed, 3)) for d, t in self.totals.items()]

    def _emit(self, phase: str) -> None:
        for ev in self.events(phase):
            self.on_event(ev)

    def _write_json(self, ev: ProgressEvent) -> None:
        self.stream.write(json.dumps({"format_version": FORMAT_VERSION, **ev.to_dict()}) + "\n")
        self.stream.flush()

    def _run(self) -> None:
        tick = min(self.interval, 1.0) if self.sink else self.interval
        last_shown = time.monotonic()
        while not self._stop.wait(tick):
            if self.sink:
                self.sink(self.snapshot())
            if self.mode == "none" or time.monotonic() - last_shown < self.interval - 1e-3:
                continue
            last_shown = time.monotonic()
            if self.on_event:
                self._emit(self.phase)
                continue
            if self.mode == "bar":
                self.stream.write("\r\x1b[K" + self.line())
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()
