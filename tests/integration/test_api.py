"""libvbackup.api alone drives full -> incremental -> restore -> verify -> prune on real VMs,
reports typed progress, raises the project's errors, and backs up two VMs at once in threads."""

from __future__ import annotations

import os
import pathlib
import random
import stat
import threading

import pytest

from libvbackup import api
from libvbackup.errors import Error, NotFound, StateError, UsageError
from libvbackup.results import BackupResult, ProgressEvent, RestoreResult

from .helpers import MiB, first_difference, random_writes, read_image, snap

pytestmark = pytest.mark.integration


def _restored(result: RestoreResult, expected: dict[str, bytes]) -> None:
    assert sorted(result.disks) == sorted(expected)
    for name, d in result.disks.items():
        got = read_image(pathlib.Path(d.path), "qcow2")
        assert got == expected[name], f"{name}: {first_difference(got, expected[name])}"


def test_full_incremental_restore_verify_prune_through_the_api(make_vm, repo, workdir):
    vm = make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))
    rng = random.Random(21)
    for d in vm.disks:
        random_writes(d, rng, 6)
    events: list[ProgressEvent] = []
    full = api.pull(vm.name, repo=str(repo), checkpoint="a1", on_progress=events.append)
    assert isinstance(full, BackupResult) and full.level == "full" and full.consistency == "crash"
    at_a1 = snap(vm)
    final = {e.disk: e for e in events if e.phase == "done"}
    assert set(final) == {"vda", "vdb"} and all(e.vm == vm.name and e.done == e.total for e in final.values())
    assert final["vda"].total >= full.disks["vda"].bytes_copied > 0
    vm["vda"].write(3 * MiB + 5, b"incremental bytes")
    inc = api.pull(vm.name, repo=str(repo), level="inc", checkpoint="a2")
    assert inc.level == "incremental" and inc.parent == "a1"
    at_a2 = snap(vm)
    vm["vdb"].fill(MiB, 4096, 0x77)
    api.push(vm.name, repo=str(repo), level="inc", checkpoint="a3")
    at_a3 = snap(vm)
    assert [p.checkpoint for p in api.list_points(vm.name, repo=str(repo)).points] == ["a1", "a2", "a3"]
    for chk, want in (("a1", at_a1), ("a2", at_a2), ("a3", at_a3)):
        r = api.restore(vm.name, repo=str(repo), checkpoint=chk, output=str(workdir / chk))
        _restored(r, want)
    v = api.verify(vm.name, repo=str(repo))
    assert v.ok and [p.checkpoint for p in v.points] == ["a1", "a2", "a3"]
    pr = api.prune(vm.name, repo=str(repo), keep_last=2)
    assert pr.remove == ("a1",) and pr.keep == ("a2", "a3")
    _restored(api.restore(vm.name, repo=str(repo), checkpoint="a2", output=str(workdir / "after")), at_a2)
    assert api.status(vm.name, repo=str(repo)).running is False
    assert sorted(c.name for c in api.checkpoints(vm.name, repo=str(repo)).checkpoints) == ["a2", "a3"]
    # The project's errors, with their exit codes and hints.
    with pytest.raises(NotFound) as e:
        api.restore(vm.name, repo=str(repo), checkpoint="nope", output=str(workdir / "nope"))
    assert e.value.exit_code == 3
    with pytest.raises(UsageError):
        api.restore(vm.name, repo=str(repo), start=True, output=str(workdir / "x"))
    with pytest.raises(StateError) as e:
        api.pull(vm.name, repo=str(repo), quiesce="yes")
    assert e.value.exit_code == 4 and e.value.hint
    assert not (workdir / "nope").exists() and not (workdir / "x").exists()


def test_two_vms_at_once_in_threads(make_vm, repo, workdir):
    vms = [make_vm((8 * MiB, "qcow2")), make_vm((6 * MiB, "qcow2"), (2 * MiB, "raw"))]
    for i, vm in enumerate(vms):
        for d in vm.disks:
            random_writes(d, random.Random(30 + i), 5)
    expected, results, errors = {}, {}, []
    os.umask(0o022)

    def run(vm):
        try:
            results[vm.name] = [api.pull(vm.name, repo=str(repo), checkpoint="t1")]
            expected[(vm.name, "t1")] = snap(vm)
            results[vm.name].append(api.pull(vm.name, repo=str(repo), level="inc", checkpoint="t2"))
        except Error as e:  # pragma: no cover - reported below
            errors.append(e)

    for vm in vms:
        vm.disks[0].write(MiB + 3, b"before t2 " + vm.name.encode())
    threads = [threading.Thread(target=run, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert os.umask(0o022) == 0o022  # a run's private umask was given back
    for vm in vms:
        assert [r.level for r in results[vm.name]] == ["full", "incremental"]
        r = api.restore(vm.name, repo=str(repo), checkpoint="t1", output=str(workdir / f"{vm.name}-t1"))
        _restored(r, expected[(vm.name, "t1")])
        for p in (repo / vm.name).rglob("*"):  # private: nothing readable by others
            assert not stat.S_IMODE(p.stat().st_mode) & 0o077 or p.name == ".lock", p
