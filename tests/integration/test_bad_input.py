"""Bad input: one line on stderr, a non-zero exit, no traceback, and nothing changed.

Each case runs the real CLI against a real VM that already has one backup point, then checks
that the repository (every file, byte for byte), libvirt's checkpoints, the VM's job state and
the scratch space are exactly as before.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest

from libvbackup.backup import pull
from libvbackup.manifest import FORMAT

from .helpers import MiB, cli, leftovers, tmpfs, tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(lab):
    base = pathlib.Path(tempfile.mkdtemp(prefix="lvbtest-bad-", dir="/var/tmp"))
    repo = base / "repo"
    repo.mkdir(mode=0o700)
    vm = lab.LabVM([(8 * MiB, "qcow2"), (4 * MiB, "raw")]).start()
    vm["vda"].fill(0, MiB, 0x77)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    nonempty = base / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("x")
    yield {"vm": vm, "repo": repo, "base": base, "nonempty": nonempty}
    vm.destroy()
    shutil.rmtree(base, ignore_errors=True)


# (id, argv template, expected exit code, a word the message must contain)
CASES = [
    ("unknown-vm", ["pull", "no-such-vm-xyz", "--repo", "{repo}"], 3, "no-such-vm-xyz"),
    ("unknown-checkpoint", ["pull", "{vm}", "--repo", "{repo}", "--incremental", "nope"], 3, "nope"),
    ("checkpoint-name-taken", ["pull", "{vm}", "--repo", "{repo}", "--checkpoint", "c1"], 2, "c1"),
    ("bad-checkpoint-name", ["pull", "{vm}", "--repo", "{repo}", "--checkpoint", "../evil"], 2, "invalid"),
    ("same-incremental-and-new", ["pull", "{vm}", "--repo", "{repo}", "--checkpoint", "c9",
                                  "--incremental", "c9"], 2, "same"),
    ("unreachable-uri", ["pull", "{vm}", "--repo", "{repo}", "--uri",
                         "qemu+unix:///system?socket=/nonexistent/libvirt.sock"], 6, "cannot connect"),
    ("missing-repo", ["pull", "{vm}", "--repo", "{base}/no-such-repo"], 5, "does not exist"),
    ("unknown-disk", ["pull", "{vm}", "--repo", "{repo}", "--disk", "vdz"], 3, "vdz"),
    ("include-and-exclude", ["pull", "{vm}", "--repo", "{repo}", "--disk", "vda", "--exclude", "vda"], 2, "vda"),
    ("exclude-everything", ["pull", "{vm}", "--repo", "{repo}", "--exclude", "vda", "--exclude", "vdb"], 2,
     "no disk"),
    ("missing-scratch-dir", ["pull", "{vm}", "--repo", "{repo}", "--scratch-dir", "{base}/nope"], 2, "scratch"),
    ("bad-progress", ["pull", "{vm}", "--repo", "{repo}", "--progress", "loud"], 2, "progress"),
    ("bad-scratch-limit", ["pull", "{vm}", "--repo", "{repo}", "--scratch-limit", "lots"], 2, "invalid size"),
    ("restore-unknown-point", ["restore", "{vm}", "--repo", "{repo}", "--checkpoint", "zz", "--output",
                               "{base}/out-zz"], 3, "zz"),
    ("restore-nonempty-output", ["restore", "{vm}", "--repo", "{repo}", "--output", "{nonempty}"], 2,
     "not empty"),
    ("restore-bad-format", ["restore", "{vm}", "--repo", "{repo}", "--format", "vmdk", "--output",
                            "{base}/out-fmt"], 2, "vmdk"),
    ("restore-unknown-disk", ["restore", "{vm}", "--repo", "{repo}", "--disk", "vdz", "--output",
                              "{base}/out-disk"], 3, "vdz"),
    ("list-unknown-vm", ["list", "no-such-vm-xyz", "--repo", "{repo}"], 3, "no backups"),
]


def _snapshot(env) -> dict:
    vm = env["vm"]
    return {"repo": tree(env["repo"]), "checkpoints": vm.checkpoints(), "job": vm.has_job(),
            "scratch": leftovers(), "running": vm.dom.isActive(),
            "base": sorted(p.name for p in env["base"].iterdir())}


def check_refused(env, argv: list[str], code: int, word: str) -> None:
    fmt = {"vm": env["vm"].name, "repo": env["repo"], "base": env["base"], "nonempty": env["nonempty"]}
    args = [a.format(**fmt) for a in argv]
    before = _snapshot(env)
    res = cli(*args)
    after = _snapshot(env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    if code != 2 or lines[0].startswith("libvbackup: error:"):
        assert len(lines) == 1 and lines[0].startswith("libvbackup: error:"), res.stderr
    assert word in res.stderr, res.stderr
    assert after == before


@pytest.mark.parametrize("argv,code,word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(env, argv, code, word):
    check_refused(env, argv, code, word)


def test_checkpoint_libvirt_lost_suggests_full_backup(env):
    vm = env["vm"]
    pull(vm.name, repo=str(env["repo"]), checkpoint="lost1")
    # Deleted for real (bitmap too): it cannot be redefined from the repository either.
    vm.dom.checkpointLookupByName("lost1").delete(0)
    check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--incremental", "lost1"], 4, "full backup")
    check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--level", "inc"], 4, "full backup")
    check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--level", "inc", "--incremental", "c1"], 2,
                  "contradict")
    check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--level", "weekly"], 2, "level")


def test_corrupt_and_newer_manifests_are_refused(env):
    manifest = env["repo"] / env["vm"].name / "manifest.json"
    good = manifest.read_text()
    try:
        manifest.write_text(good[: len(good) // 2])
        check_refused(env, ["pull", "{vm}", "--repo", "{repo}"], 5, "not valid JSON")
        check_refused(env, ["list", "{vm}", "--repo", "{repo}"], 5, "not valid JSON")
        assert f'"format": {FORMAT}' in good
        manifest.write_text(good.replace(f'"format": {FORMAT}', '"format": 99', 1))
        check_refused(env, ["pull", "{vm}", "--repo", "{repo}"], 5, "newer")
        check_refused(env, ["restore", "{vm}", "--repo", "{repo}", "--output", "{base}/o"], 5, "newer")
    finally:
        manifest.write_text(good)


def test_unwritable_repository(env):
    with tmpfs(env["base"] / "ro-repo", "1m", "ro") as ro:
        check_refused(env, ["pull", "{vm}", "--repo", str(ro)], 5, "not writable")


def test_push_of_a_vm_not_running(lab, workdir):
    """(A pull backs a shut-off VM up from its images: tests/integration/test_offline.py.)"""
    vm = lab.LabVM([(4 * MiB, "qcow2")]).start()
    try:
        vm.dom.destroy()
        res = cli("push", vm.name, "--repo", str(workdir))
        assert res.returncode == 4 and "is shut off; a push backup needs QEMU running" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert list(workdir.iterdir()) == [] and vm.checkpoints() == []
    finally:
        vm.destroy()


def test_another_tools_backup_job_is_refused_and_left_alone(env):
    vm = env["vm"]
    run = env["base"] / "foreign"
    run.mkdir()
    os.chmod(env["base"], 0o711)  # QEMU must reach the other tool's scratch directory
    import pwd

    qemu = pwd.getpwnam("libvirt-qemu")
    os.chown(run, qemu.pw_uid, qemu.pw_gid)
    vm.dom.backupBegin(f"<domainbackup mode='pull'><server transport='unix' socket='{run}/s.sock'/>"
                       f"<disks><disk name='vda' backup='yes' type='file'><scratch file='{run}/vda.q'/>"
                       "</disk></disks></domainbackup>", None, 0)
    try:
        check_refused(env, ["pull", "{vm}", "--repo", "{repo}"], 4, "already has a backup job")
        assert vm.has_job()  # still there: not ours to abort
    finally:
        vm.dom.abortJob()


def test_missing_parent_image_is_refused(env):
    image = env["repo"] / env["vm"].name / "c1" / "vda.qcow2"
    hidden = image.with_name("vda.hidden")
    image.rename(hidden)
    try:
        check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--incremental", "c1"], 5, "missing")
        check_refused(env, ["restore", "{vm}", "--repo", "{repo}", "--checkpoint", "c1", "--output",
                            "{base}/o-missing"], 5, "missing")
    finally:
        hidden.rename(image)


def test_foreign_checkpoint_and_checkpoint_of_another_vm(env, lab):
    vm = env["vm"]
    # A checkpoint made by another tool: libvirt has it, the repository does not.
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>foreign1</name><disks><disk name='vda'/>"
                               "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>", 0)
    try:
        check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--incremental", "foreign1"], 3, "foreign1")
    finally:
        vm.dom.checkpointLookupByName("foreign1").delete(0)
    # A point of another VM in the same repository.
    other = lab.LabVM([(4 * MiB, "qcow2")]).start()
    try:
        pull(other.name, repo=str(env["repo"]), checkpoint="other1")
        check_refused(env, ["pull", "{vm}", "--repo", "{repo}", "--incremental", "other1"], 3, "other1")
        check_refused(env, ["restore", "{vm}", "--repo", "{repo}", "--checkpoint", "other1", "--output",
                            "{base}/o-other"], 3, "other1")
    finally:
        other.destroy()
        shutil.rmtree(env["repo"] / other.name, ignore_errors=True)


def test_restore_into_a_full_file_system(env):
    with tmpfs(env["base"] / "tiny", "256k") as out:
        res = cli("restore", env["vm"].name, "--repo", str(env["repo"]), "--checkpoint", "c1",
                  "--output", str(out), "--format", "raw")
        assert res.returncode == 7, res.stderr  # the copy failed (CopyError)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert "space" in res.stderr.lower(), res.stderr
        assert list(out.iterdir()) == []  # nothing half-written left
