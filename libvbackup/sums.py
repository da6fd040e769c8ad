"""How a point stores its block digests: ``<point>/<disk>.sums`` (pure).

Sums format 2 (sparse; manifest ``sums_format: 2``), written since format 3 of the manifest::

    record*      one per block whose bytes are not all zero, in increasing block order:
                 block index (8 bytes, big-endian) + digest (16 bytes XXH3-128, 32 SHA-256)

A block that reads as zeroes has no record, however it is stored (hole, zero cluster, zeroes
written, past the end of a shorter backing file): the encoding depends on the guest's bytes
alone, so it is canonical. blkhash = SHA-256(``PREFIX`` + disk size (8 bytes) + block size
(4 bytes) + algorithm name + NUL + the records): equal guest data gives an equal blkhash
whatever the chain, the image format or the allocation. Metadata, memory and time follow the
data: 24 bytes per 64 KiB of data, nothing for empty space.

Sums format 1 (dense, older points): one digest for every block, zero blocks included;
blkhash = SHA-256 of the file. ``records`` reads either as the same sparse stream, so a chain
that started dense continues in format 2 (its algorithm and block size are kept).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO, Iterator

from .checksum import BLOCK, DEFAULT, Algorithm, algorithm, block_count
from .records import Record, Records

DENSE, SPARSE = 1, 2  # sums formats
PREFIX = b"libvbackup sparse sums 2\0"
READ_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a sums file is: its format, the disk size, block size and algorithm."""

    size: int
    block: int = BLOCK
    algorithm_name: str = DEFAULT
    format: int = SPARSE

    @property
    def algorithm(self) -> Algorithm:
        return algorithm(self.algorithm_name)

    def prefix(self) -> bytes:
        return PREFIX + struct.pack(">QI", self.size, self.block) + self.algorithm_name.encode() + b"\0"

    def blkhash_of(self, f: BinaryIO) -> str:
        """The blkhash of a sums file, read as a stream."""
        import hashlib  # (lazily: OpenSSL's 2.5 ms are for the commands that hash)

        h = hashlib.sha256(self.prefix() if self.format == SPARSE else b"")
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
        return h.hexdigest()

    def file_size_ok(self, n: int) -> bool:
        k = self.algorithm.size
        if self.format == DENSE:
            return n == block_count(self.size, self.block) * k
        return n % (8 + k) == 0 and n // (8 + k) <= block_count(self.size, self.block)

    def stream(self, f: BinaryIO) -> Records:
        """The file's records as a ``Records`` stream: a sparse file's bytes as they are, an
        older dense file's digests of non-zero blocks packed as records."""
        k, n = self.algorithm.size, block_count(self.size, self.block)
        if self.format == SPARSE:
            step = 8 + k
            return Records(iter(lambda: f.read(READ_CHUNK // step * step), b""), k, n)
        return Records.of(self.records(f), k, n)

    def records(self, f: BinaryIO) -> Iterator[Record]:
        """The file's digests of non-zero blocks, in block order, whatever its format."""
        k = self.algorithm.size
        if self.format == SPARSE:
            unpack = struct.Struct(">Q").unpack_from
            step = 8 + k
            last = -1
            n = block_count(self.size, self.block)
            while chunk := f.read(READ_CHUNK // step * step):
                for pos in range(0, len(chunk) - step + 1, step):
                    (index,) = unpack(chunk, pos)
                    if index <= last or index >= n:
                        raise ValueError(f"sums record for block {index} out of order")
                    last = index
                    yield index, bytes(chunk[pos + 8:pos + step])
            return
        zero = self.algorithm.zero_digest(self.block)
        tail = self.size % self.block
        last_index = block_count(self.size, self.block) - 1
        index = 0
        while chunk := f.read(READ_CHUNK // k * k):
            for pos in range(0, len(chunk), k):
                d = bytes(chunk[pos:pos + k])
                z = self.algorithm.zero_digest(tail) if tail and index == last_index else zero
                if d != z:
                    yield index, d
                index += 1


class SumsWriter:
    """Writes sparse records to ``f`` as they come, in order; ``close`` returns the blkhash."""

    def __init__(self, f: BinaryIO, layout: Layout):
        if layout.format != SPARSE:
            raise ValueError("new sums are written sparse")
        self.f = f
        self.layout = layout
        import hashlib

        self._h = hashlib.sha256(layout.prefix())
        self._buf = bytearray()
        self._last = -1
        self.count = 0

    def add(self, index: int, digest: bytes) -> None:
        if index <= self._last:
            raise ValueError(f"sums record for block {index} out of order")
        self._last = index
        self._buf += struct.pack(">Q", index) + digest
        self.count += 1
        if len(self._buf) >= READ_CHUNK:
            self._flush()

    def add_raw(self, raw: bytes) -> None:
        """A run of records as they are (a parent's, passed through)."""
        if not raw:
            return
        step = 8 + self.layout.algorithm.size
        first = struct.unpack_from(">Q", raw, 0)[0]
        if first <= self._last or len(raw) % step:
            raise ValueError(f"sums record for block {first} out of order")
        self._last = struct.unpack_from(">Q", raw, len(raw) - step)[0]
        self._buf += raw
        self.count += len(raw) // step
        if len(self._buf) >= READ_CHUNK:
            self._flush()

    def _flush(self) -> None:
        self._h.update(self._buf)
        self.f.write(self._buf)
        self._buf.clear()

    def close(self) -> str:
        self._flush()
        return self._h.hexdigest()
