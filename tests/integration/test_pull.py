"""Pull-mode backups against a real libvirtd and QEMU, restored and compared byte for byte."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from libvbackup.backup import pull
from libvbackup.repo import Repository

from .helpers import MiB, KiB, assert_restores, leftovers, random_writes, snap

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((24 * MiB, "qcow2"), (12 * MiB, "qcow2"), (6 * MiB, "raw"))



def backing_of(path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    return info.get("backing-filename")


def test_full_incremental_differential_restore_byte_exact(vm, repo, workdir):
    rng = random.Random(20261123)
    models = {}
    for d in vm.disks:
        random_writes(d, rng)
    r = pull(vm.name, repo=str(repo), checkpoint="full1")
    assert r.level == "full" and r.parent is None
    assert r.disks["vdc"].mode == "full"
    models["full1"] = snap(vm)

    for d in vm.disks:
        random_writes(d, rng, n=6)
    r = pull(vm.name, repo=str(repo), checkpoint="inc1", incremental="full1")
    assert (r.level, r.parent) == ("incremental", "full1")
    assert r.disks["vda"].mode == "incremental"
    assert r.disks["vdc"].mode == "full" and "raw" in r.disks["vdc"].reason
    # Only what changed was read: far less than the whole disk.
    assert 0 < r.disks["vda"].bytes_copied < vm["vda"].size // 2
    models["inc1"] = snap(vm)

    for d in vm.disks:
        random_writes(d, rng, n=6)
    r = pull(vm.name, repo=str(repo), checkpoint="inc2", incremental="inc1")
    assert (r.level, r.parent) == ("incremental", "inc1")
    models["inc2"] = snap(vm)

    for d in vm.disks:
        random_writes(d, rng, n=6)
    r = pull(vm.name, repo=str(repo), checkpoint="diff1", incremental="full1")
    assert (r.level, r.parent) == ("differential", "full1")
    models["diff1"] = snap(vm)

    m = Repository(repo).load(vm.name)
    assert [p.checkpoint for p in m.points] == ["full1", "inc1", "inc2", "diff1"]
    assert [p.checkpoint for p in m.chain("inc2")] == ["full1", "inc1", "inc2"]
    assert [p.checkpoint for p in m.chain("diff1")] == ["full1", "diff1"]
    vmdir = repo / vm.name
    # The repository is a tree of ordinary qcow2 chains with relative backing files.
    assert backing_of(vmdir / "full1/vda.qcow2") is None
    assert backing_of(vmdir / "inc1/vda.qcow2") == "../full1/vda.qcow2"
    assert backing_of(vmdir / "inc2/vdb.qcow2") == "../inc1/vdb.qcow2"
    assert backing_of(vmdir / "diff1/vda.qcow2") == "../full1/vda.qcow2"
    assert backing_of(vmdir / "diff1/vdc.qcow2") is None
    for p in m.points:
        for d in p.disks.values():
            subprocess.run(["qemu-img", "check", "-q", str(vmdir / d.image)], check=True)

    for chk, expected in models.items():
        assert_restores(repo, vm.name, chk, expected, workdir, fmt="raw")
    assert_restores(repo, vm.name, "inc2", models["inc2"], workdir, fmt="qcow2")

    assert vm.checkpoints() == ["diff1", "full1", "inc1", "inc2"]
    assert not vm.has_job()
    assert leftovers() == []
    assert not (repo / vm.name / ".run.json").exists()
    assert sorted(p.name for p in (repo / vm.name).iterdir()) == [".lock", "diff1", "full1", "inc1", "inc2", "manifest.json"]


def test_dirty_range_zeroed_since_parent_restores_as_zero(vm, repo, workdir):
    vda = vm["vda"]
    vda.fill(0, 4 * MiB, 0xAB)
    vda.fill(8 * MiB, 3 * MiB + 123, 0xCD)
    pull(vm.name, repo=str(repo), checkpoint="c1", disks=["vda"])
    vda.zero(MiB, 2 * MiB, unmap=True)  # becomes zero clusters: reads as a zero extent
    vda.zero(8 * MiB + 100, 64 * KiB, unmap=False)  # unaligned, written as zeroes
    r = pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1", disks=["vda"])
    assert r.disks["vda"].bytes_zeroed >= 2 * MiB, r
    assert_restores(repo, vm.name, "c2", {"vda": vda.snapshot()}, workdir)


def test_guest_writes_during_backup_go_to_the_next_point(vm, repo, workdir):
    rng = random.Random(7)
    for d in vm.disks:
        random_writes(d, rng)
    before = snap(vm)

    def write_while_running():
        vm["vda"].write(1000, rng.randbytes(300 * KiB))
        vm["vdb"].zero(0, 1 * MiB, unmap=True)
        vm["vdc"].fill(4095, 10_000, 0x5A)

    pull(vm.name, repo=str(repo), checkpoint="p1", on_job_started=write_while_running)
    after = snap(vm)
    assert after != before
    assert_restores(repo, vm.name, "p1", before, workdir)
    pull(vm.name, repo=str(repo), checkpoint="p2", incremental="p1")
    assert_restores(repo, vm.name, "p2", after, workdir)


def test_disk_selection_and_json_cli(vm, repo, workdir):
    from .helpers import cli

    vm["vdb"].fill(0, MiB, 0x11)
    res = cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "only-b", "--disk", "vdb", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["vm"] == vm.name and out["checkpoint"] == "only-b" and out["level"] == "full"
    assert list(out["disks"]) == ["vdb"] and out["disks"]["vdb"]["bytes_copied"] >= MiB
    assert out["seconds"] >= 0 and out["disks"]["vdb"]["image"].endswith("only-b/vdb.qcow2")
    res = cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "no-b", "--exclude", "vdb", "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(json.loads(res.stdout)["disks"]) == ["vda", "vdc"]
    res = cli("list", vm.name, "--repo", str(repo), "--json")
    assert [p["checkpoint"] for p in json.loads(res.stdout)["points"]] == ["only-b", "no-b"]
    assert_restores(repo, vm.name, "only-b", {"vdb": vm["vdb"].snapshot()}, workdir)
    # Repository files are private.
    for p in (repo / vm.name).rglob("*"):
        assert p.stat().st_mode & 0o077 == 0, p


def test_dry_run_prints_schema_valid_xml_and_starts_nothing(vm, repo):
    from lxml import etree

    from .helpers import cli, tree

    schemas = {name: etree.RelaxNG(etree.parse(f"/usr/share/libvirt/schemas/{name}.rng"))
               for name in ("domainbackup", "domaincheckpoint")}
    pull(vm.name, repo=str(repo), checkpoint="base")
    before = (tree(repo), vm.checkpoints())
    for extra in ([], ["--incremental", "base"], ["--incremental", "base", "--disk", "vdc"]):
        res = cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "next", "--dry-run", "--json", *extra)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        backup_doc = etree.fromstring(out["backup_xml"].encode())
        chk_doc = etree.fromstring(out["checkpoint_xml"].encode())
        assert schemas["domainbackup"].validate(backup_doc), schemas["domainbackup"].error_log
        assert schemas["domaincheckpoint"].validate(chk_doc), schemas["domaincheckpoint"].error_log
        assert chk_doc.findtext("name") == "next"
        inc = backup_doc.findtext("incremental")
        assert inc == ("base" if extra and "--disk" not in extra else None)
    # The text form shows the same documents.
    res = cli("pull", vm.name, "--repo", str(repo), "--dry-run", "--incremental", "base")
    assert res.returncode == 0 and "<domainbackup" in res.stdout and "<domaincheckpoint>" in res.stdout
    assert "vdc: full (raw-format disk holds no dirty bitmap)" in res.stdout
    assert (tree(repo), vm.checkpoints()) == before
    assert not vm.has_job() and leftovers() == []


def test_disks_with_other_cluster_sizes_and_odd_sizes(make_vm, repo, workdir):
    """Source clusters of 4 KiB (dirty bitmap finer than the backup's 64 KiB clusters: partly
    dirty clusters are copied whole, their clean part from the export) and 2 MiB, disk sizes
    that end inside a cluster; a chain of full, incremental and differential points."""
    vm = make_vm((5 * MiB + 512, "qcow2:cluster_size=4096"), (3 * MiB + 3584, "qcow2:cluster_size=2097152"),
                 (2 * MiB + 1536, "raw"))
    rng = random.Random(7)
    for d in vm.disks:
        random_writes(d, rng)
    pull(vm.name, repo=str(repo), checkpoint="f")
    models = {"f": snap(vm)}
    for name, parent in (("i1", "f"), ("i2", "i1"), ("d1", "f")):
        for d in vm.disks:
            random_writes(d, rng, n=6)
            for _ in range(4):  # small scattered writes: many 64 KiB clusters dirty only in part
                off = rng.randrange(0, d.size - 4096) // 4096 * 4096
                d.write(off, rng.randbytes(rng.choice([512, 4096])))
        pull(vm.name, repo=str(repo), checkpoint=name, incremental=parent)
        models[name] = snap(vm)
    for chk, expected in models.items():
        assert_restores(repo, vm.name, chk, expected, workdir, fmt="raw")
    assert_restores(repo, vm.name, "i2", models["i2"], workdir, fmt="qcow2")
    from libvbackup.verify import verify
    r = verify(vm.name, repo=str(repo))
    assert r.ok, [(p.checkpoint, n, d.problems) for p in r.points for n, d in p.disks.items() if not d.ok]
