"""Quiesced points with a real guest and its agent (tests/guest.py): what the guest wrote is in
the restored file systems, the guest is frozen only while the job begins, and thawed after an
error, SIGTERM and SIGKILL; a VM back from a point boots with its files.

The guest is shared by the session: each test uses its own repository and files and removes the
checkpoints it made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from libvbackup import api, virt
from libvbackup.errors import LibvirtError
from libvbackup.repo import Repository

from .helpers import cli, leftovers

pytestmark = pytest.mark.integration


def fs_file(image_raw, path: str) -> bytes | None:
    """A file's bytes in an ext4 image (debugfs, read-only), None if it is not there."""
    p = subprocess.run(["debugfs", "-R", f"dump -p {path} /dev/stdout", str(image_raw)], capture_output=True)
    if b"File not found" in p.stderr or p.returncode != 0:
        return None
    return p.stdout


def restored(repo, vm: str, chk: str, workdir) -> dict:
    out = workdir / f"r-{chk}"
    r = api.restore(vm, repo=str(repo), checkpoint=chk, output=str(out), format="raw")
    return {n: d.path for n, d in r.disks.items()}


@pytest.fixture
def no_writeback(guest):
    """Dirty page cache stays in the guest until something syncs (as on a busy server between
    two writebacks): what only a freeze puts on the disk is then visible."""
    guest.check(["sh", "-c", "echo 0 > /proc/sys/vm/dirty_writeback_centisecs; "
                             "echo 360000 > /proc/sys/vm/dirty_expire_centisecs"])
    yield
    guest.check(["sh", "-c", "echo 500 > /proc/sys/vm/dirty_writeback_centisecs; "
                             "echo 3000 > /proc/sys/vm/dirty_expire_centisecs; sync"])


def test_quiesced_full_and_incremental_hold_what_the_guest_wrote(guest, grepo, workdir, monkeypatch, no_writeback):
    seen = []
    real_begin = virt.Domain.backup_begin

    def begin(self, *a, **kw):
        seen.append(guest.fsfreeze_status())
        real_begin(self, *a, **kw)
        seen.append(guest.fsfreeze_status())

    monkeypatch.setattr(virt.Domain, "backup_begin", begin)
    va, vb = guest.disks[0].mount, guest.disks[1].mount
    synced1 = os.urandom(70_000)
    guest.write_file(f"{va}/synced1.bin", synced1)  # written and synced just before
    guest.check(["sh", "-c", f"printf 'in the page cache only, point 1' > {va}/cached1.txt"])
    full = api.pull(guest.name, repo=str(grepo), checkpoint="q1", quiesce="yes")
    assert seen == ["frozen", "frozen"] and guest.fsfreeze_status() == "thawed"
    assert full.consistency == "quiesced" and 0 < full.frozen_seconds < 10
    synced2 = os.urandom(130_001)
    guest.write_file(f"{vb}/synced2.bin", synced2)
    guest.check(["sh", "-c", f"printf 'point 2 rewrote it' > {va}/cached1.txt; "
                             f"printf 'cached on the second disk' > {vb}/cached2.txt"])
    inc = api.pull(guest.name, repo=str(grepo), level="inc", checkpoint="q2", quiesce="auto")
    assert inc.level == "incremental" and inc.consistency == "quiesced"
    # The control: without the freeze, what is only in the page cache is not on the disks.
    guest.check(["sh", "-c", f"printf 'never synced' > {va}/cached3.txt"])
    crash = api.pull(guest.name, repo=str(grepo), level="inc", checkpoint="q3", quiesce="no")
    assert crash.consistency == "crash" and crash.frozen_seconds is None
    points = {p.checkpoint: p for p in Repository(grepo).load(guest.name).points}
    assert [points[c].consistency for c in ("q1", "q2", "q3")] == ["quiesced", "quiesced", "crash"]
    assert points["q1"].frozen_seconds == full.frozen_seconds

    r1 = restored(grepo, guest.name, "q1", workdir)
    assert fs_file(r1["vda"], "/synced1.bin") == synced1
    assert fs_file(r1["vda"], "/cached1.txt") == b"in the page cache only, point 1"
    r2 = restored(grepo, guest.name, "q2", workdir)
    assert fs_file(r2["vda"], "/cached1.txt") == b"point 2 rewrote it"
    assert fs_file(r2["vdb"], "/synced2.bin") == synced2
    assert fs_file(r2["vdb"], "/cached2.txt") == b"cached on the second disk"
    r3 = restored(grepo, guest.name, "q3", workdir)
    assert fs_file(r3["vda"], "/cached3.txt") in (None, b"")  # the crash-consistent point lacks it
    assert fs_file(r3["vda"], "/synced1.bin") == synced1
    # Push mode freezes around its job the same way.
    guest.check(["sh", "-c", f"printf 'cached before the push' > {vb}/cached4.txt"])
    pushed = api.push(guest.name, repo=str(grepo), level="inc", checkpoint="q4", quiesce="yes")
    assert pushed.consistency == "quiesced" and seen[-2:] == ["frozen", "frozen"]
    assert fs_file(restored(grepo, guest.name, "q4", workdir)["vdb"], "/cached4.txt") == b"cached before the push"
    listing = cli("list", guest.name, "--repo", str(grepo))
    assert [line.split()[4] for line in listing.stdout.splitlines()[1:]] == ["quiesced", "quiesced", "crash",
                                                                             "quiesced"]


