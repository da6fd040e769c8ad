"""Sparse digest records as a stream of raw bytes (pure): what a point's ``.sums`` holds and what
the block hasher merges (see ``checksum`` and ``sums``)."""

from __future__ import annotations

import struct
from typing import Iterable, Iterator

Record = tuple[int, bytes]  # (block index, digest)


class Records:
    """A stream of sparse records (block index, 8 bytes big-endian, + digest), kept as raw bytes
    and read as needed: runs of records pass through whole (``take_below``), at the speed of a
    memory copy, instead of one Python call per record (a parent with 16 million records, a
    1 TiB disk full of data, would otherwise cost an incremental half a minute).

    ``chunks`` yields raw bytes in record order (a sparse file read as it is, or records packed
    from another source); ``limit``: every index must be below it (the parent's block count).
    """

    def __init__(self, chunks: Iterable[bytes], digest_size: int, limit: int | None = None):
        self.step = 8 + digest_size
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._pos = 0
        self._last = -1
        self._limit = limit

    @classmethod
    def of(cls, records: Iterable[Record], digest_size: int, limit: int | None = None) -> "Records":
        """From (index, digest) pairs (older dense files, tests)."""
        def chunks():
            out = bytearray()
            for index, digest in records:
                out += _INDEX.pack(index) + digest
                if len(out) >= 1 << 20:
                    yield bytes(out)
                    out.clear()
            if out:
                yield bytes(out)
        return cls(chunks(), digest_size, limit)

    def _index(self, at: int) -> int:
        return _INDEX.unpack_from(self._buf, at)[0]

    def _append(self) -> bool:
        """One more chunk into the buffer (checked: whole records, in order); False at the end."""
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        if len(chunk) % self.step:
            raise ValueError("sums end inside a record")
        if not chunk:
            return True
        if self._pos > 1 << 20:
            del self._buf[:self._pos]
            self._pos = 0
        start = len(self._buf)
        self._buf += chunk
        first, last = self._index(start), self._index(len(self._buf) - self.step)
        if first <= self._last or last < first or (self._limit is not None and last >= self._limit):
            raise ValueError(f"sums records out of order near block {first}")
        self._last = last
        return True

    def _fill(self) -> bool:
        """At least one record buffered; False at the end of the stream."""
        while len(self._buf) - self._pos < self.step:
            if not self._append():
                return False
        return True

    def peek(self) -> int | None:
        return self._index(self._pos) if self._fill() else None

    def take_below(self, limit: int) -> bytes:
        """Raw records whose index is below ``limit``, consumed: at most RUN bytes at a time
        (call again until it returns nothing)."""
        out = bytearray()
        while len(out) + self.step <= max(RUN, self.step) and self._fill():
            n = min((len(self._buf) - self._pos) // self.step, max(1, (RUN - len(out)) // self.step))
            if self._index(self._pos + (n - 1) * self.step) < limit:
                out += self._buf[self._pos:self._pos + n * self.step]
                self._pos += n * self.step
                continue
            lo, hi = 0, n  # the first record at or above limit
            while lo < hi:
                mid = (lo + hi) // 2
                if self._index(self._pos + mid * self.step) < limit:
                    lo = mid + 1
                else:
                    hi = mid
            out += self._buf[self._pos:self._pos + lo * self.step]
            self._pos += lo * self.step
            break
        return bytes(out)

    def next(self) -> Record | None:
        if not self._fill():
            return None
        at = self._pos
        self._pos += self.step
        return self._index(at), bytes(self._buf[at + 8:at + self.step])

    def drop(self, index: int) -> None:
        """Consume the next record if it is ``index``'s."""
        if self.peek() == index:
            self._pos += self.step

    def peek_bytes(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and self._append():
            pass
        return bytes(self._buf[self._pos:self._pos + n])

    def skip_bytes(self, n: int) -> None:
        self._pos += n


def decode(raw: bytes, digest_size: int) -> Iterator[Record]:
    step = 8 + digest_size
    for at in range(0, len(raw), step):
        yield _INDEX.unpack_from(raw, at)[0], bytes(raw[at + 8:at + step])


_INDEX = struct.Struct(">Q")
RUN = 1 << 20  # bytes of records handed on at once
