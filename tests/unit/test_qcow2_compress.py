"""Compressed qcow2 images (``qcow2.Layout.pack``/``map``, ``target.CompressedQcow2Target``).

Each case writes an image, its ranges' data handed to the target in a shuffled order (the
engine's writers finish out of order), then asks qemu-img: ``check`` (refcounts of shared host
clusters, no leak, no COPIED flag on a compressed cluster) and ``compare`` against the model.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvbackup import qcow2, target

C = qcow2.CLUSTER

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

KINDS = ["text", "random", "same", "zero", "hole"]


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def text(rng: random.Random, n: int) -> bytes:
    words = [b"backup", b"qcow2", b"cluster", b"guest", b"libvirt", b"checkpoint", b"\n", b"0123"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def data_of(kind: str, rng: random.Random, n: int) -> bytes:
    if kind == "text":
        return text(rng, n)
    if kind == "random":
        return rng.randbytes(n)
    if kind == "same":
        return bytes([rng.randrange(1, 256)]) * n
    return bytes(n)  # "zero": data that happens to be zeroes (still copied as data)


def write_image(path, size, ops, *, backing=None, compression="zstd", seed=0):
    """ops: sorted (kind, start, length), kind "hole" a zero range; the data goes to the
    target in a shuffled order. Returns the model of the image's own writes."""
    rng = random.Random(seed)
    t = target.CompressedQcow2Target(str(path), size, backing, compression=compression)
    written = {}
    try:
        tickets = []
        for kind, start, length in ops:
            if kind == "hole":
                t.zero(start, length)
                written[start] = bytes(length)
            else:
                data = data_of(kind, rng, length)
                tickets.append((t.place(start, length), data))
                written[start] = data
            if tickets and rng.random() < 0.3:  # some complete before later ranges are placed
                i = rng.randrange(len(tickets))
                ticket, data = tickets.pop(i)
                t.pwrite(memoryview(data), ticket)
        rng.shuffle(tickets)
        for ticket, data in tickets:
            t.pwrite(memoryview(data), ticket)
        t.finish()
    finally:
        t.close()
    return written


def assert_image(path, expected: bytes, tmp_path):
    chk = qemu_img("check", "-f", "qcow2", str(path))
    assert chk.returncode == 0 and "No errors" in chk.stdout, chk.stdout + chk.stderr
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(ref))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    ref.unlink()


@st.composite
def op_lists(draw):
    clusters = draw(st.integers(1, 40))
    tail = draw(st.sampled_from([0, 512, 4096, C - 512]))
    size = clusters * C + tail
    total = clusters + (1 if tail else 0)
    ops = []
    c = 0
    while c < total:
        c += draw(st.integers(0, 2))
        if c >= total:
            break
        n = draw(st.integers(1, min(16, total - c)))  # the engine's requests: at most 1 MiB
        start = c * C
        ops.append((draw(st.sampled_from(KINDS)), start, min(n * C, size - start)))
        c += n
    return size, ops


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(op_lists(), st.booleans(), st.sampled_from(["zstd", "zlib"]))
def test_random_compressed_images_match_model(tmp_path_factory, case, with_backing, compression):
    size, ops = case
    tmp = tmp_path_factory.mktemp("c")
    base = bytes(size)
    backing = None
    if with_backing:
        base = random.Random(size).randbytes(size)
        bt = target.open_target(str(tmp / "base.qcow2"), size)
        bt.pwrite(base, bt.place(0, size))
        bt.finish()
        bt.close()
        backing = "base.qcow2"
    img = tmp / "img.qcow2"
    written = write_image(img, size, ops, backing=backing, compression=compression, seed=len(ops))
    model = bytearray(base)
    for start, data in written.items():
        model[start:start + len(data)] = data
    assert_image(img, bytes(model), tmp)
    info = qemu_img("info", "--output=json", str(img)).stdout
    assert f'"compression-type": "{compression}"' in info


def test_compressible_data_takes_less_room_random_data_stays_as_it_is(tmp_path):
    size = 64 * C
    for kind in ("text", "random"):
        plain, packed = tmp_path / f"{kind}.plain.qcow2", tmp_path / f"{kind}.qcow2"
        data = data_of(kind, random.Random(1), size)
        t = target.open_target(str(plain), size)
        t.pwrite(data, t.place(0, size))
        t.finish()
        t.close()
        t = target.open_target(str(packed), size, compress=True)
        for k in range(0, size, 16 * C):
            t.pwrite(memoryview(data)[k:k + 16 * C], t.place(k, 16 * C))
        t.finish()
        t.close()
        assert_image(packed, data, tmp_path)
        cmp = qemu_img("compare", str(plain), str(packed))
        assert cmp.returncode == 0, cmp.stdout
        if kind == "text":
            assert os.path.getsize(packed) < os.path.getsize(plain) // 3
            assert "100.00% compressed clusters" in qemu_img("check", str(packed)).stdout
        else:
            assert os.path.getsize(packed) == os.path.getsize(plain)  # every cluster stored as it was
            assert "compressed clusters" not in qemu_img("check", str(packed)).stdout.replace(
                "0.00% compressed clusters", "")


