"""Benchmark: libvbackup vs the pipelines an admin would script by hand, alternating A B A B.

Pull: `libvbackup pull` against `virsh backup-begin` + nbdcopy / qemu-img convert of the export.
Push: `libvbackup push` against libvirt's own push job (`virsh backup-begin` of a
<domainbackup mode='push'>, polled with `virsh domjobinfo` until it completed, then fsync).
All backups are durable when the command returns (flushed), like nbdcopy --flush and
qemu-img convert. Printed: medians of wall time and peak RSS, the ratios, and the storage
that held the repository and the hand pipelines' outputs (--repo-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests import lab  # noqa: E402

MiB = 1 << 20
CLI = str(pathlib.Path(sys.executable).parent / "libvbackup")


# A small launcher runs each measured command and reports its peak RSS: measured from this
# (larger) process, a child's peak would include the pages it shared with us before exec.
LAUNCHER = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)\n"
)


def timed(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of the largest process the command waited for.

    Dirty pages left by the previous command are written first, so that no command pays for
    another's write-back.
    """
    os.sync()
    p = subprocess.run(["/usr/bin/python3", "-c", LAUNCHER, *argv], capture_output=True, text=True)
    elapsed, rss, code = p.stderr.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({code}): {p.stderr[-500:]}")
    return float(elapsed), int(rss)


