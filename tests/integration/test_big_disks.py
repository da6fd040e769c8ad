"""A 16 TiB thin disk holding a few MiB: full, incremental, verify and restore follow the data,
not the disk size (the times and memory are measured by scripts/bench, not asserted here)."""

from __future__ import annotations

import pathlib
import random
import shutil
import subprocess

import pytest

from libvbackup import nbdio
from libvbackup.backup import pull
from libvbackup.repo import Repository
from libvbackup.restore import restore
from libvbackup.verify import verify

from .helpers import MiB

pytestmark = pytest.mark.integration

TiB = 1 << 40
BIG = 16 * TiB


class SparseModel:
    """What the guest wrote to a disk too big for a bytearray: the writes, in order."""

    def __init__(self, size: int):
        self.size = size
        self.writes: list[tuple[int, bytes]] = []

    def write(self, disk, offset: int, data: bytes) -> None:
        disk.write(offset, data)  # the lab disk has no model of its own here (track=False)
        self.writes.append((offset, data))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for off, data in self.writes:
            lo, hi = max(off, offset), min(off + len(data), offset + length)
            if lo < hi:
                out[lo - offset:hi - offset] = data[lo - off:hi - off]
        return bytes(out)

    def copy(self) -> "SparseModel":
        m = SparseModel(self.size)
        m.writes = list(self.writes)
        return m


def assert_image_equals(path: pathlib.Path, model: SparseModel) -> None:
    """Byte for byte, at the cost of the data: every extent the image reports is compared,
    data extents read and zero extents checked against the model's writes."""
    with nbdio.image(str(path)) as src:
        assert src.size == model.size
        pos = 0
        while pos < src.size:
            end = min(src.size, pos + nbdio.STATUS_RANGE)
            for e in src.extents(pos, end):
                if e.zero:
                    for off, data in model.writes:
                        lo, hi = max(off, e.start), min(off + len(data), e.end)
                        if lo < hi:
                            assert model.read(lo, hi - lo) == bytes(hi - lo), f"{path}: data lost at {lo}"
                else:
                    for at in range(e.start, e.end, 4 * MiB):
                        n = min(4 * MiB, e.end - at)
                        assert src.pread(n, at) == model.read(at, n), f"{path}: differs in [{at}, {at + n})"
                pos = e.end


@pytest.fixture
def big_vm(lab):
    vm = lab.LabVM([(BIG, "qcow2"), (4 << 30, "qcow2")], track=False).start()
    yield vm
    vm.destroy()


def test_a_16_tib_thin_disk_costs_its_data(big_vm, repo, workdir):
    rng = random.Random(16)
    models = {d.target: SparseModel(d.size) for d in big_vm.disks}
    # The same data on both disks, plus the big disk's far end, unaligned pieces and zeroes.
    for off, n in ((0, MiB), (123_457, 70_000), (3 * MiB + 17, 2 * MiB), ((1 << 30) + 512, 300_000)):
        data = rng.randbytes(n)
        for d in big_vm.disks:
            models[d.target].write(d, off, data)
    vda = big_vm["vda"]
    for off, n in ((BIG // 2 + 4097, 1 * MiB), (BIG - 5000, 5000), (13 * TiB, 64 << 10)):
        models["vda"].write(vda, off, rng.randbytes(n))
    r1 = pull(big_vm.name, repo=str(repo), checkpoint="f")
    at = {"f": {k: m.copy() for k, m in models.items()}}
    models["vda"].write(vda, BIG // 2 + 4097, bytes(1000))  # zeroes over data
    models["vda"].write(vda, 9 * TiB + 1, rng.randbytes(MiB // 2))
    models["vdb"].write(big_vm["vdb"], (2 << 30) - 3, rng.randbytes(5000))
    r2 = pull(big_vm.name, repo=str(repo), checkpoint="i", level="inc")
    at["i"] = {k: m.copy() for k, m in models.items()}
    assert (r2.level, r2.parent) == ("incremental", "f")
    assert r2.disks["vda"].bytes_copied < 4 * MiB  # the dirty clusters only
    assert verify(big_vm.name, repo=str(repo)).ok
    # Metadata follows the data: the repository is the data copied plus a little per point.
    m = Repository(repo).load(big_vm.name)
    copied = sum(d.bytes_copied for p in m.points for d in p.disks.values())
    stored = int(subprocess.run(["du", "-sB1", str(repo / big_vm.name)], capture_output=True, text=True,
                                check=True).stdout.split()[0])
    assert stored <= copied + len(m.points) * MiB, (stored, copied)
    for p in m.points:
        sums = Repository(repo).sums_path(big_vm.name, p.disks["vda"].image)
        assert sums.stat().st_size < 4096  # 24 bytes per 64 KiB block holding data
    assert r1.disks["vda"].size == BIG
    for chk in ("f", "i"):
        out = workdir / f"restored-{chk}"
        res = restore(big_vm.name, repo=str(repo), output=str(out), checkpoint=chk)
        for name, d in res.disks.items():
            subprocess.run(["qemu-img", "check", "-q", d.path], check=True)
            assert_image_equals(pathlib.Path(d.path), at[chk][name])
        shutil.rmtree(out)
    # A flipped byte in the big full image is found without reading 16 TiB.
    image = repo / big_vm.name / "f" / "vda.qcow2"
    mapped = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True,
                            check=True).stdout
    import json

    first = next(e for e in json.loads(mapped) if e["data"] and "offset" in e)
    with open(image, "r+b") as f:
        f.seek(first["offset"] + 99)
        b = f.read(1)
        f.seek(first["offset"] + 99)
        f.write(bytes([b[0] ^ 0x10]))
    r = verify(big_vm.name, repo=str(repo))
    assert {p.checkpoint: p.disks["vda"].ok for p in r.points} == {"f": False, "i": False}
    assert r.points[0].disks["vda"].bad_blocks == 1 and all(p.disks["vdb"].ok for p in r.points)
