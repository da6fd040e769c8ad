"""The copy engine: one source (``nbdio.Source``) into one target (``target.Target``).

Work goes range by range, as nbdcopy does: block status is asked for the next range only when
the queue of requests runs low, the source merges its contexts (``extents.merge``), and
``extents.plan`` turns them into reads and zero ranges, in whole clusters of the target. Reads
are issued with up to ``max_inflight`` requests in flight per connection into reused buffers;
writer threads write each completed read where the target placed it; zero ranges are never
read. An *observer* (``checksum.BlockHasher``) watches the copy: it is told of every operation
queued and completed, and may ask for ranges to be read again (blocks only partly dirty).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
from typing import Callable, Iterator, Protocol

from . import extents
from .errors import CopyError
from . import nbdio
from .nbdio import Source

# Measured on a libvirt pull export of 1 GiB (README, "Where the time goes, second session"; the
# engine in-process against nbdcopy on the same export, 5-7 alternating rounds, QEMU's CPU time
# read from /proc): 1 MiB requests cost QEMU's NBD server 0.75-0.79 s of CPU per GiB, 512 KiB
# ones 0.47-0.49 s (nbdcopy's 256 KiB: 0.56-0.67 s, and ours 0.55 s with more of our own);
# on 2 cores shared with QEMU that took the copy from 0.99-1.04 s to 0.82 s. 32 in flight per
# connection keeps the 32 MiB in flight of before; 2 connections (1 and 4: no faster).
REQUEST_SIZE = 512 << 10  # unless the source prefers another (Source.request_size)
MAX_INFLIGHT = 32
# Threads writing (and hashing) completed reads. On 2 cores shared with QEMU one is faster
# (CLI, 7 alternating rounds: 1.015 s against 1.055 s per GiB; in-process 0.76 against 0.82 s,
# less system time); with more cores a second one overlaps writes that block.
WRITERS = 1 if (os.cpu_count() or 1) <= 2 else 2

ProgressFn = Callable[[int], None]


@dataclasses.dataclass
class CopyStats:
    bytes_copied: int = 0
    bytes_zeroed: int = 0


class Observer(Protocol):
    """What watches a copy (the block hasher); operations are issued in offset order."""

    block: int  # re-reads are ranges of at most this size

    def issue(self, offset: int, length: int) -> None: ...
    def data(self, offset: int, data: memoryview) -> None: ...  # from writer threads
    def zero(self, offset: int, length: int) -> None: ...
    def set_block(self, offset: int, data: memoryview) -> None: ...  # a re-read range
    def take_rereads(self) -> list[tuple[int, int]]: ...
    def finish(self) -> list[tuple[int, int]]: ...



def _ops(src: Source, target_is_zero: bool, max_request: int, granularity: int = 1,
         remember: bool = False) -> Iterator[extents.Op]:
    pos = 0
    while pos < src.size:
        end = min(src.size, pos + nbdio.STATUS_RANGE)
        exts = src.extents(pos, end, remember)
        yield from extents.plan(exts, target_is_zero=target_is_zero, max_request=max_request,
                                granularity=granularity)
        pos = exts[-1].end


def planned_bytes(src: Source, target) -> int:
    """How many bytes a copy into ``target`` will read or zero: a pass of block status only,
    O(1) memory. Gives progress a true total (the disk size would count holes and clean ranges)."""
    return sum(op.length for op in _ops(src, target.reads_as_zero, extents.MAX_ZERO, target.granularity,
                                        remember=True))


class _Buffers:
    """Read buffers of ``size`` bytes, reused; libnbd reads into them without a copy."""

    def __init__(self, size: int, wrap):
        self.size = size
        self.wrap = wrap  # the source's buffer type (libnbd reads into an nbd.Buffer)
        self.free: list[tuple[bytearray, memoryview]] = []

    def get(self, length: int):
        if self.free:
            ba, mv = self.free.pop()
        else:
            with _SPARE_LOCK:
                spare = _SPARE.get(self.size)
                ba = spare.pop() if spare else bytearray(self.size)
            mv = memoryview(ba)
        return ba, mv, self.wrap(mv[:length])

    def put(self, ba: bytearray, mv: memoryview) -> None:
        self.free.append((ba, mv))

    def release(self) -> None:
        """Hand the buffers to the next copy (a verify of 60 layers allocated 1 MiB buffers
        332 times, 0.16 s, before they were kept)."""
        with _SPARE_LOCK:
            spare = _SPARE.setdefault(self.size, [])
            while self.free and len(spare) < SPARE_MAX:
                ba, mv = self.free.pop()
                mv.release()
                spare.append(ba)
        self.free.clear()


SPARE_MAX = 64  # buffers kept between copies, per size
_SPARE: dict[int, list[bytearray]] = {}
_SPARE_LOCK = threading.Lock()


@dataclasses.dataclass
class _Item:
    kind: str  # "copy" (write, then tell the observer) or "hash" (a re-read: observer only)
    offset: int
    length: int
    host: int  # where the data goes in the target file
    ba: bytearray
    mv: memoryview
    nbuf: object
    conn: int = 0  # the connection it was read on
    error: BaseException | None = None


def _writer(work: "queue.SimpleQueue", finished: collections.deque, wake: int, target, observer) -> None:
    while True:
        item = work.get()
        if item is None:
            return
        try:
            data = item.mv[:item.length]
            if item.kind == "copy":
                target.pwrite(data, item.host)
                if observer is not None:
                    observer.data(item.offset, data)
            elif observer is not None:
                observer.set_block(item.offset, data)
        except BaseException as e:  # noqa: BLE001 - reported by the loop
            item.error = e
        finished.append(item)
        os.eventfd_write(wake, 1)


def copy(
    src: Source,
    target,
    *,
    observer: Observer | None = None,
    progress: ProgressFn | None = None,
    max_request: int | None = None,
    max_inflight: int = MAX_INFLIGHT,
    writers: int = WRITERS,
    should_stop: Callable[[], bool] = lambda: False,
    on_source_done: Callable[[], None] | None = None,
) -> CopyStats:
    """Make ``target`` (a ``target.Target``) equal to ``src`` wherever ``src`` is dirty
    (everywhere when it has no dirty context), then finish it (metadata, fsync).

    Requests go round robin over the source's connections; block status comes from the
    first. Reads complete out of order into reused buffers and go to ``writers`` threads,
    which write them where the target placed them; zero ranges are the target's business
    (metadata only for qcow2, nothing for a new raw file) and are never read. The ``observer``
    is told of every operation; the ranges it asks for again (blocks it could not hash from
    what was copied) are read from the source during the copy and after it: the source is
    the point in time the target now holds. The caller opened ``target`` and closes it.
    ``on_source_done`` is called once nothing more will be read, before the target's metadata
    and fsync (a pull ends its backup job meanwhile).
    """
    if target.size < src.size:
        raise CopyError(f"target image is smaller ({target.size}) than the source ({src.size})")
    if isinstance(target, Discard) and observer is not None and getattr(src, "mapped", False):
        stats = _digest_views(src, target, observer, progress, should_stop)
        if on_source_done is not None:
            on_source_done()
        return stats
    stats = CopyStats()
    max_request = max_request or src.request_size or REQUEST_SIZE
    ops = _ops(src, target.reads_as_zero, max_request, target.granularity)
    if observer is not None:
        ops = _with_rereads(ops, observer)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    work: queue.SimpleQueue = queue.SimpleQueue()
    finished: collections.deque = collections.deque()
    threads = [threading.Thread(target=_writer, args=(work, finished, wake, target, observer),
                                name="nbd-writer", daemon=True) for _ in range(max(1, writers))]
    for t in threads:
        t.start()
    # One set of buffers for both passes; re-reads need a whole observer block.
    buffers = _Buffers(max(max_request, observer.block if observer is not None else 0), src.buffer)
    src.bind(wake)
    try:
        _run(src, wake, ops, target, observer, stats, progress, max_inflight, should_stop, work, finished, buffers)
        if observer is not None:
            rereads = (extents.Op("hash", o, n) for o, n in observer.finish())
            _run(src, wake, rereads, target, observer, stats, None, max_inflight, should_stop, work, finished,
                 buffers)
        if on_source_done is not None:  # every read is done: the source may go while the target finishes
            on_source_done()
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join(10)
        if not any(t.is_alive() for t in threads):
            os.close(wake)  # else a writer stuck in I/O may still signal it: leave it open
            buffers.release()
    target.finish()
    return stats


def _digest_views(src, target: "Discard", observer: Observer, progress: ProgressFn | None,
                  should_stop: Callable[[], bool]) -> CopyStats:
    """A copy into nothing that only feeds its observer, from a source that shows its data in
    place (``src.view``: a mapped image file): the operations in order, each hashed where it
    lies, in this thread; what the source cannot show is read with ``pread``. No buffers, no
    threads: for 1 GiB pushed into tmpfs, 0.35 s through the engine's reads, 0.21 s this way."""
    stats = CopyStats()
    max_request = src.request_size or REQUEST_SIZE
    for op in _ops(src, target.reads_as_zero, max_request, target.granularity):
        if should_stop():
            raise CopyError("copy stopped")
        observer.issue(op.start, op.length)
        if op.kind == "zero":
            observer.zero(op.start, op.length)
            stats.bytes_zeroed += op.length
        else:
            view = src.view(op.start, op.length)
            try:
                observer.data(op.start, view if view is not None else src.pread(op.length, op.start))
            finally:
                if view is not None:
                    view.release()
            stats.bytes_copied += op.length
        if progress:
            progress(op.length)
    for offset, length in observer.finish():
        observer.set_block(offset, src.pread(length, offset))
    return stats


