"""Backups that survive what happens to VMs: QEMU killed, the guest shut down, the host rebooted
in the middle of a backup; disks grown, shrunk, added, removed and replaced between points.

Every point is restored byte-exact against the model of what the guest wrote.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from libvbackup.backup import pull
from libvbackup.prune import prune
from libvbackup.repo import Repository
from libvbackup.verify import verify

from .helpers import KiB, MiB, assert_restores, cli, leftovers, random_writes, snap, tree

pytestmark = pytest.mark.integration

# The CLI in a child whose copy stops after its first completed read until a line arrives on its
# stdin: what happens to the VM meanwhile (QEMU killed, the guest shut down) is up to the test.
GATED_CLI = textwrap.dedent("""
    import sys, threading
    from libvbackup import engine
    real_copy = engine.copy
    gate, lock, told = threading.Event(), threading.Lock(), []
    def gated_copy(src, dst, **kw):
        inner = kw.get("progress")
        def progress(n):
            if inner:
                inner(n)
            with lock:
                first = not told
                told.append(n)
            if first:
                print("COPYING", flush=True)
                sys.stdin.readline()
                gate.set()
            else:
                gate.wait()
        kw["progress"] = progress
        return real_copy(src, dst, **kw)
    engine.copy = gated_copy
    from libvbackup.cli.main import main
    sys.argv = ["libvbackup", *sys.argv[1:]]
    main()
""")


@pytest.fixture
def vm(make_vm):
    return make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))


@pytest.fixture
def big_vm(make_vm):
    """More dirty data than the reads one copy keeps in flight: the copy stops with reads to go."""
    return make_vm((64 * MiB, "qcow2"), (4 * MiB, "qcow2"))


def start_gated(vm, repo, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", GATED_CLI, "pull", vm.name, "--repo", str(repo),
                          "--progress", "none", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "COPYING", p.stderr.read()
    assert vm.has_job()
    return p


def release(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate("\n", timeout=60)
    return p.returncode, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def bitmaps(image: pathlib.Path) -> list[str]:
    """The persistent bitmaps stored in an image (of a shut-off domain)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     capture_output=True, text=True, check=True).stdout)
    return sorted(b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def vm_dir(repo, vm) -> list[str]:
    return sorted(x.name for x in (repo / vm.name).iterdir())


def assert_nothing_left(vm, repo, points: list[str]) -> None:
    assert vm_dir(repo, vm) == sorted([".lock", "manifest.json", *points])  # no .run.json, no <chk>.partial
    assert [p.checkpoint for p in Repository(repo).load(vm.name).points] == points
    assert ours(leftovers(), vm) == []


def ours(paths: list[str], vm) -> list[str]:
    """Of this VM (tests of other sessions may run beside these, and this file restarts libvirtd)."""
    return [p for p in paths if f"libvbackup-{vm.name}-" in p]


# --------------------------------------------------------------------------- QEMU killed


def test_qemu_killed_mid_incremental(big_vm, repo, workdir):
    vm = big_vm
    vm["vda"].fill(0, 3 * MiB, 0x31)
    vm["vdb"].fill(MiB, MiB, 0x32)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)
    vm["vda"].fill(2 * MiB, 48 * MiB + 7, 0x33)

    p = start_gated(vm, repo, "--checkpoint", "k2", "--incremental", "c1")
    assert "k2" in vm.checkpoints()
    vm.flush()  # the guest's writes are durable (unflushed ones may be lost with QEMU)
    os.kill(vm.qemu_pid(), signal.SIGKILL)  # the OOM killer
    vm.wait_stopped()
    code, err = release(p)
    assert code == 4, err
    assert one_line(err).startswith(f"libvbackup: error: VM {vm.name!r} stopped during the backup (QEMU exited)"), err
    # The failed run's checkpoint is gone (libvirt cannot delete one of a shut-off domain: its
    # metadata is removed, and QEMU never stored its bitmap), nothing else is left behind.
    assert vm.checkpoints() == ["c1"]
    assert bitmaps(vm["vda"].path) == bitmaps(vm["vdb"].path) == []  # QEMU died before storing any, c1 included
    assert_nothing_left(vm, repo, ["c1"])

    vm.boot()
    # An explicit incremental on the lost bitmap is refused in one line, and changes nothing.
    before, chks = tree(repo), vm.checkpoints()
    res = cli("pull", vm.name, "--repo", str(repo), "--incremental", "c1", "--checkpoint", "x")
    assert res.returncode == 4, res.stderr
    line = one_line(res.stderr)
    assert "cannot back up incrementally from 'c1'" in line and "missing or broken bitmap" in line, line
    assert tree(repo) == before and vm.checkpoints() == chks and not vm.has_job() and ours(leftovers(), vm) == []

    # --level auto takes a full backup, saying why, and the chain goes on from it.
    vm["vdb"].write(3 * MiB + 5, b"after the crash")
    res = cli("pull", vm.name, "--repo", str(repo), "--level", "auto", "--checkpoint", "a3", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["level"], out["parent"]) == ("full", None)
    assert "'c1'" in out["fallback_reason"] and "bitmap" in out["fallback_reason"]
    at_a3 = snap(vm)
    vm["vda"].write(64 * MiB - 3, b"end")
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="a4")
    assert (r.level, r.parent) == ("incremental", "a3")
    assert_nothing_left(vm, repo, ["c1", "a3", "a4"])
    assert_restores(repo, vm.name, "c1", at_c1, workdir)
    assert_restores(repo, vm.name, "a3", at_a3, workdir)
    assert_restores(repo, vm.name, "a4", snap(vm), workdir)


