"""libvbackup run: a configuration file with two policies, three real VMs backed up two at a
time; full then incremental points, retention by each policy, one JSON report; a VM that fails
never stops the others."""

from __future__ import annotations

import json
import os
import random
import stat
import uuid

import pytest

from libvbackup.repo import Repository

from .helpers import (MiB, assert_restores, cli, leftovers, random_writes, snap, stalling_child, tmpfs, tree,
                      wait_copying)

pytestmark = pytest.mark.integration


@pytest.fixture
def three(lab):
    """Three running disk-only VMs named lvbtest-<tag>-a/b/c (the tag keeps the policies' patterns
    off any other VM of this libvirtd)."""
    tag = uuid.uuid4().hex[:8]
    made = []
    try:
        for suffix, disks in (("a", [(8 * MiB, "qcow2"), (4 * MiB, "raw")]), ("b", [(8 * MiB, "qcow2")]),
                              ("c", [(6 * MiB, "qcow2")])):
            made.append(lab.LabVM(disks, name=f"lvbtest-{tag}-{suffix}").start())
        yield tag, made
    finally:
        for vm in made:
            vm.destroy()


def _run(*args: str) -> tuple[int, dict, str]:
    res = cli("run", *args, "--json", timeout=300)
    return res.returncode, json.loads(res.stdout), res.stderr


def ours(paths: list[str], tag: str) -> list[str]:
    """Scratch leftovers of this test's VMs (other tests may run beside it on this libvirtd)."""
    return [p for p in paths if f"-{tag}-" in p]


def _private(path) -> bool:
    """Nothing below ``path`` is open to group or others (the umask held across threads)."""
    return all(not os.lstat(p).st_mode & 0o077 for p in [path, *path.rglob("*")]
               if not stat.S_ISLNK(os.lstat(p).st_mode))


def test_run_backs_up_every_vm_of_the_policies_and_applies_each_retention(three, repo, workdir):
    tag, vms = three
    a, b, c = vms
    conf = workdir / "libvbackup.toml"
    conf.write_text(f"""
[defaults]
repo = "{repo}"
level = "auto"
jobs = 2

[[policy]]
match = "lvbtest-{tag}-[ab]"
schedule = "daily"
keep_last = 2

[[policy]]
match = "lvbtest-{tag}-c"
keep_daily = 7
keep_weekly = 4
keep_monthly = 6
""")
    rng = random.Random(5)
    models: dict[str, list[dict[str, bytes]]] = {vm.name: [] for vm in vms}
    reports = []
    for _ in range(3):
        for vm in vms:
            for d in vm.disks:
                random_writes(d, rng, n=4)
        code, report, err = _run("--config", str(conf))
        assert code == 0, err
        for vm in vms:
            models[vm.name].append(snap(vm))
        assert report["format_version"] == 1 and report["exit_code"] == 0 and report["ok"] is True
        assert (report["config"], report["jobs"], report["dry_run"]) == (str(conf), 2, False)
        assert [r["vm"] for r in report["vms"]] == [a.name, b.name, c.name]
        assert all(r["ok"] and r["exit_code"] == 0 and r["error"] is None for r in report["vms"])
        reports.append({r["vm"]: r for r in report["vms"]})

    first, second, third = reports
    for vm in vms:
        chk = [rep[vm.name]["checkpoint"] for rep in reports]
        assert [rep[vm.name]["level"] for rep in reports] == ["full", "incremental", "incremental"]
        assert [rep[vm.name]["parent"] for rep in reports] == [None, chk[0], chk[1]]
        assert all(rep[vm.name]["bytes_copied"] > 0 for rep in reports)
        assert first[vm.name]["pruned"] == [] and second[vm.name]["pruned"] == []
    for vm in (a, b):
        r = third[vm.name]
        chk = [rep[vm.name]["checkpoint"] for rep in reports]
        assert (r["policy"], r["schedule"], r["retention"]) == (f"[[policy]] 1 (lvbtest-{tag}-[ab])", "daily", "last 2")
        # keep_last = 2: exactly the two newest points remain, byte-exact, with their checkpoints.
        assert r["pruned"] == [chk[0]] and r["kept"] == chk[1:]
        assert [p.checkpoint for p in Repository(repo).load(vm.name).points] == chk[1:]
        assert vm.checkpoints() == sorted(chk[1:])
        for i in (1, 2):
            assert_restores(repo, vm.name, chk[i], models[vm.name][i], workdir)
    # keep_daily/weekly/monthly, all three points of one day: the newest ("daily #1") and the
    # oldest ("daily[oldest] #2", the rule found fewer days than 7); the middle one goes.
    r, chk = third[c.name], [rep[c.name]["checkpoint"] for rep in reports]
    assert (r["policy"], r["schedule"], r["retention"]) == (
        f"[[policy]] 2 (lvbtest-{tag}-c)", None, "daily 7, weekly 4, monthly 6")
    assert r["pruned"] == [chk[1]] and r["kept"] == [chk[0], chk[2]]
    assert [p.checkpoint for p in Repository(repo).load(c.name).points] == [chk[0], chk[2]]
    for i in (0, 2):
        assert_restores(repo, c.name, chk[i], models[c.name][i], workdir)
    assert _private(repo) and ours(leftovers(), tag) == []

    # --dry-run: the plan of each VM, in text; nothing changes.
    before = tree(repo)
    res = cli("run", "--config", str(conf), "--dry-run", timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for vm in (a, b):
        assert (f"would back up {vm.name} with [[policy]] 1 (lvbtest-{tag}-[ab]): pull, level auto -> incremental "
                f"since {third[vm.name]['checkpoint']}") in "\n".join(lines)
    assert any(line.startswith(f"would back up {c.name} with [[policy]] 2") and
               "retention daily 7, weekly 4, monthly 6" in line for line in lines)
    assert lines[-1].startswith("total: 3 VM(s), 3 planned, 0 failed")
    assert tree(repo) == before

    # Text: one line per VM, then the total; a VM named on the command line runs alone.
    res = cli("run", b.name, "--config", str(conf), timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert len(out) == 2 and out[0].startswith(f"ok {b.name}: incremental pull backup ") and "pruned 1" in out[0]
    assert out[1].startswith("total: 1 VM(s), 1 backed up, 0 failed")
    assert len(Repository(repo).load(b.name).points) == 2


def test_a_failing_vm_never_stops_the_others(three, repo, workdir):
    tag, vms = three
    a, b, c = vms
    c.dom.destroy()  # shut off, still defined: its push backup is refused (exit 4)
    c.wait_stopped()
    ro = workdir / "ro"
    with tmpfs(ro, "16M", "ro"):  # b's repository: a read-only file system (exit 5)
        conf = workdir / "libvbackup.toml"
        conf.write_text(f"""
[defaults]
repo = "{repo}"
jobs = 3
quiesce = "no"            # no guest agent in these VMs: no warning about it either

[[policy]]
match = "lvbtest-{tag}-a"
keep_last = 1

[[policy]]
match = "lvbtest-{tag}-b"
repo = "{ro}"

[[policy]]
match = "lvbtest-{tag}-c"
mode = "push"             # (pull would back the shut-off VM up from its images)
keep_last = 1
""")
        rng = random.Random(8)
        for d in a.disks:
            random_writes(d, rng, n=4)
        code, report, err = _run("--config", str(conf))
        assert code == 10 and report["exit_code"] == 10 and report["ok"] is False
        assert err.strip().splitlines() == [
            f"libvbackup: error: 2 of 3 VMs failed: {b.name} (exit 5), {c.name} (exit 4)"]
        by_vm = {r["vm"]: r for r in report["vms"]}
        assert by_vm[a.name]["ok"] and by_vm[a.name]["level"] == "full" and by_vm[a.name]["exit_code"] == 0
        assert (by_vm[b.name]["ok"], by_vm[b.name]["exit_code"]) == (False, 5)
        assert by_vm[b.name]["error"].startswith(f"repository {ro} is not writable")
        assert (by_vm[c.name]["ok"], by_vm[c.name]["exit_code"]) == (False, 4)
        assert by_vm[c.name]["error"].startswith(f"VM {c.name!r} is shut off; a push backup needs QEMU running")
        assert by_vm[c.name]["checkpoint"] is None and by_vm[c.name]["pruned"] == []
        (point,) = Repository(repo).load(a.name).points
        assert point.checkpoint == by_vm[a.name]["checkpoint"]
        assert_restores(repo, a.name, point.checkpoint, snap(a), workdir)
        assert not (repo / b.name).exists() and not (repo / c.name).exists() and list(ro.iterdir()) == []
        assert ours(leftovers(), tag) == []

        # Only the shut-off VM: its own exit code and message, one line.
        res = cli("run", c.name, "--config", str(conf))
        assert res.returncode == 4
        assert res.stderr.strip().splitlines() == [
            f"libvbackup: error: {c.name}: VM {c.name!r} is shut off; a push backup needs QEMU running "
            f"(use pull: it backs up a shut-off VM from its images (libvbackup pull {c.name}))"]
        assert res.stdout.startswith(f"FAILED {c.name} ([[policy]] 3 ")

    # The whole run refused, before anything: a VM no policy names, a file that is wrong.
    res = cli("run", "lvbtest-nosuchvm", "--config", str(conf))
    assert res.returncode == 2
    assert res.stderr == f"libvbackup: error: no [[policy]] of {conf} names VM 'lvbtest-nosuchvm' " \
                         f"(add a [[policy]] whose match names it, or back it up with: libvbackup pull lvbtest-nosuchvm)\n"
    conf.write_text(conf.read_text().replace("keep_last = 1", "kep_last = 1"))
    res = cli("run", "--config", str(conf), "--json")
    assert res.returncode == 2 and json.loads(res.stdout)["type"] == "UsageError"
    assert res.stderr == (f"libvbackup: error: {conf}: [[policy]] 1: unknown key 'kep_last' "
                          "(did you mean 'keep_last'?)\n")
    res = cli("run", "--config", str(workdir / "missing.toml"), env={**os.environ, "LIBVBACKUP_CONFIG": str(conf)})
    assert res.returncode == 2
    assert res.stderr == f"libvbackup: error: configuration file {workdir / 'missing.toml'} does not exist\n"
    assert len(Repository(repo).load(a.name).points) == 1


# `libvbackup run` whose copies stall after their first completed request (see test_faults.py),
# so that it can be stopped with two backups in the middle of their copy.
STALLING_RUN = stalling_child("""
    from libvbackup.cli.main import main
    sys.argv = ["libvbackup", "run", "--config", sys.argv[1], "--json"]
    main()
""", stream="sys.stderr")


def test_sigterm_stops_the_running_backups_which_clean_up_and_starts_no_other(three, repo, workdir):
    import signal
    import subprocess
    import sys

    tag, vms = three
    for vm in vms:
        for d in vm.disks:
            d.fill(0, 2 * MiB, 0x5a)
    conf = workdir / "libvbackup.toml"
    conf.write_text(f'[defaults]\nrepo = "{repo}"\njobs = 2\nquiesce = "no"\n'
                    f'[[policy]]\nmatch = "lvbtest-{tag}-*"\nkeep_last = 1\n')
    p = subprocess.Popen([sys.executable, "-c", STALLING_RUN, str(conf)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a's two disks and b's one, each stalled in its copy
            wait_copying(p, "stderr")
        assert vms[0].has_job() and vms[1].has_job() and not vms[2].has_job()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    report = json.loads(out)
    assert (report["exit_code"], report["ok"]) == (143, False)
    by_vm = {r["vm"]: r for r in report["vms"]}
    for vm in vms[:2]:
        assert (by_vm[vm.name]["exit_code"], by_vm[vm.name]["error"]) == (
            143, "interrupted by SIGTERM; the backup job was aborted and cleaned up")
    assert by_vm[vms[2].name]["exit_code"] == 143
    assert by_vm[vms[2].name]["error"].startswith("not backed up: the run was interrupted (SIGTERM)")
    assert err.strip().splitlines()[-1] == "libvbackup: error: interrupted by SIGTERM: 3 of 3 VM(s) not backed up"
    for vm in vms:
        assert not vm.has_job() and vm.checkpoints() == []
        assert Repository(repo).load(vm.name).points == []
        assert not (repo / vm.name / ".run.json").exists()
    assert ours(leftovers(), tag) == []