def test_thawed_after_an_error_of_the_job(guest, grepo, monkeypatch):
    seen = []

    def failing_begin(self, *a, **kw):
        seen.append(guest.fsfreeze_status())
        raise LibvirtError("backupBegin refused (made up by the test)")

    monkeypatch.setattr(virt.Domain, "backup_begin", failing_begin)
    before = sorted(c.getName() for c in guest.dom.listAllCheckpoints(0))
    with pytest.raises(LibvirtError, match="made up by the test"):
        api.pull(guest.name, repo=str(grepo), checkpoint="e1", quiesce="yes")
    assert seen == ["frozen"] and guest.fsfreeze_status() == "thawed"
    assert sorted(c.getName() for c in guest.dom.listAllCheckpoints(0)) == before
    assert not (grepo / guest.name / ".run.json").exists() and leftovers() == []


# A run whose backupBegin stalls while the guest is frozen: killed there.
CHILD = textwrap.dedent("""
    import sys, time
    from libvbackup import api, virt
    def stalled(self, *a, **kw):
        print("FROZEN", flush=True)
        time.sleep(120)
    virt.Domain.backup_begin = stalled
    api.pull(sys.argv[1], repo=sys.argv[2], checkpoint="killed", quiesce="yes")
""")


def start_frozen(guest, repo) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", CHILD, guest.name, str(repo)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "FROZEN", p.stderr.read()
    assert guest.fsfreeze_status() == "frozen"
    return p


def wait_thawed(guest, within: float = 30.0) -> float:
    t0 = time.monotonic()
    while guest.fsfreeze_status() != "thawed":
        assert time.monotonic() - t0 < within, "the guest stayed frozen"
        time.sleep(0.1)
    return time.monotonic() - t0


def journal(repo, vm) -> dict | None:
    path = repo / vm / ".run.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_thawed_after_sigterm(guest, grepo):
    p = start_frozen(guest, grepo)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert "interrupted by SIGTERM" in err, err
    assert guest.fsfreeze_status() == "thawed"
    assert journal(grepo, guest.name) is None and leftovers() == []


def test_thawed_by_the_guard_after_sigkill_then_abort_cleans_up(guest, grepo):
    p = start_frozen(guest, grepo)
    assert journal(grepo, guest.name)["frozen"] is True
    p.kill()
    p.wait(30)
    wait_thawed(guest)  # nothing else ran: the guard saw the pipe close
    assert journal(grepo, guest.name)["frozen"] is True  # the dead run's word stays until cleaned up
    res = cli("abort", guest.name, "--repo", str(grepo))
    assert res.returncode == 0, res.stderr
    assert journal(grepo, guest.name) is None and guest.fsfreeze_status() == "thawed"


@pytest.mark.parametrize("who_thaws", ["abort", "next run"])
def test_when_the_guard_dies_too_the_journal_thaws(guest, grepo, who_thaws):
    p = start_frozen(guest, grepo)
    guards = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(guards) == 1
    with open(f"/proc/{guards[0]}/cmdline", "rb") as f:
        assert b"libvbackup.quiesce" in f.read()  # it is the guard, our child's child
    os.kill(int(guards[0]), signal.SIGKILL)
    p.kill()
    p.wait(30)
    time.sleep(1)
    assert guest.fsfreeze_status() == "frozen"  # the outage the journal is there for
    if who_thaws == "abort":
        res = cli("abort", guest.name, "--repo", str(grepo))
        assert res.returncode == 0, res.stderr
    else:
        r = api.pull(guest.name, repo=str(grepo), checkpoint="after", quiesce="no")
        assert r.level == "full"
    assert guest.fsfreeze_status() == "thawed" and journal(grepo, guest.name) is None