def _with_rereads(ops: Iterator[extents.Op], observer: Observer) -> Iterator[extents.Op]:
    """The plan's operations, with the re-reads the observer asks for queued as soon as it
    knows of them (they overlap the copy; the source does not change)."""
    for op in ops:
        yield op
        for offset, length in observer.take_rereads():
            yield extents.Op("hash", offset, length)


def _run(src: Source, wake: int, ops, target, observer, stats, progress, max_inflight, should_stop,
         work, finished, buffers: _Buffers) -> None:
    """Issue ``ops``; each connection has at most ``max_inflight`` reads not yet written (a slow
    connection never takes the others' share: a read goes to the least busy one)."""
    done: collections.deque = collections.deque()  # completed reads: (item, errno)
    per_conn = [0] * len(src.handles)
    inflight = 0
    exhausted = False

    def on_read(item):
        def cb(err) -> int:
            done.append((item, err.value))
            return 1

        return cb

    while True:
        while not exhausted and min(per_conn) < max_inflight:
            op = next(ops, None)
            if op is None:
                exhausted = True
                break
            if op.kind == "zero":
                if observer is not None:
                    observer.issue(op.start, op.length)
                target.zero(op.start, op.length)
                if observer is not None:
                    observer.zero(op.start, op.length)
                stats.bytes_zeroed += op.length
                if progress:
                    progress(op.length)
                continue
            if op.length > buffers.size:
                raise CopyError(f"a request of {op.length} bytes exceeds the buffer size")
            host = 0
            if op.kind == "copy":
                if observer is not None:
                    observer.issue(op.start, op.length)
                host = target.place(op.start, op.length)
            ba, mv, nbuf = buffers.get(op.length)
            conn = per_conn.index(min(per_conn))
            item = _Item(op.kind, op.start, op.length, host, ba, mv, nbuf, conn)
            src.aio_pread(nbuf, op.start, on_read(item), conn)
            per_conn[conn] += 1
            inflight += 1
        if inflight == 0 and exhausted:
            return
        if should_stop():
            raise CopyError("copy stopped")
        if not done:
            # (A synchronous block status runs libnbd's state machine too: replies to reads in
            # flight may have completed during it, with nothing left on the socket to wake a poll.)
            src.step(wake)
        while done:
            item, errno = done.popleft()
            if errno:
                failure = getattr(src, "failure", None)  # a source that knows why (a sealed frame that fails)
                if failure is not None:
                    raise failure
                raise CopyError(f"reading {src.name} at offset {item.offset} failed: {os.strerror(errno)}")
            work.put(item)
        while finished:
            item = finished.popleft()
            per_conn[item.conn] -= 1
            inflight -= 1
            if item.error is not None:
                if isinstance(item.error, CopyError):
                    raise item.error
                raise CopyError(f"writing the image at offset {item.offset} failed: {item.error}") from item.error
            buffers.put(item.ba, item.mv)
            if item.kind == "copy":
                stats.bytes_copied += item.length
                if progress:
                    progress(item.length)


class Discard:
    """A target that keeps nothing: the copy only feeds its observer (verify, push checksums).

    ``reads_as_zero``: zero ranges need no operation (a full image's digests start as zeroes);
    False when the observer must see them (an image's own zero clusters hide its backing file).
    """

    granularity = 1

    def __init__(self, size: int, reads_as_zero: bool = True):
        self.size = size
        self.reads_as_zero = reads_as_zero

    def place(self, start: int, length: int) -> int:
        return 0

    def zero(self, start: int, length: int) -> None:
        pass

    def pwrite(self, data, offset: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass
