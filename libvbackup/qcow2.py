"""qcow2 images written by libvbackup itself (pure layout; the engine does the I/O).

A backup writes each cluster once, in increasing guest order, into an image that nothing else
reads until it is complete. That needs none of a general qcow2 driver (no copy-on-write, no
reallocation), and writing the data straight into the file (rather than through qemu-nbd) is
what lets a backup run at the speed of a raw copy. The result is an ordinary qcow2 v3
(compat=1.1) image, 64 KiB clusters, 16-bit refcounts, optionally a backing file; ``qemu-img
check`` finds nothing to say about it.

File layout, in the order it is written::

    cluster 0           header, backing-format extension, backing file name (written last)
    data, L2, data ...  data clusters as they are placed; each L2 table once its 512 MiB of
                        guest space is behind the writer
    L1 table, refcount blocks, refcount table      (``finish``)

Every cluster of the file is used exactly once, so every refcount is 1 and L1/L2 entries
carry the COPIED flag. A cluster that must read as zeroes (hiding the backing file) is an
unallocated L2 entry with the zero flag.
"""

from __future__ import annotations

import struct
from typing import Iterator

MAGIC = b"QFI\xfb"
VERSION = 3
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts
HEADER_LENGTH = 112  # QEMU's own v3 header (includes the compression type byte, zlib)
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
MAX_BACKING_NAME = 1023  # QEMU refuses longer backing file names

COPIED = 1 << 63
ZERO = 1  # L2 entry flag (v3): the cluster reads as zeroes
OFFSET_MASK = 0x00FFFFFFFFFFFE00

Write = tuple[int, bytes]  # (file offset, bytes) the caller must write


def _pad(data: bytes, to: int = CLUSTER) -> bytes:
    return data + bytes(-len(data) % to)


