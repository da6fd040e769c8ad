"""qcow2map.own_map against qemu-img map of the image alone (backing: null), on images QEMU wrote
(several cluster sizes, v2 and v3, zero clusters with and without unmap, a backing file) and on
images from our writer: the same extents, cluster for cluster."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from libvbackup import qcow2map, target

KiB, MiB = 1 << 10, 1 << 20


def qemu_map(path) -> list[dict]:
    alone = "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}})
    return json.loads(subprocess.run(["qemu-img", "map", "--output=json", alone], capture_output=True, text=True,
                                     check=True).stdout)


def normal(entries) -> list[tuple]:
    """(start, end, kind, host at start) runs, adjacent runs of one kind (contiguous data) joined."""
    out: list[list] = []
    for e in entries:
        kind = "data" if e["data"] else "zero" if e["present"] else "none"
        host = e.get("offset") if kind == "data" else None
        s, n = e["start"], e["length"]
        if out and out[-1][2] == kind and out[-1][1] == s and (kind != "data" or out[-1][3] + out[-1][1] - out[-1][0] == host):
            out[-1][1] = s + n
        else:
            out.append([s, s + n, kind, host])
    return [tuple(r) for r in out]


def own(path, start=0) -> list[dict]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(qcow2map.own_map(lambda n, off: os.pread(fd, n, off), start))
    finally:
        os.close(fd)


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096", "cluster_size=2097152",
                                  "compat=0.10"])
def test_own_map_equals_qemu_img_map(tmp_path, opts):
    rng = random.Random(opts)
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    size = 48 * MiB + 512
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 3 0 {8 * MiB}", str(base)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", str(base), "-F", "qcow2", str(top)],
                   check=True)
    cmds = []
    for _ in range(40):
        off = rng.randrange(0, size - 1)
        n = rng.randint(1, min(3 * MiB, size - off))
        kind = rng.choice(["data", "data", "zero", "unmap"])
        if kind == "data":
            cmds += ["-c", f"write -P {rng.randint(1, 255)} {off} {n}"]
        elif kind == "zero":
            cmds += ["-c", f"write -z {off} {n}"]
        else:
            off, n = off // (2 * MiB) * (2 * MiB), 2 * MiB
            if off + n <= size:
                cmds += ["-c", f"write -z -u {off} {n}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(top)], check=True, capture_output=True)
    assert normal(own(top)) == normal(qemu_map(top))
    # From an offset inside the image: the runs that reach past it, as qemu-img gives them.
    mid = 17 * MiB
    got = [r for r in normal(own(top, mid)) if r[1] > mid]
    assert got == [r for r in normal(qemu_map(top)) if r[1] > mid]


def test_own_map_of_our_writer(tmp_path):
    path = tmp_path / "ours.qcow2"
    size = 16 * (1 << 40)  # 16 TiB, a few clusters of data
    t = target.Qcow2Target(str(path), size, backing="x.qcow2")
    try:
        for off, n in ((0, 3 * MiB), ((1 << 40) + 64 * KiB, 64 * KiB)):
            t.pwrite(bytes([7]) * n, t.place(off, n))
        t.zero(9 << 40, 2 * MiB)
        t.pwrite(bytes([8]) * 128 * KiB, t.place(size - 128 * KiB, 128 * KiB))
        t.finish()
    finally:
        t.close()
    assert normal(own(path)) == normal(qemu_map(path))


def test_own_map_refuses_what_it_does_not_read(tmp_path):
    path = tmp_path / "c.qcow2"
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"x" * MiB)
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    with pytest.raises(qcow2map.Unsupported, match="compressed"):
        own(path)
    many = tmp_path / "m.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(many), "64G"], check=True)
    cmds = [a for i in range(70) for a in ("-c", f"write -P 1 {i * 512 * MiB} 4096")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(many)], check=True, capture_output=True)
    with pytest.raises(qcow2map.Unsupported, match="too many L2 tables"):
        own(many)
    with pytest.raises(qcow2map.Unsupported):
        own(raw)


def test_own_map_of_a_preallocated_image_with_zeroed_clusters(tmp_path):
    path = tmp_path / "p.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path), "8M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 1M 100k", "-c", "write -z 4M 1M",
                    "-c", "write -z -u 6M 1M", str(path)], check=True, capture_output=True)
    assert normal(own(path)) == normal(qemu_map(path))