# --------------------------------------------------------------------------- the guest shut down


def test_guest_shut_down_mid_backup(big_vm, repo, workdir):
    vm = big_vm
    vm["vda"].fill(0, 2 * MiB, 0x41)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vda"].fill(MiB, 48 * MiB, 0x42)
    vm["vdb"].fill(0, MiB, 0x43)

    p = start_gated(vm, repo, "--checkpoint", "s2", "--level", "auto")
    vm.flush()
    # Power off: QEMU exits cleanly (SIGTERM) and stores its bitmaps, once it has answered the
    # reads in flight; so the copy is let go on while QEMU goes (a client that stops reading
    # holds QEMU up until libvirt kills it, and the bitmaps are lost).
    off = threading.Thread(target=vm.dom.destroy)
    off.start()
    time.sleep(0.3)
    code, err = release(p)
    off.join()
    assert code == 4, err
    assert one_line(err).startswith(f"libvbackup: error: VM {vm.name!r} stopped during the backup (QEMU exited)"), err
    assert vm.checkpoints() == ["c1"]
    # The failed run's bitmap was stored by QEMU on its way out: removed from the images too.
    assert bitmaps(vm["vda"].path) == bitmaps(vm["vdb"].path) == ["c1"]
    assert_nothing_left(vm, repo, ["c1"])

    vm.boot()
    assert not vm.has_job()
    vm["vdb"].write(4 * MiB - 100, b"x" * 100)
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c3")
    assert (r.level, r.parent) == ("incremental", "c1")  # a clean exit keeps the bitmaps
    assert vm.checkpoints() == ["c1", "c3"]
    assert_nothing_left(vm, repo, ["c1", "c3"])
    assert_restores(repo, vm.name, "c3", snap(vm), workdir)


def test_guest_reboot_mid_backup_does_not_stop_it(vm, repo, workdir):
    vm["vda"].fill(0, 2 * MiB, 0x44)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vda"].fill(MiB, 2 * MiB, 0x45)
    at_c2 = snap(vm)
    # A reboot inside the guest (here: a reset) keeps QEMU, its job and its export.
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c2", on_job_started=lambda: vm.dom.reset(0))
    assert (r.level, r.parent) == ("incremental", "c1")
    assert vm.dom.isActive() and not vm.has_job() and vm.checkpoints() == ["c1", "c2"]
    assert_nothing_left(vm, repo, ["c1", "c2"])
    assert_restores(repo, vm.name, "c2", at_c2, workdir)


# --------------------------------------------------------------------------- host reboot


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def test_host_reboot_mid_backup(vm, repo, workdir, lab):
    vm["vda"].fill(0, 3 * MiB, 0x51)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)
    vm["vda"].fill(MiB, MiB, 0x52)

    p = start_gated(vm, repo, "--checkpoint", "r2", "--incremental", "c1")
    vm.flush()
    qemu = vm.qemu_pid()
    libvirtd = int(pathlib.Path("/run/libvirtd.pid").read_text())
    # The power goes: the backup, QEMU and libvirtd die at once, and /run is empty afterwards.
    for pid in (p.pid, qemu, libvirtd):
        os.kill(pid, signal.SIGKILL)
    p.wait(timeout=30)
    for pid in (qemu, libvirtd):
        _wait_gone(pid)
    for f in (lab.RUN_DIR / f"{vm.name}.xml", lab.RUN_DIR / f"{vm.name}.pid"):
        f.unlink(missing_ok=True)
    for d in pathlib.Path("/var/lib/libvirt/qemu").glob(f"domain-*-{vm.name}"):
        shutil.rmtree(d, ignore_errors=True)
    pathlib.Path("/run/libvirtd.pid").unlink(missing_ok=True)

    subprocess.run(["libvirtd", "-d"], check=True)  # (the killed one may stay a zombie: no init reaps it)
    vm.conn = lab.ensure_libvirtd()
    vm.dom = vm.conn.lookupByName(vm.name)
    assert not vm.dom.isActive()
    vm.boot()
    assert (repo / vm.name / ".run.json").exists() and "r2" in vm.checkpoints()

    vm["vdb"].write(123, b"after the reboot")
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="a3")
    # The dead run was undone (its checkpoint's bitmap is gone: removed as metadata only), and
    # c1's bitmaps died with QEMU: a full backup.
    assert (r.level, r.parent) == ("full", None) and "bitmap" in r.fallback_reason
    assert vm.checkpoints() == ["a3", "c1"]
    assert_nothing_left(vm, repo, ["c1", "a3"])
    vm["vda"].write(5 * MiB, b"and on")
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="a4")
    assert (r.level, r.parent) == ("incremental", "a3")
    assert_restores(repo, vm.name, "c1", at_c1, workdir)
    assert_restores(repo, vm.name, "a4", snap(vm), workdir)


