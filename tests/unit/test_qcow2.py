"""libvbackup.qcow2 / target: images we write are valid qcow2 that QEMU reads as the model says.

Each case writes an image with the writer, then asks qemu-img: ``check`` (no corruption, no
leak) and ``compare`` against a raw file built from the model (backing file contents
overlaid with what was placed and zeroed).
"""

from __future__ import annotations

import bisect
import os
import random
import shutil
import struct
import subprocess
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvbackup import qcow2, target
from libvbackup.errors import CopyError

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
    list(lay.finish())
    with pytest.raises(ValueError):
        lay.place(9 * C, C)  # after finish


def test_refcounts_cover_metadata_beyond_one_refcount_block():
    """A layout whose file needs several refcount blocks: the fixed point is found."""
    lay = qcow2.Layout(8 << 30)
    _, l2 = lay.place(0, 8 << 30)  # 131072 data clusters: more than one 16-bit refcount block covers
    assert len(list(l2)) == 16
    writes = list(lay.finish())
    assert all(len(data) <= qcow2.CHUNK for _, data in writes)
    header = writes[-1][1]
    assert writes[-1][0] == 0 and header[:4] == qcow2.MAGIC
    l1_offset, rt_offset, rt_clusters = hdr(header)[2:5]
    rt = b"".join(d for o, d in writes if o >= rt_offset)
    blocks = [int.from_bytes(rt[k:k + 8], "big") for k in range(0, len(rt), 8)]
    blocks = blocks[:blocks.index(0)]
    assert blocks == list(range(blocks[0], rt_offset, C)) and rt_clusters == 1
    rb = b"".join(d for o, d in writes if blocks[0] <= o < rt_offset)
    clusters = lay.file_size // C
    assert len(blocks) == len(rb) // C == -(-clusters // (C * 8 // 16))
    assert rb[:clusters * 2] == b"\x00\x01" * clusters
    assert not any(rb[clusters * 2:])


def hdr(header: bytes):
    """(size, l1_size, l1_offset, refcount table offset, its clusters) of a header."""
    size, = struct.unpack_from(">Q", header, 24)
    l1_size, l1_offset, rt_offset, rt_clusters = struct.unpack_from(">IQQI", header, 36)
    return size, l1_size, l1_offset, rt_offset, rt_clusters


# -- sizes that are not a multiple of 512 ------------------------------------------------------


def test_layout_refuses_a_size_qemu_would_cut():
    with pytest.raises(ValueError, match="1000001 bytes, not a multiple of 512: QEMU would cut it to 999936"):
        qcow2.Layout(1000001)
    qcow2.Layout(1000448)  # a multiple of 512, not of the cluster size: fine


def test_qcow2_target_refuses_an_unaligned_size_raw_keeps_it(tmp_path):
    """QEMU rounds every size it exports up to 512 bytes; another NBD server (nbdkit) may not."""
    with pytest.raises(CopyError, match="not a multiple of 512") as ei:
        target.Qcow2Target(str(tmp_path / "x.qcow2"), 1000001)
    assert "raw image" in ei.value.hint
    assert not (tmp_path / "x.qcow2").exists()  # refused before the file is created
    t = target.open_target(str(tmp_path / "x.raw"), 1000001, "raw")
    t.finish()
    t.close()
    assert os.path.getsize(tmp_path / "x.raw") == 1000001


# -- images of any size in bounded memory ------------------------------------------------------

TiB = 1 << 40


