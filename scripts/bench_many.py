"""The many mode of scripts/bench: several VMs at once.

--many-vms N disk-only VMs (default 2), each with --data-mib of random data on a --disk-mib disk.
Alternating: `libvbackup pull VM1 … VMN --jobs N` (one command, full backups) against N hand
pipelines started at once (`virsh backup-begin`, `nbdcopy --flush` of the export to raw,
`virsh domjobabort`, each in its own directory), timed until the last one ends. Aggregate MiB/s
of data and the ratio (issue 13's goal: within 10%).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests import lab  # noqa: E402

MiB = 1 << 20


def _hand_script(vms, work: pathlib.Path, pull_xml, qemu_ids) -> tuple[str, list[pathlib.Path]]:
    parts, dirs = [], []
    for i, vm in enumerate(vms):
        run = work / f"many-hand{i}"
        run.mkdir(mode=0o700)
        os.chown(run, *qemu_ids())
        dirs.append(run)
        xml = work / f"many-hand{i}.xml"
        xml.write_text(pull_xml(str(run / "nbd.sock")))
        uri = f"nbd+unix:///vda?socket={run}/nbd.sock"
        parts.append(f"( set -e; virsh -q backup-begin {vm.name} {xml} >/dev/null; "
                     f"nbdcopy --flush '{uri}' {work}/many-hand{i}.out; virsh -q domjobabort {vm.name} >/dev/null ) & "
                     f"p{i}=$!")
    waits = "; ".join(f"wait $p{i}" for i in range(len(vms)))
    return "set -e; " + "; ".join(parts) + f"; {waits}", dirs


def bench_many(args, work: pathlib.Path, opts: dict, rng, add, log, timed, cli: str, alternate, destroy_vm,
               populate, pull_xml, qemu_ids, delete_checkpoints) -> dict:
    n = args.many_vms
    vms = []
    try:
        for i in range(n):
            vm = lab.LabVM([(args.disk_mib * MiB, "qcow2")], name=f"lvb-bench-many{i}", track=False)
            lab.remove_domain(vm.conn, vm.name)
            vms.append(vm)
            vm.create_images()
            populate(vm.disks[0].path, args.data_mib, args.disk_mib, rng)
            vm.start(images_ready=True)
        log(f"bench: many: {n} VMs, {args.data_mib} MiB of random data each")

        def ours(r: int):
            repo = work / f"many-repo{r}"
            repo.mkdir(mode=0o700)
            try:
                return timed([cli, "pull", *(vm.name for vm in vms), "--jobs", str(n), "--repo", str(repo),
                              "--quiesce", "no", *[o for o in opts["pull"] if o != "--progress" and o != "none"]])
            finally:
                shutil.rmtree(repo, ignore_errors=True)

        def hand():
            script, dirs = _hand_script(vms, work, pull_xml, qemu_ids)
            try:
                return timed(["bash", "-c", script])
            finally:
                deadline = time.monotonic() + 30
                while any(vm.has_job() for vm in vms) and time.monotonic() < deadline:
                    time.sleep(0.02)
                for d in dirs:
                    shutil.rmtree(d, ignore_errors=True)
                for p in work.glob("many-hand*.out"):
                    p.unlink()

        for r in range(args.rounds):
            log(f"bench: many: round {r + 1}/{args.rounds}")
            alternate(r, [("many_libvbackup", lambda: ours(r)), ("many_nbdcopy", hand)], add)
            for vm in vms:
                delete_checkpoints(vm)
        return {"vms": n, "data_bytes": n * args.data_mib * MiB}
    finally:
        for vm in vms:
            destroy_vm(vm)


def print_many(many: dict, med: dict, rss: dict, ratios: dict, cpu: dict | None = None) -> None:
    data = many["data_bytes"]
    print(f"many: {many['vms']} VMs at once, {data / MiB:.0f} MiB of data in all, full backups")
    for k in ("many_libvbackup", "many_nbdcopy"):
        used = f"   CPU {cpu[k]:6.3f} s" if cpu and k in cpu else ""
        print(f"  {k:<22} {med[k]:8.3f} s   {data / MiB / med[k]:7.1f} MiB/s   peak RSS {rss[k] / 1024:7.1f} MiB{used}")
    print(f"  libvbackup pull --jobs N / N nbdcopy pipelines at once {ratios['many_vs_nbdcopy']:6.2f}   goal <= 1.10")
