"""qcow2 images written by libvbackup itself (pure layout; the engine does the I/O).

A backup writes each cluster once, in increasing guest order, into an image that nothing else
reads until it is complete. That needs none of a general qcow2 driver (no copy-on-write, no
reallocation), and writing the data straight into the file (rather than through qemu-nbd) is
what lets a backup run at the speed of a raw copy. The result is an ordinary qcow2 v3
(compat=1.1) image, 64 KiB clusters, 16-bit refcounts, optionally a backing file; ``qemu-img
check`` finds nothing to say about it.

File layout, in the order it is written::

    cluster 0           header, backing-format extension, backing file name (written last)
    data, L2, data ...  data clusters as they are placed; each L2 table after the data of the
                        call that completes or passes its 512 MiB of guest space
    L1 table, refcount blocks, refcount table      (``finish``)

Every cluster of the file is used exactly once, so every refcount is 1 and L1/L2 entries
carry the COPIED flag. A cluster that must read as zeroes (hiding the backing file) is an
unallocated L2 entry with the zero flag.

Compressed images (``compression``: ``zstd`` or ``zlib``; docs/interop/qcow2.txt, "Compressed
Clusters Descriptor"): a guest cluster's data compressed on its own (a zstd frame, or raw deflate,
zlib window bits -12) is packed at any byte offset after the previous one, as QEMU's
``qcow2_alloc_bytes`` does, running into the next host cluster when the packing owns it too, else
starting afresh in a new cluster (the last one's tail is left unused). Its L2 entry::

    bit 62                      1: compressed (never COPIED)
    bits 54..61 (62 - (16-8))   sectors of 512 bytes it touches after the one its offset is in
    bits 0..53                  host byte offset of the compressed data

A host cluster holding compressed data has as refcount the number of compressed clusters whose
sectors touch it (what ``qemu-img check`` counts); data that does not compress is stored as an
ordinary cluster. ``pack`` (host offsets, any guest order: compression finishes out of order) and
``map`` (L2 entries, guest order) are the two halves of ``place`` for such data. zstd needs
incompatible feature bit 3 and the compression type byte (header offset 104); zlib is type 0.

Memory does not grow with the image: at most one L2 table is open, the metadata of a call
(L2 tables, and ``finish``'s L1 table and refcounts) comes as an iterator of writes of at
most ``CHUNK`` bytes, made as it is consumed; only the L1 table is kept (8 bytes per 512 MiB).

Sizes: QEMU cuts a qcow2's virtual size down to a multiple of 512 on open; ``Layout`` refuses
others. QEMU exports none (7.2: qemu-nbd and ``qemu-img info`` of a 1000001-byte raw file, and
``qemu-img create -f qcow2 x 1000001``, all give 1000448); nbdkit can: ``Qcow2Target`` refuses.
"""

from __future__ import annotations

import functools
import struct
import sys
from array import array
from typing import Iterable, Iterator, Sequence

MAGIC = b"QFI\xfb"
VERSION = 3
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts
HEADER_LENGTH = 112  # QEMU's own v3 header (includes the compression type byte, zlib)
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
MAX_BACKING_NAME = 1023  # QEMU refuses longer backing file names
SECTOR = 512  # QEMU's unit of virtual size

COPIED = 1 << 63
COMPRESSED = 1 << 62  # L2 entry flag: a compressed cluster's descriptor follows
ZERO = 1  # L2 entry flag (v3): the cluster reads as zeroes
OFFSET_MASK = 0x00FFFFFFFFFFFE00
CSIZE_SHIFT = 62 - (CLUSTER_BITS - 8)  # compressed descriptor: host offset below, sector count above
CSIZE_MASK = (1 << (CLUSTER_BITS - 8)) - 1
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}  # the header's compression_type byte
INCOMPAT_COMPRESSION_TYPE = 1 << 3  # incompatible feature: compression_type is not zlib