# --------------------------------------------------------------------------- disk sizes


def test_disk_grown_online_continues_the_chain(make_vm, repo, workdir):
    old = 8 * MiB + 100 * 512  # not a whole number of clusters: the last block is short
    vm = make_vm((old, "qcow2"), (4 * MiB, "qcow2"))
    rng = random.Random(18)
    random_writes(vm["vda"], rng, n=6)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)

    new = 12 * MiB + 3 * 4096
    vm.resize("vda", new)
    vm["vda"].write(old - 300, rng.randbytes(700))  # across the old end
    vm["vda"].write(10 * MiB + 17, rng.randbytes(70 * KiB))  # well past it
    vm["vda"].write(new - 5000, rng.randbytes(5000))  # the new end
    vm["vda"].fill(MiB, 4096, 0x61)
    res = cli("pull", vm.name, "--repo", str(repo), "--level", "auto", "--checkpoint", "c2")
    assert res.returncode == 0, res.stderr
    assert "incremental pull backup c2" in res.stdout and "since c1" in res.stdout, res.stdout
    assert f"[incremental: grew from {old} to {new} bytes since c1]" in res.stdout, res.stdout
    at_c2 = snap(vm)
    m = Repository(repo).load(vm.name)
    assert (m.get("c2").level, m.get("c2").parent) == ("incremental", "c1")
    assert (m.get("c1").disks["vda"].size, m.get("c2").disks["vda"].size) == (old, new)
    assert m.get("c2").disks["vda"].reason == f"grew from {old} to {new} bytes since c1"  # recorded too

    vm["vda"].write(new - 1, b"!")
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c3")
    assert (r.level, r.disks["vda"].reason) == ("incremental", None)
    at_c3 = snap(vm)
    assert verify(vm.name, repo=str(repo)).ok
    assert_restores(repo, vm.name, "c1", at_c1, workdir)  # at its own (old) size
    assert_restores(repo, vm.name, "c2", at_c2, workdir, fmt="qcow2")
    assert_restores(repo, vm.name, "c3", at_c3, workdir)
    # Prune flattens c3 onto nothing: its chain's images have two sizes.
    prune(vm.name, repo=str(repo), keep=1)
    assert verify(vm.name, repo=str(repo)).ok
    assert_restores(repo, vm.name, "c3", at_c3, workdir)


def test_disk_shrunk_offline_starts_a_new_chain_for_that_disk(vm, repo, workdir):
    vm["vda"].fill(0, MiB, 0x71)
    vm["vdb"].fill(2 * MiB, 2 * MiB, 0x72)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)
    vm.dom.destroy()
    subprocess.run(["qemu-img", "resize", "-q", "--shrink", str(vm["vdb"].path), str(3 * MiB)], check=True)
    vm["vdb"].size = 3 * MiB
    del vm["vdb"].model[3 * MiB:]
    vm.boot()
    vm["vda"].fill(4 * MiB, MiB, 0x73)
    vm["vdb"].write(3 * MiB - 10, b"0123456789")
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c2")
    assert (r.level, r.parent) == ("incremental", "c1")
    assert r.disks["vda"].mode == "incremental"
    assert r.disks["vdb"].mode == "full" and r.disks["vdb"].backing is None
    assert r.disks["vdb"].reason == f"shrunk from {4 * MiB} to {3 * MiB} bytes since c1: a new chain"
    assert verify(vm.name, repo=str(repo)).ok
    assert_restores(repo, vm.name, "c1", at_c1, workdir)
    assert_restores(repo, vm.name, "c2", snap(vm), workdir)


# --------------------------------------------------------------------------- disks added, removed, replaced


