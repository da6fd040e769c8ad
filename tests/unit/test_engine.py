"""The copy engine (nbdio.copy) between a real qemu-nbd and the image writers, no libvirt.

A source image with data, zero clusters, holes, unaligned pieces and a short last cluster is
served by qemu-nbd; the engine copies it into a new qcow2 (our writer) and a sparse raw file,
with the block hasher on. The copies must equal the source (qemu-img compare), pass qemu-img
check, and the digests must be those of the source's bytes. An incremental copy over a
backing image with a fake "dirty" set is checked the same way.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess

import pytest

from libvbackup import checksum, engine, extents, nbdio, sums, target

KiB = 1024
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-nbd", "qemu-img", "qemu-io")),
    reason="qemu-nbd, qemu-img and qemu-io are needed",
)


def qemu_io(path, fmt, *cmds):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


def make_source(path, size, rng):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), str(size)],
                   check=True)
    cmds = []
    for _ in range(40):
        off = rng.randrange(0, size - 1)
        n = rng.randint(1, min(300 * KiB, size - off))
        kind = rng.choice(["data", "data", "zero", "zero-unmap"])
        if kind == "data":
            cmds.append(f"write -P {rng.randint(1, 255)} {off} {n}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {n}")
        else:
            off, n = off // 4096 * 4096, max(4096, n // 4096 * 4096)
            if off + n <= size:
                cmds.append(f"write -z -u {off} {n}")
    cmds.append(f"write -P 9 {size - 700} 700")  # the short last cluster
    qemu_io(path, "qcow2", *cmds)


def dense_sums(data: bytes, block: int) -> bytes:
    digest = checksum.algorithm(checksum.DEFAULT).digest
    return b"".join(digest(data[off:off + block]) for off in range(0, len(data), block))


def read_raw(path, fmt, tmp):
    raw = tmp / "read.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_full_copy_equals_the_source_with_true_digests(tmp_path, fmt):
    size = 7 * MiB + 3 * 512
    src_path = tmp_path / "src.qcow2"
    make_source(src_path, size, random.Random(fmt))
    src = nbdio.image(str(src_path))
    out = tmp_path / f"out.{fmt}"
    dst = target.open_target(str(out), size, fmt)
    hasher = checksum.BlockHasher(size, block=256 * KiB)
    try:
        stats = engine.copy(src, dst, observer=hasher, max_request=64 * KiB, max_inflight=4, writers=3)
    finally:
        dst.close()
        src.close()
    expected = read_raw(src_path, "qcow2", tmp_path)
    assert read_raw(out, fmt, tmp_path) == expected
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", str(out)], check=True)
    hasher.done()
    assert hasher.dense() == dense_sums(expected, 256 * KiB)
    assert stats.bytes_copied > 0 and stats.bytes_zeroed == 0  # a new image: zeroes are skipped


@pytest.mark.parametrize("max_request,block", [(64 * KiB, 256 * KiB), (MiB, 256 * KiB), (MiB, checksum.BLOCK)])
def test_incremental_copy_over_a_backing_image(tmp_path, max_request, block):
    """Only 'dirty' ranges are written (some now zero, some partly covering a 64 KiB cluster);
    the result read through its backing file equals the source everywhere. With checksum
    blocks of the image's cluster size nothing is read back: whole clusters are copied."""
    size = 4 * MiB + 512
    rng = random.Random(5)
    old = tmp_path / "old.qcow2"
    make_source(old, size, rng)
    new = tmp_path / "new.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", str(new)],
                   check=True)
    dirty = [(100 * KiB, 8 * KiB), (1 * MiB, 200 * KiB), (2 * MiB + 4096, 4096), (3 * MiB, 256 * KiB),
             (size - 4096 - 512, 4096 + 512)]
    cmds = []
    for i, (off, n) in enumerate(dirty):
        cmds.append(f"write -z {off} {n}" if i % 2 else f"write -P {i + 40} {off} {n}")
    qemu_io(new, "qcow2", *cmds)
    # The overlay plays the export; its dirty bitmap is the list above.
    class WithDirty(nbdio.Source):
        def extents(self, start, end, remember=False):
            out = []
            for e in super().extents(start, end, remember):
                cuts = sorted({e.start, e.end, *(p for o, n in dirty for p in (o, o + n) if e.start < p < e.end)})
                for a, b in zip(cuts, cuts[1:]):
                    is_dirty = any(o <= a < o + n for o, n in dirty)
                    out.append(extents.Extent(a, b - a, e.zero, is_dirty))
            return out

    plain = nbdio.image(str(new))
    src = WithDirty(plain.handles, plain.name)
    src.close = plain.close  # the server is plain's
    top = tmp_path / "top.qcow2"
    dst = target.Qcow2Target(str(top), size, backing="old.qcow2")
    old_bytes = read_raw(old, "qcow2", tmp_path)
    parent = sums.Layout(size, block, checksum.DEFAULT, sums.DENSE).records(
        io.BytesIO(dense_sums(old_bytes, block)))
    hasher = checksum.BlockHasher(size, parent=parent, block=block)
    try:
        engine.copy(src, dst, observer=hasher, max_request=max_request)
    finally:
        dst.close()
        src.close()
    expected = read_raw(new, "qcow2", tmp_path)
    assert read_raw(top, "qcow2", tmp_path) == expected
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
    hasher.done()
    assert hasher.dense() == dense_sums(expected, block)
    assert (hasher.reread == []) == (block == dst.granularity), hasher.reread


