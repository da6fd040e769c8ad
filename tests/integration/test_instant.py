"""Instant recovery with the real tiny guest (tests/guest.py): ``restore --instant`` runs a new
domain at once on overlays of a point served over NBD by our qemu-nbd, the repository stays
root's, prune refuses to remove what it reads, ``finalize`` pulls the chain into the overlays
while the guest runs, and afterwards nothing of the repository is referenced or left running.

The guest is shared by the session: each test uses its own repository and removes the
checkpoints and domains it made."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import time

import jsonschema
import libvirt
import pytest

from libvbackup import api, instantrec, lock, schemas
from libvbackup.repo import Repository

from .helpers import cli

pytestmark = pytest.mark.integration


@pytest.fixture
def instant_names(lab, guest, grepo):
    """Names of instant domains the test makes: removed afterwards with whatever they left."""
    names: list[str] = []
    yield names
    conn = lab.ensure_libvirtd()
    for n in names:
        lab.remove_domain(conn, n)
    conn.close()
    repository = Repository(grepo)
    for rec in instantrec.records(repository, guest.name):
        instantrec.tear_down(repository, rec)


def tree(root: pathlib.Path) -> dict:
    """Every file and directory under root but the instant records: (mode, uid, size, mtime_ns
    of files), to see the points unchanged."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.name == ".lock" or ".instant" in rel.parts:
            continue  # the lock is taken (not written) by every operation
        st = os.lstat(p)
        out[str(rel)] = (st.st_mode, st.st_uid, st.st_size, None if p.is_dir() else st.st_mtime_ns)
    return out