def test_disks_added_removed_and_replaced_between_points(vm, repo, workdir):
    vm["vda"].fill(0, 2 * MiB, 0x81)
    vm["vdb"].fill(MiB, MiB, 0x82)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)

    # Added: hot-plugged into the running VM, it is copied in full inside the incremental point.
    vm.hotplug("vdc", 4 * MiB)
    vm["vdc"].fill(0, 3 * MiB, 0x83)
    vm["vda"].fill(MiB, 4096, 0x84)
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c2")
    assert (r.level, r.parent) == ("incremental", "c1")
    assert {n: (d.mode, d.reason) for n, d in r.disks.items()} == {
        "vda": ("incremental", None), "vdb": ("incremental", None), "vdc": ("full", "not in point c1")}
    at_c2 = snap(vm)

    # Removed (the definition changed while the VM was shut off): the others go on.
    vm.dom.destroy()
    vm.redefine(lambda xml: _drop_disk(xml, "vdb"))
    vm.disks = [d for d in vm.disks if d.target != "vdb"]
    vm.boot()
    vm["vda"].write(7 * MiB, b"vdb is gone")
    vm["vdc"].fill(3 * MiB, MiB, 0x85)
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c3")
    assert (r.level, r.parent) == ("incremental", "c2")
    assert {n: d.mode for n, d in r.disks.items()} == {"vda": "incremental", "vdc": "incremental"}
    at_c3 = snap(vm)

    # Replaced: another image under the same target: a new chain for that disk, never an
    # incremental against the old image's; the other disk goes on incrementally.
    vm.dom.destroy()
    old_vdc = vm["vdc"]
    new_path = vm.workdir / "vdc-new.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(new_path), str(6 * MiB)], check=True)
    vm.redefine(lambda xml: xml.replace(str(old_vdc.path), str(new_path)))
    old_vdc.path, old_vdc.size, old_vdc.model = new_path, 6 * MiB, bytearray(6 * MiB)
    vm.boot()
    vm["vdc"].fill(MiB, MiB, 0x86)
    vm["vda"].fill(0, 4096, 0x87)
    res = cli("pull", vm.name, "--repo", str(repo), "--level", "auto", "--checkpoint", "c4", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["level"], out["parent"]) == ("incremental", "c3")
    assert out["disks"]["vda"]["mode"] == "incremental"
    vdc = out["disks"]["vdc"]
    assert (vdc["mode"], vdc["backing"]) == ("full", None)
    assert vdc["reason"].startswith("replaced since c3 (") and str(new_path) in vdc["reason"], vdc["reason"]
    assert Repository(repo).load(vm.name).get("c4").disks["vdc"].reason == vdc["reason"]  # recorded too
    at_c4 = snap(vm)

    assert verify(vm.name, repo=str(repo)).ok
    assert_restores(repo, vm.name, "c1", at_c1, workdir)
    assert_restores(repo, vm.name, "c2", at_c2, workdir)
    assert_restores(repo, vm.name, "c3", at_c3, workdir)
    assert_restores(repo, vm.name, "c4", at_c4, workdir)


def _drop_disk(xml: str, target: str) -> str:
    from lxml import etree

    root = etree.fromstring(xml.encode())
    for d in root.iterfind("./devices/disk"):
        if d.find("target").get("dev") == target:
            d.getparent().remove(d)
    return etree.tostring(root, encoding="unicode")


def test_a_file_put_in_place_of_a_disk_at_the_same_path_is_another_image(make_vm, repo, workdir):
    """The source path is the same but the file is another one (another inode): that disk gets a
    full backup, never an incremental against the old image's chain."""
    vm = make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))
    vm["vda"].fill(0, MiB, 0x91)
    vm["vdb"].fill(MiB, MiB, 0x92)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vdb = vm["vdb"].path
    before = os.stat(vdb).st_ino
    shutil.copyfile(vdb, str(vdb) + ".new")
    os.chmod(str(vdb) + ".new", os.stat(vdb).st_mode)
    os.rename(str(vdb) + ".new", vdb)  # QEMU keeps writing to the file it has open
    assert os.stat(vdb).st_ino != before
    vm["vda"].fill(2 * MiB, 4096, 0x93)
    vm["vdb"].fill(0, 4096, 0x94)
    r = pull(vm.name, repo=str(repo), level="auto", checkpoint="c2")
    assert (r.level, r.parent, r.disks["vda"].mode) == ("incremental", "c1", "incremental")
    assert r.disks["vdb"].mode == "full"
    assert r.disks["vdb"].reason == f"replaced since c1 (another file at {vdb}): a new chain"
    m = Repository(repo).load(vm.name)
    assert m.get("c2").disks["vdb"].backing is None and m.get("c2").disks["vdb"].reason == r.disks["vdb"].reason
    assert m.get("c2").disks["vdb"].identity == f"{os.stat(vdb).st_dev}:{os.stat(vdb).st_ino}"
    assert_restores(repo, vm.name, "c2", snap(vm), workdir)
