"""A point's qcow2 chain read from a bucket: a source for the copy engine.

The images are never downloaded whole. Each layer's own map comes from its L1/L2 tables
(``qcow2map.own_map``, reading the tables' frames only); the chain's map is the topmost layer
that holds each range, as ``qemu-img map`` of the chain would give it; a read is a ranged read
of the frames holding that range in the layer that holds it. ``own_layer``: one image alone,
its own ranges dirty, for verify.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import os
import zlib

from . import imagefile, qcow2map
from .errors import CopyError, Error
from .extents import Extent
from .offsite import RemoteFile

THREADS = 4
REQUEST_SIZE = 1 << 20
MAX_TABLES = 1 << 14  # L2 tables per image read from the bucket (64 KiB clusters: 8 TiB)


class _Done:
    def __init__(self, value: int):
        self.value = value


def _kind(r: dict) -> str:
    if "compressed" in r:
        return "compressed"
    return "data" if r["data"] else ("zero" if r["present"] else "none")


def _runs(layer: RemoteFile) -> list[tuple[int, int, str, object]]:
    try:
        return [(r["start"], r["start"] + r["length"], _kind(r), r.get("compressed", r.get("offset")))
                for r in qcow2map.own_map(layer.pread, 0, MAX_TABLES, compressed=True)]
    except qcow2map.Unsupported as e:
        raise CopyError(f"{layer.name} cannot be read from the bucket: {e}") from e
    except ValueError as e:
        raise CopyError(f"{layer.name} is not a readable qcow2 image: {e}") from e


def chain_map(layers: list[list[tuple[int, int, str, object]]], size: int) -> list[tuple[int, int, int, object]]:
    """(start, end, depth, host) of the chain, depth -1 for ranges that read as zeroes (pure).

    ``layers``: each layer's runs (start, end, kind, host), the top image first, kind "data",
    "zero" (reads as zeroes, hides what is below), "none" (not in this layer: look below) or
    "compressed" (one cluster; host: its descriptor). A compressed cluster's host in the map is
    (the cluster's guest start, its descriptor)."""
    cuts = sorted({0, size, *(b for runs in layers for r in runs for b in (r[0], r[1]) if 0 <= b <= size)})
    starts = [[r[0] for r in runs] for runs in layers]
    out: list[tuple[int, int, int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        depth, host = -1, 0
        for d, runs in enumerate(layers):
            i = bisect.bisect_right(starts[d], a) - 1
            if i < 0 or runs[i][1] <= a or runs[i][2] == "none":
                continue
            if runs[i][2] == "data":
                depth, host = d, runs[i][3] + a - runs[i][0]
            elif runs[i][2] == "compressed":
                depth, host = d, (runs[i][0], runs[i][3])
            break
        if out and out[-1][2] == depth and out[-1][1] == a and (
                depth < 0 or (out[-1][3] == host if isinstance(host, tuple) else
                              not isinstance(out[-1][3], tuple) and out[-1][3] + (a - out[-1][0]) == host)):
            out[-1] = (out[-1][0], b, depth, out[-1][3])
        else:
            out.append((a, b, depth, host))
    return out


def _inflate(data: bytes, method: str) -> bytes:
    """A compressed cluster's data (qcow2: raw deflate, or a zstd frame; what follows it in the
    sectors read is ignored)."""
    try:
        if method == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        return zlib.decompressobj(-12).decompress(data)
    except ImportError as e:
        raise CopyError("reading zstd clusters needs python3-zstandard", "run scripts/setup") from e
    except Exception as e:  # noqa: BLE001 - zlib.error, zstandard.ZstdError: damaged data
        raise CopyError(f"a compressed cluster does not inflate: {e}") from e


class RemoteSource:
    def __init__(self, layers: list[RemoteFile], size: int, own_layer: bool = False):
        self.layers = layers
        self.size = size
        self.own_layer = own_layer
        self.name = f"object {layers[0].name}"
        self.request_size = REQUEST_SIZE
        self.handles = [None]
        self._wake: int | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="s3-source")
        if own_layer:  # depth 0: data; -1: zeroes of its own; -2: not in this image
            self._map = [(a, b, {"data": 0, "compressed": 0, "zero": -1}.get(kind, -2),
                          (a, host) if kind == "compressed" else host or 0) for a, b, kind, host in _runs(layers[0])]
        else:
            self._map = chain_map([_runs(layer) for layer in layers], size)
        self._starts = [m[0] for m in self._map]

    # -- the engine's source interface ---------------------------------------------------
    def bind(self, wake_fd: int) -> None:
        self._wake = wake_fd

    @staticmethod
    def buffer(view: memoryview) -> memoryview:
        return view

    def extents(self, start: int, end: int, remember: bool = False) -> list[Extent]:
        out = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self._map) and self._map[i][0] < end:
            a, b, depth, _host = self._map[i]
            a, b = max(a, start), min(b, end)
            if a < b:
                out.append(Extent(a, b - a, zero=depth < 0, dirty=depth != -2))
            i += 1
        return out

    def aio_pread(self, buf: memoryview, offset: int, cb, conn: int = 0) -> None:
        self._pool.submit(self._read, buf, offset, cb)

    def _read(self, buf: memoryview, offset: int, cb) -> None:
        err = 0
        try:
            self._fill(buf, offset)
        except Error as e:
            self.failure = e
            err = 5
        except OSError as e:
            err = e.errno or 5
        except Exception:  # noqa: BLE001 - an I/O error of this read
            err = 5
        cb(_Done(err))
        if self._wake is not None:
            os.eventfd_write(self._wake, 1)

    failure: Error | None = None

    def _fill(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        pos = offset
        while pos < end:
            a, b, depth, host = self._map[i]
            n = min(b, end) - pos
            view = buf[pos - offset:pos - offset + n]
            if depth < 0:
                view[:] = bytes(n)
            elif isinstance(host, tuple):
                cluster_start, (where, length, method) = host
                plain = _inflate(self.layers[depth].pread(length, where), method)
                view[:] = plain[pos - cluster_start:pos - cluster_start + n]
                if len(plain) < pos - cluster_start + n:
                    raise CopyError(f"a compressed cluster of {self.layers[depth].name} inflates short")
            else:
                data = self.layers[depth].pread(n, host + pos - a)
                if len(data) != n:
                    raise CopyError(f"short read from {self.layers[depth].name}")
                view[:] = data
            pos += n
            i += 1

    def step(self, wake_fd: int | None = None, timeout_ms: int = 1000) -> None:
        imagefile.wait_wake(wake_fd, timeout_ms)

    def pread(self, length: int, offset: int) -> bytes:
        buf = memoryview(bytearray(length))
        self._fill(buf, offset)
        return bytes(buf)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> "RemoteSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