# -- the pure layout -----------------------------------------------------------------------


def test_compressed_entry_encoding():
    # qcow2.txt: x = 62 - (cluster_bits - 8) = 54; offset in bits 0..53, then the count of
    # 512-byte sectors after the first that the data touches.
    assert qcow2.CSIZE_SHIFT == 54 and qcow2.CSIZE_MASK == 0xFF
    e = qcow2.compressed_entry(C + 100, 412)  # ends exactly at the first sector's end
    assert e == 1 << 62 | C + 100
    e = qcow2.compressed_entry(C + 100, 413)  # one byte into the next sector
    assert e == 1 << 62 | 1 << 54 | C + 100
    e = qcow2.compressed_entry(2 * C - 1, C - 1)  # the most a compressed cluster can span
    assert (e >> 54) & 0xFF == 128 and not e & qcow2.COPIED
    assert qcow2.data_entry(3 * C) == 3 * C | qcow2.COPIED
    for bad in ((C, 0), (C, C), (1 << 54, 10)):
        with pytest.raises(ValueError):
            qcow2.compressed_entry(*bad)


def test_pack_packs_runs_into_the_next_cluster_and_counts_references():
    lay = qcow2.Layout(100 * C, compression="zlib")
    assert lay.pack([C // 2, C // 2 - 10, 100]) == [C, C + C // 2, 2 * C - 10]  # the third runs into cluster 2
    assert lay.next_host == 3 * C
    # the first fits in cluster 2; an ordinary cluster takes the next one, so the third cannot
    # run into it: the packing starts afresh (cluster 2's last 10 bytes stay unused)
    assert lay.pack([C - 100, C, 200]) == [2 * C + 90, 3 * C, 4 * C]
    assert lay.next_host == 5 * C
    refs = [int.from_bytes(lay._extra[2 * k:2 * k + 2], "big") + 1 for k in range(5)]
    # cluster 1: two pieces and the start of the third; 2: the third's end and the fourth;
    # 3: ordinary; 4: one piece
    assert refs[1:] == [3, 2, 1, 1]
    writes = dict(lay.finish())
    rb = writes[lay.refcount_offset]
    assert struct.unpack(">9H", rb[:18]) == (1, 3, 2, 1, 1, 1, 1, 1, 0)  # 5-7: L1, refcount block, table


def test_map_needs_guest_order_and_a_compressed_layout():
    with pytest.raises(ValueError):
        qcow2.Layout(10 * C).pack([100])
    lay = qcow2.Layout(10 * C, compression="zstd")
    h = lay.pack([100, C])
    list(lay.map(2 * C, struct.pack(">2Q", qcow2.compressed_entry(h[0], 100), qcow2.data_entry(h[1]))))
    with pytest.raises(ValueError):
        lay.map(C, struct.pack(">Q", qcow2.data_entry(h[1])))  # backwards
    with pytest.raises(ValueError):
        lay.map(9 * C, bytes(16))  # past the end of the disk


def test_header_says_zstd():
    lay = qcow2.Layout(C, compression="zstd")
    head = lay.header(C, 2 * C, 1)
    assert struct.unpack_from(">Q", head, 72)[0] == qcow2.INCOMPAT_COMPRESSION_TYPE
    assert head[104] == 1 and struct.unpack_from(">I", head, 100)[0] == 112
    plain = qcow2.Layout(C, compression="zlib").header(C, 2 * C, 1)
    assert struct.unpack_from(">Q", plain, 72)[0] == 0 and plain[104] == 0


def test_a_partial_last_cluster_inflates_to_a_whole_one(tmp_path):
    """QEMU inflates a compressed cluster into a whole cluster: the last, short one is
    compressed with its padding (else qemu-img reads an I/O error)."""
    size = 3 * C + 4096
    data = text(random.Random(2), size)
    path = tmp_path / "tail.qcow2"
    t = target.CompressedQcow2Target(str(path), size, compression="zlib")
    t.pwrite(memoryview(data), t.place(0, size))
    t.finish()
    t.close()
    assert_image(path, data, tmp_path)
    raw = path.read_bytes()
    assert zlib.decompressobj(-12).decompress(raw[C:C + 200])[:50] == data[:50]
