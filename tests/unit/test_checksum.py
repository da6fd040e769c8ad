"""BlockHasher against a model: digests equal those of the disk's final bytes."""

from __future__ import annotations

import hashlib

import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from libvbackup import checksum

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
        if pos >= size:
            break
        n = draw(st.integers(1, min(2 * BLOCK, size - pos)))
        kind = draw(st.sampled_from(["copy", "zero"] if not full else ["copy"]))
        data = draw(st.binary(min_size=n, max_size=n)) if kind == "copy" else bytes(n)
        ops.append((kind, pos, data))
        pos += n
    order = draw(st.permutations(range(len(ops))))
    window = draw(st.integers(1, 6))
    algo = draw(st.sampled_from(sorted(REFERENCE)))
    return size, full, parent, ops, order, window, algo


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(scenario())
def test_hasher_matches_model(sc):
    size, full, parent, ops, order, window, algo = sc
    final = bytearray(parent)
    for _kind, off, data in ops:
        final[off:off + len(data)] = data
    h = checksum.BlockHasher(size, parent_sums=None if full else model_sums(parent, algo=algo), block=BLOCK,
                             algorithm_name=algo)
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
    assert bytes(h.sums) == model_sums(bytes(final), algo=algo)


@pytest.mark.parametrize("algo", sorted(REFERENCE))
def test_zero_sums_and_compare(algo):
    a_ = checksum.algorithm(algo)
    assert a_.zero_sums(2 * BLOCK + 5, BLOCK) == model_sums(bytes(2 * BLOCK + 5), algo=algo)
    a = model_sums(bytes(3 * BLOCK), algo=algo)
    b = bytearray(a)
    b[a_.size + 3] ^= 1  # a bit of the second block's digest
    assert a_.compare(a, bytes(b), BLOCK) == [BLOCK]
    assert a_.compare(a, a, BLOCK) == []


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        checksum.algorithm("md4")
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        checksum.BlockHasher(10, algorithm_name="crc")


def test_parse_size():
    import pytest

    from libvbackup.errors import UsageError
    from libvbackup.plan import parse_size

    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5k") == 1536
    for bad in ("", "lots", "-1G", "1X", "G"):
        with pytest.raises(UsageError):
            parse_size(bad)
