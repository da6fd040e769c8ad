"""BlockHasher against a model: digests equal those of the disk's final bytes."""

from __future__ import annotations

import hashlib
import io

import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from libvbackup import checksum, records, sums

BLOCK = 4096  # small blocks so that examples span many of them
# The reference implementations, independent of libvbackup's table of algorithms.
REFERENCE = {"sha256": lambda b: hashlib.sha256(b).digest(),
             "xxh3-128": lambda b: xxhash.xxh3_128(b).digest()}


def model_sums(data: bytes, block: int = BLOCK, algo: str = checksum.DEFAULT) -> bytes:
    return b"".join(REFERENCE[algo](data[i:i + block]) for i in range(0, len(data), block))


@st.composite
def scenario(draw):
    size = draw(st.integers(1, 12 * BLOCK + 1000))
    full = draw(st.booleans())
    parent = bytes(size) if full else draw(st.binary(min_size=size, max_size=size))
    # Non-overlapping operations in offset order, as extents.plan produces them.
    ops, pos = [], 0
    while pos < size and len(ops) < 20:
        pos += draw(st.integers(0, 3 * BLOCK))
        # Some operations cover whole blocks (the copy's usual request), up to the disk's end.
        whole = draw(st.booleans())
        if whole:
            pos = -(-pos // BLOCK) * BLOCK
        if pos >= size:
            break
        n = draw(st.integers(1, min(2 * BLOCK, size - pos)))
        if whole:
            n = min(size - pos, draw(st.integers(1, 3)) * BLOCK)
        kind = draw(st.sampled_from(["copy", "zero"] if not full else ["copy"]))
        data = draw(st.binary(min_size=n, max_size=n)) if kind == "copy" else bytes(n)
        ops.append((kind, pos, data))
        pos += n
    order = draw(st.permutations(range(len(ops))))
    window = draw(st.integers(1, 6))
    algo = draw(st.sampled_from(sorted(REFERENCE)))
    return size, full, parent, ops, order, window, algo


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(scenario())
def test_hasher_matches_model(sc):
    size, full, parent, ops, order, window, algo = sc
    final = bytearray(parent)
    for _kind, off, data in ops:
        final[off:off + len(data)] = data
    h = checksum.BlockHasher(size, parent=None if full else records_of(model_sums(parent, algo=algo), size, algo),
                             block=BLOCK, algorithm_name=algo)
    # Queue in offset order, complete in a shuffled order within a sliding window.
    inflight: list[int] = []
    nxt = 0
    rank = {i: r for r, i in enumerate(order)}
    while nxt < len(ops) or inflight:
        while nxt < len(ops) and len(inflight) < window:
            h.issue(ops[nxt][1], len(ops[nxt][2]))
            inflight.append(nxt)
            nxt += 1
        i = min(inflight, key=rank.__getitem__)
        inflight.remove(i)
        kind, off, data = ops[i]
        if kind == "copy":
            h.data(off, data)
        else:
            h.zero(off, len(data))
    for off, length in h.finish():
        assert not full, "a full backup never needs to read back"
        h.set_block(off, bytes(final[off:off + length]))
    h.done()
    assert h.dense() == model_sums(bytes(final), algo=algo)
    # Sparse: exactly the blocks that are not all zeroes, in order.
    nonzero = [i for i in range(checksum.block_count(size, BLOCK)) if any(final[i * BLOCK:(i + 1) * BLOCK])]
    assert [i for i, _ in h.records] == nonzero


def records_of(dense: bytes, size: int, algo: str = checksum.DEFAULT, block: int = BLOCK):
    layout = sums.Layout(size, block, algo, sums.DENSE)
    return list(layout.records(io.BytesIO(dense)))


def sparse_file(data: bytes, algo: str = checksum.DEFAULT, block: int = BLOCK) -> tuple[bytes, str]:
    """The sums file and blkhash a full backup of ``data`` writes."""
    f = io.BytesIO()
    w = sums.SumsWriter(f, sums.Layout(len(data), block, algo))
    h = checksum.BlockHasher(len(data), block=block, algorithm_name=algo, sink=w.add)
    for off in range(0, len(data), 3 * block + 17):  # pieces that straddle blocks
        n = min(3 * block + 17, len(data) - off)
        h.issue(off, n)
        h.data(off, data[off:off + n])
    assert h.finish() == []
    h.done()
    blkhash = w.close()
    return f.getvalue(), blkhash


@pytest.mark.parametrize("algo", sorted(REFERENCE))
def test_sparse_sums_are_canonical_and_read_back(algo):
    size = 10 * BLOCK + 300
    data = bytearray(size)
    data[BLOCK + 5] = 1
    data[7 * BLOCK:8 * BLOCK] = b"\x07" * BLOCK
    data[-1] = 9
    body, blkhash = sparse_file(bytes(data), algo)
    k = checksum.algorithm(algo).size
    assert len(body) == 3 * (8 + k)  # three blocks hold data; zero blocks cost nothing
    layout = sums.Layout(size, BLOCK, algo)
    assert layout.blkhash_of(io.BytesIO(body)) == blkhash and layout.file_size_ok(len(body))
    recs = list(layout.records(io.BytesIO(body)))
    assert [i for i, _ in recs] == [1, 7, 10]
    assert recs[1][1] == REFERENCE[algo](b"\x07" * BLOCK) and recs[2][1] == REFERENCE[algo](bytes(299) + b"\x09")
    # The same guest data however it was written (here: in other pieces) gives the same blkhash;
    # other data, another size or another block size do not.
    again = checksum.BlockHasher(size, block=BLOCK, algorithm_name=algo)
    for off in (0, 5 * BLOCK):
        again.issue(off, 5 * BLOCK)
        again.data(off, data[off:off + 5 * BLOCK])
    again.issue(10 * BLOCK, 300)
    again.data(10 * BLOCK, data[10 * BLOCK:])
    again.finish()
    again.done()
    assert again.records == recs
    assert sparse_file(bytes(data[:-1]) + b"\x08", algo)[1] != blkhash
    assert sparse_file(bytes(data) + bytes(512), algo)[1] != blkhash
    # A dense file of the same data reads as the same records.
    assert records_of(model_sums(bytes(data), algo=algo), size, algo) == recs


def test_sparse_records_out_of_order_are_refused():
    layout = sums.Layout(4 * BLOCK)
    rec = lambda i: i.to_bytes(8, "big") + bytes(16)  # noqa: E731
    with pytest.raises(ValueError, match="out of order"):
        list(layout.records(io.BytesIO(rec(2) + rec(1))))
    with pytest.raises(ValueError, match="out of order"):
        list(layout.records(io.BytesIO(rec(4))))  # past the end of the disk
    assert not layout.file_size_ok(5)


def test_a_grown_disk_keeps_the_parent_digests_and_rereads_its_old_short_block():
    old = bytes(range(256)) * (2 * BLOCK // 256) + b"\x05" * 100  # 2 blocks and a short one
    size = 6 * BLOCK
    new = bytearray(size)
    new[:len(old)] = old
    parent = records_of(model_sums(old), len(old))
    h = checksum.BlockHasher(size, parent=parent, parent_size=len(old), block=BLOCK)
    h.issue(4 * BLOCK, BLOCK)  # written after the growth
    new[4 * BLOCK:5 * BLOCK] = b"\x44" * BLOCK
    h.data(4 * BLOCK, new[4 * BLOCK:5 * BLOCK])
    rereads = h.take_rereads() + h.finish()
    assert rereads == [(2 * BLOCK, BLOCK)]
    h.set_block(2 * BLOCK, new[2 * BLOCK:3 * BLOCK])
    h.done()
    assert h.dense() == model_sums(bytes(new))
    with pytest.raises(ValueError, match="shrunk"):
        checksum.BlockHasher(BLOCK, parent=parent, parent_size=len(old), block=BLOCK)


def _incremental_over(n: int) -> int:
    """Peak Python memory of an incremental that touches 20 blocks of a parent holding ``n``
    records, read 1 MiB at a time as from its file; checks what comes out."""
    import tracemalloc

    step = 24

    def chunks():  # a sums file read 1 MiB at a time, never materialised
        per = (1 << 20) // step
        for first in range(0, n, per):
            out = bytearray()
            for i in range(first, min(n, first + per)):
                out += i.to_bytes(8, "big") + i.to_bytes(16, "big")
            yield bytes(out)

    seen = {"records": 0, "last": -1, "new": 0}

    def sink_raw(raw):
        assert len(raw) % step == 0 and len(raw) <= records.RUN
        first, last = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[-step:-16], "big")
        assert seen["last"] < first <= last
        seen["records"] += len(raw) // step
        seen["last"] = last

    def sink(i, d):
        seen["new"] += 1

    tracemalloc.start()
    h = checksum.BlockHasher(n * BLOCK, parent=records.Records(chunks(), 16, n), block=BLOCK, sink=sink,
                             sink_raw=sink_raw)
    for b in range(0, n, n // 20):
        h.issue(b * BLOCK, BLOCK)
        h.data(b * BLOCK, bytes(BLOCK))  # now zeroes: their records go
    assert h.finish() == []
    h.done()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen == {"records": n - 20, "last": n - 1, "new": 0}
    return peak


def test_streaming_memory_does_not_follow_the_disk():
    """An incremental on a parent of 500 thousand records and one of 2 million (a 128 GiB disk
    full of data; a 16 TiB disk's parent is read the same way): the parent's records pass
    through in runs of bytes, the hasher holds a window only, whatever the parent's size."""
    small, big = _incremental_over(500_000), _incremental_over(2_000_000)
    assert big < 12 << 20, big
    assert big < small * 1.5, (small, big)  # (measured: 4.8 and 6.3 MiB; 4 million: 6.5 MiB)