L2_BITS = CLUSTER_BITS - 3
L2_ENTRIES = 1 << L2_BITS  # entries of one L2 table
L2_SPAN = CLUSTER * L2_ENTRIES  # guest bytes one L2 table maps (512 MiB)
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
MAX_L1_ENTRIES = (32 << 20) // 8  # QEMU refuses a larger L1 table (QCOW_MAX_L1_SIZE): 2 PiB
CHUNK = 4 << 20  # the most bytes in one write of ``finish``

Write = tuple[int, bytes]  # (file offset, bytes-like) the caller must write

_ZERO_ENTRIES = struct.pack(">Q", ZERO) * L2_ENTRIES  # a table of zero entries
_SWAP = sys.byteorder == "little"


def _pad(data: bytes, to: int = CLUSTER) -> bytes:
    return data + bytes(-len(data) % to)


def compressed_entry(host: int, length: int) -> int:
    """The L2 entry of ``length`` bytes of compressed data at file offset ``host``."""
    if not 0 < length < CLUSTER or host >> CSIZE_SHIFT:
        raise ValueError(f"no compressed cluster of {length} bytes at {host}")
    sectors = (host + length - 1) // SECTOR - host // SECTOR  # after the first one
    return COMPRESSED | sectors << CSIZE_SHIFT | host


def data_entry(host: int) -> int:
    """The L2 entry of an ordinary cluster at file offset ``host``."""
    return host | COPIED


_LANES = struct.pack(">Q", 1) * L2_ENTRIES  # a table's lanes, each 1
_STEPS = struct.pack(f">{L2_ENTRIES}Q", *range(0, L2_SPAN, CLUSTER))  # lanes 0, C, 2C, ...


@functools.lru_cache(maxsize=16)
def _ramp(n: int) -> tuple[int, int]:
    """n big-endian 64-bit lanes as integers: (every lane 1, lanes 0, C, 2C, ...)."""
    return int.from_bytes(_LANES[:8 * n], "big"), int.from_bytes(_STEPS[:8 * n], "big")


def _offsets(base: int, n: int) -> bytes:
    """n big-endian entries base, base + C, base + 2C, ... (n <= L2_ENTRIES).

    One integer multiply-add instead of n Python integers (a lane never carries into the next:
    entries are below 2**64); a whole table takes about a quarter of ``struct.pack``'s time.
    """
    ones, steps = _ramp(n)
    return (base * ones + steps).to_bytes(8 * n, "big")


def _tables(offset: int, parts: list) -> Iterator[Write]:
    """The L2 tables ``parts`` describes, written from ``offset`` on, made one at a time."""
    for count, what in parts:
        if isinstance(what, bytearray):  # a table filled piece by piece
            yield offset, what
            offset += CLUSTER
        elif what is None:  # tables of zero entries
            for _ in range(count):
                yield offset, _ZERO_ENTRIES
                offset += CLUSTER
        else:  # tables mapping consecutive data clusters from host offset ``what``
            ones, steps = _ramp(L2_ENTRIES)
            x = (what | COPIED) * ones + steps
            step = L2_SPAN * ones
            for _ in range(count):
                yield offset, x.to_bytes(CLUSTER, "big")
                x += step
                offset += CLUSTER