class Layout:
    """Where each guest cluster of a new image goes; produces the metadata to write.

    ``place`` and ``zero`` must come in increasing guest order (a copy plan's order), with
    cluster-aligned starts; ``place`` returns the file offset of a contiguous run of clusters
    for the data. Both return metadata writes (finished L2 tables) to perform as well.
    """

    def __init__(self, size: int, backing: str | None = None, backing_format: str = "qcow2"):
        if size <= 0:
            raise ValueError("the image size must be positive")
        if backing is not None and len(backing.encode()) > MAX_BACKING_NAME:
            raise ValueError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        self.size = size
        self.backing = backing
        self.backing_format = backing_format
        self.l2_entries = CLUSTER // 8
        self.l2_span = CLUSTER * self.l2_entries  # guest bytes one L2 table maps (512 MiB)
        self.l1_size = (size + self.l2_span - 1) // self.l2_span
        self.l1 = [0] * self.l1_size
        self.next_host = CLUSTER  # cluster 0 is the header
        self._tables: dict[int, bytearray] = {}  # L2 tables still open, by L1 index
        self._guest_pos = 0
        self.data_clusters = 0
        self.zero_clusters = 0

    # -- placing guest clusters --------------------------------------------------------------

    def _check(self, start: int, length: int) -> None:
        if start % CLUSTER or length <= 0 or start < self._guest_pos or start + length > self.size:
            raise ValueError(f"bad range [{start}, {start + length}) after {self._guest_pos}")
        self._guest_pos = start + length

    def _table(self, index: int) -> bytearray:
        t = self._tables.get(index)
        if t is None:
            t = self._tables[index] = bytearray(CLUSTER)
        return t

    def _close_tables(self, below: int) -> list[Write]:
        """Write out the L2 tables of guest space entirely below ``below``."""
        out = []
        for index in sorted(i for i in self._tables if (i + 1) * self.l2_span <= below):
            out.append((self.next_host, bytes(self._tables.pop(index))))
            self.l1[index] = self.next_host | COPIED
            self.next_host += CLUSTER
        return out

    def _entries(self, start: int, length: int) -> Iterator[tuple[bytearray, int, int]]:
        """(table, first entry, entry count) pieces of [start, start+length)."""
        first = start // CLUSTER
        last = (start + length + CLUSTER - 1) // CLUSTER
        while first < last:
            index = first // self.l2_entries
            n = min(last, (index + 1) * self.l2_entries) - first
            yield self._table(index), first % self.l2_entries, n
            first += n

    def place(self, start: int, length: int) -> tuple[int, list[Write]]:
        """File offset for guest data [start, start+length), and metadata to write first."""
        writes = self._close_tables(start)
        self._check(start, length)
        host = self.next_host
        h = host
        for table, i, n in self._entries(start, length):
            table[i * 8:(i + n) * 8] = struct.pack(f">{n}Q", *range(h | COPIED, (h + n * CLUSTER) | COPIED, CLUSTER))
            h += n * CLUSTER
            self.data_clusters += n
        self.next_host = h
        return host, writes

    def zero(self, start: int, length: int) -> list[Write]:
        """Guest [start, start+length) reads as zeroes, whatever the backing file holds."""
        writes = self._close_tables(start)
        if (start + length) % CLUSTER and start + length != self.size:
            raise ValueError("a zero range must end on a cluster boundary or at the end of the disk")
        self._check(start, length)
        entry = struct.pack(">Q", ZERO)
        for table, i, n in self._entries(start, length):
            table[i * 8:(i + n) * 8] = entry * n
            self.zero_clusters += n
        return writes

    # -- finishing ---------------------------------------------------------------------------

    def finish(self) -> list[Write]:
        """The remaining metadata, ending with the header (to be written last)."""
        writes = self._close_tables(self.l1_size * self.l2_span)
        l1_offset = self.next_host
        l1_bytes = _pad(struct.pack(f">{self.l1_size}Q", *self.l1))
        writes.append((l1_offset, l1_bytes))
        self.next_host += len(l1_bytes)
        # Refcount blocks cover every cluster of the file, themselves and the table included.
        per_block = CLUSTER * 8 >> REFCOUNT_ORDER
        start = self.next_host // CLUSTER
        blocks = table_clusters = 0
        while True:
            total = start + blocks + table_clusters
            need_blocks = (total + per_block - 1) // per_block
            need_table = (need_blocks * 8 + CLUSTER - 1) // CLUSTER
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        total = start + blocks + table_clusters
        rb_offset = self.next_host
        refcounts = bytearray(blocks * CLUSTER)
        refcounts[:total * 2] = b"\x00\x01" * total
        writes.append((rb_offset, bytes(refcounts)))
        rt_offset = rb_offset + blocks * CLUSTER
        table = struct.pack(f">{blocks}Q", *range(rb_offset, rt_offset, CLUSTER))
        writes.append((rt_offset, _pad(table)))
        self.next_host = rt_offset + table_clusters * CLUSTER
        writes.append((0, self.header(l1_offset, rt_offset, table_clusters)))
        return writes

    def header(self, l1_offset: int, rt_offset: int, rt_clusters: int) -> bytes:
        ext = b""
        if self.backing is not None:
            fmt = self.backing_format.encode()
            ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
        ext += struct.pack(">II", EXT_END, 0)
        name = self.backing.encode() if self.backing is not None else b""
        backing_offset = HEADER_LENGTH + len(ext) if name else 0
        head = struct.pack(
            ">4sIQIIQIIQQIIQQQQII",
            MAGIC, VERSION, backing_offset, len(name), CLUSTER_BITS, self.size,
            0,  # no encryption
            self.l1_size, l1_offset, rt_offset, rt_clusters,
            0, 0,  # no snapshots
            0, 0, 0,  # incompatible, compatible, autoclear features
            REFCOUNT_ORDER, HEADER_LENGTH,
        )
        head += bytes(HEADER_LENGTH - len(head))  # compression type 0 (zlib) and padding
        out = head + ext + name
        if len(out) > CLUSTER:
            raise ValueError("qcow2 header does not fit in one cluster")
        return out

    @property
    def file_size(self) -> int:
        return self.next_host