def test_a_failing_target_stops_the_copy_with_one_error(tmp_path):
    size = 2 * MiB
    src_path = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src_path), str(size)], check=True)
    qemu_io(src_path, "qcow2", f"write -P 1 0 {size}")
    src = nbdio.image(str(src_path))
    dst = target.open_target(str(tmp_path / "out.qcow2"), size)

    def broken(data, offset):
        raise nbdio.CopyError(f"writing image at offset {offset} failed: No space left on device")

    dst.pwrite = broken
    try:
        with pytest.raises(nbdio.CopyError, match="No space left"):
            engine.copy(src, dst)
    finally:
        dst.close()
        src.close()


def test_copy_all_gives_up_on_a_stalled_export(monkeypatch):
    """A copy whose export stops answering (no byte for ``stall`` seconds) fails with CopyError
    and its threads are told to stop, instead of waiting forever (libnbd has no timeout of its
    own for a request in flight)."""
    import threading

    from libvbackup import parallel
    from libvbackup.errors import CopyError

    told = threading.Event()

    def stuck_copy(src, dst, *, observer=None, progress=None, should_stop=lambda: False, **kw):
        progress(4096)  # one request completes, then the server says nothing more
        while not should_stop():
            threading.Event().wait(0.01)
        told.set()
        raise CopyError("stopped")

    monkeypatch.setattr(parallel.engine, "copy", stuck_copy)
    monkeypatch.setattr(parallel.engine, "planned_bytes", lambda s, t: 1 << 20)
    monkeypatch.setattr(parallel, "WATCH_INTERVAL", 0.05)
    with pytest.raises(CopyError, match="no data came from the export for 0 s"):
        parallel.copy_all([parallel.Job("vda", object(), object())], stall=0.3)
    assert told.wait(5)
    # Without ``stall`` the same copy is left to its watch (here: one that gives up itself).
    calls = []

    def watch():
        calls.append(1)
        if len(calls) > 10:
            raise CopyError("watch gave up")

    told.clear()
    with pytest.raises(CopyError, match="watch gave up"):
        parallel.copy_all([parallel.Job("vda", object(), object())], watch=watch)
    assert told.wait(5)


@pytest.mark.parametrize("window", [None, 192 * KiB])  # 192 KiB: a new window every few requests
@pytest.mark.parametrize("cluster", [4096, 64 * KiB])
@pytest.mark.parametrize("own_layer", [False, True])
def test_digests_from_a_mapped_image_equal_those_read_through_the_engine(tmp_path, cluster, own_layer, window,
                                                                        monkeypatch):
    """A pushed image's digests are taken from a map of its file (``FileSource(mapped=True)``):
    the same records and counts as the engine's reads give, and the digests of what the image
    holds (its own layer over its backing file: zero clusters hide the backing's data, 4 KiB
    clusters leave 64 KiB blocks partly covered, read back through qemu-nbd)."""
    from libvbackup import imagefile

    if window:
        monkeypatch.setattr(imagefile, "MAP_WINDOW", window)
    size = 4 * MiB + 512
    rng = random.Random(11)
    old = tmp_path / "old.qcow2"
    make_source(old, size, rng)
    image = old
    if own_layer:
        image = tmp_path / "new.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b",
                        "old.qcow2", "-F", "qcow2", str(image)], check=True)
        qemu_io(image, "qcow2", "write -P 7 65536 200000", "write -z 1048576 131072", f"write -P 8 {size - 900} 900",
                "write -P 9 3000000 4096")
    block = 64 * KiB
    old_bytes = read_raw(old, "qcow2", tmp_path)
    expected = read_raw(image, "qcow2", tmp_path)

    def digests(mapped):
        parent = sums.Layout(size, block, checksum.DEFAULT, sums.DENSE).records(
            io.BytesIO(dense_sums(old_bytes, block))) if own_layer else None
        hasher = checksum.BlockHasher(size, parent=parent, block=block)
        with imagefile.FileSource(str(image), size, own_layer=own_layer, mapped=mapped) as src:
            stats = engine.copy(src, engine.Discard(size, reads_as_zero=not own_layer), observer=hasher)
        hasher.done()
        return hasher.records, stats

    mapped, mapped_stats = digests(True)
    read, read_stats = digests(False)
    assert mapped == read and mapped_stats == read_stats
    assert mapped_stats.bytes_copied > 0
    assert checksum.dense(mapped, size, block, checksum.algorithm(checksum.DEFAULT)) == dense_sums(expected, block)
