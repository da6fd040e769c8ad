"""Consistent points on real libvirt/QEMU: --quiesce without an agent (disk-only VMs), and with
a real guest and its agent: files written inside it, freeze/thaw around the job, and the
guest thawed after every fault."""

from __future__ import annotations

import json

import pytest

from libvbackup.backup import pull
from libvbackup.repo import Repository

from .helpers import MiB, cli, leftovers, tree

pytestmark = pytest.mark.integration

CHANNEL = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


@pytest.mark.parametrize("channel", [False, True], ids=["no-channel", "agent-not-connected"])
def test_quiesce_yes_without_an_agent_fails_and_changes_nothing(lab, repo, workdir, channel):
    vm = lab.LabVM([(4 * MiB, "qcow2")]).start(extra_devices=CHANNEL if channel else "")
    try:
        vm["vda"].fill(0, MiB, 0x41)
        pull(vm.name, repo=str(repo), checkpoint="c1")
        before = tree(repo)
        for level in ("full", "inc"):
            res = cli("pull", vm.name, "--repo", str(repo), "--level", level, "--quiesce", "yes")
            assert res.returncode == 4, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1, res.stderr
            want = "guest agent is not connected" if channel else "no guest agent channel"
            assert f"cannot quiesce VM {vm.name!r}" in res.stderr and want in res.stderr, res.stderr
        assert tree(repo) == before
        assert vm.checkpoints() == ["c1"] and not vm.has_job() and leftovers() == []
        # auto: a warning, and the point says it is crash-consistent only.
        res = cli("pull", vm.name, "--repo", str(repo), "--level", "inc", "--checkpoint", "c2", "--json")
        assert res.returncode == 0, res.stderr
        assert "crash-consistent only" in res.stderr
        doc = json.loads(res.stdout)
        assert doc["consistency"] == "crash" and doc["frozen_seconds"] is None and doc["consistency_note"]
        res = cli("pull", vm.name, "--repo", str(repo), "--level", "inc", "--checkpoint", "c3", "--quiesce", "no")
        assert res.returncode == 0 and "crash-consistent: --quiesce no" in res.stdout
        assert [p.consistency for p in Repository(repo).load(vm.name).points] == ["crash"] * 3
        listing = cli("list", vm.name, "--repo", str(repo))
        assert listing.stdout.splitlines()[0].split()[4] == "CONSISTENCY"
        assert all(line.split()[4] == "crash" for line in listing.stdout.splitlines()[1:])
    finally:
        vm.destroy()
