"""pull VM VM… --jobs N: several VMs at once, one report at the end (per VM: result, exit code),
one VM's failure never stopping the others; options that name one VM's things are refused."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from libvbackup import schemas

from .helpers import MiB, assert_restores, cli, random_writes, snap, tree

pytestmark = pytest.mark.integration


def test_several_vms_at_once(make_vm, repo, workdir):
    a = make_vm((8 * MiB, "qcow2"))
    b = make_vm((6 * MiB, "qcow2"), (2 * MiB, "raw"))
    for i, vm in enumerate((a, b)):
        for d in vm.disks:
            random_writes(d, random.Random(70 + i), 5)
    res = cli("pull", a.name, b.name, "--repo", str(repo), "--jobs", "2", "--quiesce", "no", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    jsonschema.Draft202012Validator(schemas.load("run")).validate(report)
    by_vm = {r["vm"]: r for r in report["vms"]}
    assert set(by_vm) == {a.name, b.name} and report["jobs"] == 2 and report["exit_code"] == 0
    assert all(r["ok"] and r["level"] == "full" and r["policy"] == "the command line" for r in by_vm.values())
    for vm in (a, b):
        assert_restores(repo, vm.name, by_vm[vm.name]["checkpoint"], snap(vm), workdir)
    a.disks[0].write(3 * MiB, b"second round")
    missing = "lvbtest-no-such-vm"
    res = cli("pull", a.name, missing, b.name, "--repo", str(repo), "--level", "auto", "--quiesce", "no",
              "--compress")
    assert res.returncode == 10, res.stderr
    points = json.loads(cli("list", a.name, "--repo", str(repo), "--json").stdout)["points"]
    assert [p["disks"]["vda"]["compression"] in ("zstd", "zlib") for p in points] == [False, True]
    assert_restores(repo, a.name, points[-1]["checkpoint"], snap(a), workdir)
    assert res.stderr.strip().splitlines() == [f"libvbackup: error: 1 of 3 VMs failed: {missing} (exit 3)"]
    lines = res.stdout.splitlines()
    assert any(line.startswith(f"ok {a.name}: incremental pull backup ") for line in lines)
    assert any(line.startswith(f"FAILED {missing} (the command line): exit 3") for line in lines)
    assert lines[-1].startswith("total: 3 VM(s), 2 backed up, 1 failed")
    before = tree(repo)
    for args, text in ((["--incremental", "x"], "--incremental"), (["--disk", "vda"], "--disk"),
                       (["--all"], "not both")):
        res = cli("pull", a.name, b.name, "--repo", str(repo), *args)
        assert res.returncode == 2 and text in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert tree(repo) == before