def alive(pid: int) -> bool:
    """A process (not a zombie) has this pid."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


def one_line_error(res, code: int, *words: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def test_instant_restore_runs_at_once_holds_its_points_and_finalizes_while_running(guest, grepo, workdir, lab,
                                                                                   instant_names):
    from tests.guest import GuestAgent, wait_agent_of

    data = os.urandom(80_000)
    keep = f"{guest.disks[1].mount}/instant.bin"
    guest.write_file(keep, data)
    api.pull(guest.name, repo=str(grepo), checkpoint="i1")
    guest.write_file(f"{guest.disks[0].mount}/second.txt", b"in the incremental point")
    api.pull(guest.name, repo=str(grepo), checkpoint="i2", level="inc")
    guest.write_file(keep, b"changed after the points")
    os.chmod(workdir, 0o711)
    out = workdir / "instant"
    name = f"{guest.name}-now"
    instant_names.append(name)
    before = tree(grepo)

    t0 = time.monotonic()
    res = cli("restore", guest.name, "--repo", str(grepo), "--checkpoint", "i2", "--instant", "--define", name,
              "--output", str(out), "--json")
    assert res.returncode == 0, res.stderr
    restored_in = time.monotonic() - t0
    doc = json.loads(res.stdout)
    jsonschema.Draft202012Validator(schemas.load("restore")).validate(doc)
    assert doc["name"] == name and doc["started"] is True and doc["points"] == ["i1", "i2"]
    conn = lab.ensure_libvirtd()
    dom = conn.lookupByName(name)
    assert dom.isActive()
    ping = wait_agent_of(dom, 90)
    print(f"instant restore {restored_in:.2f} s (in libvbackup {doc['seconds']:.2f} s), guest-ping after {ping:.2f} s")
    agent = GuestAgent(dom)
    assert agent.read_file(keep) == data
    assert agent.read_file(f"{guest.disks[0].mount}/second.txt") == b"in the incremental point"

    # The repository stays root's; QEMU reads the chain through the socket only.
    rd = instantrec.run_dir(name)
    assert stat.S_IMODE(os.stat(grepo).st_mode) == 0o700
    for image in grepo.rglob("*.qcow2"):
        st = os.stat(image)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, image
    st = os.stat(rd)
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == instantrec.qemu_group()
    xml = dom.XMLDesc(0)
    assert str(grepo) not in xml.replace(f'repo="{grepo}"', "")  # only our <metadata> names it
    assert f"socket='{rd}/vda.sock'" in xml
    pids = [d["server_pid"] for d in doc["disks"].values()]
    assert all(alive(p) and lock.holds(f"{rd}/{t}.lock", p) for t, p in zip(doc["disks"], pids))

    # prune refuses while the instant VM reads the chain, and changes nothing.
    res = cli("prune", guest.name, "--repo", str(grepo), "--keep", "1")
    one_line_error(res, 4, name, "i1", "finalize")
    assert tree(grepo) == before
    assert sorted(c.getName() for c in guest.dom.listAllCheckpoints(0)) == ["i1", "i2"]
    dry = cli("prune", guest.name, "--repo", str(grepo), "--keep", "1", "--dry-run", "--json")
    assert dry.returncode == 0 and any(name in w for w in json.loads(dry.stdout)["warnings"])
    # verify still works, and says why the points are held.
    res = cli("verify", guest.name, "--repo", str(grepo), "--json")
    assert res.returncode == 0, res.stderr
    v = json.loads(res.stdout)
    assert v["ok"] and v["in_use"] == [{"name": name, "checkpoint": "i2", "points": ["i1", "i2"]}]

    # The guest writes, then finalize pulls the chain into the overlays while it runs.
    agent.write_file(f"{guest.disks[0].mount}/written-instantly.txt", b"after the instant restore")
    res = cli("finalize", name, "--json")
    assert res.returncode == 0, res.stderr
    fin = json.loads(res.stdout)
    jsonschema.Draft202012Validator(schemas.load("finalize")).validate(fin)
    print(f"finalize {fin['seconds']:.2f} s")
    assert fin["running"] is True and {d["method"] for d in fin["disks"].values()} == {"block-pull"}
    assert dom.isActive()
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        xml = dom.XMLDesc(flags)
        assert str(grepo) not in xml and str(rd) not in xml and "protocol='nbd'" not in xml, xml
    for t in ("vda", "vdb"):
        info = json.loads(os.popen(f"qemu-img info -U --output=json {out}/{t}.qcow2").read())
        assert "backing-filename" not in info
    assert not rd.exists() and not any(alive(p) for p in pids)
    assert instantrec.records(Repository(grepo), guest.name) == []

    # The points are free: prune removes i1 (i2 made standalone), the guest still reads its files
    # from its own disks (page cache dropped first, so the reads hit the disk).
    res = cli("prune", guest.name, "--repo", str(grepo), "--keep", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["remove"] == ["i1"] and not (grepo / guest.name / "i1").exists()
    agent.check(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
    assert agent.read_file(keep) == data
    assert agent.read_file(f"{guest.disks[0].mount}/written-instantly.txt") == b"after the instant restore"

    res = cli("finalize", name)
    one_line_error(res, 4, "finalized already")
    lab.remove_domain(conn, name)
    conn.close()
    assert not rd.exists() and not any(alive(p) for p in pids)


def test_bad_input_creates_nothing(guest, grepo, workdir, lab, instant_names):
    api.pull(guest.name, repo=str(grepo), checkpoint="b1")
    os.chmod(workdir, 0o711)
    out = workdir / "never"
    name = f"{guest.name}-never"
    instant_names.append(name)
    before = tree(grepo)

    def nothing_made():
        assert not out.exists() and not instantrec.run_dir(name).exists()
        assert tree(grepo) == before
        conn = lab.ensure_libvirtd()
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
        conn.close()

    base = ("restore", guest.name, "--repo", str(grepo), "--instant", "--output", str(out))
    one_line_error(cli(*base, "--checkpoint", "nope", "--define", name), 3, "nope")
    nothing_made()
    one_line_error(cli(*base, "--define", guest.name), 4, "already has a VM named")
    nothing_made()
    one_line_error(cli(*base), 2, "--define")
    private = workdir / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    one_line_error(cli("restore", guest.name, "--repo", str(grepo), "--instant", "--output", str(private / "x"),
                       "--define", name), 2, "QEMU cannot reach")
    assert not (private / "x").exists()
    nothing_made()
    one_line_error(cli("finalize", guest.name), 4, "not an instant VM")
    one_line_error(cli("finalize", f"{guest.name}-no-such-vm"), 3, "no VM named")


def test_a_stale_record_does_not_block_prune(guest, grepo, workdir, lab, instant_names):
    """The instant VM removed by hand (never finalized): the next prune stops its servers
    (proven ours by their locks), removes the socket directory and the record, then prunes."""
    api.pull(guest.name, repo=str(grepo), checkpoint="s1")
    api.pull(guest.name, repo=str(grepo), checkpoint="s2", level="inc")
    os.chmod(workdir, 0o711)
    name = f"{guest.name}-stale"
    instant_names.append(name)
    r = api.restore(guest.name, repo=str(grepo), checkpoint="s1", output=str(workdir / "stale"), define=name,
                    instant=True, start=False)
    assert not r.started and r.points == ("s1",)
    pids = [d.server_pid for d in r.disks.values()]
    assert all(alive(p) for p in pids)
    conn = lab.ensure_libvirtd()
    lab.remove_domain(conn, name)
    conn.close()
    res = cli("prune", guest.name, "--repo", str(grepo), "--keep", "1")
    assert res.returncode == 0, res.stderr
    assert not any(alive(p) for p in pids) and not instantrec.run_dir(name).exists()
    assert instantrec.records(Repository(grepo), guest.name) == []
    assert [p.checkpoint for p in Repository(grepo).load(guest.name).points] == ["s2"]


def test_finalize_of_a_shut_off_instant_vm_rebases_offline(guest, grepo, workdir, lab, instant_names):
    api.pull(guest.name, repo=str(grepo), checkpoint="o1")
    os.chmod(workdir, 0o711)
    name = f"{guest.name}-off"
    instant_names.append(name)
    r = api.restore(guest.name, repo=str(grepo), output=str(workdir / "off"), define=name, instant=True,
                    start=False)
    f = api.finalize(name)
    assert not f.running and {d.method for d in f.disks.values()} == {"rebase"}
    assert not any(alive(d.server_pid) for d in r.disks.values())
    conn = lab.ensure_libvirtd()
    dom = conn.lookupByName(name)
    dom.create()  # boots from its own, standalone disks
    try:
        from tests.guest import wait_agent_of

        wait_agent_of(dom, 90)
        assert "nbd" not in dom.XMLDesc(0)
    finally:
        lab.remove_domain(conn, name)
        conn.close()
