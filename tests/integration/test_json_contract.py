"""Every --json document of real runs validates against the schema shipped for its command;
--progress json lines validate too; errors under --json are documents with the exit code."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from libvbackup import schemas

from .helpers import MiB, cli

pytestmark = pytest.mark.integration


def run_json(name: str, *args: str, code: int = 0) -> dict:
    p = cli(*args, "--json")
    assert p.returncode == code, p.stderr
    doc = json.loads(p.stdout)
    jsonschema.Draft202012Validator(schemas.load("error" if code else name)).validate(doc)
    assert doc["format_version"] == 1
    return doc


def test_every_command_json_validates(make_vm, repo, workdir, lab):
    vm = make_vm((8 * MiB, "qcow2"), (4 * MiB, "raw"))
    vm["vda"].fill(MiB, 3 * MiB + 17, 0x42)
    r = str(repo)
    full = run_json("pull", "pull", vm.name, "--repo", r, "--checkpoint", "c1")
    assert full["level"] == "full" and full["disks"]["vda"]["bytes_copied"] > 0
    vm["vda"].write(5 * MiB + 1, b"x" * 70000)
    p = cli("pull", vm.name, "--repo", r, "--checkpoint", "c2", "--level", "inc", "--progress", "json", "--json")
    assert p.returncode == 0, p.stderr
    jsonschema.Draft202012Validator(schemas.load("pull")).validate(json.loads(p.stdout))
    lines = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    progress = jsonschema.Draft202012Validator(schemas.load("progress"))
    for line in lines:
        progress.validate(line)
    final = {ev["disk"]: ev for ev in lines if ev["phase"] == "done"}
    assert set(final) == {"vda", "vdb"} and all(ev["vm"] == vm.name for ev in lines)
    assert final["vda"]["done"] == final["vda"]["total"] > 0
    dry = run_json("pull", "pull", vm.name, "--repo", r, "--level", "inc", "--dry-run")
    assert dry["dry_run"] is True and "<domainbackup" in dry["backup_xml"]
    run_json("push", "push", vm.name, "--repo", r, "--checkpoint", "c3", "--level", "inc")
    listing = run_json("list", "list", vm.name, "--repo", r)
    assert [p["checkpoint"] for p in listing["points"]] == ["c1", "c2", "c3"]
    run_json("restore", "restore", vm.name, "--repo", r, "--output", str(workdir / "out"))
    os.chmod(workdir, 0o711)
    new = f"{vm.name}-json"
    try:
        defined = run_json("restore", "restore", vm.name, "--repo", r, "--checkpoint", "c2",
                           "--output", str(workdir / "def"), "--define", new)
        assert defined["name"] == new and defined["started"] is False
    finally:
        conn = lab.ensure_libvirtd()
        lab.remove_domain(conn, new)
        conn.close()
    assert run_json("verify", "verify", vm.name, "--repo", r)["ok"] is True
    assert run_json("checkpoints", "checkpoints", vm.name, "--repo", r)["lost"] == []
    assert run_json("status", "status", vm.name, "--repo", r)["running"] is False
    pruned = run_json("prune", "prune", vm.name, "--repo", r, "--keep", "2", "--dry-run")
    assert pruned["remove"] == ["c1"]
    run_json("prune", "prune", vm.name, "--repo", r, "--keep", "2")
    # Failures are documents too, with the command's exit code.
    err = run_json("abort", "abort", vm.name, "--repo", r, code=3)
    assert err["type"] == "NotFound" and "no backup of VM" in err["error"]
    err = run_json("pull", "pull", "lvbtest-no-such-vm", "--repo", r, code=3)
    assert "no VM named" in err["error"]
    vm.dom.destroy()
    vm.wait_stopped()
    err = run_json("restore", "restore", vm.name, "--repo", r, "--in-place", code=2)
    assert "--yes" in err["error"]
    done = run_json("restore", "restore", vm.name, "--repo", r, "--in-place", "--yes")
    assert sorted(done["checkpoints_dropped"]) == ["c2", "c3"]