class Layout:
    """Where each guest cluster of a new image goes; produces the metadata to write.

    ``place`` and ``zero`` must come in increasing guest order (a copy plan's order), with
    cluster-aligned starts; ``place`` returns the file offset of a contiguous run of clusters
    for the data. Both return metadata writes (finished L2 tables) to perform as well: an
    iterable, made lazily; the layout's own state is up to date when the call returns.
    """

    def __init__(self, size: int, backing: str | None = None, backing_format: str = "qcow2",
                 compression: str | None = None):
        if compression is not None and compression not in COMPRESSION_TYPES:
            raise ValueError(f"unknown compression type {compression!r}")
        if size <= 0:
            raise ValueError("the image size must be positive")
        if size % SECTOR:
            raise ValueError(f"a qcow2 image cannot have a size of {size} bytes, not a multiple "
                             f"of {SECTOR}: QEMU would cut it to {size - size % SECTOR}")
        if backing is not None and len(backing.encode()) > MAX_BACKING_NAME:
            raise ValueError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        self.size = size
        self.backing = backing
        self.backing_format = backing_format
        self.l2_entries = L2_ENTRIES
        self.l2_span = L2_SPAN
        self.l1_size = (size + L2_SPAN - 1) // L2_SPAN
        if self.l1_size > MAX_L1_ENTRIES:
            raise ValueError(f"a qcow2 image with {CLUSTER >> 10} KiB clusters cannot hold {size} "
                             f"bytes (at most {MAX_L1_ENTRIES * L2_SPAN})")
        self.l1 = array("Q", bytes(8 * self.l1_size))  # host offset | COPIED of each L2 table
        self.next_host = CLUSTER  # cluster 0 is the header
        self._open: bytearray | None = None  # the one L2 table partly filled, if any
        self._open_index = -1  # its L1 index
        self._guest_pos = 0
        self.l1_offset = self.refcount_offset = self.refcount_table_offset = 0  # set by finish
        self.data_clusters = 0
        self.zero_clusters = 0
        self.compression = compression
        self.compressed_clusters = 0
        # Compressed packing: [_cend, _clim) is free space of the host clusters it owns; _extra
        # holds refcount - 1 of every host cluster up to the last one it touched (big-endian
        # 16-bit, as a refcount block: 2 bytes per 64 KiB of file, only in a compressed image).
        self._cend = self._clim = 0
        self._touched = -1  # the last host cluster compressed data touches
        self._extra = bytearray()

    # -- placing guest clusters --------------------------------------------------------------

    def _check(self, start: int, length: int) -> None:
        if start % CLUSTER or length <= 0 or start < self._guest_pos or start + length > self.size:
            raise ValueError(f"bad range [{start}, {start + length}) after {self._guest_pos}")
        self._guest_pos = start + length

    def _fill(self, first: int, last: int, host: int | bytes | None) -> Iterable[Write]:
        """Map guest clusters [first, last) to data from ``host`` on (None: zero entries; bytes:
        their big-endian L2 entries). The L2 tables this completes go at ``next_host``; the one
        it leaves partial stays open."""
        given = host if isinstance(host, (bytes, bytearray)) else None
        parts: list = []  # (L1 index, table count, bytearray | host of the first entry | None)
        t = self._open
        if t is not None and self._open_index < first >> L2_BITS:  # its guest space is behind
            parts.append((self._open_index, 1, t))
            t = self._open = None
        c = first
        while c < last:
            index = c >> L2_BITS
            i = c & (L2_ENTRIES - 1)
            n = min(last, (index + 1) << L2_BITS) - c
            if n == L2_ENTRIES and given is None:  # whole tables: made when written
                n = (last - c) >> L2_BITS << L2_BITS
                parts.append((index, n >> L2_BITS, host))
            else:
                if t is None:
                    t = self._open = bytearray(CLUSTER)
                    self._open_index = index
                if given is not None:
                    t[8 * i:8 * (i + n)] = given[8 * (c - first):8 * (c - first + n)]
                else:
                    t[8 * i:8 * (i + n)] = (_offsets(host | COPIED, n) if host is not None
                                            else _ZERO_ENTRIES[:8 * n])
                if i + n == L2_ENTRIES:
                    parts.append((index, 1, t))
                    t = self._open = None
            c += n
            if host is not None and given is None:
                host += n << CLUSTER_BITS
        if not parts:
            return ()
        offset = h = self.next_host
        for index, count, _ in parts:
            self.l1[index:index + count] = array("Q", range(h | COPIED, (h + count * CLUSTER) | COPIED, CLUSTER))
            h += count * CLUSTER
        self.next_host = h
        return _tables(offset, [(count, what) for _, count, what in parts])

    def place(self, start: int, length: int) -> tuple[int, Iterable[Write]]:
        """File offset for guest data [start, start+length), and metadata to write."""
        self._check(start, length)
        first = start >> CLUSTER_BITS
        last = (start + length + CLUSTER - 1) >> CLUSTER_BITS
        host = self.next_host
        self.next_host = host + ((last - first) << CLUSTER_BITS)
        self.data_clusters += last - first
        return host, self._fill(first, last, host)

    def pack(self, sizes: Sequence[int]) -> list[int]:
        """File offsets for the clusters of one guest range (in any guest order): a size below
        ``CLUSTER`` is compressed data, packed; ``CLUSTER`` an ordinary cluster (consecutive
        ones are contiguous). Nothing is mapped until ``map``."""
        if self.compression is None:
            raise ValueError("this image is not compressed")
        out = []
        for n in sizes:
            if n == CLUSTER:
                out.append(self.next_host)
                self.next_host += CLUSTER
                self.data_clusters += 1
                continue
            if not 0 < n < CLUSTER:
                raise ValueError(f"compressed data of {n} bytes")
            if self._cend + n > self._clim:
                if self._clim != self.next_host or not self._clim:  # not ours to run into: start afresh
                    self._cend = self._clim = self.next_host
                grow = -(-(self._cend + n - self._clim) // CLUSTER) * CLUSTER
                self._clim += grow
                self.next_host += grow
            at = self._cend
            first, last = at // CLUSTER, (at + n - 1) // CLUSTER
            if len(self._extra) < 2 * (last + 1):
                self._extra.extend(bytes(2 * (last + 1) - len(self._extra)))
            if first <= self._touched:  # shared with the data before it: one more reference
                k = 2 * first
                count = (self._extra[k] << 8 | self._extra[k + 1]) + 1
                if count >= 0xFFFF:
                    raise ValueError("too many compressed clusters in one host cluster")
                self._extra[k:k + 2] = count.to_bytes(2, "big")
            self._touched = last
            self._cend = at + n
            self.compressed_clusters += 1
            out.append(at)
        return out

    def map(self, start: int, entries: bytes) -> Iterable[Write]:
        """Guest clusters from ``start`` on take ``entries`` (big-endian L2 entries: of
        ``compressed_entry``/``data_entry`` for what ``pack`` placed), in guest order as ``place``."""
        n = len(entries) // 8
        if not n or len(entries) % 8:
            raise ValueError("no L2 entries")
        self._check(start, min(n * CLUSTER, self.size - start))
        first = start >> CLUSTER_BITS
        if first + n > -(-self.size // CLUSTER):
            raise ValueError("L2 entries beyond the end of the disk")
        return self._fill(first, first + n, bytes(entries))

    def zero(self, start: int, length: int) -> Iterable[Write]:
        """Guest [start, start+length) reads as zeroes, whatever the backing file holds."""
        if (start + length) % CLUSTER and start + length != self.size:
            raise ValueError("a zero range must end on a cluster boundary or at the end of the disk")
        self._check(start, length)
        first = start >> CLUSTER_BITS
        last = (start + length + CLUSTER - 1) >> CLUSTER_BITS
        self.zero_clusters += last - first
        return self._fill(first, last, None)

    # -- finishing ---------------------------------------------------------------------------

    def finish(self) -> Iterator[Write]:
        """The remaining metadata, ending with the header (to be written last), as writes of
        at most ``CHUNK`` bytes made as they are consumed. Nothing can be placed afterwards."""
        self._guest_pos = self.size  # any further place or zero is refused
        l2 = None
        if self._open is not None:
            l2 = (self.next_host, self._open)
            self.l1[self._open_index] = self.next_host | COPIED
            self._open = None
            self.next_host += CLUSTER
        l1_offset = self.next_host
        self.next_host += -(-8 * self.l1_size // CLUSTER) * CLUSTER
        # Refcount blocks cover every cluster of the file, themselves and the table included.
        start = self.next_host // CLUSTER
        blocks = table_clusters = 0
        while True:
            total = start + blocks + table_clusters
            need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
            need_table = -(-need_blocks * 8 // CLUSTER)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        rb_offset = self.next_host
        rt_offset = rb_offset + blocks * CLUSTER
        self.next_host = rt_offset + table_clusters * CLUSTER
        self.l1_offset, self.refcount_offset, self.refcount_table_offset = l1_offset, rb_offset, rt_offset
        return self._finish(l2, l1_offset, rb_offset, blocks, rt_offset, table_clusters)

    def _finish(self, l2: Write | None, l1_offset: int, rb_offset: int, blocks: int,
                rt_offset: int, table_clusters: int) -> Iterator[Write]:
        if l2 is not None:
            yield l2
        per = CHUNK // 8
        for k in range(0, self.l1_size, per):
            part = self.l1[k:k + per]
            if _SWAP:
                part.byteswap()  # to big-endian
            data = part.tobytes()
            yield l1_offset + 8 * k, _pad(data) if k + per >= self.l1_size else data
        full, rest = divmod(self.next_host // CLUSTER, REFCOUNTS_PER_BLOCK)  # every cluster: 1
        per = CHUNK // CLUSTER
        chunk = b"\x00\x01" * (REFCOUNTS_PER_BLOCK * min(full, per))  # the same chunk again
        offset = rb_offset
        while full:
            n = min(full, per)
            yield offset, self._counted(offset - rb_offset, chunk if n * CLUSTER == len(chunk) else chunk[:n * CLUSTER])
            offset += n * CLUSTER
            full -= n
        if rest:
            yield offset, self._counted(offset - rb_offset, _pad(b"\x00\x01" * rest))
        for k in range(0, blocks, L2_ENTRIES):
            n = min(L2_ENTRIES, blocks - k)
            yield rt_offset + 8 * k, _pad(_offsets(rb_offset + k * CLUSTER, n))
        yield 0, self.header(l1_offset, rt_offset, table_clusters)

    def _counted(self, at: int, block: bytes) -> bytes:
        """Refcount entries [at/2, ...) of 1 each, plus the extra references of clusters
        holding compressed data (lanes never carry: each count is below 0xFFFF)."""
        extra = self._extra[at:at + len(block)]
        if not extra or not any(extra):
            return block
        extra += bytes(len(block) - len(extra))
        return (int.from_bytes(block, "big") + int.from_bytes(extra, "big")).to_bytes(len(block), "big")

    def header(self, l1_offset: int, rt_offset: int, rt_clusters: int) -> bytes:
        ext = b""
        if self.backing is not None:
            fmt = self.backing_format.encode()
            ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
        ext += struct.pack(">II", EXT_END, 0)
        name = self.backing.encode() if self.backing is not None else b""
        ctype = COMPRESSION_TYPES[self.compression] if self.compression else 0
        backing_offset = HEADER_LENGTH + len(ext) if name else 0
        head = struct.pack(
            ">4sIQIIQIIQQIIQQQQII",
            MAGIC, VERSION, backing_offset, len(name), CLUSTER_BITS, self.size,
            0,  # no encryption
            self.l1_size, l1_offset, rt_offset, rt_clusters,
            0, 0,  # no snapshots
            INCOMPAT_COMPRESSION_TYPE if ctype else 0, 0, 0,  # incompatible, compatible, autoclear features
            REFCOUNT_ORDER, HEADER_LENGTH,
        )
        head += bytes([ctype]) + bytes(HEADER_LENGTH - len(head) - 1)  # compression type and padding
        out = head + ext + name
        if len(out) > CLUSTER:
            raise ValueError("qcow2 header does not fit in one cluster")
        return out

    @property
    def file_size(self) -> int:
        return self.next_host