def test_16_tib_full_disk_in_bounded_memory():
    """Metadata only (the data is not written): placing 16 TiB in large pieces of uneven sizes
    and finishing keep Python's peak under 200 MiB (it was 1.5 GiB), and the metadata is
    consistent: data runs and metadata writes tile the file, each cluster once; all refcounts
    are 1 and cover the file; the L1 table points at the L2 tables, which point at the data."""
    size = 16 * TiB
    sizes = [1 << 30, (3 << 30) + C, (512 << 20) - C, 5 * C, 7 << 30]
    ones = b"\x00\x01" * (qcow2.CHUNK // 2)
    tracemalloc.start()
    try:
        lay = qcow2.Layout(size)
        runs = []  # (guest start, host offset)
        extents = []  # (file offset, length) of all written
        l2 = {}  # file offset of a table -> (first entry, last entry)
        pos = k = 0
        while pos < size:
            n = min(sizes[k % len(sizes)], size - pos)
            host, writes = lay.place(pos, n)
            runs.append((pos, host))
            extents.append((host, n))
            for off, data in writes:
                assert len(data) == C
                l2[off] = (data[:8], data[-8:])
                extents.append((off, C))
            pos += n
            k += 1
        fin = lay.finish()
        clusters = lay.file_size // C
        head = l1 = rt = None
        rb_entries = biggest = 0
        for off, data in fin:
            biggest = max(biggest, len(data))
            if off:
                extents.append((off, len(data)))
            if off == 0:
                head = bytes(data)
            elif off < lay.l1_offset:
                l2[off] = (data[:8], data[-8:])
            elif off < lay.refcount_offset:
                l1 = (l1 or b"") + data
            elif off < lay.refcount_table_offset:
                assert off == lay.refcount_offset + rb_entries * 2
                m = max(0, min(len(data) // 2, clusters - rb_entries))
                assert data[:2 * m] == ones[:2 * m] and not data[2 * m:].strip(b"\x00")
                rb_entries += len(data) // 2
            else:
                rt = (rt or b"") + data
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * MiB, f"peak {peak >> 20} MiB"
    assert biggest <= qcow2.CHUNK
    # the header, written last
    assert head[:4] == qcow2.MAGIC
    assert hdr(head) == (size, 32768, lay.l1_offset, lay.refcount_table_offset,
                         (lay.file_size - lay.refcount_table_offset) // C)
    # the file: every cluster written once
    extents.sort()
    end = C  # cluster 0: the header
    for off, n in extents:
        assert off == end
        end = off + -(-n // C) * C
    assert end == lay.file_size
    # refcounts: the last block covers the file's last cluster, and no more blocks than needed
    blocks = rb_entries // qcow2.REFCOUNTS_PER_BLOCK
    assert (blocks - 1) * qcow2.REFCOUNTS_PER_BLOCK < clusters <= rb_entries
    table = struct.unpack(f">{len(rt) // 8}Q", rt)
    assert table[:blocks] == tuple(range(lay.refcount_offset, lay.refcount_table_offset, C))
    assert not any(table[blocks:])
    # L1 -> L2 -> data
    guests = [g for g, _ in runs]

    def host_of(cluster):
        g, h = runs[bisect.bisect_right(guests, cluster * C) - 1]
        return h + cluster * C - g | qcow2.COPIED

    entries = struct.unpack(">32768Q", l1[:32768 * 8])
    assert len(set(entries)) == len(l2) == 32768
    for index, entry in enumerate(entries):
        assert entry & qcow2.COPIED
        first, last = l2[entry & qcow2.OFFSET_MASK]
        e = index * qcow2.L2_ENTRIES
        assert (int.from_bytes(first, "big"), int.from_bytes(last, "big")) == (
            host_of(e), host_of(e + qcow2.L2_ENTRIES - 1)), index


def test_a_16_tib_image_qemu_reads(tmp_path):
    """A few MiB of data over 16 TiB (minus 512: a short last cluster), at the start, across
    an L2 table boundary, at the very end; 4 GiB placed but never written (a sparse file
    that needs several refcount blocks); a zero range. QEMU finds nothing to say and reads
    the data where it was put."""
    size = 16 * TiB - 512
    path = tmp_path / "big.qcow2"
    t = target.Qcow2Target(str(path), size)
    try:
        t.pwrite(b"\x11" * MiB, t.place(0, MiB))
        t.zero(TiB, 3 * C)
        t.pwrite(b"\x22" * MiB, t.place(5 * TiB - 2 * C, MiB))
        t.place(8 * TiB, 4 << 30)  # reads as zeroes: a hole in the file
        t.pwrite(b"\x33" * (MiB - 512), t.place(size - MiB + 512, MiB - 512))
        t.finish()
    finally:
        t.close()
    assert os.stat(path).st_blocks * 512 < 16 * MiB  # only the data and the metadata
    chk = qemu_img("check", "-f", "qcow2", str(path))
    assert chk.returncode == 0 and "No errors" in chk.stdout, chk.stdout + chk.stderr
    info = qemu_img("info", "--output=json", str(path))
    assert f'"virtual-size": {size},' in info.stdout
    reads = [(0x11, 0, MiB), (0, MiB, C), (0, TiB, 3 * C), (0x22, 5 * TiB - 2 * C, MiB),
             (0, 5 * TiB - 3 * C, C), (0, 5 * TiB - 2 * C + MiB, C), (0, 8 * TiB, MiB),
             (0, 8 * TiB + (4 << 30) - MiB, MiB), (0, size - MiB - C + 512, C),
             (0x33, size - MiB + 512, MiB - 512)]
    argv = ["qemu-io", "-f", "qcow2", "-r"]
    for pattern, offset, n in reads:
        argv += ["-c", f"read -P {pattern} {offset} {n}"]
    io = subprocess.run(argv + [str(path)], capture_output=True, text=True)
    assert io.returncode == 0 and io.stdout.count("read ") == len(reads), io.stdout + io.stderr
    assert "verification failed" not in io.stdout + io.stderr, io.stdout
