"""Checkpoint lifecycle: two repositories, ownership marks, the lock, status and abort."""

from __future__ import annotations

import json
import signal

import pytest

from libvbackup.backup import pull
from libvbackup.errors import StateError
from libvbackup.lifecycle import checkpoints, status
from libvbackup.repo import Repository
from libvbackup.results import StatusResult

from .helpers import MiB, assert_restores, cli, leftovers, snap
from .test_faults import start_stalled

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))



def test_two_repositories_back_up_one_vm_alternately(vm, workdir):
    a, b = workdir / "A", workdir / "B"
    a.mkdir()
    b.mkdir()
    expect: dict = {"A": {}, "B": {}}
    for i in range(3):
        for name, repo in (("A", a), ("B", b)):
            vm["vda"].fill((i * 2 + (name == "B")) * MiB, MiB // 2 + 7, 0x30 + i)
            vm["vdb"].write(i * 4096 + 3, f"{name}{i}".encode())
            r = pull(vm.name, repo=str(repo), level="auto")
            assert r.level == ("full" if i == 0 else "incremental")
            assert r.checkpoint.startswith(Repository(repo).checkpoint_prefix + "-")
            expect[name][r.checkpoint] = snap(vm)
    for name, repo in (("A", a), ("B", b)):
        for chk, model in expect[name].items():
            assert_restores(repo, vm.name, chk, model, workdir)
        marks = {c.name: c.owner for c in checkpoints(vm.name, repo=str(repo)).checkpoints}
        other = b if name == "A" else a
        assert all(marks[c] == "point" for c in expect[name])
        assert all(marks[c] == "other-repository" for c in expect["B" if name == "A" else "A"]), marks
        assert Repository(other).checkpoint_prefix != Repository(repo).checkpoint_prefix


def test_lock_status_abort_and_orphans(vm, repo, lab):
    vm["vda"].fill(0, 2 * MiB, 0x41)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vda"].fill(MiB, MiB, 0x42)
    p = start_stalled(vm, repo, "running", "c1")
    try:
        # One operation per VM per repository: the second names the holder.
        with pytest.raises(StateError, match=f"pid {p.pid}"):
            pull(vm.name, repo=str(repo), checkpoint="second", incremental="c1")
        s = status(vm.name, repo=str(repo))
        assert s.running and s.pid == p.pid and s.checkpoint == "running" and s.job
        res = cli("status", vm.name, "--repo", str(repo))
        assert res.returncode == 0 and f"pid {p.pid}" in res.stdout, res.stdout + res.stderr
        res = cli("abort", vm.name, "--repo", str(repo))
        assert res.returncode == 0, res.stderr
        p.wait(timeout=60)
        assert "interrupted by SIGTERM; the backup job was aborted and cleaned up" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert not vm.has_job() and vm.checkpoints() == ["c1"] and leftovers() == []
    assert status(vm.name, repo=str(repo)) == StatusResult(vm.name, running=False)
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == [".lock", "c1", "manifest.json"]

    # A run killed outright leaves an orphan checkpoint, marked as such, until the next run.
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>someone-else</name><disks><disk name='vda'/>"
                               "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>", 0)
    p = start_stalled(vm, repo, "killed", "c1")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    r = json.loads(cli("checkpoints", vm.name, "--repo", str(repo), "--json").stdout)
    marks = {c["name"]: c["owner"] for c in r["checkpoints"]}
    assert marks == {"c1": "point", "killed": "orphan", "someone-else": "foreign"}
    assert json.loads(cli("status", vm.name, "--repo", str(repo), "--json").stdout)["stale"] is True
    res = cli("abort", vm.name, "--repo", str(repo))  # a dead run: abort finishes its clean-up
    assert res.returncode == 0, res.stderr
    assert sorted(vm.checkpoints()) == ["c1", "someone-else"] and not vm.has_job() and leftovers() == []
    vm.dom.checkpointLookupByName("someone-else").delete(0)
