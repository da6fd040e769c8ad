"""Reading qcow2 images libvbackup did not write (pure): the header, and the own layer's map
from the L1/L2 tables (``qemu-img map`` does the same in C; this saves a process per image)."""

from __future__ import annotations

import re
import struct
import sys
from array import array
from typing import Iterator

from .qcow2 import CLUSTER, MAGIC, MAX_BACKING_NAME, OFFSET_MASK, ZERO


def read_header(head: bytes) -> tuple[int, str | None]:
    """(virtual size, backing file name) from the first bytes of any qcow2 image (v2 or v3);
    ValueError if it is not one."""
    if len(head) < 72 or head[:4] != MAGIC:
        raise ValueError("not a qcow2 image")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    if version not in (2, 3):
        raise ValueError(f"qcow2 version {version}")
    (size,) = struct.unpack_from(">Q", head, 24)
    if not backing_offset:
        return size, None
    if backing_offset + backing_size > len(head) or backing_size > MAX_BACKING_NAME:
        raise ValueError("backing file name out of the header")
    return size, head[backing_offset:backing_offset + backing_size].decode(errors="replace")


_NONZERO = re.compile(rb"[^\0]")
MAX_RUNS = 1 << 16  # own_map holds at most this many runs (else qemu-img map streams them)


class Unsupported(ValueError):
    """An image this reader leaves to ``qemu-img map`` (encrypted, compressed, extended L2…)."""


COMPRESSION_BIT = 1 << 3  # incompatible feature: the header names a compression type (byte 104)


def own_map(pread, start: int = 0, max_tables: int = 64, compressed: bool = False) -> Iterator[dict]:
    """The own layer of a qcow2 image, as ``qemu-img map --output=json`` of the image alone
    (``backing: null``) gives it: ``{start, length, depth: 0, present, zero, data[, offset]}``
    from ``start`` on, adjacent clusters of one kind (and contiguous data) joined.

    ``pread(length, offset)`` reads the file. Raises Unsupported (before yielding anything)
    for what it does not read: encryption, external data files, extended L2 entries, a dirty or
    corrupt image, compressed clusters, or more than ``max_tables`` L2 tables (a big image is
    mapped faster by qemu-img in C than entry by entry here).

    ``compressed``: compressed clusters are mapped too, one entry per cluster, with
    ``compressed: (host offset, bytes to read, "zlib" | "zstd")`` (for a reader that inflates
    them itself: the bytes come from a bucket, where no qemu-img can map them).
    """
    head = pread(CLUSTER, 0)
    if len(head) < 104 or head[:4] != MAGIC:
        raise Unsupported("not a qcow2 image")
    version, = struct.unpack_from(">I", head, 4)
    cluster_bits, = struct.unpack_from(">I", head, 20)
    size, crypt, l1_size, l1_offset = struct.unpack_from(">QIIQ", head, 24)
    incompatible = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
    method = "zlib"
    if compressed and incompatible == COMPRESSION_BIT and len(head) > 104:
        method = {0: "zlib", 1: "zstd"}.get(head[104], "")
        if not method:
            raise Unsupported(f"compression type {head[104]}")
        incompatible = 0
    if version not in (2, 3) or crypt or incompatible or not 9 <= cluster_bits <= 21:
        raise Unsupported("encrypted, dirty, corrupt, external data or extended L2")
    cluster = 1 << cluster_bits
    per_table = cluster // 8
    l1 = array("Q", pread(l1_size * 8, l1_offset))
    if sys.byteorder == "little":
        l1.byteswap()
    if len(l1) != l1_size or sum(1 for e in l1 if e & OFFSET_MASK) > max_tables:
        raise Unsupported("too many L2 tables")
    runs = _own_runs(pread, l1, cluster, per_table, size, version, method if compressed else None)
    yield from (r for r in runs if r["start"] + r["length"] > start)


def _own_runs(pread, l1, cluster: int, per_table: int, size: int, version: int,
              method: str | None = None) -> list[dict]:
    span = cluster * per_table
    out: list[dict] = []
    cluster_bits = cluster.bit_length() - 1
    csize_shift = 62 - (cluster_bits - 8)

    def add(at: int, n: int, kind: str, host: int | None, packed: tuple | None = None) -> None:
        n = min(n, size - at)
        if n <= 0:
            return
        if packed is not None:
            if len(out) >= MAX_RUNS:
                raise Unsupported("too fragmented")
            out.append({"start": at, "length": n, "depth": 0, "present": True, "zero": False, "data": True,
                        "_kind": "compressed", "compressed": packed})
            return
        if out:
            last = out[-1]
            if last["_kind"] == kind and last["start"] + last["length"] == at and (
                    kind != "data" or last["offset"] + last["length"] == host):
                last["length"] += n
                return
        if len(out) >= MAX_RUNS:
            raise Unsupported("too fragmented")
        e = {"start": at, "length": n, "depth": 0, "present": kind != "none", "zero": kind != "data",
             "data": kind == "data", "_kind": kind}
        if kind == "data":
            e["offset"] = host
        out.append(e)

    for i, entry in enumerate(l1):
        base = i * span
        if not entry & OFFSET_MASK:
            add(base, span, "none", None)
            continue
        raw = pread(cluster, entry & OFFSET_MASK)
        table = array("Q", raw)
        if sys.byteorder == "little":
            table.byteswap()
        j = 0
        while j < per_table:
            found = _NONZERO.search(raw, j * 8)  # runs of unallocated entries: at C speed
            k = found.start() // 8 if found else per_table
            if k > j:
                add(base + j * cluster, (k - j) * cluster, "none", None)
                j = k
                continue
            e = table[j]
            at = base + j * cluster
            if at >= size:
                break
            if e & (1 << 62):
                if method is None:
                    raise Unsupported("compressed clusters")
                host = e & ((1 << csize_shift) - 1)
                sectors = ((e >> csize_shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
                add(at, cluster, "compressed", None, (host, sectors * 512 - (host & 511), method))
                j += 1
                continue
            host = e & OFFSET_MASK
            if version >= 3 and e & ZERO:
                add(at, cluster, "zero", None)
            elif host:
                add(at, cluster, "data", host)
            else:
                add(at, cluster, "none", None)
            j += 1
    for e in out:
        del e["_kind"]
    return out
