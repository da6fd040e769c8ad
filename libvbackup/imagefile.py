"""A qcow2 image (its own layer, or its whole chain) read straight from its files: a source for
the copy engine.

Push checksums and verify read what one image holds itself. Through qemu-nbd that costs a
round trip per request and a copy through a socket (1 GiB from tmpfs: 0.6-1.0 s here); read
from the file it is a ``pread`` (0.2-0.3 s). The extents come from ``qemu-img map`` (read line
by line as the copy advances, so memory follows the window, not the image): for each range its
depth in the chain, whether it holds data and where in the file. A read of a range the map
showed as this image's data is a ``pread`` at that place, in a worker thread; anything else
(a block partly in the backing file, re-read for its digest) is read through qemu-nbd.

Data the map shows without a place in the file (compressed clusters: ``pull --compress``;
``qemu-img map`` of QEMU 7.2 gives them ``data: true`` and no ``offset``) is read through
qemu-nbd like any other range it does not cover: QEMU inflates it. ``qcow2map.own_map`` leaves
such an image to ``qemu-img map``.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import json
import mmap
import os
import select
import subprocess
import threading

from . import nbdio, qcow2map
from .errors import CopyError, ToolError
from .extents import Extent

THREADS = 4
REQUEST_SIZE = 1 << 20
MAP_WINDOW = 32 << 20
KEEP = 4096  # data extents kept for reads; older ones (64 MiB behind the map) are dropped:
KEEP_BYTES = 64 << 20  # a read the list no longer covers goes through qemu-nbd, still right


class _Done:
    """What a completion callback receives (libnbd passes an object with ``value``: errno)."""

    def __init__(self, value: int):
        self.value = value


def wait_wake(wake_fd: int | None, timeout_ms: int) -> None:
    """``step`` of a source whose reads complete in threads: wait until one signals ``wake_fd``
    (an eventfd), or ``timeout_ms``."""
    p = select.poll()
    if wake_fd is not None:
        p.register(wake_fd, select.POLLIN)
    for fd, _ev in p.poll(timeout_ms):
        os.eventfd_read(fd)


class FileSource:
    """``own_layer``: the ranges this image holds itself are the dirty ones (else every range
    counts, and what the image does not hold reads as zeroes: an image without backing).
    ``chain``: the image's whole backing chain is read (a restore), each range from the file
    that holds it: ``chain`` lists the files, the image first, as ``qemu-img map`` counts depth."""

    def __init__(self, path: str, size: int, own_layer: bool = False, chain: list[str] | None = None,
                 mapped: bool = False):
        if own_layer and chain:
            raise ValueError("own_layer and chain exclude each other")
        self.path = path
        self.size = size
        self.own_layer = own_layer
        self.chain_files = list(chain or [])
        self.name = f"image {path}"
        self.request_size = REQUEST_SIZE
        self.handles = [None]  # one "connection" for the engine: MAX_INFLIGHT reads, THREADS at a time
        self.fds: list[int] = []
        for f in self.chain_files or [path]:
            try:
                self.fds.append(os.open(f, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                for fd in self.fds:
                    os.close(fd)
                raise CopyError(f"cannot open {f}: {e.strerror}") from e
        self.fd = self.fds[0]
        self._pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="image-read")
        self._wake: int | None = None
        self._map: subprocess.Popen | None = None
        self._own = None  # the own layer mapped from the image's tables (qcow2map.own_map)
        self._first: dict | None = None
        self._pos = 0  # the map has been read up to here
        self._carry: dict | None = None  # a map entry read but not used up
        self._starts: list[int] = []  # data extents of this image, by guest start
        self._ends: list[int] = []
        self._hosts: list[int] = []
        self._files: list[int] = []  # which of ``fds`` (depth in the chain)
        self._lock = threading.Lock()
        self._chain: nbdio.Source | None = None  # for reads the map does not cover
        self._remembered: dict[tuple[int, int], list[Extent]] = {}
        self._remembered_count = 0
        # ``mapped``: ``view`` serves this image's data from a read-only map of the file, no copy
        # (a digest pass over a pushed image: 0.12 s per GiB from the page cache, against 0.18 s
        # for pread into a buffer). Only for a file no one else changes while it is read: a
        # mapped file cut short under the reader kills it (SIGBUS), so ranges past the size the
        # file had when mapped are never viewed. A window of MAP_WINDOW bytes is mapped at a time:
        # mapped pages count in the process's RSS (1.3 GiB for a 1 GiB image mapped whole).
        self.mapped = mapped
        self._maps: dict[int, tuple[int, mmap.mmap]] = {}  # fd -> (file offset, its window)

    # -- the engine's source interface ---------------------------------------------------

    def bind(self, wake_fd: int) -> None:
        self._wake = wake_fd

    @staticmethod
    def buffer(view: memoryview) -> memoryview:
        return view

    def extents(self, start: int, end: int, remember: bool = False) -> list[Extent]:
        """As ``nbdio.Source.extents``; the ranges are asked for in order (a new pass from an
        earlier offset starts ``qemu-img map`` again)."""
        got = self._remembered.pop((start, end), None)
        if got is not None:
            self._remembered_count -= len(got)
            return got
        got = self._ask(start, end)
        if remember and self._remembered_count + len(got) <= nbdio.REMEMBER:
            self._remembered[(start, end)] = got
            self._remembered_count += len(got)
        return got

    def _ask(self, start: int, end: int) -> list[Extent]:
        if start != self._pos or (self._map is None and self._own is None):
            self._restart(start)
        out: list[Extent] = []
        while self._pos < end:
            e = self._carry or self._next_entry()
            self._carry = None
            e_start, e_end = max(e["start"], self._pos), e["start"] + e["length"]
            stop = min(e_end, end)
            if stop < e_end:
                self._carry = e
            if e_start < stop:
                out.append(self._extent(e, e_start, stop))
            self._pos = stop
        return out

    def _extent(self, e: dict, start: int, stop: int) -> Extent:
        depth = e.get("depth", 0)
        own = e.get("present", False) and (depth == 0 or bool(self.chain_files))
        data = bool(e.get("data"))
        if data and own and "offset" in e:  # else compressed: read through qemu-nbd
            if depth >= len(self.fds):
                raise CopyError(f"{self.path}: qemu-img map shows data at depth {depth} of a chain of "
                                f"{len(self.fds)} files")
            with self._lock:
                if len(self._starts) >= KEEP:  # reads lag the map by the requests in flight
                    cut = bisect.bisect_left(self._ends, start - KEEP_BYTES)
                    del self._starts[:cut], self._ends[:cut], self._hosts[:cut], self._files[:cut]
                self._starts.append(start)
                self._ends.append(stop)
                self._hosts.append(e["offset"] + start - e["start"])
                self._files.append(depth)
        if self.own_layer:
            return Extent(start, stop - start, zero=not data, dirty=own)
        return Extent(start, stop - start, zero=not (data and own), dirty=True)

    def _restart(self, start: int) -> None:
        self._stop_map()
        self._pos = start
        self._carry = None
        with self._lock:
            self._starts.clear(), self._ends.clear(), self._hosts.clear(), self._files.clear()
        if not self.chain_files:
            # A small own layer is mapped here from its L1/L2 tables: no process to start
            # (a qemu-img map per layer was most of a 60-point verify).
            try:
                self._own = qcow2map.own_map(lambda n, off: os.pread(self.fd, n, off), start)
                self._first = next(self._own, None)
                return
            except qcow2map.Unsupported:
                self._own = None
            except OSError as e:
                raise CopyError(f"cannot read {self.path}: {e.strerror}") from e
        try:
            # The image alone, its backing file not opened: "present" is then its own layer,
            # and a chain of 60 images costs 60 opens to map, not 60 x 30.
            alone = "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                          "file": {"driver": "file", "filename": self.path}})
            what = self.path if self.chain_files else alone
            self._map = subprocess.Popen(["qemu-img", "map", "--output=json", "--start-offset", str(start), what],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise ToolError(f"qemu-img is not installed: {e.strerror}", "run scripts/setup") from e
        self._pos = start
        self._carry = None
        with self._lock:
            self._starts.clear(), self._ends.clear(), self._hosts.clear(), self._files.clear()

    def _next_entry(self) -> dict:
        if self._own is not None:
            e = self._first if self._first is not None else next(self._own, None)
            self._first = None
            if e is None:
                raise CopyError(f"the map of {self.path} ended at offset {self._pos}")
            return e
        line = self._map.stdout.readline()
        text = line.strip().lstrip("[").rstrip("]").rstrip(",").strip()
        if not text:
            err = self._map.stderr.read().strip().splitlines()
            raise ToolError(f"qemu-img map {self.path} ended at offset {self._pos}: "
                            f"{err[-1] if err else 'no more extents'}")
        return json.loads(text)

    def aio_pread(self, buf: memoryview, offset: int, cb, conn: int = 0) -> None:
        self._pool.submit(self._read, buf, offset, cb)

    def _read(self, buf: memoryview, offset: int, cb) -> None:
        err = 0
        try:
            segments = self._segments(offset, len(buf))
            if segments is None:
                self._chain_pread(buf, offset)
            else:
                for at, n, host, fd in segments:
                    view = buf[at - offset:at - offset + n]
                    got = os.preadv(fd, [view], host)
                    while got < n:
                        more = os.preadv(fd, [view[got:]], host + got)
                        if more == 0:
                            raise OSError(5, "short read")
                        got += more
        except OSError as e:
            err = e.errno or 5
        except Exception:  # noqa: BLE001 - reported as an I/O error of this read
            err = 5
        cb(_Done(err))
        if self._wake is not None:
            os.eventfd_write(self._wake, 1)

    def _segments(self, offset: int, length: int) -> list[tuple[int, int, int, int]] | None:
        """(guest offset, length, file offset, fd) pieces of a range made of data the map
        showed, or None when some of it is not."""
        end = offset + length
        out = []
        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            pos = offset
            while pos < end:
                if i < 0 or i >= len(self._starts) or not self._starts[i] <= pos < self._ends[i]:
                    return None
                n = min(end, self._ends[i]) - pos
                out.append((pos, n, self._hosts[i] + pos - self._starts[i], self.fds[self._files[i]]))
                pos += n
                i += 1
        return out

    def _chain_pread(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            if self._chain is None:
                self._chain = nbdio.image(self.path, connections=1)
            chain = self._chain
        buf[:] = chain.pread(len(buf), offset)

    def view(self, offset: int, length: int) -> memoryview | None:
        """The bytes of a range the map showed as data in one piece of one file, without a copy
        (``mapped`` sources); None otherwise (read it with ``pread``)."""
        if not self.mapped:
            return None
        segments = self._segments(offset, length)
        if segments is None or len(segments) != 1:
            return None
        _at, n, host, fd = segments[0]
        start, m = self._maps.get(fd, (0, None))
        if m is None or not start <= host or host + n > start + len(m):
            if m is not None:
                m.close()  # the engine released its last view of it
                del self._maps[fd]
            size = os.fstat(fd).st_size
            start = host // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            length = min(size - start, max(MAP_WINDOW, host + n - start))
            if length <= 0 or host + n > start + length:
                return None
            m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
            m.madvise(mmap.MADV_SEQUENTIAL)
            self._maps[fd] = (start, m)
        return memoryview(m)[host - start:host - start + n]

    def step(self, wake_fd: int | None = None, timeout_ms: int = 1000) -> None:
        wait_wake(wake_fd, timeout_ms)

    def pread(self, length: int, offset: int) -> bytes:
        buf = memoryview(bytearray(length))
        done = []
        self._read(buf, offset, lambda e: done.append(e.value))
        if done[0]:
            raise CopyError(f"reading {self.name} at offset {offset} failed: {os.strerror(done[0])}")
        return bytes(buf)

    # -- the end ---------------------------------------------------------------------------

    def _stop_map(self) -> None:
        self._own = self._first = None
        if self._map is not None:
            if self._map.poll() is None:
                self._map.kill()  # our own child
            self._map.wait()
            self._map.stdout.close()
            self._map.stderr.close()
            self._map = None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stop_map()
        for _start, m in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still held: the map goes with it
                m.close()
        self._maps.clear()
        if self._chain is not None:
            self._chain.close()
            self._chain = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.fd = -1

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
