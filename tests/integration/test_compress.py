"""pull --compress: compressed qcow2 clusters in the repository, against a real libvirtd and
QEMU. Every point is checked by qemu-img, compared with an uncompressed backup of the same
data, restored byte for byte against the model of the guest's writes, and verified."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from libvbackup import api
from libvbackup.backup import pull
from libvbackup.repo import Repository
from libvbackup.verify import verify

from .helpers import KiB, MiB, assert_restores, cli, first_difference, leftovers, read_image, snap

pytestmark = pytest.mark.integration


def text(rng: random.Random, n: int) -> bytes:
    """Text-like data: words and numbers in lines (compresses about 3:1 with zstd)."""
    words = [b"backup", b"checkpoint", b"qcow2", b"cluster", b"guest", b"libvirt", b"the", b"of", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" " + str(rng.randrange(10000)).encode() + b" "
    return bytes(out[:n])


def writes(disk, rng: random.Random, scale: int = 1) -> None:
    """Compressible text (unaligned), random data, a fill, zero writes with and without unmap,
    a few bytes, and the disk's last bytes."""
    size = disk.size
    for _ in range(3 * scale):
        n = rng.randint(100 * KiB, 2 * MiB)
        disk.write(rng.randrange(0, size - n), text(rng, n))
    n = rng.randint(300 * KiB, MiB)
    disk.write(rng.randrange(0, size - n), rng.randbytes(n))  # incompressible
    disk.fill(rng.randrange(0, size - MiB), MiB - 777, rng.randrange(1, 256))
    disk.zero(rng.randrange(0, size // (64 * KiB) - 4) * 64 * KiB, 128 * KiB, unmap=True)
    disk.zero(rng.randrange(0, size - 100 * KiB), 100 * KiB - 3)
    disk.write(rng.randrange(0, size - 700), rng.randbytes(rng.randint(1, 700)))
    tail = rng.randint(1, 5000)
    disk.write(size - tail, text(rng, tail))


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", str(path)).stdout)


@pytest.fixture
def vm(make_vm):
    # a qcow2 disk, one whose size ends inside a cluster (a compressed last cluster is padded),
    # and a raw one (copied in full in every point)
    return make_vm((32 * MiB, "qcow2"), (5 * MiB + 512, "qcow2"), (6 * MiB, "raw"))


def test_compressed_chain_is_smaller_and_restores_byte_exact(vm, make_vm, repo, workdir):
    plain = workdir / "plain"
    plain.mkdir(mode=0o700)
    rng = random.Random(20261201)
    for d in vm.disks:
        writes(d, rng)
    models = {}
    r = pull(vm.name, repo=str(repo), checkpoint="z-full", compress=True)
    models["z-full"] = snap(vm)
    assert all(d.compression in ("zstd", "zlib") for d in r.disks.values())
    pull(vm.name, repo=str(plain), checkpoint="p-full")  # the same data, uncompressed

    for d in vm.disks:
        writes(d, rng)
    # an incremental through the CLI: --compress --json says what was stored
    res = cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "z-inc1", "--incremental", "z-full",
              "--compress", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    models["z-inc1"] = snap(vm)
    assert out["level"] == "incremental"
    for name, d in out["disks"].items():
        assert d["compression"] in ("zstd", "zlib") and d["stored_bytes"] > 0, (name, d)
    pull(vm.name, repo=str(plain), checkpoint="p-inc1", incremental="p-full")

    for d in vm.disks:
        writes(d, rng, scale=0)
    pull(vm.name, repo=str(repo), checkpoint="z-inc2", incremental="z-inc1")  # not compressed: a mixed chain
    models["z-inc2"] = snap(vm)
    for d in vm.disks:
        writes(d, rng, scale=0)
    pull(vm.name, repo=str(repo), checkpoint="z-inc3", incremental="z-inc2", compress=True)
    models["z-inc3"] = snap(vm)

    m = Repository(repo).load(vm.name)
    p = Repository(plain).load(vm.name)
    vmdir, pdir = repo / vm.name, plain / vm.name
    for point in m.points:
        compressed = point.checkpoint != "z-inc2"
        for name, d in point.disks.items():
            path = vmdir / d.image
            chk = qemu_img("check", "--output=json", str(path))
            assert chk.returncode == 0, chk.stdout + chk.stderr
            report = json.loads(chk.stdout)
            assert not report.get("leaks") and not report.get("corruptions"), report
            assert d.stored_bytes == path.stat().st_size
            assert (d.compression is not None) == compressed
            assert (info(path).get("format-specific", {}).get("data", {}).get("compression-type")
                    == (d.compression or "zlib"))
            if compressed:
                assert report.get("compressed-clusters", 0) > 0, (point.checkpoint, name, report)
    # the same data as the uncompressed backups, in less room (the raw disk too: copied in full)
    for zname, pname in (("z-full", "p-full"), ("z-inc1", "p-inc1")):
        for name in m.get(zname).disks:
            z, q = vmdir / zname / f"{name}.qcow2", pdir / pname / f"{name}.qcow2"
            cmp = qemu_img("compare", "-U", str(z), str(q))  # each with its chain
            assert cmp.returncode == 0, (zname, name, cmp.stdout + cmp.stderr)
            assert z.stat().st_size < q.stat().st_size, (zname, name)
    names = list(m.get("z-full").disks)
    total = {r: sum((d / c / f"{n}.qcow2").stat().st_size for c in cs for n in names)
             for r, d, cs in (("z", vmdir, ["z-full", "z-inc1"]), ("p", pdir, ["p-full", "p-inc1"]))}
    assert total["z"] < total["p"] * 0.75, total
    print("stored: compressed", total["z"], "plain", total["p"])

    for chk, expected in models.items():
        assert_restores(repo, vm.name, chk, expected, workdir, fmt="raw")
    assert_restores(repo, vm.name, "z-inc3", models["z-inc3"], workdir, fmt="qcow2")
    assert_restores(repo, vm.name, "z-inc1", models["z-inc1"], workdir, fmt="qcow2")
    v = verify(vm.name, repo=str(repo))
    assert v.ok, [(q.checkpoint, n, d.problems) for q in v.points for n, d in q.disks.items() if not d.ok]

    out = workdir / "restore-compressed"  # restore --format qcow2 --compress
    api.restore(vm.name, repo=str(repo), output=str(out), checkpoint="z-inc1", compress=True)
    for name, expected in models["z-inc1"].items():
        path = out / f"{name}.qcow2"
        report = json.loads(qemu_img("check", "--output=json", str(path)).stdout)
        assert report.get("compressed-clusters", 0) > 0 and not report.get("leaks"), report
        assert "backing-filename" not in info(path)
        got = read_image(path, "qcow2")
        assert got == expected, first_difference(got, expected)

    res = cli("list", vm.name, "--repo", str(repo), "--json")
    points = {q["checkpoint"]: q for q in json.loads(res.stdout)["points"]}
    assert points["z-full"]["disks"]["vda"]["compression"] in ("zstd", "zlib")
    assert points["z-inc2"]["disks"]["vda"]["compression"] is None
    assert points["z-inc2"]["disks"]["vda"]["stored_bytes"] > 0
    res = cli("list", vm.name, "--repo", str(repo))
    assert "stored)" in res.stdout
    assert leftovers() == [] and not vm.has_job()


def test_incompressible_and_zero_data(vm, repo, workdir):
    """Random data is stored as it is (no bigger than uncompressed), zeroes cost nothing."""
    vda = vm["vda"]
    rng = random.Random(5)
    vda.write(3 * MiB + 5, rng.randbytes(4 * MiB))
    vda.zero(10 * MiB, 4 * MiB, unmap=True)
    vda.zero(16 * MiB + 100, 2 * MiB)  # written as zeroes, not unmapped
    vda.write(20 * MiB, bytes(MiB))  # zero data, written
    pull(vm.name, repo=str(repo), checkpoint="r1", disks=["vda"], compress=True)
    path = repo / vm.name / "r1" / "vda.qcow2"
    chk = json.loads(qemu_img("check", "--output=json", str(path)).stdout)
    assert chk.get("check-errors", 0) == 0 and not chk.get("leaks")
    assert path.stat().st_size < 4 * MiB + MiB  # the random data and metadata, no more
    assert_restores(repo, vm.name, "r1", {"vda": vda.snapshot()}, workdir)
    vda.zero(3 * MiB, 2 * MiB, unmap=True)  # hides part of the random data in the parent
    vda.write(4 * MiB, text(rng, 64 * KiB))
    pull(vm.name, repo=str(repo), checkpoint="r2", incremental="r1", disks=["vda"], compress=True)
    assert_restores(repo, vm.name, "r2", {"vda": vda.snapshot()}, workdir)
    assert verify(vm.name, repo=str(repo)).ok


def test_push_refuses_compress(vm, repo):
    res = cli("push", vm.name, "--repo", str(repo), "--compress")
    assert res.returncode == 2 and "--compress is for pull" in res.stderr
    assert not (repo / vm.name / "manifest.json").exists()


def test_verify_finds_a_damaged_compressed_cluster(vm, repo):
    vda = vm["vda"]
    vda.write(MiB, text(random.Random(9), 2 * MiB))
    pull(vm.name, repo=str(repo), checkpoint="d1", disks=["vda"], compress=True)
    path = repo / vm.name / "d1" / "vda.qcow2"
    assert verify(vm.name, repo=str(repo)).ok
    # a byte in the middle of the compressed data (past the header cluster, before the metadata)
    at = 65536 + 3000
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x55]))
    r = verify(vm.name, repo=str(repo))
    assert not r.ok
    assert not r.points[0].disks["vda"].ok