def populate(image: pathlib.Path, data_mib: int, disk_mib: int, rng: random.Random) -> None:
    """Incompressible data in 64 MiB pieces spread over the disk, with holes between them."""
    pieces = max(1, data_mib // 64)
    stride = disk_mib // pieces
    cmds = []
    for i in range(pieces):
        chunk_i = image.parent / f"chunk{i}.bin"
        chunk_i.write_bytes(rng.randbytes(64 * MiB))
        cmds += ["-c", f"write -s {chunk_i} {i * stride * MiB} {64 * MiB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(image)], check=True, capture_output=True)
    for f in image.parent.glob("chunk*.bin"):
        f.unlink()


def dirty(vm, disk_mib: int, rng: random.Random, fraction: float = 0.01, extents: int = 64) -> int:
    """Random data over ``fraction`` of the disk, in ``extents`` scattered pieces."""
    each = int(disk_mib * MiB * fraction / extents) // 65536 * 65536
    slots = rng.sample(range(disk_mib * MiB // each), extents)
    for s in slots:
        vm.disks[0].write(s * each, rng.randbytes(each))
    return each * extents


def pull_xml(sock: str) -> str:
    return (f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
            f"<disks><disk name='vda' backup='yes' type='file'><scratch file='{pathlib.Path(sock).parent}/s.qcow2'/>"
            f"</disk></disks></domainbackup>")


def hand_pipeline(vm, work: pathlib.Path, copier: str) -> tuple[float, int]:
    """virsh backup-begin; nbdcopy --flush (or qemu-img convert) of the export; domjobabort."""
    run = work / "hand"
    run.mkdir(mode=0o700)
    os.chown(run, *qemu_ids())
    (work / "hand.xml").write_text(pull_xml(str(run / "nbd.sock")))
    uri = f"nbd+unix:///vda?socket={run}/nbd.sock"
    out = work / "hand.out"
    if copier == "nbdcopy":
        copy = f"nbdcopy --flush '{uri}' {out}"
    else:
        # -t writeback: by default qemu-img convert writes with cache=unsafe and does not flush.
        copy = f"qemu-img convert -t writeback -f raw -O qcow2 '{uri}' {out}"
    script = (f"set -e; virsh -q backup-begin {vm.name} {work}/hand.xml >/dev/null; {copy}; "
              f"virsh -q domjobabort {vm.name} >/dev/null")
    try:
        return timed(["bash", "-c", script])
    finally:
        shutil.rmtree(run, ignore_errors=True)
        out.unlink(missing_ok=True)


def push_xml(target: pathlib.Path, incremental: str | None = None) -> str:
    """A push job of vda into a new qcow2 that libvirt creates; no checkpoint is made with it."""
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (f"<domainbackup mode='push'>{inc}<disks><disk name='vda' backup='yes' type='file'>"
            f"<driver type='qcow2'/><target file='{target}'/></disk></disks></domainbackup>")


def hand_push(vm, work: pathlib.Path, incremental: str | None = None) -> tuple[float, int]:
    """virsh backup-begin (push); poll virsh domjobinfo until the job is over; check that it
    completed; fsync the target and its directory. No checkpoint XML: no checkpoint is created.
    An incremental (since libvbackup's checkpoint) gets a target that libvirt backs by the live disk.
    """
    run = work / "hand-push"
    run.mkdir(mode=0o700)
    os.chown(run, *qemu_ids())  # QEMU, as libvirt-qemu, opens the target there
    target = run / "vda.qcow2"
    (work / "hand-push.xml").write_text(push_xml(target, incremental))
    script = (f"set -e; virsh -q backup-begin {vm.name} {work}/hand-push.xml >/dev/null; "
              f"while virsh -q domjobinfo {vm.name} | grep -q '^Job type: *Unbounded'; do sleep 0.05; done; "
              f"info=$(virsh -q domjobinfo {vm.name} --completed); "
              f"case \"$info\" in *'Job type:'*Completed*) ;; *) echo \"push job: $info\" >&2; exit 1;; esac; "
              f"sync {target} {run}")
    before = vm.checkpoints()
    try:
        result = timed(["bash", "-c", script])
    finally:
        try:
            if vm.has_job():  # only when the script failed half-way
                vm.dom.abortJob()
        except lab.libvirt.libvirtError:
            pass  # libvirtd went away: the script's own error is the one to report
        shutil.rmtree(run, ignore_errors=True)
        (work / "hand-push.xml").unlink(missing_ok=True)
    if vm.checkpoints() != before:
        raise SystemExit(f"bench: the hand push changed the checkpoints: {before} -> {vm.checkpoints()}")
    return result


def storage(path: pathlib.Path) -> dict:
    """File system type, device and mount point of ``path`` (findmnt, as df -T would name them)."""
    p = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "-T", str(path)],
                       capture_output=True, text=True)
    fstype, source, target = (p.stdout.split() + ["?", "?", "?"])[:3]
    return {"dir": str(path), "fstype": fstype, "device": source, "mount": target}


def cli_options(command: str) -> str:
    """The options that this libvbackup's command accepts (its --help), to pass only known ones."""
    p = subprocess.run([CLI, command, "--help"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: {CLI} {command} --help failed ({p.returncode}): {p.stderr[-500:]}")
    return p.stdout


def qemu_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("libvirt-qemu")
    return pw.pw_uid, pw.pw_gid


GOALS = {  # README, section Performance
    "full_vs_best_hand": 1.10,
    "inc_cost_per_dirty_byte_vs_full_per_data_byte": 1.5,
    "restore_vs_qemu_img": 1.10,
    "push_full_vs_libvirt_job": 1.5,
}


def reachable_by_qemu(path: pathlib.Path) -> None:
    """QEMU (libvirt-qemu) must traverse every directory above the work directory."""
    for d in [path, *path.parents]:
        if not os.stat(d).st_mode & 0o001:
            raise SystemExit(f"bench: {d} is not searchable by others (o+x); QEMU's user must reach {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--disk-mib", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repo-dir", default="/var/tmp", metavar="DIR",
                    help="where the repositories and the hand pipelines' outputs go, in a new lvb-bench-* "
                         "directory (DIR is created if missing, and then removed); /dev/shm/... takes the disk "
                         "out [default: /var/tmp]")
    ap.add_argument("--modes", default="pull,push", help="comma-separated: pull, push [default: pull,push]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = set(args.modes.split(","))
    if not modes or modes - {"pull", "push"}:
        ap.error("--modes takes pull, push or pull,push")
    rng = random.Random(42)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    base = pathlib.Path(args.repo_dir).absolute()
    made_base = not base.exists()
    if made_base:
        base.mkdir(mode=0o755)  # its parent must exist
        os.chmod(base, 0o755)
    work = None
    res: dict[str, list] = {}
    dirty_bytes = push_dirty_bytes = 0

    def add(key, value):
        res.setdefault(key, []).append(value)

    def alternate(r, pairs):
        # A B C in even rounds, C B A in odd ones: whatever the previous command leaves
        # behind (write-back, discards of deleted files) is not charged to one side.
        for key, run in pairs if r % 2 == 0 else pairs[::-1]:
            add(key, run())

    # The VM's own disk stays in /var/tmp whatever --repo-dir says: only the outputs move.
    vm = lab.LabVM([(args.disk_mib * MiB, "qcow2")], name="lvb-bench", track=False)
    lab.remove_domain(vm.conn, vm.name)
    try:
        reachable_by_qemu(base)
        work = pathlib.Path(tempfile.mkdtemp(prefix="lvb-bench-", dir=base))
        os.chmod(work, 0o711)  # QEMU must reach the hand-made pipelines' socket and target directories
        # libvbackup's own run directory (push targets, pull scratch) on the same storage as the
        # repository and the hand pipelines, when this libvbackup has the option.
        scratch = work / "scratch"
        scratch.mkdir(mode=0o711)
        opts = {}
        for command in ("pull", "push"):
            helptext = cli_options(command)
            opts[command] = ((["--progress", "none"] if "--progress" in helptext else [])
                             + (["--scratch-dir", str(scratch)] if "--scratch-dir" in helptext else []))
        where = {"repo": storage(work), "vm_disk": storage(vm.workdir)}
        vm.create_images()
        log(f"bench: writing {args.data_mib} MiB of random data into a {args.disk_mib} MiB disk")
        populate(vm.disks[0].path, args.data_mib, args.disk_mib, rng)
        vm.start(images_ready=True)
        log(f"bench: outputs in {work} ({where['repo']['fstype']} {where['repo']['device']})")
        for r in range(args.rounds):
            log(f"bench: round {r + 1}/{args.rounds}")
            if "pull" in modes:
                repo = work / f"repo{r}"
                repo.mkdir(mode=0o700)
                pull = [CLI, "pull", vm.name, "--repo", str(repo), *opts["pull"]]
                alternate(r, [
                    ("full_libvbackup", lambda: timed(pull + ["--checkpoint", f"b{r}-full"])),
                    ("full_nbdcopy", lambda: hand_pipeline(vm, work, "nbdcopy")),
                    ("full_qemu_img", lambda: hand_pipeline(vm, work, "qemu-img")),
                ])
                add("inc_empty", timed(pull + ["--checkpoint", f"b{r}-i0", "--incremental", f"b{r}-full"]))
                dirty_bytes = dirty(vm, args.disk_mib, rng)
                add("inc_1pct", timed(pull + ["--checkpoint", f"b{r}-i1", "--incremental", f"b{r}-i0"]))
                top = repo / vm.name / f"b{r}-i1" / "vda.qcow2"
                out = work / "restore"
                alternate(r, [
                    ("restore_libvbackup", lambda: timed([CLI, "restore", vm.name, "--repo", str(repo), "--checkpoint",
                                                          f"b{r}-i1", "--output", str(out), "--progress", "none"])),
                    ("restore_qemu_img", lambda: timed(["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
                                                        "qcow2", str(top), str(work / "ref.qcow2")])),
                ])
                shutil.rmtree(out)
                (work / "ref.qcow2").unlink()
                shutil.rmtree(repo)
            if "push" in modes:
                repo = work / f"push{r}"
                repo.mkdir(mode=0o700)
                push = [CLI, "push", vm.name, "--repo", str(repo), *opts["push"]]
                before = set(vm.checkpoints())
                alternate(r, [
                    ("push_full_libvbackup", lambda: timed(push)),
                    ("push_full_libvirt", lambda: hand_push(vm, work)),
                ])
                made = sorted(set(vm.checkpoints()) - before)
                if len(made) != 1:
                    raise SystemExit(f"bench: expected one new checkpoint from the full push, found {made}")
                push_dirty_bytes = dirty(vm, args.disk_mib, rng)
                # Both copy what changed since the full push's checkpoint, whichever runs first.
                alternate(r, [
                    ("push_inc_libvbackup", lambda: timed(push + ["--level", "inc"])),
                    ("push_inc_libvirt", lambda: hand_push(vm, work, incremental=made[0])),
                ])
                shutil.rmtree(repo)
            for c in vm.checkpoints():
                vm.dom.checkpointLookupByName(c).delete(0)
    finally:
        vm.destroy()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if made_base:
            shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v[0] for v in vals) for k, vals in res.items()}
    rss = {k: max(v[1] for v in vals) for k, vals in res.items()}
    data = args.data_mib * MiB
    ratios = {}
    if "pull" in modes:
        best_hand = min(med["full_nbdcopy"], med["full_qemu_img"])
        full_per_byte = med["full_libvbackup"] / data
        inc_per_byte = max(med["inc_1pct"] - med["inc_empty"], 0) / dirty_bytes
        ratios.update({
            "full_vs_best_hand": med["full_libvbackup"] / best_hand,
            "full_vs_nbdcopy": med["full_libvbackup"] / med["full_nbdcopy"],
            "full_vs_qemu_img": med["full_libvbackup"] / med["full_qemu_img"],
            "inc_cost_per_dirty_byte_vs_full_per_data_byte": inc_per_byte / full_per_byte,
            "restore_vs_qemu_img": med["restore_libvbackup"] / med["restore_qemu_img"],
        })
    if "push" in modes:
        ratios.update({
            "push_full_vs_libvirt_job": med["push_full_libvbackup"] / med["push_full_libvirt"],
            "push_inc_vs_libvirt_job": med["push_inc_libvbackup"] / med["push_inc_libvirt"],
        })
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
        "data_mib": args.data_mib, "disk_mib": args.disk_mib, "rounds": args.rounds,
        "storage": where,
        "dirty_bytes": dirty_bytes, "push_dirty_bytes": push_dirty_bytes,
        "median_seconds": med, "peak_rss_kib": rss, "ratios": ratios,
        "goals": {k: v for k, v in GOALS.items() if k in ratios},
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(f"libvbackup benchmark, {report['date']}, {report['machine']}")
    print(f"{args.data_mib} MiB of random data on a {args.disk_mib} MiB qcow2 disk, {args.rounds} rounds, medians")
    for role, label in (("repo", "repository and hand outputs"), ("vm_disk", "VM disk (source)")):
        st = where[role]
        print(f"  {label}: {st['dir']} on {st['fstype']} {st['device']} (mounted on {st['mount']})")
    for k in med:
        print(f"  {k:<22} {med[k]:8.3f} s   peak RSS {rss[k] / 1024:7.1f} MiB")
    for k, v in ratios.items():
        goal = f"   goal <= {GOALS[k]:.2f}" if k in GOALS else ""
        print(f"  {k:<48} {v:6.2f}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
