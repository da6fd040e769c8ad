"""Several copies at once, one thread each, with progress and a watchdog; the first failure
stops the others."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

from . import engine
from .errors import CopyError
from .progress import Progress

WATCH_INTERVAL = 0.5
STUCK_WAIT = 10.0  # an interrupted run waits this long for its copy threads, then cleans up


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    source: object  # nbdio.Source
    target: object  # target.Target (or engine.Discard)
    observer: object | None = None


def copy_all(jobs: list[Job], progress_mode: str = "none", watch: Callable[[], None] = lambda: None,
             sink: Callable[[dict], None] | None = None, vm: str = "",
             stall: float | None = None,
             on_sources_done: Callable[[], None] | None = None) -> dict[str, engine.CopyStats]:
    """Copy every job at once; ``watch`` is called every WATCH_INTERVAL and may raise to stop.

    Daemon threads with a bounded join: an interrupted run must clean up and exit even when
    a copy thread is stuck (a hung NBD server), instead of waiting for it forever. ``stall``:
    seconds without a single completed byte after which the copy fails (CopyError): a link or a
    server that stopped answering (libnbd has no timeout of its own for a request in flight).
    ``on_sources_done`` is called (from a copy thread) once every copy has read all it needs,
    while the images are still being finished.
    """
    stop = threading.Event()
    prog = Progress(progress_mode, sink=sink, vm=vm)
    results: dict[str, engine.CopyStats] = {}
    errors: list[BaseException] = []

    left = [len(jobs)]
    left_lock = threading.Lock()

    def source_done() -> None:
        with left_lock:
            left[0] -= 1
            last = left[0] == 0
        if last and on_sources_done is not None:
            on_sources_done()

    def one(job: Job) -> None:
        try:
            results[job.name] = engine.copy(job.source, job.target, observer=job.observer,
                                            progress=prog.callback(job.name), should_stop=stop.is_set,
                                            on_source_done=source_done)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            if not stop.is_set():
                errors.append(e)
            stop.set()

    for job in jobs:
        prog.add(job.name, engine.planned_bytes(job.source, job.target) if prog.shown else 0)
    threads = [threading.Thread(target=one, args=(job,), name=f"copy-{job.name}", daemon=True) for job in jobs]
    with prog:
        for t in threads:
            t.start()
        try:
            last = moved = time.monotonic()
            seen = -1
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
                    if time.monotonic() - last >= WATCH_INTERVAL:
                        last = time.monotonic()
                        watch()
                        done = prog.snapshot()["done"]
                        if done != seen:
                            seen, moved = done, last
                        elif stall is not None and last - moved > stall:
                            raise CopyError(f"no data came from the export for {stall:.0f} s: the network "
                                            "or the server stopped answering; the backup was abandoned")
        except BaseException:
            stop.set()
            deadline = time.monotonic() + STUCK_WAIT
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            raise
    if errors:
        raise errors[0]
    return results
