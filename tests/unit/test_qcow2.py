"""libvbackup.qcow2 / target: images we write are valid qcow2 that QEMU reads as the model says.

Each case writes an image with the writer, then asks qemu-img: ``check`` (no corruption, no
leak) and ``compare`` against a raw file built from the model (backing file contents
overlaid with what was placed and zeroed).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvbackup import qcow2, target

C = qcow2.CLUSTER
MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def write_image(path, size, ops, backing=None, seed=0, backing_format="qcow2"):
    """ops: sorted (kind, start, length); returns what each placed range holds."""
    rng = random.Random(seed)
    t = target.Qcow2Target(str(path), size, backing, backing_format)
    placed = []
    try:
        for kind, start, length in ops:
            if kind == "data":
                data = rng.randbytes(length)
                t.pwrite(data, t.place(start, length))
                placed.append((start, data))
            else:
                t.zero(start, length)
        t.finish()
    finally:
        t.close()
    return placed


def model(size, ops, placed, base: bytes | None) -> bytearray:
    img = bytearray(base if base is not None else bytes(size))
    data = dict(placed)
    for kind, start, length in ops:
        img[start:start + length] = data[start] if kind == "data" else bytes(length)
    return img


def assert_image(path, expected: bytearray, tmp_path):
    chk = qemu_img("check", "-f", "qcow2", str(path))
    assert chk.returncode == 0, chk.stdout + chk.stderr
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
        c += draw(st.integers(0, 3))
        if c >= total:
            break
        n = draw(st.integers(1, total - c))
        start = c * C
        length = min(n * C, size - start)
        ops.append((draw(st.sampled_from(["data", "zero"])), start, length))
        c += n
    return size, ops


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(op_lists(), st.booleans())
def test_random_images_match_model(tmp_path_factory, case, with_backing):
    size, ops = case
    tmp = tmp_path_factory.mktemp("q")
    base = None
    backing = None
    if with_backing:
        base = random.Random(size).randbytes(size)
        (tmp / "base.qcow2").unlink(missing_ok=True)
        bt = target.open_target(str(tmp / "base.qcow2"), size, "qcow2")
        bt.pwrite(base, bt.place(0, size))
        bt.finish()
        bt.close()
        backing = "base.qcow2"
    img = tmp / "img.qcow2"
    placed = write_image(img, size, ops, backing, seed=len(ops))
    assert_image(img, model(size, ops, placed, base), tmp)
    info = qemu_img("info", "--output=json", str(img))
    assert ('"backing-filename": "base.qcow2"' in info.stdout) == with_backing


def test_l2_tables_across_regions_and_a_large_sparse_disk(tmp_path):
    """Writes on both sides of 512 MiB boundaries, zeroes spanning one, on a 1.5 GiB+ disk."""
    span = C * (C // 8)
    size = 3 * span + 4096
    ops = [
        ("data", 0, C),
        ("data", span - 2 * C, 4 * C),  # one placement crossing an L2 boundary
        ("zero", span + 10 * C, span),  # a zero range crossing the next boundary
        ("data", 3 * span, 4096),  # the partial last cluster
    ]
    base = bytes([7]) * size
    basef = tmp_path / "base.raw"
    with open(basef, "wb") as f:
        f.truncate(size)
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 7 0 {size}", str(basef)], check=True,
                   capture_output=True)
    placed = write_image(tmp_path / "img.qcow2", size, ops, "base.raw", seed=1, backing_format="raw")
    expected = model(size, ops, placed, base)
    assert_image(tmp_path / "img.qcow2", expected, tmp_path)
    assert os.path.getsize(tmp_path / "img.qcow2") < 2 * MiB


def test_empty_overlay_reads_as_its_backing(tmp_path):
    size = 5 * C
    base = random.Random(3).randbytes(size)
    bt = target.open_target(str(tmp_path / "b.qcow2"), size)
    bt.pwrite(base, bt.place(0, size))
    bt.finish()
    bt.close()
    write_image(tmp_path / "top.qcow2", size, [], backing="b.qcow2")
    assert_image(tmp_path / "top.qcow2", bytearray(base), tmp_path)


def test_layout_refuses_out_of_order_and_unaligned_ranges():
    lay = qcow2.Layout(10 * C)
    lay.place(2 * C, C)
    with pytest.raises(ValueError):
        lay.place(C, C)  # backwards
    with pytest.raises(ValueError):
        lay.place(4 * C + 512, C)  # unaligned
    with pytest.raises(ValueError):
        lay.zero(5 * C, 100)  # ends inside a cluster, not at the end of the disk
    with pytest.raises(ValueError):
        lay.place(9 * C, 2 * C)  # past the end
    with pytest.raises(ValueError):
        qcow2.Layout(C, backing="x" * 2000)


def test_refcounts_cover_metadata_beyond_one_refcount_block():
    """A layout whose file needs several refcount blocks: the fixed point is found."""
    lay = qcow2.Layout(8 << 30)
    lay.place(0, 8 << 30)  # 131072 data clusters: more than one 16-bit refcount block covers
    writes = lay.finish()
    rt_offset = writes[-2][0]
    rb_offset, rb = writes[-3]
    clusters = lay.file_size // C
    assert len(rb) // C == -(-clusters // (C * 8 // 16))
    assert rb[:clusters * 2] == b"\x00\x01" * clusters
    assert not any(rb[clusters * 2:])
    header = writes[-1][1]
    assert header[:4] == qcow2.MAGIC
    assert int.from_bytes(header[48:56], "big") == rt_offset
