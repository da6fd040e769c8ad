"""Sealed frames (seal.py) and the chain map of a bucket's images (remotesource.chain_map)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from libvbackup import seal
from libvbackup.errors import UsageError, VerifyError
from libvbackup.remotesource import chain_map

SECRET = bytes(range(32))


def test_a_frame_opens_only_in_its_place_with_its_key():
    s = seal.Sealer(SECRET)
    blob = s.seal("vm1/c1/vda.qcow2", 3, 7, b"guest data" * 100)
    assert b"guest data" not in blob
    assert len(blob) == 1000 + seal.OVERHEAD
    assert s.open("vm1/c1/vda.qcow2", 3, 7, blob) == b"guest data" * 100
    for name, index, count in (("vm1/c1/vdb.qcow2", 3, 7), ("vm1/c1/vda.qcow2", 4, 7),
                               ("vm1/c1/vda.qcow2", 3, 6)):  # swapped, moved, truncated object
        with pytest.raises(seal.Tampered):
            s.open(name, index, count, blob)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    with pytest.raises(seal.Tampered):
        s.open("vm1/c1/vda.qcow2", 3, 7, bytes(flipped))
    with pytest.raises(seal.Tampered):
        seal.Sealer(bytes(32)).open("vm1/c1/vda.qcow2", 3, 7, blob)
    with pytest.raises(VerifyError):
        s.open("vm1/c1/vda.qcow2", 3, 7, blob[:10])


def test_sealing_is_deterministic_per_place_and_content_and_keys_have_ids():
    s = seal.Sealer(SECRET)
    a = s.seal("x", 0, 2, b"same")
    assert s.seal("x", 0, 2, b"same") == a  # a resumed upload can compare ETags
    assert s.seal("x", 1, 2, b"same")[:seal.NONCE] != a[:seal.NONCE]
    assert s.seal("x", 0, 2, b"other")[:seal.NONCE] != a[:seal.NONCE]
    assert seal.Sealer(SECRET).key_id == s.key_id != seal.Sealer(SECRET[::-1]).key_id


def test_key_files_are_checked(tmp_path):
    good = tmp_path / "k"
    good.write_bytes(os.urandom(40))
    good.chmod(0o600)
    assert len(seal.read_key_file(str(good))) == 40
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    loose = tmp_path / "loose"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o640)
    for path, words in ((short, "at least 32"), (loose, "readable by others"), (tmp_path / "none", "cannot read"),
                        (tmp_path, "not a regular file")):
        with pytest.raises(UsageError, match=words):
            seal.read_key_file(str(path))


def test_frame_arithmetic():
    assert seal.frames(0) == 1 and seal.frames(1) == 1 and seal.frames(seal.FRAME) == 1
    assert seal.frames(seal.FRAME + 1) == 2
    assert seal.sealed_size(seal.FRAME + 1, True) == seal.FRAME + 1 + 2 * seal.OVERHEAD
    assert seal.sealed_size(5, False) == 5
    assert seal.frame_span(2, True) == 2 * (seal.FRAME + seal.OVERHEAD)


# -- chain_map against a per-byte model ----------------------------------------------------------
SIZE = 64


@st.composite
def layer(draw):
    cuts = sorted(draw(st.sets(st.integers(1, SIZE - 1), max_size=6)) | {0, SIZE})
    runs, host = [], 1000 * draw(st.integers(1, 9))
    for a, b in zip(cuts, cuts[1:]):
        kind = draw(st.sampled_from(["data", "zero", "none"]))
        runs.append((a, b, kind, host if kind == "data" else None))
        if kind == "data":
            host += (b - a) + draw(st.integers(0, 3))
    return runs


@settings(max_examples=300, deadline=None)
@given(st.lists(layer(), min_size=1, max_size=4))
def test_chain_map_is_the_topmost_layer_holding_each_byte(layers):
    def model(pos):
        for d, runs in enumerate(layers):
            for a, b, kind, host in runs:
                if a <= pos < b and kind != "none":
                    return (d, host + pos - a) if kind == "data" else (-1, None)
        return (-1, None)

    got = chain_map(layers, SIZE)
    assert got[0][0] == 0 and got[-1][1] == SIZE
    assert all(x[1] == y[0] for x, y in zip(got, got[1:]))
    for a, b, depth, host in got:
        for pos in range(a, b):
            assert (depth, host + pos - a if depth >= 0 else None) == model(pos)
    for x, y in zip(got, got[1:]):  # adjacent runs are joined when they can be
        assert not (x[2] == y[2] == -1)
