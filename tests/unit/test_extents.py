"""libvbackup.extents: parsing block-status replies, merging contexts, planning NBD requests."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvbackup import extents
from libvbackup.extents import MAX_ZERO, STATE_DIRTY, STATE_HOLE, STATE_ZERO, Extent, Op

KiB = 1024
MiB = 1024 * KiB
B = 512  # block size of the reference models

DATA = 0
HOLE = STATE_HOLE  # unallocated, but *not* promised to read as zeroes
ZERO = STATE_ZERO
HOLE_ZERO = STATE_HOLE | STATE_ZERO
CLEAN = 0
DIRTY = STATE_DIRTY

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


# --------------------------------------------------------------------------- from_entries


def test_from_entries_turns_flat_list_into_positioned_runs():
    assert extents.from_entries(1024, [4096, DATA, 8192, HOLE_ZERO, 512, ZERO]) == [
        (1024, 4096, DATA),
        (5120, 8192, HOLE_ZERO),
        (13312, 512, ZERO),
    ]


def test_from_entries_empty():
    assert extents.from_entries(0, []) == []


def test_from_entries_stops_at_a_zero_or_negative_length():
    assert extents.from_entries(0, [512, DATA, 0, ZERO, 512, DATA]) == [(0, 512, DATA)]
    assert extents.from_entries(0, [512, DATA, -512, ZERO, 512, DATA]) == [(0, 512, DATA)]


def test_from_entries_ignores_a_dangling_length_without_flags():
    assert extents.from_entries(512, [512, ZERO, 1024]) == [(512, 512, ZERO)]


# --------------------------------------------------------------------------- merge


def test_merge_clips_a_last_extent_that_runs_past_the_request():
    alloc = extents.from_entries(0, [4096, DATA, 1 * MiB, HOLE_ZERO])
    assert extents.merge(0, 8192, alloc) == [
        Extent(0, 4096, zero=False, dirty=True),
        Extent(4096, 4096, zero=True, dirty=True),
    ]


def test_merge_clips_a_single_run_at_a_nonzero_start():
    alloc = [(64 * KiB, 1 * MiB, DATA)]
    assert extents.merge(64 * KiB, 128 * KiB, alloc, [(64 * KiB, 4 * MiB, DIRTY)]) == [
        Extent(64 * KiB, 64 * KiB, zero=False, dirty=True)
    ]


def test_merge_stops_where_the_dirty_bitmap_stops():
    alloc = [(0, 16384, DATA)]
    dirty = [(0, 1024, CLEAN), (1024, 3072, DIRTY)]
    assert extents.merge(0, 16384, alloc, dirty) == [
        Extent(0, 1024, zero=False, dirty=False),
        Extent(1024, 3072, zero=False, dirty=True),
    ]


def test_merge_stops_where_allocation_stops():
    alloc = [(0, 2048, ZERO)]
    dirty = [(0, 16384, DIRTY)]
    assert extents.merge(0, 16384, alloc, dirty) == [Extent(0, 2048, zero=True, dirty=True)]


def test_merge_stops_at_the_shortest_context_even_when_the_other_overruns():
    alloc = [(0, 1024, DATA), (1024, 1 * MiB, ZERO)]  # past the end
    dirty = [(0, 1536, DIRTY)]  # short of the end
    assert extents.merge(0, 8192, alloc, dirty) == [
        Extent(0, 1024, zero=False, dirty=True),
        Extent(1024, 512, zero=True, dirty=True),
    ]


def test_merge_cuts_at_every_boundary_of_either_context():
    # alloc:  | data 0-3000      | zero 3000-8192               |
    # dirty:  |clean 0-1000| dirty 1000-5000     | clean 5000-8192 |
    alloc = [(0, 3000, DATA), (3000, 5192, ZERO)]
    dirty = [(0, 1000, CLEAN), (1000, 4000, DIRTY), (5000, 3192, CLEAN)]
    assert extents.merge(0, 8192, alloc, dirty) == [
        Extent(0, 1000, zero=False, dirty=False),
        Extent(1000, 2000, zero=False, dirty=True),
        Extent(3000, 2000, zero=True, dirty=True),
        Extent(5000, 3192, zero=True, dirty=False),
    ]


def test_merge_joins_adjacent_extents_with_equal_flags():
    # A hole without the zero bit reads as data; flags that differ only in bits merge() does
    # not use must not split an extent.
    alloc = [(0, 512, DATA), (512, 512, HOLE), (1024, 512, ZERO), (1536, 512, HOLE_ZERO)]
    dirty = [(0, 256, DIRTY), (256, 256, DIRTY | 0x10), (512, 1536, DIRTY)]
    assert extents.merge(0, 2048, alloc, dirty) == [
        Extent(0, 1024, zero=False, dirty=True),
        Extent(1024, 1024, zero=True, dirty=True),
    ]


def test_merge_keeps_extents_apart_when_only_dirtiness_differs():
    alloc = [(0, 2048, ZERO)]
    dirty = [(0, 512, DIRTY), (512, 512, CLEAN), (1024, 1024, DIRTY)]
    assert extents.merge(0, 2048, alloc, dirty) == [
        Extent(0, 512, zero=True, dirty=True),
        Extent(512, 512, zero=True, dirty=False),
        Extent(1024, 1024, zero=True, dirty=True),
    ]


def test_merge_without_bitmap_marks_everything_dirty():
    alloc = [(0, 512, DATA), (512, 1024, HOLE_ZERO), (1536, 512, DATA)]
    got = extents.merge(0, 2048, alloc, None)
    assert got == [
        Extent(0, 512, zero=False, dirty=True),
        Extent(512, 1024, zero=True, dirty=True),
        Extent(1536, 512, zero=False, dirty=True),
    ]
    assert all(e.dirty for e in got)


@pytest.mark.parametrize(
    "alloc, dirty",
    [
        pytest.param([(512, 4096, DATA)], None, id="alloc-starts-elsewhere"),
        pytest.param([(0, 4096, DATA)], [(512, 4096, DIRTY)], id="dirty-starts-elsewhere"),
        pytest.param([], None, id="alloc-empty"),
        pytest.param([], [(0, 4096, DIRTY)], id="alloc-empty-with-bitmap"),
        pytest.param([(0, 4096, DATA)], [], id="dirty-empty"),
    ],
)
def test_merge_is_empty_when_a_context_describes_nothing_from_start(alloc, dirty):
    assert extents.merge(0, 4096, alloc, dirty) == []


def test_merge_is_empty_for_an_empty_request():
    assert extents.merge(4096, 4096, [(4096, 512, DATA)]) == []


def test_extent_and_op_end():
    assert Extent(512, 1024, zero=False).end == 1536
    assert Extent(512, 1024, zero=False).dirty is True  # default: a full copy
    assert Op("copy", 4096, 512).end == 4608


# --------------------------------------------------------------------------- plan


def _plan(exts, *, target_is_zero, max_request=1 * MiB):
    return list(extents.plan(exts, target_is_zero=target_is_zero, max_request=max_request))


def test_plan_full_skips_zeroes_and_splits_data():
    exts = [
        Extent(0, 2 * MiB + 512 * KiB, zero=False),
        Extent(2 * MiB + 512 * KiB, 4 * MiB, zero=True),
        Extent(6 * MiB + 512 * KiB, 512, zero=False),
    ]
    assert _plan(exts, target_is_zero=True) == [
        Op("copy", 0, 1 * MiB),
        Op("copy", 1 * MiB, 1 * MiB),
        Op("copy", 2 * MiB, 512 * KiB),
        Op("copy", 6 * MiB + 512 * KiB, 512),
    ]


def test_plan_full_does_not_join_copies_across_a_skipped_zero_extent():
    exts = [Extent(0, 512, False), Extent(512, 512, True), Extent(1024, 512, False)]
    assert _plan(exts, target_is_zero=True) == [Op("copy", 0, 512), Op("copy", 1024, 512)]


def test_plan_incremental_writes_dirty_zeroes_and_skips_clean_extents():
    exts = [
        Extent(0, 4096, zero=False, dirty=False),
        Extent(4096, 4096, zero=False, dirty=True),
        Extent(8192, 8192, zero=True, dirty=True),  # must be zeroed: older data lies beneath
        Extent(16384, 4096, zero=True, dirty=False),
        Extent(20480, 4096, zero=False, dirty=False),
    ]
    assert _plan(exts, target_is_zero=False) == [Op("copy", 4096, 4096), Op("zero", 8192, 8192)]


def test_plan_incremental_never_skips_a_dirty_zero_extent():
    assert _plan([Extent(0, 512, zero=True, dirty=True)], target_is_zero=False) == [
        Op("zero", 0, 512)
    ]
    assert _plan([Extent(0, 512, zero=True, dirty=True)], target_is_zero=True) == []


def test_plan_clean_extents_produce_nothing():
    exts = [Extent(0, 4096, zero=False, dirty=False), Extent(4096, 4096, zero=True, dirty=False)]
    assert _plan(exts, target_is_zero=False) == []
    assert _plan(exts, target_is_zero=True) == []


def test_plan_empty():
    assert _plan([], target_is_zero=False) == []


def test_plan_merges_adjacent_extents_of_the_same_kind_before_splitting():
    # As from several block-status replies, whose extents are not joined by merge().
    exts = [
        Extent(0, 768 * KiB, zero=False),
        Extent(768 * KiB, 768 * KiB, zero=False),
        Extent(1536 * KiB, 512, zero=True),
        Extent(1536 * KiB + 512, 512, zero=True),
    ]
    assert _plan(exts, target_is_zero=False) == [
        Op("copy", 0, 1 * MiB),
        Op("copy", 1 * MiB, 512 * KiB),
        Op("zero", 1536 * KiB, 1024),
    ]


def test_plan_does_not_merge_across_a_gap_or_a_clean_extent():
    gap = [Extent(0, 512, False), Extent(1024, 512, False)]
    assert _plan(gap, target_is_zero=False) == [Op("copy", 0, 512), Op("copy", 1024, 512)]
    clean = [Extent(0, 512, True), Extent(512, 512, True, dirty=False), Extent(1024, 512, True)]
    assert _plan(clean, target_is_zero=False) == [Op("zero", 0, 512), Op("zero", 1024, 512)]


def test_plan_does_not_merge_copy_and_zero():
    exts = [Extent(0, 512, False), Extent(512, 512, True), Extent(1024, 512, False)]
    assert _plan(exts, target_is_zero=False) == [
        Op("copy", 0, 512),
        Op("zero", 512, 512),
        Op("copy", 1024, 512),
    ]


def test_plan_splits_zero_requests_at_max_zero_not_at_max_request():
    start = 4096
    exts = [Extent(start, 2 * MAX_ZERO + 512, zero=True, dirty=True)]
    assert _plan(exts, target_is_zero=False, max_request=64 * KiB) == [
        Op("zero", start, MAX_ZERO),
        Op("zero", start + MAX_ZERO, MAX_ZERO),
        Op("zero", start + 2 * MAX_ZERO, 512),
    ]


def test_max_zero_is_below_the_protocol_limit():
    assert 0 < MAX_ZERO < 4 << 30


def test_plan_copy_of_exactly_max_request_is_one_op():
    assert _plan([Extent(0, 1 * MiB, False)], target_is_zero=True) == [Op("copy", 0, 1 * MiB)]


# --------------------------------------------------------------------------- properties
#
# Reference models work in 512-byte blocks: a context is a list of (blocks, flags) runs that
# begins at the request's start and may run past its end or stop short of it.

ALLOC_FLAGS = st.sampled_from([DATA, HOLE, ZERO, HOLE_ZERO])
DIRTY_FLAGS = st.sampled_from([CLEAN, DIRTY, DIRTY | 0x4, 0x4])


def _runs(flags, max_blocks):
    return st.lists(st.tuples(st.integers(1, 8), flags), min_size=0, max_size=max_blocks)


def _entries(runs):
    out = []
    for blocks, flags in runs:
        out += [blocks * B, flags]
    return out


def _per_block(runs):
    """Flags of each block described by ``runs``."""
    out = []
    for blocks, flags in runs:
        out += [flags] * blocks
    return out


@st.composite
def contexts(draw, cover=False):
    """(start, end, alloc runs, dirty runs or None); with ``cover`` both contexts reach ``end``."""
    start = draw(st.integers(0, 8)) * B
    nblocks = draw(st.integers(1, 40))
    alloc = draw(_runs(ALLOC_FLAGS, 30))
    dirty = draw(st.none() | _runs(DIRTY_FLAGS, 30))
    if cover:
        # Extend each context past the end by a random amount (the last run overruns).
        extra = draw(st.integers(0, 5))
        need = nblocks - sum(n for n, _ in alloc)
        if need > 0:
            alloc = alloc + [(need + extra, draw(ALLOC_FLAGS))]
        if dirty is not None:
            need = nblocks - sum(n for n, _ in dirty)
            if need > 0:
                dirty = dirty + [(need + extra, draw(DIRTY_FLAGS))]
    return start, start + nblocks * B, alloc, dirty


def _merge(start, end, alloc, dirty):
    return extents.merge(
        start,
        end,
        extents.from_entries(start, _entries(alloc)),
        None if dirty is None else extents.from_entries(start, _entries(dirty)),
    )


@PROPERTY
@given(contexts())
def test_property_merge_matches_a_per_block_model(ctx):
    start, end, alloc, dirty = ctx
    got = _merge(start, end, alloc, dirty)

    nblocks = (end - start) // B
    alloc_b = _per_block(alloc)
    dirty_b = None if dirty is None else _per_block(dirty)
    covered = min(nblocks, len(alloc_b), nblocks if dirty_b is None else len(dirty_b))

    if covered == 0:
        assert got == []
        return
    # Contiguous from start, non-overlapping, within [start, end), up to the shortest coverage.
    assert got[0].start == start
    for a, b in zip(got, got[1:]):
        assert a.end == b.start
    assert all(e.length > 0 for e in got)
    assert got[-1].end == start + covered * B <= end
    # Every byte of each extent has the extent's flags; neighbours differ (joined otherwise).
    for e in got:
        assert e.start % B == 0 and e.length % B == 0
        for blk in range((e.start - start) // B, (e.end - start) // B):
            assert e.zero == bool(alloc_b[blk] & STATE_ZERO)
            assert e.dirty == (True if dirty_b is None else bool(dirty_b[blk] & STATE_DIRTY))
    for a, b in zip(got, got[1:]):
        assert (a.zero, a.dirty) != (b.zero, b.dirty)


def _apply(ops, source, backing, start):
    """Write ``ops`` onto a copy of ``backing``; blocks hold 0 for zeroes, a data id otherwise."""
    target = list(backing)
    for op in ops:
        for blk in range((op.start - start) // B, (op.end - start) // B):
            target[blk] = source[blk] if op.kind == "copy" else 0
    return target


@st.composite
def plan_cases(draw):
    start, end, alloc, dirty = draw(contexts(cover=True))
    max_request = draw(st.integers(1, 6)) * B
    max_zero = draw(st.integers(1, 6)) * B
    return start, end, alloc, dirty, max_request, max_zero


def _check_plan(start, end, alloc, dirty, max_request, max_zero, target_is_zero, backing):
    nblocks = (end - start) // B
    exts = _merge(start, end, alloc, dirty)
    assert exts and exts[-1].end == end  # both contexts reach the end
    alloc_b = _per_block(alloc)[:nblocks]
    dirty_b = [True] * nblocks if dirty is None else [
        bool(f & STATE_DIRTY) for f in _per_block(dirty)[:nblocks]
    ]
    source = [0 if f & STATE_ZERO else 1000 + i for i, f in enumerate(alloc_b)]

    with mock.patch.object(extents, "MAX_ZERO", max_zero):
        ops = list(extents.plan(exts, target_is_zero=target_is_zero, max_request=max_request))

    # Well formed: ordered, disjoint, aligned, inside the request, within the size limits.
    for a, b in zip(ops, ops[1:]):
        assert a.end <= b.start
    for op in ops:
        assert op.kind in ("copy", "zero")
        assert start <= op.start < op.end <= end
        assert op.length <= (max_request if op.kind == "copy" else max_zero)
        blocks = range((op.start - start) // B, (op.end - start) // B)
        # Only dirty blocks are touched; data is read, zeroes are written, never read.
        assert all(dirty_b[i] for i in blocks)
        if op.kind == "copy":
            assert all(source[i] != 0 for i in blocks)
        else:
            assert all(source[i] == 0 for i in blocks)
            assert not target_is_zero

    target = _apply(ops, source, backing, start)
    for i in range(nblocks):
        want = source[i] if dirty_b[i] else backing[i]
        assert target[i] == want, f"block {i}: dirty={dirty_b[i]} source={source[i]}"


@PROPERTY
@given(plan_cases())
def test_property_full_plan_reproduces_the_source_on_a_zero_target(case):
    start, end, alloc, dirty, max_request, max_zero = case
    backing = [0] * ((end - start) // B)
    _check_plan(start, end, alloc, dirty, max_request, max_zero, True, backing)


@PROPERTY
@given(plan_cases(), st.data())
def test_property_incremental_plan_reproduces_dirty_blocks_over_a_backing(case, data):
    start, end, alloc, dirty, max_request, max_zero = case
    nblocks = (end - start) // B
    # Older data: mostly non-zero, so a skipped dirty zero range shows through.
    backing = data.draw(st.lists(st.sampled_from([0, -1, -2, -3]), min_size=nblocks, max_size=nblocks))
    _check_plan(start, end, alloc, dirty, max_request, max_zero, False, backing)


@settings(PROPERTY, max_examples=100)
@given(st.data())
def test_property_repeated_merge_over_short_replies_covers_the_request(data):
    """Like nbdio.read_extents: ask again from where the merged reply stopped."""
    nblocks = data.draw(st.integers(1, 24), label="nblocks")
    disk_alloc = data.draw(st.lists(ALLOC_FLAGS, min_size=nblocks + 8, max_size=nblocks + 8))
    disk_dirty = data.draw(st.lists(DIRTY_FLAGS, min_size=nblocks + 8, max_size=nblocks + 8))
    start = data.draw(st.integers(0, 4), label="start blocks") * B
    end = start + nblocks * B

    def reply(table, pos):
        # The server describes from pos a random number of blocks (possibly past the end),
        # and may split runs of equal flags.
        first = pos // B
        upto = data.draw(st.integers(first + 1, len(table)))
        runs, i = [], first
        while i < upto:
            n = data.draw(st.integers(1, upto - i))
            flags = table[i]
            n = next((k for k in range(1, n) if table[i + k] != flags), n)
            runs.append((pos + (i - first) * B, n * B, flags))
            i += n
        return runs

    out, pos = [], start
    while pos < end:
        got = extents.merge(pos, end, reply(disk_alloc, pos), reply(disk_dirty, pos))
        assert got and got[0].start == pos
        out.extend(got)
        pos = got[-1].end
    assert pos == end
    for e in out:
        for blk in range(e.start // B, e.end // B):
            assert e.zero == bool(disk_alloc[blk] & STATE_ZERO)
            assert e.dirty == bool(disk_dirty[blk] & STATE_DIRTY)


def test_copies_are_cut_on_the_request_grid():
    exts = [Extent(1000, 3 * 64 * KiB, zero=False, dirty=True)]
    ops = _plan(exts, target_is_zero=True, max_request=64 * KiB)
    assert [o.start for o in ops] == [1000, 64 * KiB, 128 * KiB, 192 * KiB]
    assert all(o.start % (64 * KiB) == 0 for o in ops[1:])
    assert sum(o.length for o in ops) == 3 * 64 * KiB


@PROPERTY
@given(plan_cases(), st.sampled_from([2, 3, 4, 8]), st.data())
def test_property_cluster_plans_cover_whole_clusters_and_reproduce_the_source(case, per_cluster, data):
    """A qcow2 target takes whole clusters: partly dirty clusters are copied whole from the
    export, whose clean bytes equal the parent's; a cluster is zeroed only when all of it is a
    dirty zero range; a cluster with nothing dirty is never touched."""
    start, end, alloc, dirty, max_request, max_zero = case
    g = per_cluster * B
    start_al = start - start % g  # extents start on a cluster boundary
    shift = start - start_al
    start, end = start_al, end - shift
    nblocks = (end - start) // B
    target_is_zero = dirty is None and data.draw(st.booleans())
    exts = _merge(start, end, alloc, dirty)
    alloc_b = _per_block(alloc)[:nblocks]
    dirty_b = [True] * nblocks if dirty is None else [bool(f & STATE_DIRTY) for f in _per_block(dirty)[:nblocks]]
    source = [0 if f & STATE_ZERO else 1000 + i for i, f in enumerate(alloc_b)]
    if target_is_zero:
        backing = [0] * nblocks
    else:
        old = data.draw(st.lists(st.sampled_from([0, -1, -2]), min_size=nblocks, max_size=nblocks))
        backing = [source[i] if not dirty_b[i] else old[i] for i in range(nblocks)]
    max_request = max_request * per_cluster
    with mock.patch.object(extents, "MAX_ZERO", max_zero * per_cluster):
        ops = list(extents.plan(exts, target_is_zero=target_is_zero, max_request=max_request, granularity=g))
    for a, b in zip(ops, ops[1:]):
        assert a.end <= b.start
    for op in ops:
        assert op.start % g == 0 and (op.end % g == 0 or op.end == end)
        assert start <= op.start < op.end <= end
        for c in range(op.start, op.end, g):  # every touched cluster has something dirty
            cb = range((c - start) // B, (min(c + g, end) - start) // B)
            assert any(dirty_b[i] for i in cb)
            if op.kind == "zero":
                assert all(dirty_b[i] and source[i] == 0 for i in cb)
        if op.kind == "copy":
            assert op.length <= max_request
        else:
            assert not target_is_zero
    assert _apply(ops, source, backing, start) == source
