"""verify: checksums recorded at backup time catch flipped bytes and missing files."""

from __future__ import annotations

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
    assert r["ok"], json.dumps(r, indent=1)
    assert [p["checkpoint"] for p in r["points"]] == ["full", "inc", "diff"]
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
    assert not r["ok"] and r["points"][0]["disks"]["vdb"]["bad_blocks"] == 1
    assert r["points"][0]["disks"]["vda"]["ok"] and r["points"][0]["disks"]["vdc"]["ok"]


def test_flipped_byte_in_an_incremental_image(chain, repo):
    image = repo / chain.name / "inc" / "vda.qcow2"
    flip(image, data_cluster(image) + 7)
    r = verify(chain.name, repo=str(repo))
    status = {p["checkpoint"]: p["ok"] for p in r["points"]}
    assert status == {"full": True, "inc": False, "diff": True}


def test_missing_image_and_damaged_checksums(chain, repo):
    (repo / chain.name / "full" / "vdc.qcow2").unlink()
    r = verify(chain.name, repo=str(repo))
    # vdc (raw source) is a full image in every point: only the full point lost it.
    assert {p["checkpoint"]: p["ok"] for p in r["points"]} == {"full": False, "inc": True, "diff": True}
    assert "missing" in r["points"][0]["disks"]["vdc"]["problems"][0]
    (repo / chain.name / "full" / "vda.qcow2").unlink()
    r = verify(chain.name, repo=str(repo))
    assert all(not p["ok"] for p in r["points"])  # every vda chain starts at the full image
    sums = repo / chain.name / "diff" / "vdb.sums"
    sums.write_bytes(sums.read_bytes()[:-1] + b"\0")
    r = verify(chain.name, repo=str(repo), checkpoint="diff")
    assert any("checksums" in p for p in r["points"][0]["disks"]["vdb"]["problems"])
