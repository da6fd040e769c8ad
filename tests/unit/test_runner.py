"""The runner without libvirt: which VMs, which policy, one failure among others, the bound on
concurrent backups, the exit code, the signal relay into worker threads, the shared umask."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from libvbackup import runner, signals
from libvbackup.config import parse
from libvbackup.errors import NotFound, RepositoryError, StateError, UsageError
from libvbackup.results import BackupDisk, BackupResult, PruneResult
from libvbackup.retention import Policy

URI = "qemu:///system"
CONFIG = f"""
[defaults]
repo = "/backups"
uri = "{URI}"
[[policy]]
match = "web-*"
keep_last = 2
[[policy]]
match = ["db1", "db2"]
level = "full"
repo = "/backups/db"
[[policy]]
match = "far-*"
uri = "qemu+ssh://far/system"
keep_daily = 7
"""


def result(vm, checkpoint="chk", level="full", copied=100):
    return BackupResult(vm=vm, checkpoint=checkpoint, parent=None, level=level, mode="pull", requested_level="auto",
                        fallback_reason=None, redefined=(),
                        disks={"vda": BackupDisk("vda", "full", None, True, bytes_copied=copied),
                               "vdb": BackupDisk("vdb", "full", None, False, bytes_copied=copied)})


class Lab:
    """Fake libvirt listings, backups and prunes; ``backup``/``prune`` may be replaced."""

    def __init__(self, monkeypatch, listed):
        self.listed = listed
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        lab = self

        class Connection:
            def __init__(self, uri):
                self.uri = uri

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def domain_names(self):
                return sorted(lab.listed[self.uri])

        monkeypatch.setattr(runner, "Connection", Connection)
        monkeypatch.setattr(runner, "backup", lambda vm, **kw: self.backup(vm, **kw))
        monkeypatch.setattr(runner, "prune", lambda vm, **kw: self.prune(vm, **kw))
        self.fail: dict[str, BaseException] = {}

    def backup(self, vm, **kw):
        with self.lock:
            self.calls.append(("backup", vm, kw))
        if vm in self.fail:
            raise self.fail[vm]
        if kw["on_job_started"] and not kw["dry_run"]:
            kw["on_job_started"]()
        return result(vm)

    def prune(self, vm, **kw):
        with self.lock:
            self.calls.append(("prune", vm, kw))
        return PruneResult(vm, ("a", "chk"), ("old",), (), False)


def test_choose_takes_the_first_policy_of_the_domain_s_libvirt():
    c = parse(CONFIG, "/c.toml")
    listed = {URI: ["db1", "db3", "web-1", "far-1"], "qemu+ssh://far/system": ["far-1", "web-2"]}
    chosen, warnings = runner.choose(c, listed)
    assert [(x.vm, x.uri, x.policy.index) for x in chosen] == [
        ("db1", URI, 2), ("web-1", URI, 1), ("far-1", "qemu+ssh://far/system", 3)]
    assert warnings == []  # web-2 on the far host: no policy of that libvirt names it
    chosen, warnings = runner.choose(c, {URI: ["web-1"], "qemu+ssh://far/system": []})
    assert warnings == ["[[policy]] 2 (db1, db2) covers no VM (none matches, or an earlier policy takes them)",
                        "[[policy]] 3 (far-*) covers no VM (none matches, or an earlier policy takes them)"]
    # Named VMs: in the order given, once; one no libvirt lists is tried (its backup says NotFound).
    chosen, _ = runner.choose(c, listed, ["web-1", "db2", "web-1"])
    assert [(x.vm, x.uri, x.policy.index) for x in chosen] == [("web-1", URI, 1), ("db2", URI, 2)]
    with pytest.raises(UsageError, match=r"^no \[\[policy\]\] of /c.toml names VM 'db3'"):
        runner.choose(c, listed, ["web-1", "db3"])


def test_exit_codes():
    def r(code):
        return runner.VmRun(vm="v", policy="p", schedule=None, uri=URI, repo="/r", mode="pull", requested_level="auto",
                            retention=None, ok=code == 0, exit_code=code, error=None if code == 0 else "e", seconds=0)

    assert runner.exit_code([r(0), r(0)]) == 0
    assert runner.exit_code([r(4)]) == 4
    assert runner.exit_code([r(0), r(5)]) == runner.SOME_FAILED == 10
    assert runner.exit_code([r(4), r(4)]) == 10
    assert runner.exit_code([r(0)], signum=signal.SIGTERM) == 143


def test_one_vm_failing_never_stops_the_others(monkeypatch):
    lab = Lab(monkeypatch, {URI: ["db1", "db2", "web-1", "web-2", "other"], "qemu+ssh://far/system": []})
    lab.fail = {"db1": StateError("VM 'db1' is not running", "start it"), "web-2": RuntimeError("a bug")}
    events = []
    report = runner.run_policies(parse(CONFIG, "/c.toml"), jobs=2, on_event=events.append)
    by_vm = {r.vm: r for r in report.vms}
    assert [r.vm for r in report.vms] == ["db1", "db2", "web-1", "web-2"]
    assert sorted(e.vm for e in events) == sorted(by_vm)
    assert (report.ok, report.exit_code, report.jobs, report.config) == (False, 10, 2, "/c.toml")
    assert report.warnings == ("[[policy]] 3 (far-*) covers no VM (none matches, or an earlier policy takes them)",)
    assert (by_vm["db1"].ok, by_vm["db1"].exit_code, by_vm["db1"].error) == (False, 4, "VM 'db1' is not running (start it)")
    assert by_vm["web-2"].exit_code == 70 and by_vm["web-2"].error.startswith("internal error: RuntimeError: a bug")
    good = by_vm["web-1"]
    assert (good.ok, good.exit_code, good.checkpoint, good.level, good.bytes_copied) == (True, 0, "chk", "full", 200)
    assert (good.policy, good.repo, good.retention, good.kept, good.pruned) == (
        "[[policy]] 1 (web-*)", "/backups", "last 2", ("a", "chk"), ("old",))
    assert by_vm["db2"].retention is None and by_vm["db2"].pruned == () and by_vm["db2"].repo == "/backups/db"
    # Each backup with its policy's settings; prune only after a good backup, by the policy's rules.
    kw = {vm: k for what, vm, k in lab.calls if what == "backup"}
    assert kw["db2"]["level"] == "full" and kw["db2"]["repo"] == "/backups/db" and kw["db2"]["uri"] == URI
    assert kw["web-1"]["level"] == "auto" and kw["web-1"]["mode"] == "pull" and kw["web-1"]["dry_run"] is False
    prunes = {vm: k for what, vm, k in lab.calls if what == "prune"}
    assert prunes == {"web-1": {"repo": "/backups", "keep": Policy(last=2), "uri": URI}}
    d = report.to_dict()
    assert d["vms"][0]["vm"] == "db1" and d["vms"][0]["ok"] is False and d["exit_code"] == 10


def test_a_failed_prune_and_a_single_vm(monkeypatch):
    lab = Lab(monkeypatch, {URI: ["web-1", "db1"], "qemu+ssh://far/system": []})

    def prune(vm, **kw):
        raise RepositoryError("repository /backups is not writable: Read-only file system")

    lab.prune = prune
    report = runner.run_policies(parse(CONFIG, "/c.toml"), vms=["web-1"])
    (r,) = report.vms
    assert (r.ok, r.exit_code, report.exit_code, r.checkpoint) == (False, 5, 5, "chk")
    assert r.error == ("backed up as chk, but the retention failed: repository /backups is not writable: "
                       "Read-only file system")
    lab.fail = {"db9": NotFound("libvirt at qemu:///system has no VM named 'db9'")}
    c = parse(CONFIG.replace('["db1", "db2"]', '"db*"'), "/c.toml")
    report = runner.run_policies(c, vms=["db9"])
    assert report.exit_code == 3 and "no VM named 'db9'" in report.vms[0].error


def test_dry_run_plans_and_prunes_nothing(monkeypatch):
    lab = Lab(monkeypatch, {URI: ["web-1"], "qemu+ssh://far/system": []})
    report = runner.run_policies(parse(CONFIG, "/c.toml"), dry_run=True)
    assert [c[0] for c in lab.calls] == ["backup"] and lab.calls[0][2]["dry_run"] is True
    assert report.dry_run and report.vms[0].dry_run and report.vms[0].retention == "last 2" and report.exit_code == 0


def test_nothing_to_run(monkeypatch):
    Lab(monkeypatch, {URI: ["other"], "qemu+ssh://far/system": []})
    with pytest.raises(NotFound, match="no VM of libvirt at qemu:///system, qemu\\+ssh://far/system matches"):
        runner.run_policies(parse(CONFIG, "/c.toml"))
    with pytest.raises(UsageError, match=r"^/c.toml: no \[\[policy\]\], so nothing to back up"):
        runner.run_policies(parse("", "/c.toml"))
    with pytest.raises(UsageError, match=r"^no configuration file /etc/libvbackup.toml"):
        runner.run_policies(parse("", "/c.toml").__class__(None))
    with pytest.raises(UsageError, match=r"--jobs 0"):
        runner.run_policies(parse(CONFIG, "/c.toml"), jobs=0)


def test_at_most_jobs_backups_at_once_and_one_start_at_a_time(monkeypatch):
    names = [f"web-{i}" for i in range(6)]
    lab = Lab(monkeypatch, {URI: names, "qemu+ssh://far/system": []})
    now = {"copying": 0, "starting": 0}
    peak = {"copying": 0, "starting": 0}

    def backup(vm, **kw):
        with lab.lock:
            now["starting"] += 1
            peak["starting"] = max(peak["starting"], now["starting"])
        time.sleep(0.02)
        with lab.lock:
            now["starting"] -= 1
            now["copying"] += 1
            peak["copying"] = max(peak["copying"], now["copying"])
        kw["on_job_started"]()
        time.sleep(0.1)
        with lab.lock:
            now["copying"] -= 1
        return result(vm)

    lab.backup = backup
    report = runner.run_policies(parse(CONFIG, "/c.toml"), jobs=3)
    assert report.ok and len(report.vms) == 6
    assert peak == {"copying": 3, "starting": 1}


def test_a_signal_interrupts_the_running_backups_and_starts_no_other(monkeypatch):
    names = [f"web-{i}" for i in range(5)]
    lab = Lab(monkeypatch, {URI: names, "qemu+ssh://far/system": []})
    copying = threading.Semaphore(0)
    cleaned = []

    def backup(vm, **kw):
        kw["on_job_started"]()
        copying.release()
        try:
            while True:  # a copy: Python code between reads, where the relayed exception lands
                time.sleep(0.01)
        except BaseException as e:
            cleaned.append((vm, type(e).__mro__[1].__name__))  # backup's clean-up, then it re-raises
            raise

    lab.backup = backup
    before = signal.getsignal(signal.SIGTERM)

    def kill():
        for _ in range(2):
            assert copying.acquire(timeout=10)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=kill)
    t.start()
    report = runner.run_policies(parse(CONFIG, "/c.toml"), jobs=2)
    t.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert (report.ok, report.exit_code) == (False, 143)
    assert sorted(cleaned) == [("web-0", "Interrupted"), ("web-1", "Interrupted")]
    by_vm = {r.vm: r for r in report.vms}
    for vm in ("web-0", "web-1"):
        assert by_vm[vm].exit_code == 143
        assert by_vm[vm].error == "interrupted by SIGTERM; the backup job was aborted and cleaned up"
    for vm in ("web-2", "web-3", "web-4"):
        assert by_vm[vm].exit_code == 143 and by_vm[vm].error.startswith("not backed up: the run was interrupted")
    assert not [c for c in lab.calls if c[0] == "prune"]


def test_the_umask_is_held_while_any_thread_needs_it():
    old = os.umask(0o022)
    try:
        inside, leave = [threading.Event() for _ in range(2)], [threading.Event() for _ in range(2)]
        seen = []

        def worker(i):
            with signals.umask(0o077):
                inside[i].set()
                leave[i].wait(5)
                seen.append((i, current()))

        def current():
            mask = os.umask(0)
            os.umask(mask)
            return mask

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        threads[0].start()
        inside[0].wait(5)
        threads[1].start()
        inside[1].wait(5)
        leave[0].set()  # the first one in leaves first: the second still needs 077
        threads[0].join()
        assert current() == 0o077
        leave[1].set()
        threads[1].join()
        assert seen == [(0, 0o077), (1, 0o077)]
        assert current() == 0o022  # the last one out restores it
        with signals.umask(0o077), signals.umask(0o002):
            assert current() == 0o077  # a later entrant only adds bits
        assert current() == 0o022
    finally:
        os.umask(old)
