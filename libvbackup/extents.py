"""Extents of an NBD export and the copy plan built from them (pure).

An NBD block-status reply is loose, and the merging code must accept all of it::

    request:      |<------------------ count ------------------>|
    base:alloc:   |  data  | zero |   data   |      zero             ...|   (last extent may run past)
    dirty bitmap: |  clean      |  dirty  |                               (may stop short)

Each context may describe a different length; the merged result covers only the part that
*every* context described, clipped to the request, and the caller asks again from there.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

STATE_HOLE = 1  # base:allocation
STATE_ZERO = 2  # base:allocation
STATE_DIRTY = 1  # qemu:dirty-bitmap:*

MAX_ZERO = 1 << 30  # one NBD_CMD_WRITE_ZEROES at most (the protocol allows < 4 GiB)


@dataclasses.dataclass(frozen=True)
class Extent:
    start: int
    length: int
    zero: bool  # reads as zeroes
    dirty: bool = True  # changed since the parent checkpoint (always True for a full copy)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # "copy" or "zero"
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def from_entries(start: int, entries: Sequence[int]) -> list[tuple[int, int, int]]:
    """libnbd's flat ``[length, flags, length, flags, ...]`` -> ``[(start, length, flags)]``."""
    out = []
    pos = start
    for i in range(0, len(entries) - 1, 2):
        length, flags = entries[i], entries[i + 1]
        if length <= 0:
            break
        out.append((pos, length, flags))
        pos += length
    return out


def _covered_end(runs: Sequence[tuple[int, int, int]], start: int) -> int:
    if not runs or runs[0][0] != start:
        return start
    return runs[-1][0] + runs[-1][1]


def merge(
    start: int,
    end: int,
    alloc: Sequence[tuple[int, int, int]],
    dirty: Sequence[tuple[int, int, int]] | None = None,
) -> list[Extent]:
    """Merge base:allocation and (optionally) dirty-bitmap runs that both begin at ``start``.

    Returns extents from ``start`` up to the first point not described by every context, or
    ``end``, whichever is smaller; adjacent extents with equal flags are joined. An empty result
    means a context described nothing (a protocol error for the caller to report).
    """
    stop = min(end, _covered_end(alloc, start))
    if dirty is not None:
        stop = min(stop, _covered_end(dirty, start))
    if stop <= start:
        return []
    cuts = {start, stop}
    for runs in (alloc, dirty or ()):
        for s, n, _ in runs:
            if start < s < stop:
                cuts.add(s)
            if start < s + n < stop:
                cuts.add(s + n)
    points = sorted(cuts)

    def flags_at(runs: Sequence[tuple[int, int, int]], pos: int, i: list[int]) -> int:
        while runs[i[0]][0] + runs[i[0]][1] <= pos:
            i[0] += 1
        return runs[i[0]][2]

    ia, idr = [0], [0]
    out: list[Extent] = []
    for a, b in zip(points, points[1:]):
        zero = bool(flags_at(alloc, a, ia) & STATE_ZERO)
        is_dirty = True if dirty is None else bool(flags_at(dirty, a, idr) & STATE_DIRTY)
        if out and out[-1].zero == zero and out[-1].dirty == is_dirty and out[-1].end == a:
            last = out.pop()
            out.append(Extent(last.start, b - last.start, zero, is_dirty))
        else:
            out.append(Extent(a, b - a, zero, is_dirty))
    return out


def _kinds(extents: Iterable[Extent], target_is_zero: bool) -> Iterator[tuple[int, int, str | None]]:
    """(start, end, kind) runs: kind "copy", "zero", or None (nothing to do), adjacent runs joined."""
    run: list | None = None
    for e in extents:
        if not e.dirty:
            kind = None
        elif e.zero:
            kind = None if target_is_zero else "zero"
        else:
            kind = "copy"
        if run is not None and run[2] == kind and run[1] == e.start:
            run[1] = e.end
            continue
        if run is not None:
            yield tuple(run)
        run = [e.start, e.end, kind]
    if run is not None:
        yield tuple(run)


def _resolve(kinds: set) -> str | None:
    """One cluster's operation from the kinds of its pieces.

    Partly dirty, or zero beside data or beside clean bytes: the whole cluster is copied, read
    from the export, which holds the clean bytes too (they equal the parent's).
    """
    if kinds == {None}:
        return None
    if kinds == {"zero"}:
        return "zero"
    return "copy"


def _quantize(runs: Iterable[tuple[int, int, str | None]], granularity: int
              ) -> Iterator[tuple[int, int, str | None]]:
    """Runs widened to whole clusters of ``granularity`` bytes (the disk's last one may be short)."""
    acc_start, acc_end, acc = -1, 0, set()
    for s, e, kind in runs:
        pos = s
        while pos < e:
            c0 = pos - pos % granularity
            if pos == c0 and e - pos >= granularity:
                stop = e - (e - pos) % granularity
                yield pos, stop, kind
                pos = stop
                continue
            # A piece of a cluster: remember its kind until the cluster (or the input) ends.
            if acc_start != c0:
                if acc_start >= 0:
                    yield acc_start, acc_end, _resolve(acc)
                acc_start, acc = c0, set()
            acc.add(kind)
            acc_end = min(e, c0 + granularity)
            pos = acc_end
            if acc_end == c0 + granularity:
                yield c0, acc_end, _resolve(acc)
                acc_start, acc = -1, set()
    if acc_start >= 0:
        yield acc_start, acc_end, _resolve(acc)


def plan(extents: Iterable[Extent], *, target_is_zero: bool, max_request: int,
         granularity: int = 1) -> Iterator[Op]:
    """The NBD operations that make the target equal the source on the dirty extents.

    - clean extents: nothing (the backing image already holds them);
    - dirty extents that read as zeroes: a zero request, never a read. Skipped only when the
      target already reads as zero there (``target_is_zero``: a new image with no backing).
      In an incremental image the older data underneath would otherwise show through;
    - dirty data: reads of at most ``max_request`` bytes.

    With ``granularity`` (a qcow2 target's cluster size) every operation covers whole clusters
    (``_resolve`` says which); extents must then start on a cluster boundary, and end on one
    unless the disk ends there.
    """
    runs = _kinds(extents, target_is_zero)
    if granularity > 1:
        runs = _quantize(runs, granularity)
    pending: Op | None = None
    for start, end, kind in runs:
        if pending is not None and (kind != pending.kind or start != pending.end):
            yield from _split(pending, max_request)
            pending = None
        if kind is None:
            continue
        if pending is None:
            pending = Op(kind, start, end - start)
        else:
            pending = Op(kind, pending.start, end - pending.start)
    if pending is not None:
        yield from _split(pending, max_request)


def _split(op: Op, max_request: int) -> Iterator[Op]:
    """Requests of at most ``limit`` bytes; copies are cut on multiples of ``max_request``.

    Cutting copies on the grid rather than from the start of the extent keeps them aligned, so
    a read is usually exactly one checksum block (hashed without being reassembled).
    """
    copy = op.kind == "copy"
    limit = max_request if copy else MAX_ZERO
    pos = op.start
    while pos < op.end:
        n = min(limit - pos % limit if copy else limit, op.end - pos)
        yield Op(op.kind, pos, n)
        pos += n