def test_a_restored_guest_boots_with_its_files(guest, grepo, workdir, lab):
    from tests.guest import GuestAgent, wait_agent_of

    data = os.urandom(50_000)
    guest.write_file(f"{guest.disks[1].mount}/keep.bin", data)
    api.pull(guest.name, repo=str(grepo), checkpoint="b1")
    guest.write_file(f"{guest.disks[1].mount}/keep.bin", b"changed after the point")
    os.chmod(workdir, 0o711)
    copy = f"{guest.name}-copy"
    try:
        res = cli("restore", guest.name, "--repo", str(grepo), "--checkpoint", "b1",
                  "--output", str(workdir / "copy"), "--define", copy, "--start")
        assert res.returncode == 0, res.stderr
        conn = lab.ensure_libvirtd()
        dom = conn.lookupByName(copy)
        wait_agent_of(dom, 60)
        agent = GuestAgent(dom)
        assert agent.read_file(f"{guest.disks[1].mount}/keep.bin") == data
        assert dom.listAllCheckpoints(0) == [] and dom.UUIDString() != guest.dom.UUIDString()
    finally:
        conn = lab.ensure_libvirtd()
        lab.remove_domain(conn, copy)
        conn.close()
    assert guest.read_file(f"{guest.disks[1].mount}/keep.bin") == b"changed after the point"


def test_in_place_restore_of_the_shut_off_guest_then_a_full_backup(guest, grepo):
    path = f"{guest.disks[0].mount}/in-place.txt"
    guest.write_file(path, b"version one")
    api.pull(guest.name, repo=str(grepo), checkpoint="p1")
    guest.write_file(path, b"version two, longer")
    api.pull(guest.name, repo=str(grepo), level="inc", checkpoint="p2")
    guest.shutdown()
    try:
        res = cli("restore", guest.name, "--repo", str(grepo), "--checkpoint", "p1", "--in-place", "--yes")
        assert res.returncode == 0, res.stderr
        assert guest.dom.listAllCheckpoints(0) == []
    finally:
        guest.boot()
        guest.wait_agent()
    assert guest.read_file(path) == b"version one"
    r = api.pull(guest.name, repo=str(grepo), level="auto", quiesce="yes")
    assert r.level == "full" and r.consistency == "quiesced"


def test_an_agent_that_does_not_answer_fails_the_freeze_and_never_hangs(guest, grepo):
    """qemu-ga stopped (SIGSTOP) for 8 s: libvirt gives up on it after its 5 s, the freeze
    fails, and nothing waits for the agent forever (the subprocess timeout only guards a hang)."""
    def stop_agent():
        guest.agent("guest-exec", path="/bin/sh",
                    arg=["-c", "(p=$(pidof qemu-ga); sleep 0.2; kill -STOP $p; sleep 8; kill -CONT $p) "
                               "</dev/null >/dev/null 2>&1 &"])
        time.sleep(0.5)

    before = sorted(c.getName() for c in guest.dom.listAllCheckpoints(0))
    stop_agent()
    res = cli("pull", guest.name, "--repo", str(grepo), "--quiesce", "yes", timeout=90)
    assert res.returncode == 4, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "cannot freeze" in res.stderr, res.stderr
    guest.wait_agent(60)
    assert guest.fsfreeze_status() == "thawed"
    assert sorted(c.getName() for c in guest.dom.listAllCheckpoints(0)) == before
    assert journal(grepo, guest.name) is None and leftovers() == []
    # auto: the same agent trouble gives a crash-consistent point, and says why.
    stop_agent()
    res = cli("pull", guest.name, "--repo", str(grepo), "--checkpoint", "hung", "--json", timeout=90)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["consistency"] == "crash" and "freezing failed" in doc["consistency_note"], doc
    guest.wait_agent(60)
    assert guest.fsfreeze_status() == "thawed"
