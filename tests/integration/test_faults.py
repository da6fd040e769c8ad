"""A backup killed or interrupted in the middle of copying: nothing lost, nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from libvbackup.backup import pull
from libvbackup.repo import Repository

from .helpers import MiB, assert_restores, cli, leftovers, stalling_child, tmpfs, wait_copying

pytestmark = pytest.mark.integration

# A child that runs a real pull whose copy stalls after its first completed request, so it can
# be killed with the job, the checkpoint, the partial images and qemu-nbd all alive.
CHILD = stalling_child("""
    from libvbackup import backup
    vm, repo, chk, inc = sys.argv[1:5]
    backup.pull(vm, repo=repo, checkpoint=chk, incremental=inc or None)
""")


@pytest.fixture
def vm(make_vm):
    return make_vm((16 * MiB, "qcow2"), (8 * MiB, "qcow2"))


def start_stalled(vm, repo, chk, inc=""):
    p = subprocess.Popen([sys.executable, "-c", CHILD, vm.name, str(repo), chk, inc],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_copying(p)
    assert vm.has_job() and chk in vm.checkpoints()
    assert (repo / vm.name / f"{chk}.partial").is_dir()
    return p


def qemu_nbd_for(path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def test_sigkill_mid_copy_is_cleaned_up_by_the_next_run(vm, repo, workdir):
    vm["vda"].fill(0, 4 * MiB, 0x61)
    vm["vdb"].fill(MiB, MiB, 0x62)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = {d.target: d.snapshot() for d in vm.disks}
    vm["vda"].fill(2 * MiB, 3 * MiB + 5, 0x63)
    vm["vdb"].zero(MiB, 512 * 1024, unmap=True)

    p = start_stalled(vm, repo, "killed", "c1")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    # The dead run left its journal; the killed point is not listed and cannot be restored.
    assert (repo / vm.name / ".run.json").exists()
    assert [q.checkpoint for q in Repository(repo).load(vm.name).points] == ["c1"]
    res = cli("restore", vm.name, "--repo", str(repo), "--checkpoint", "killed", "--output", str(workdir / "k"))
    assert res.returncode == 3

    vm["vda"].write(15 * MiB + 3, b"after the crash")
    now = {d.target: d.snapshot() for d in vm.disks}
    r = pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1")
    assert r.level == "incremental"
    assert vm.checkpoints() == ["c1", "c2"]  # the killed run's checkpoint is gone
    assert not vm.has_job()
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == [".lock", "c1", "c2", "manifest.json"]
    assert leftovers() == []
    assert qemu_nbd_for(repo) == []
    assert_restores(repo, vm.name, "c1", at_c1, workdir)
    assert_restores(repo, vm.name, "c2", now, workdir)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_abort_and_clean_up(vm, repo, workdir, sig, code):
    vm["vda"].fill(0, 2 * MiB, 0x71)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vda"].fill(MiB, MiB, 0x72)  # something to copy, so the stalled copy really stalls
    p = start_stalled(vm, repo, "stopped", "c1")
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err  # an uncaught libvbackup error in a plain Python program
    assert f"Interrupted: interrupted by {sig.name}; the backup job was aborted and cleaned up" in err, err
    assert not vm.has_job()
    assert vm.checkpoints() == ["c1"]
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == [".lock", "c1", "manifest.json"]
    assert leftovers() == []
    # Through the CLI the same interruption is one line and the conventional exit code.
    p = subprocess.Popen([sys.executable, "-c", CHILD.replace(
        "backup.pull(vm, repo=repo, checkpoint=chk, incremental=inc or None)",
        "from libvbackup.cli.main import main; sys.argv = ['libvbackup', 'pull', vm, '--repo', repo,"
        " '--checkpoint', chk, '--progress', 'none']; main()"), vm.name, str(repo), "s2", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_copying(p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    assert vm.checkpoints() == ["c1"] and not vm.has_job() and leftovers() == []
    assert json.loads((repo / vm.name / "manifest.json").read_text())["points"][-1]["checkpoint"] == "c1"


def _assert_clean(vm, repo, points: list[str]) -> None:
    assert not vm.has_job()
    assert [p.checkpoint for p in Repository(repo).load(vm.name).points] == points
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == sorted(points + [".lock", "manifest.json"])
    assert leftovers() == []
    assert qemu_nbd_for(repo) == []


def test_repository_file_system_full(vm, workdir):
    with tmpfs(workdir / "small", "12m", "mode=0700") as repo:
        vm["vda"].fill(0, 2 * MiB, 0x41)
        pull(vm.name, repo=str(repo), checkpoint="c1")
        at_c1 = {d.target: d.snapshot() for d in vm.disks}
        vm["vda"].write(3 * MiB, bytes(range(256)) * (40 * 1024))  # 10 MiB: cannot fit
        vm["vdb"].write(0, b"\x01" * (6 * MiB))
        res = cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "c2", "--incremental", "c1")
        assert res.returncode == 7, res.stderr  # CopyError: writing the image failed
        assert "No space left on device" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert vm.checkpoints() == ["c1"]
        _assert_clean(vm, repo, ["c1"])
        assert_restores(repo, vm.name, "c1", at_c1, workdir)


def test_qemu_dies_during_backup(vm, repo, workdir):
    vm["vda"].fill(0, 3 * MiB, 0x51)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = {d.target: d.snapshot() for d in vm.disks}
    vm["vda"].fill(MiB, MiB, 0x52)

    def kill_qemu():
        vm.dom.destroy()

    from libvbackup.errors import Error, StateError

    with pytest.raises(Error) as ei:
        pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1", on_job_started=kill_qemu)
    assert isinstance(ei.value, StateError) and ei.value.exit_code == 4
    assert str(ei.value).startswith(f"VM {vm.name!r} stopped during the backup (QEMU exited)"), ei.value
    assert [p.checkpoint for p in Repository(repo).load(vm.name).points] == ["c1"]
    assert not (repo / vm.name / "c2.partial").exists() and not (repo / vm.name / "c2").exists()
    assert leftovers() == []
    assert_restores(repo, vm.name, "c1", at_c1, workdir)
    # QEMU died without closing its images: the dirty bitmaps are lost, so the next backup is
    # a full one; it also finishes any clean-up the failed run could not do.
    vm.dom.create()
    now = {d.target: d.snapshot() for d in vm.disks}
    pull(vm.name, repo=str(repo), checkpoint="c3")
    assert "c2" not in vm.checkpoints()
    _assert_clean(vm, repo, ["c1", "c3"])
    assert_restores(repo, vm.name, "c3", now, workdir)


def test_libvirtd_restarted_during_backup(vm, repo, workdir, lab):
    vm["vda"].fill(0, 3 * MiB, 0x61)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vda"].fill(MiB, MiB, 0x62)
    at_c2 = {d.target: d.snapshot() for d in vm.disks}

    def restart_libvirtd():
        subprocess.run(["pkill", "-x", "libvirtd"], check=True)
        for _ in range(100):
            if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0:
                break
            time.sleep(0.1)
        subprocess.run(["libvirtd", "-d"], check=True)
        lab.ensure_libvirtd().close()

    # QEMU, the job and the NBD export survive the restart; only our connection dies, and the
    # run reconnects and finishes.
    pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1", on_job_started=restart_libvirtd)
    vm.conn = lab.ensure_libvirtd()
    vm.dom = vm.conn.lookupByName(vm.name)
    _assert_clean(vm, repo, ["c1", "c2"])
    assert vm.checkpoints() == ["c1", "c2"]
    assert_restores(repo, vm.name, "c2", at_c2, workdir)
    vm["vda"].write(5 * MiB, b"after restart")
    now = {d.target: d.snapshot() for d in vm.disks}
    pull(vm.name, repo=str(repo), checkpoint="c3", incremental="c2")
    _assert_clean(vm, repo, ["c1", "c2", "c3"])
    assert_restores(repo, vm.name, "c3", now, workdir)


def test_scratch_limit_aborts_the_backup_not_the_guest(vm, repo, workdir):
    vda = vm["vda"]
    vda.fill(0, 8 * MiB, 0x11)
    pull(vm.name, repo=str(repo), checkpoint="c1")

    def guest_writes():  # overwrites old data: copy-before-write puts it in the scratch image
        vda.write(MiB, bytes([0x22]) * (6 * MiB))

    from libvbackup.errors import StateError

    with pytest.raises(StateError, match="scratch-limit"):
        pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1",
             scratch_limit=2 * MiB, on_job_started=guest_writes)
    assert vm.dom.isActive()  # the guest's writes were confirmed by the lab; the VM runs on
    assert vm.checkpoints() == ["c1"]
    _assert_clean(vm, repo, ["c1"])
    pull(vm.name, repo=str(repo), checkpoint="c3", incremental="c1")
    assert_restores(repo, vm.name, "c3", {d.target: d.snapshot() for d in vm.disks}, workdir)


def test_scratch_file_system_too_small_is_refused(vm, repo, workdir):
    with tmpfs(workdir / "scratch", "64m") as small:
        res = cli("pull", vm.name, "--repo", str(repo), "--scratch-dir", str(small))
        assert res.returncode == 4 and "free" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert vm.checkpoints() == [] and not vm.has_job() and list(repo.iterdir()) == []
