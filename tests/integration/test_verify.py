"""verify: checksums recorded at backup time catch flipped bytes and missing files."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess

import pytest

from libvbackup.backup import pull
from libvbackup.verify import verify

from .helpers import MiB, cli, random_writes

pytestmark = pytest.mark.integration


@pytest.fixture
def chain(lab, repo):
    """A VM with a full, an incremental and a differential point after random writes."""
    vm = lab.LabVM([(16 * MiB, "qcow2"), (8 * MiB, "qcow2"), (4 * MiB, "raw")]).start()
    rng = random.Random(99)
    try:
        for d in vm.disks:
            random_writes(d, rng)
        pull(vm.name, repo=str(repo), checkpoint="full")
        for d in vm.disks:
            random_writes(d, rng, n=5)
        pull(vm.name, repo=str(repo), checkpoint="inc", incremental="full")
        for d in vm.disks:
            random_writes(d, rng, n=5)
        pull(vm.name, repo=str(repo), checkpoint="diff", incremental="full")
        yield vm
    finally:
        vm.destroy()


def data_cluster(image) -> int:
    """Host file offset of the first allocated data cluster of an image (its own layer)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True,
                         check=True).stdout
    for e in json.loads(out):
        if e["data"] and e.get("depth", 0) == 0 and "offset" in e:
            return e["offset"]
    raise AssertionError(f"{image} has no data cluster of its own")


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_fresh_chain_verifies(chain, repo):
    r = verify(chain.name, repo=str(repo))
    assert r.ok, json.dumps(r.to_dict(), indent=1)
    assert [p.checkpoint for p in r.points] == ["full", "inc", "diff"]
    res = cli("verify", chain.name, "--repo", str(repo), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]
    # Same guest data, same blkhash, whatever the chain: a point taken with nothing changed
    # since the previous one has the same digests.
    pull(chain.name, repo=str(repo), checkpoint="again", incremental="diff")
    m = json.loads((repo / chain.name / "manifest.json").read_text())
    by = {p["checkpoint"]: p for p in m["points"]}
    for disk in ("vda", "vdb", "vdc"):
        assert by["again"]["disks"][disk]["blkhash"] == by["diff"]["disks"][disk]["blkhash"]


def test_flipped_byte_in_the_full_image_fails_every_point_that_sees_it(chain, repo):
    vmdir = repo / chain.name
    flip(vmdir / "full" / "vdb.qcow2", data_cluster(vmdir / "full" / "vdb.qcow2") + 1234)
    res = cli("verify", chain.name, "--repo", str(repo))
    assert res.returncode == 9, res.stdout + res.stderr
    assert "full: DAMAGED" in res.stdout and "differ" in res.stdout
    assert "full" in res.stderr.strip().splitlines()[-1]
    r = verify(chain.name, repo=str(repo), checkpoint="full")
    assert not r.ok and r.points[0].disks["vdb"].bad_blocks == 1
    assert r.points[0].disks["vda"].ok and r.points[0].disks["vdc"].ok


def test_flipped_byte_in_an_incremental_image(chain, repo):
    image = repo / chain.name / "inc" / "vda.qcow2"
    flip(image, data_cluster(image) + 7)
    r = verify(chain.name, repo=str(repo))
    status = {p.checkpoint: p.ok for p in r.points}
    assert status == {"full": True, "inc": False, "diff": True}


def test_missing_image_and_damaged_checksums(chain, repo):
    (repo / chain.name / "full" / "vdc.qcow2").unlink()
    r = verify(chain.name, repo=str(repo))
    # vdc (raw source) is a full image in every point: only the full point lost it.
    assert {p.checkpoint: p.ok for p in r.points} == {"full": False, "inc": True, "diff": True}
    assert "missing" in r.points[0].disks["vdc"].problems[0]
    (repo / chain.name / "full" / "vda.qcow2").unlink()
    r = verify(chain.name, repo=str(repo))
    assert all(not p.ok for p in r.points)  # every vda chain starts at the full image
    sums = repo / chain.name / "diff" / "vdb.sums"
    sums.write_bytes(sums.read_bytes()[:-1] + b"\0")
    r = verify(chain.name, repo=str(repo), checkpoint="diff")
    assert any("checksums" in p for p in r.points[0].disks["vdb"].problems)


def _to_legacy(repo, vm_name, tmp_path) -> None:
    """Rewrite the repository as libvbackup wrote it before XXH3: dense SHA-256 block digests
    (one for every block of the disk), no algorithm or sums format named in the manifest,
    manifest format 1."""
    vmdir = repo / vm_name
    m = json.loads((vmdir / "manifest.json").read_text())
    for p in m["points"]:
        for name, d in p["disks"].items():
            assert d.pop("checksum") == "xxh3-128"
            assert d.pop("sums_format") == 2
            raw = tmp_path / "point.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(vmdir / d["image"]), str(raw)], check=True)
            data, block = raw.read_bytes(), d["block_size"]
            sums = b"".join(hashlib.sha256(data[i:i + block]).digest() for i in range(0, len(data), block))
            (vmdir / d["image"]).with_suffix(".sums").write_bytes(sums)
            d["blkhash"] = hashlib.sha256(sums).hexdigest()
            raw.unlink()
    m["format"] = 1
    (vmdir / "manifest.json").write_text(json.dumps(m))


def test_repository_with_sha256_checksums(chain, repo, tmp_path):
    """Points written with SHA-256 digests still verify, damage in them is still found, and an
    incremental on top of them continues with SHA-256 (it reuses its parent's digests)."""
    _to_legacy(repo, chain.name, tmp_path)
    assert verify(chain.name, repo=str(repo)).ok
    random_writes(chain["vda"], random.Random(5), n=4)
    pull(chain.name, repo=str(repo), checkpoint="next", incremental="diff")
    m = json.loads((repo / chain.name / "manifest.json").read_text())
    assert m["points"][-1]["disks"]["vda"]["checksum"] == "sha256"
    assert m["points"][-1]["disks"]["vda"]["sums_format"] == 2  # the chain continues sparse
    assert m["format"] == 3
    assert verify(chain.name, repo=str(repo)).ok
    image = repo / chain.name / "next" / "vda.qcow2"
    flip(image, data_cluster(image) + 99)
    r = verify(chain.name, repo=str(repo))
    assert {p.checkpoint: p.ok for p in r.points} == {"full": True, "inc": True, "diff": True, "next": False}
    assert r.points[-1].disks["vda"].bad_blocks == 1
