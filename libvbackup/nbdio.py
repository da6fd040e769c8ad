"""The copy engine; the only module that imports libnbd (``nbd``).

A copy runs one event loop over the connections to the source (libvirt's pull export, or
qemu-nbd serving a chain for a restore, started by libnbd through socket activation so no
socket file of ours exists and the server dies with the handle) and writes into a
``target.Target``: an image file, not another NBD server.

Work goes range by range, as nbdcopy does: block status is asked for the next range only
when the queue of requests runs low, allocation and dirty-bitmap replies are merged
(``extents.merge``), and ``extents.plan`` turns them into reads and zero ranges, in whole
clusters of the target. Reads are issued with up to ``max_inflight`` requests in flight per
connection into reused buffers; writer threads write and hash each completed read; zero
ranges are never read.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import select
import threading
from typing import Callable, Iterator

import nbd

from . import extents
from .errors import CopyError

log = logging.getLogger(__name__)

# Measured on a libvirt pull export (scripts/bench and the same export copied A/B): 1 MiB x 16
# in flight per connection, 2 connections, 2 writer threads; nbdcopy's 256 KiB x 64, 4
# connections or more writers were no faster here, within the noise.
REQUEST_SIZE = 1 << 20
MAX_INFLIGHT = 16
STATUS_RANGE = 1 << 30  # block status is asked for at most this much at a time
WRITERS = 2  # threads writing (and hashing) completed reads
CONNECTIONS = 2  # to one export, when it offers multi-conn

ProgressFn = Callable[[int], None]


@dataclasses.dataclass
class CopyStats:
    bytes_copied: int = 0
    bytes_zeroed: int = 0


def _err(what: str, e: Exception) -> CopyError:
    return CopyError(f"{what}: {e}")


def connect_export(socket: str, export: str, bitmap: str | None = None) -> "nbd.NBD":
    """Connect to a pull-mode export over a unix socket, with the block-status contexts."""
    h = nbd.NBD()
    h.set_handle_name(f"src-{export}")
    h.set_export_name(export)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if bitmap:
        h.add_meta_context(f"qemu:dirty-bitmap:{bitmap}")
    try:
        h.connect_unix(socket)
    except nbd.Error as e:
        raise _err(f"cannot connect to NBD export {export!r} on {socket}", e) from e
    if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        raise CopyError(f"NBD export {export!r} does not offer base:allocation")
    if bitmap and not h.can_meta_context(f"qemu:dirty-bitmap:{bitmap}"):
        raise CopyError(f"NBD export {export!r} does not offer dirty bitmap {bitmap!r}")
    return h


def more_connections(h: "nbd.NBD", socket: str, export: str, bitmap: str | None, n: int) -> list:
    """Up to ``n`` more connections to the export of ``h``, when the server offers multi-conn
    (QEMU does for read-only exports: every connection sees the same data)."""
    if n <= 0 or not h.can_multi_conn():
        return []
    return [connect_export(socket, export, bitmap) for _ in range(n)]


def open_image(path: str, fmt: str = "qcow2", readonly: bool = False) -> "nbd.NBD":
    """Serve an image with qemu-nbd (socket activation) and connect to it."""
    argv = ["qemu-nbd", "-f", fmt, "--cache=writeback", "--aio=threads"]
    if readonly:
        argv.append("--read-only")
    argv.append(path)
    if not log.isEnabledFor(logging.DEBUG):
        # qemu-nbd reports a client's disconnect on stderr; our own error says what happened.
        # exec keeps the pid, which socket activation (LISTEN_PID) requires.
        argv = ["sh", "-c", 'exec "$0" "$@" 2>/dev/null', *argv]
    h = nbd.NBD()
    h.set_handle_name(f"dst-{path}")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    try:
        h.connect_systemd_socket_activation(argv)
    except nbd.Error as e:
        raise _err(f"cannot serve image {path} with qemu-nbd", e) from e
    return h


def size(h: "nbd.NBD") -> int:
    return h.get_size()


def close(h: "nbd.NBD", flush: bool = False) -> None:
    """Flush (when asked) and disconnect; a qemu-nbd child exits when the handle is freed.

    libnbd 1.14's Python handle has no close(): the C handle is closed (and a socket-activated
    qemu-nbd reaped) when the last reference goes.
    """
    try:
        if flush:
            h.flush()
        if not (h.aio_is_closed() or h.aio_is_dead()):
            h.shutdown()
    except nbd.Error as e:
        if flush:
            raise _err("flushing the backup image failed", e) from e
        log.debug("closing %s: %s", h.get_handle_name(), e)


def read_extents(
    h: "nbd.NBD", start: int, end: int, bitmap: str | None
) -> list[extents.Extent]:
    """Merged extents of [start, end): allocation, and dirtiness when ``bitmap`` is given."""
    out: list[extents.Extent] = []
    pos = start
    dirty_ctx = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
    while pos < end:
        replies: dict[str, list] = {}

        def cb(ctx: str, offset: int, entries: list, err) -> int:
            replies[ctx] = extents.from_entries(offset, entries)
            return 0

        try:
            h.block_status(min(end - pos, STATUS_RANGE), pos, cb)
        except nbd.Error as e:
            raise _err(f"block status at offset {pos} failed", e) from e
        alloc = replies.get(nbd.CONTEXT_BASE_ALLOCATION)
        if alloc is None:
            raise CopyError(f"the server sent no base:allocation status at offset {pos}")
        dirty = None
        if dirty_ctx:
            dirty = replies.get(dirty_ctx)
            if dirty is None:
                raise CopyError(f"the server sent no dirty-bitmap status at offset {pos}")
        got = extents.merge(pos, end, alloc, dirty)
        if not got:
            raise CopyError(f"the server described no extent at offset {pos}")
        out.extend(got)
        pos = got[-1].end
    return out


class _Loop:
    """Polls a set of handles (and a wake-up fd) once; raises CopyError when one has died."""

    def __init__(self, handles, wake_fd: int | None = None):
        self.handles = handles
        self.wake_fd = wake_fd

    def step(self, timeout_ms: int = 1000) -> None:
        p = select.poll()
        by_fd = {}
        for h in self.handles:
            if h.aio_is_dead() or h.aio_is_closed():
                raise CopyError(f"NBD connection {h.get_handle_name()} is closed")
            d = h.aio_get_direction()
            ev = 0
            if d & nbd.AIO_DIRECTION_READ:
                ev |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                ev |= select.POLLOUT
            if ev:
                fd = h.aio_get_fd()
                p.register(fd, ev)
                by_fd[fd] = h
        if self.wake_fd is not None:
            p.register(self.wake_fd, select.POLLIN)
        for fd, rev in p.poll(timeout_ms):
            if fd == self.wake_fd:
                os.eventfd_read(fd)
                continue
            h = by_fd[fd]
            if rev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            if rev & select.POLLOUT:
                h.aio_notify_write()


def _ops(src: "nbd.NBD", size_: int, bitmap: str | None, target_is_zero: bool,
         max_request: int, granularity: int = 1) -> Iterator[extents.Op]:
    pos = 0
    while pos < size_:
        end = min(size_, pos + STATUS_RANGE)
        exts = read_extents(src, pos, end, bitmap)
        yield from extents.plan(exts, target_is_zero=target_is_zero, max_request=max_request,
                                granularity=granularity)
        pos = exts[-1].end


def planned_bytes(src: "nbd.NBD", bitmap: str | None, target_is_zero: bool, granularity: int = 1) -> int:
    """How many bytes a copy will read or zero: a pass of block status only, O(1) memory.

    Gives progress a true total (the disk size would count holes and clean ranges).
    """
    return sum(op.length for op in _ops(src, src.get_size(), bitmap, target_is_zero, extents.MAX_ZERO,
                                        granularity))


class _Buffers:
    """Read buffers of ``size`` bytes, reused; libnbd reads into them without a copy."""

    def __init__(self, size: int):
        self.size = size
        self.free: list[tuple[bytearray, memoryview]] = []

    def get(self, length: int):
        if self.free:
            ba, mv = self.free.pop()
        else:
            ba = bytearray(self.size)
            mv = memoryview(ba)
        return ba, mv, nbd.Buffer.from_buffer(mv[:length])

    def put(self, ba: bytearray, mv: memoryview) -> None:
        self.free.append((ba, mv))


@dataclasses.dataclass
class _Item:
    kind: str  # "copy" (write then hash) or "hash" (hash only: a re-read block)
    offset: int
    length: int
    host: int  # where the data goes in the target file
    ba: bytearray
    mv: memoryview
    nbuf: object
    error: BaseException | None = None


def _writer(work: "queue.SimpleQueue", finished: collections.deque, wake: int, target, hasher) -> None:
    while True:
        item = work.get()
        if item is None:
            return
        try:
            data = item.mv[:item.length]
            if item.kind == "copy":
                target.pwrite(data, item.host)
                if hasher is not None:
                    hasher.data(item.offset, data)
            elif hasher is not None:
                hasher.set_block(item.offset, data)
        except BaseException as e:  # noqa: BLE001 - reported by the loop
            item.error = e
        finished.append(item)
        os.eventfd_write(wake, 1)


def copy(
    src,
    target,
    *,
    bitmap: str | None = None,
    progress: ProgressFn | None = None,
    max_request: int = REQUEST_SIZE,
    max_inflight: int = MAX_INFLIGHT,
    writers: int = WRITERS,
    should_stop: Callable[[], bool] = lambda: False,
    hasher=None,
) -> CopyStats:
    """Make ``target`` (a ``target.Target``) equal to ``src`` wherever ``src`` is dirty
    (everywhere when no bitmap).

    ``src`` is a handle or a list of handles to one export (multi-conn): requests go round
    robin; block status comes from the first. Reads complete out of order into reused buffers
    and go to ``writers`` threads, which write them at the place the target chose and hash
    them; zero ranges are the target's business (metadata only for qcow2, nothing for a new raw
    file) and are never read. ``hasher`` (a ``checksum.BlockHasher``) is told of every
    operation; the blocks it could not hash from what was copied (partly dirty ones) are read
    from the export afterwards: the export is the point in time the image now holds.
    The target is finished (metadata, fsync) before this returns.
    """
    handles = list(src) if isinstance(src, (list, tuple)) else [src]
    size_ = handles[0].get_size()
    if target.size < size_:
        raise CopyError(f"target image is smaller ({target.size}) than the export ({size_})")
    stats = CopyStats()
    ops = _ops(handles[0], size_, bitmap, target.reads_as_zero, max_request, target.granularity)
    if hasher is not None:
        ops = _with_rereads(ops, hasher)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    work: queue.SimpleQueue = queue.SimpleQueue()
    finished: collections.deque = collections.deque()
    threads = [threading.Thread(target=_writer, args=(work, finished, wake, target, hasher),
                                name="nbd-writer", daemon=True) for _ in range(max(1, writers))]
    for t in threads:
        t.start()
    loop = _Loop(handles, wake)
    # One set of buffers for both passes; re-reads need a whole checksum block.
    buffers = _Buffers(max(max_request, hasher.block if hasher is not None else 0))
    try:
        _run(handles, loop, ops, target, hasher, stats, progress,
             max_inflight * len(handles), should_stop, work, finished, buffers)
        if hasher is not None:
            rereads = (extents.Op("hash", o, n) for o, n in hasher.finish())
            _run(handles, loop, rereads, target, hasher, stats, None,
                 max_inflight * len(handles), should_stop, work, finished, buffers)
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join(10)
        if not any(t.is_alive() for t in threads):
            os.close(wake)  # else a writer stuck in I/O may still signal it: leave it open
    target.finish()
    return stats


def _with_rereads(ops: Iterator[extents.Op], hasher) -> Iterator[extents.Op]:
    """The plan's operations, with the re-reads of partly dirty checksum blocks queued as soon
    as the hasher knows of them (they overlap the copy; the export does not change)."""
    for op in ops:
        yield op
        for offset, length in hasher.take_rereads():
            yield extents.Op("hash", offset, length)


def _run(handles, loop, ops, target, hasher, stats, progress, max_inflight, should_stop,
         work, finished, buffers: _Buffers) -> None:
    done: collections.deque = collections.deque()  # completed reads: (item, errno)
    inflight = 0
    exhausted = False
    turn = 0

    def on_read(item):
        def cb(err) -> int:
            done.append((item, err.value))
            return 1

        return cb

    while True:
        while not exhausted and inflight < max_inflight:
            op = next(ops, None)
            if op is None:
                exhausted = True
                break
            if op.kind == "zero":
                if hasher is not None:
                    hasher.issue(op.start, op.length)
                target.zero(op.start, op.length)
                if hasher is not None:
                    hasher.zero(op.start, op.length)
                stats.bytes_zeroed += op.length
                if progress:
                    progress(op.length)
                continue
            if op.length > buffers.size:
                raise CopyError(f"a request of {op.length} bytes exceeds the buffer size")
            host = 0
            if op.kind == "copy":
                if hasher is not None:
                    hasher.issue(op.start, op.length)
                host = target.place(op.start, op.length)
            ba, mv, nbuf = buffers.get(op.length)
            item = _Item(op.kind, op.start, op.length, host, ba, mv, nbuf)
            h = handles[turn % len(handles)]
            turn += 1
            try:
                h.aio_pread(nbuf, op.start, on_read(item))
            except nbd.Error as e:
                raise _err(f"queueing a read at offset {op.start} failed", e) from e
            inflight += 1
        if inflight == 0 and exhausted:
            return
        if should_stop():
            raise CopyError("copy stopped")
        loop.step()
        while done:
            item, errno = done.popleft()
            if errno:
                raise CopyError(f"reading the export at offset {item.offset} failed: {_strerror(errno)}")
            work.put(item)
        while finished:
            item = finished.popleft()
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


def _strerror(errno: int) -> str:
    return os.strerror(errno)


def pread(h: "nbd.NBD", length: int, offset: int) -> bytes:
    try:
        return h.pread(length, offset)
    except nbd.Error as e:
        raise _err(f"reading offset {offset} failed", e) from e


def read_blocks(h: "nbd.NBD", block: int, chunk: int = 4 << 20) -> Iterator[tuple[int, int, bytes | None]]:
    """Every block of the export in order: ``(offset, length, data)``, data None for zeroes.

    Blocks that block status reports entirely as zero are not read; runs of other blocks are
    read ``chunk`` bytes at a time. Status is asked for whole multiples of ``block``
    (``read_extents`` covers its range exactly), so no block straddles two replies.
    """
    size_ = h.get_size()
    step = max(block, STATUS_RANGE // block * block)
    per_read = max(1, chunk // block)
    for pos in range(0, size_, step):
        end = min(size_, pos + step)
        exts = read_extents(h, pos, end, None)
        i = 0
        run: list[tuple[int, int]] = []  # blocks to read, consecutive

        def flush():
            first, last = run[0][0], run[-1][0] + run[-1][1]
            data = pread(h, last - first, first)
            for off, length in run:
                yield off, length, data[off - first:off - first + length]
            run.clear()

        for off in range(pos, end, block):
            length = min(block, end - off)
            while exts[i].end <= off:
                i += 1
            j = i
            zero = True
            while j < len(exts) and exts[j].start < off + length:
                zero = zero and exts[j].zero
                j += 1
            if zero:
                if run:
                    yield from flush()
                yield off, length, None
                continue
            run.append((off, length))
            if len(run) == per_read:
                yield from flush()
        if run:
            yield from flush()
