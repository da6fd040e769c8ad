"""The run pipeline's promises: planning changes nothing, liveness comes from the lock, a point is
on disk before the manifest names it, another repository's run is named as such."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess

import libvirt
import pytest

from libvbackup import journal
from libvbackup.backup import pull
from libvbackup.errors import StateError
from libvbackup.lifecycle import abort, status
from libvbackup.repo import Repository

from .helpers import MiB, assert_restores, cli, leftovers, snap
from .test_faults import start_stalled

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))


def lose_checkpoints(vm) -> None:
    """libvirt forgets every checkpoint (as after undefine/define); the bitmaps stay."""
    xml = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    first = sorted(vm.checkpoints())[0]
    vm.dom.checkpointLookupByName(first).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
                                                | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
    vm.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    vm.dom = vm.conn.defineXML(xml)
    assert vm.checkpoints() == []


def test_redefinition_is_a_plan_step_done_only_after_every_check(vm, repo, workdir):
    vm["vda"].fill(0, MiB, 0x31)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vdb"].fill(MiB, MiB, 0x32)
    pull(vm.name, repo=str(repo), checkpoint="c2", level="inc")
    lose_checkpoints(vm)
    # Bad input after the loss: refused, and libvirt still has no checkpoint at all.
    for bad in (["--checkpoint", "c1"], ["--checkpoint", "../x"], ["--disk", "vdz"]):
        res = cli("pull", vm.name, "--repo", str(repo), "--level", "inc", *bad)
        assert res.returncode in (2, 3) and "Traceback" not in res.stderr, res.stderr
        assert vm.checkpoints() == [], bad
    # The dry run shows the step and does not take it.
    res = cli("pull", vm.name, "--repo", str(repo), "--level", "inc", "--checkpoint", "c3", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "# plan: incremental backup" in res.stdout
    assert [ln for ln in res.stdout.splitlines() if "redefine" in ln] == [
        "#   first: redefine checkpoint c1 from the repository",
        "#   first: redefine checkpoint c2 from the repository"]
    assert vm.checkpoints() == []
    vm["vda"].write(4097, b"after")
    r = pull(vm.name, repo=str(repo), level="inc", checkpoint="c3")
    assert (r.level, r.parent, r.redefined) == ("incremental", "c2", ("c1", "c2"))
    assert vm.checkpoints() == ["c1", "c2", "c3"]
    assert_restores(repo, vm.name, "c3", snap(vm), workdir)


def test_a_refused_redefinition_leaves_libvirt_as_it_was(vm, repo):
    vm["vda"].fill(0, MiB, 0x41)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    pull(vm.name, repo=str(repo), checkpoint="c2", level="inc")
    lose_checkpoints(vm)
    # c2's saved XML names a disk the domain does not have: libvirt refuses c2, c1 would pass.
    m = Repository(repo).load(vm.name)
    m.points[1].checkpoint_xml = m.points[1].checkpoint_xml.replace("name='vdb'", "name='vdq'").replace(
        'name="vdb"', 'name="vdq"')
    Repository(repo).save(m)
    res = cli("pull", vm.name, "--repo", str(repo), "--incremental", "c2", "--checkpoint", "c3")
    assert res.returncode == 4 and "cannot be redefined" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert vm.checkpoints() == []  # c1, redefined first, was taken back
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c3")
    assert r.level == "full" and "cannot be redefined" in r.fallback_reason


def test_liveness_comes_from_the_lock_not_the_journal_pid(vm, repo, workdir):
    """A dead run's journal names a pid that now belongs to an unrelated live process."""
    vm["vda"].fill(0, MiB, 0x51)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        for i, finish in enumerate(("status-then-pull", "abort")):
            vm["vda"].fill(2 * MiB + i * MiB, MiB, 0x53 + i)  # something to copy, so the copy stalls
            p = start_stalled(vm, repo, f"dead-{finish.split('-')[0]}", "c1")
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            r = Repository(repo)
            record = journal.read(r, vm.name)
            assert record.pid == p.pid and record.state is journal.RunState.JOB
            record.pid = unrelated.pid
            journal.write(r, record)
            s = status(vm.name, repo=str(repo))
            assert (s.running, s.stale, s.pid) == (False, True, unrelated.pid)
            if finish == "abort":
                a = abort(vm.name, repo=str(repo))
                assert a.cleaned_up and a.aborted == "dead-abort"
            else:
                vm["vdb"].fill(0, 4096, 0x52)
                res = pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1")
                assert res.level == "incremental"
                at_c2 = snap(vm)
            assert unrelated.poll() is None, "an unrelated process was signalled"
            assert journal.read(r, vm.name) is None and not vm.has_job() and leftovers() == []
        assert vm.checkpoints() == ["c1", "c2"]
        assert_restores(repo, vm.name, "c2", at_c2, workdir)
    finally:
        unrelated.kill()
        unrelated.wait()


def test_another_repositorys_run_is_named_not_called_foreign(vm, workdir):
    a, b = workdir / "A", workdir / "B"
    a.mkdir(mode=0o700)
    b.mkdir(mode=0o700)
    vm["vda"].fill(0, MiB, 0x71)
    p = start_stalled(vm, a, "ra")
    try:
        with pytest.raises(StateError) as e:
            pull(vm.name, repo=str(b))
        msg = str(e.value)
        assert f"another libvbackup run for repository {a}" in msg and "(checkpoint ra)" in msg
        assert "wait for it" in msg and "domjobabort" not in msg
        with pytest.raises(StateError) as e:
            pull(vm.name, repo=str(a))
        assert f"pid {p.pid}" in str(e.value) and "this repository" in str(e.value)
        assert abort(vm.name, repo=str(a)).pid == p.pid
        p.wait(timeout=60)
        assert "interrupted by SIGTERM; the backup job was aborted" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert not vm.has_job() and vm.checkpoints() == [] and leftovers() == []


def test_a_point_is_on_disk_before_the_manifest_names_it(vm, repo, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b, *args, **kw):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b, *args, **kw)

    def replace(a, b, *args, **kw):
        events.append(("rename", str(a), str(b)))
        return real_replace(a, b, *args, **kw)

    vm["vda"].fill(0, MiB, 0x61)
    vm["vdb"].fill(MiB, 3000, 0x62)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    pull(vm.name, repo=str(repo), checkpoint="p1")
    monkeypatch.undo()
    vm_dir = repo / vm.name
    partial, final = str(vm_dir / "p1.partial"), str(vm_dir / "p1")
    at = events.index(("rename", partial, final))
    before, after = events[:at], events[at + 1:]
    files = sorted(p.name for p in pathlib.Path(final).iterdir())
    assert files == ["vda.qcow2", "vda.sums", "vdb.qcow2", "vdb.sums"]
    synced = [i for i, e in enumerate(before) if e[0] == "fsync"]
    for name in files:
        assert ("fsync", f"{partial}/{name}") in before, name
    last_file = max(i for i in synced if before[i][1].startswith(partial + "/"))
    assert ("fsync", partial) in before[last_file:], "the directory entries were not made durable"
    manifest = str(vm_dir / "manifest.json")
    tmp = str(vm_dir / ".manifest.json.tmp")
    commit = after.index(("rename", tmp, manifest))
    assert ("fsync", str(vm_dir)) in after[:commit], "the rename was not made durable before the manifest"
    assert ("fsync", tmp) in after[:commit] and ("fsync", str(vm_dir)) in after[commit:]
    assert json.loads(pathlib.Path(manifest).read_text())["points"][0]["checkpoint"] == "p1"
