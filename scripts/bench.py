"""Benchmark: libvbackup vs the pipelines an admin would script by hand, alternating A B A B.

Pull: `libvbackup pull` against `virsh backup-begin` + nbdcopy / qemu-img convert of the export;
an empty incremental (the fixed cost of a command) against `virsh backup-begin` of an
incremental job with a checkpoint + `virsh domjobabort` (inc_empty_hand); incrementals after 1% and
then 5% of the disk changed (the slope between them: the cost per dirty byte); and the same empty
incremental, the full pull, the restore and the full push run through a `libvbackup serve`
started for the bench (*_served: the command hands itself to a process forked from the server,
which has everything imported), each into a repository of its own.
CPU: user + sys of the command's processes (libvirtd and QEMU not counted; a served command's
worker counted).
Push: `libvbackup push` against libvirt's own push job (`virsh backup-begin` of a
<domainbackup mode='push'>, polled with `virsh domjobinfo` until it completed, then fsync).
All backups are durable when the command returns (flushed), like nbdcopy --flush and
qemu-img convert. Printed: medians of wall time and peak RSS, the ratios, and the storage
that held the repository and the hand pipelines' outputs (--repo-dir).

Big (--modes big): cost follows the data, not the disk size. Two VMs, one with a thin 16 TiB
qcow2 disk (--big-tib) and one with a 4 GiB disk, hold the same 9 MiB at the same offsets; full
pull, incremental pull after 1 MiB changed, verify of the repository and restore to qcow2 are
run on both, alternating, and compared (16 TiB / 4 GiB), with each command's peak RSS and the
repository's size on disk (du) against the data copied.
Chain (--modes chain): verify follows the stored data, not points x disk data. A 512 MiB disk
with 256 MiB of random data, 1 full + 59 incrementals (1 MiB changed before each, taken
in-process); then `libvbackup verify` of all 60 points against `libvbackup restore` of the
60th point to raw, which reads the chain's data once.
Remote (--modes remote): `libvbackup pull` (full) of the VM from a remote libvirt (qemu+ssh through a
private sshd on 127.0.0.1 to this host's libvirtd, test PKI) with the NBD export over TCP and TLS, and
over plain TCP (--no-tls), against the same pull over the local unix socket, alternating; MiB/s of data
and the ratios to local.
Many (--modes many, scripts/bench_many.py): `libvbackup pull VM1 VM2 --jobs 2` against two hand
pipelines (virsh + nbdcopy --flush) started at once; aggregate MiB/s (--many-vms N VMs).
Compress (--modes compress): full `libvbackup pull` with and without --compress, alternating, of
a 1 GiB disk holding 512 MiB of text-like data (words and numbers) and 64 MiB of random data:
seconds, MiB/s of data, bytes stored (the image's file size) and the ratio; and virtnbdbackup -l full
--compress (lz4, its own stream format, not qcow2) of the same VM, installed with apt-get when missing.
Instant (--modes instant, scripts/bench_instant.py): restore --instant of the tiny guest to its
guest-ping, and finalize, against a full restore --start of the same disk to its guest-ping.
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
from tests import lab, remote  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
CLI = str(pathlib.Path(sys.executable).parent / "libvbackup")


# A small launcher runs each measured command and reports its peak RSS: measured from this
# (larger) process, a child's peak would include the pages it shared with us before exec.
LAUNCHER = (
    "import os, sys, time\n"
    "t = time.perf_counter()\n"
    "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "print(time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime,\n"
    "      file=sys.stderr)\n"
)


def timed(argv: list[str], env: dict | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (KiB) of the largest process the command waited for, and CPU
    seconds (user + sys) of the command and every process it waited for (not libvirtd's, QEMU's).

    Dirty pages left by the previous command are written first, so that no command pays for
    another's write-back.
    """
    os.sync()
    p = subprocess.run(["/usr/bin/python3", "-c", LAUNCHER, *argv], capture_output=True, text=True, env=env)
    elapsed, rss, code, cpu = p.stderr.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({code}): {p.stderr[-500:]}")
    return float(elapsed), int(rss), float(cpu)


def evicted(paths) -> bool:
    """Drop the files' pages from the page cache (written back first): the next reader reads the
    disk. True, to chain before a timed command."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


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
    each = max(65536, int(disk_mib * MiB * fraction / extents) // 65536 * 65536)  # (small disks: one cluster)
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
        # domjobabort returns before libvirt has ended the job: the next measured command
        # would find it still there (not timed: libvbackup waits for it inside its own time).
        deadline = time.monotonic() + 30
        while vm.has_job() and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(run, ignore_errors=True)
        out.unlink(missing_ok=True)


def hand_empty(vm, work: pathlib.Path, since: str) -> tuple[float, int, float]:
    """The fixed cost by hand: virsh backup-begin of an incremental pull job since ``since`` with
    a new checkpoint, then virsh domjobabort; nothing is dirty, so nothing is copied."""
    run = work / "hand"
    run.mkdir(mode=0o700)
    os.chown(run, *qemu_ids())
    (work / "hand.xml").write_text(pull_xml(str(run / "nbd.sock")).replace(
        "<server", f"<incremental>{since}</incremental><server", 1))
    (work / "hand-chk.xml").write_text("<domaincheckpoint><name>hand-empty</name><disks><disk name='vda' "
                                       "checkpoint='bitmap'/></disks></domaincheckpoint>")
    script = (f"set -e; virsh -q backup-begin {vm.name} {work}/hand.xml {work}/hand-chk.xml >/dev/null; "
              f"virsh -q domjobabort {vm.name} >/dev/null")
    try:
        return timed(["bash", "-c", script])
    finally:
        # Not timed (libvbackup's time includes it): the job's end, and the checkpoint goes again
        # so that the chain is libvbackup's alone.
        deadline = time.monotonic() + 30
        while vm.has_job() and time.monotonic() < deadline:
            time.sleep(0.02)
        if "hand-empty" in vm.checkpoints():
            vm.dom.checkpointLookupByName("hand-empty").delete(0)
        shutil.rmtree(run, ignore_errors=True)


class Served:
    """A `libvbackup serve` for the bench's commands (when this libvbackup has it): a command
    run through it is timed whole, and its CPU is the command's plus its worker's (the worker
    is the server's child: the server's reaped children's CPU, from /proc, before and after)."""

    def __init__(self, work: pathlib.Path) -> None:
        self.proc = None
        if "serve" not in subprocess.run([CLI, "--help"], capture_output=True, text=True).stdout:
            return
        d = work / "serve"
        d.mkdir(mode=0o700)
        self.sock = d / "server.sock"
        self.log = open(d / "log", "w")
        self.proc = subprocess.Popen([CLI, "serve", "--socket", str(self.sock), "--quiet"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: libvbackup serve did not start: {(d / 'log').read_text()[-500:]}")
            time.sleep(0.05)
        self.env = {**os.environ, "LIBVBACKUP_SERVER": str(self.sock)}

    def children_cpu(self) -> float:
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime

    def timed(self, argv: list[str]) -> tuple[float, int, float]:
        before = self.children_cpu()
        wall, rss, cpu = timed(argv, env=self.env)
        return wall, rss, cpu + self.children_cpu() - before

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.log.close()
            self.proc = None


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


def repo_usage(repo: pathlib.Path, vm: str) -> tuple[int, int, int]:
    """Bytes on disk of the VM's part of the repository (du), bytes copied into it by all its
    points (as `libvbackup list --json` reports them), and the number of points."""
    du = subprocess.run(["du", "-sB1", str(repo / vm)], capture_output=True, text=True, check=True)
    p = subprocess.run([CLI, "list", vm, "--repo", str(repo), "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: libvbackup list {vm} failed ({p.returncode}): {p.stderr[-500:]}")
    points = json.loads(p.stdout)["points"]
    copied = sum(d["bytes_copied"] for pt in points for d in pt["disks"].values())
    return int(du.stdout.split()[0]), copied, len(points)


def alternate(r: int, pairs, add) -> None:
    """A B C in even rounds, C B A in odd ones: whatever the previous command leaves behind
    (write-back, discards of deleted files) is not charged to one side."""
    for key, run in pairs if r % 2 == 0 else pairs[::-1]:
        add(key, run())


def destroy_vm(vm) -> None:
    """vm.destroy(), then make sure that the domain is gone: lab.remove_domain ignores its errors,
    and once a domain stayed defined (shut off) after its QEMU took 2 s to stop on SIGTERM."""
    try:
        vm.destroy()
    finally:
        conn = lab.ensure_libvirtd()
        try:
            for _ in range(50):
                try:
                    conn.lookupByName(vm.name)
                except lab.libvirt.libvirtError:
                    return
                time.sleep(0.2)
                lab.remove_domain(conn, vm.name)
            print(f"bench: could not remove the domain {vm.name}", file=sys.stderr)
        finally:
            conn.close()


def delete_checkpoints(vm) -> None:
    for c in vm.checkpoints():
        vm.dom.checkpointLookupByName(c).delete(0)


# The same data on both disks of the big mode, at the same offsets below 4 GiB: 9 MiB in four
# pieces, two of them unaligned; then 1 MiB changed in four places for the incremental.
BIG_PIECES = ((0, 1 * MiB), (3 * MiB + 17, 2 * MiB), (GiB + 512, 3 * MiB), (3 * GiB + 5 * MiB, 3 * MiB))
BIG_DIRTY = ((512 << 10, 256 << 10), (GiB + MiB, 256 << 10), (2 * GiB + 4097, 256 << 10),
             (4 * GiB - (256 << 10), 256 << 10))
BIG_COMMANDS = (("full", "full pull"), ("inc", "incremental pull, 1 MiB changed"),
                ("verify", "verify (whole repository)"), ("restore", "restore to qcow2"))


def bench_big(args, work: pathlib.Path, opts: dict, rng: random.Random, add, log) -> dict:
    """Full pull, incremental, verify and restore of a thin big disk against a 4 GiB one that
    holds the same data. One VM per disk, so that every command (verify has no --disk) sees
    one disk."""
    sizes = {"big": args.big_tib * TiB, "small": 4 * GiB}
    pieces = [(off, rng.randbytes(n)) for off, n in BIG_PIECES]
    vms = {}
    usage: dict[str, list] = {"big": [], "small": []}
    try:
        for key, size in sizes.items():
            vm = lab.LabVM([(size, "qcow2")], name=f"lvb-bench-{key}", track=False)
            lab.remove_domain(vm.conn, vm.name)  # one left by an interrupted run
            vms[key] = vm
            vm.create_images()
            cmds = []
            for i, (off, data) in enumerate(pieces):
                f = vm.workdir / f"piece{i}.bin"
                f.write_bytes(data)
                cmds += ["-c", f"write -s {f} {off} {len(data)}"]
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(vm.disks[0].path)], check=True, capture_output=True)
            for f in vm.workdir.glob("piece*.bin"):
                f.unlink()
            vm.start(images_ready=True)
        log(f"bench: big: {sum(len(d) for _, d in pieces) / MiB:.0f} MiB on a {args.big_tib} TiB and a 4 GiB disk")
        for r in range(args.rounds):
            log(f"bench: big: round {r + 1}/{args.rounds}")
            repos = {k: work / f"big-{k}-{r}" for k in vms}
            for repo in repos.values():
                repo.mkdir(mode=0o700)
            outs = {k: work / f"big-restore-{k}" for k in vms}

            def pull(k):
                return [CLI, "pull", vms[k].name, "--repo", str(repos[k]), *opts["pull"]]

            def each(command, argv):
                # bind k now: the lambdas run inside alternate()
                return [(f"big_{command}_{k}", (lambda k=k: timed(argv(k)))) for k in vms]

            alternate(r, each("full", lambda k: pull(k) + ["--checkpoint", f"f{r}"]), add)
            for off, n in BIG_DIRTY:
                data = rng.randbytes(n)
                for vm in vms.values():
                    vm.disks[0].write(off, data)
            alternate(r, each("inc", lambda k: pull(k) + ["--checkpoint", f"i{r}", "--level", "inc"]), add)
            for k in vms:
                usage[k].append(repo_usage(repos[k], vms[k].name))
            alternate(r, each("verify", lambda k: [CLI, "verify", vms[k].name, "--repo", str(repos[k])]), add)
            alternate(r, each("restore", lambda k: [CLI, "restore", vms[k].name, "--repo", str(repos[k]),
                                                    "--checkpoint", f"i{r}", "--output", str(outs[k]),
                                                    "--format", "qcow2", "--progress", "none"]), add)
            for k in vms:
                image = outs[k] / "vda.qcow2"
                info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                                 capture_output=True, text=True, check=True).stdout)
                if info["virtual-size"] != sizes[k]:
                    raise SystemExit(f"bench: restored {image} is {info['virtual-size']} bytes, not {sizes[k]}")
                shutil.rmtree(outs[k])
                shutil.rmtree(repos[k])
                delete_checkpoints(vms[k])
    finally:
        errors = []
        for vm in vms.values():
            try:
                destroy_vm(vm)
            except Exception as e:  # the other VM goes too
                errors.append(e)
        if errors:
            raise errors[0]
    stored = {k: max(u[0] for u in v) for k, v in usage.items()}
    copied = {k: max(u[1] for u in v) for k, v in usage.items()}
    points = {k: v[0][2] for k, v in usage.items()}
    return {"disk_bytes": sizes, "data_bytes": sum(len(d) for _, d in pieces),
            "dirty_bytes": sum(n for _, n in BIG_DIRTY),
            "repo_bytes_on_disk": stored, "repo_bytes_copied": copied, "points": points}


def bench_chain(args, work: pathlib.Path, scratch: pathlib.Path, rng: random.Random, add, log) -> dict:
    """verify of a 60-point chain against restore of its newest point (which reads the chain's
    data once). The chain is made in-process: only the measured commands are the CLI."""
    from libvbackup.backup import pull  # noqa: PLC0415 (only this mode needs the library itself)

    disk_mib, data_mib, points = 512, 256, args.chain_points
    vm = lab.LabVM([(disk_mib * MiB, "qcow2")], name="lvb-bench-chain", track=False)
    lab.remove_domain(vm.conn, vm.name)
    repo = work / "chain"
    repo.mkdir(mode=0o700)
    out = work / "chain-restore"
    try:
        vm.create_images()
        populate(vm.disks[0].path, data_mib, disk_mib, rng)
        vm.start(images_ready=True)
        log(f"bench: chain: {data_mib} MiB of random data on a {disk_mib} MiB disk, 1 full + {points - 1} "
            f"incrementals (1 MiB changed before each)")
        t = time.perf_counter()
        pull(vm.name, repo=str(repo), checkpoint="c00", scratch_dir=str(scratch))
        each = 256 << 10
        for i in range(1, points):
            for slot in rng.sample(range(disk_mib * MiB // each), 4):
                vm.disks[0].write(slot * each, rng.randbytes(each))
            pull(vm.name, repo=str(repo), checkpoint=f"c{i:02d}", level="inc", scratch_dir=str(scratch))
        setup = time.perf_counter() - t
        stored, copied, n = repo_usage(repo, vm.name)
        if n != points:
            raise SystemExit(f"bench: chain: {n} points in the repository, expected {points}")
        log(f"bench: chain: made in {setup:.1f} s; {copied / MiB:.1f} MiB copied, {stored / MiB:.1f} MiB on disk")
        newest = f"c{points - 1:02d}"
        for r in range(args.rounds):
            log(f"bench: chain: round {r + 1}/{args.rounds}")
            alternate(r, [
                ("chain_verify", lambda: timed([CLI, "verify", vm.name, "--repo", str(repo)])),
                ("chain_restore_raw", lambda: timed([CLI, "restore", vm.name, "--repo", str(repo), "--checkpoint",
                                                     newest, "--output", str(out), "--format", "raw",
                                                     "--progress", "none"])),
            ], add)
            if (out / "vda.raw").stat().st_size != disk_mib * MiB:
                raise SystemExit(f"bench: chain: {out / 'vda.raw'} has the wrong size")
            shutil.rmtree(out)
    finally:
        destroy_vm(vm)
    return {"disk_bytes": disk_mib * MiB, "data_bytes": data_mib * MiB, "points": points,
            "setup_seconds": setup, "repo_bytes_on_disk": stored, "repo_bytes_copied": copied}


def text_like(rng: random.Random, n: int) -> bytes:
    """Words and numbers in lines: about what logs and source text compress to (zstd ~3:1)."""
    words = [b"backup", b"checkpoint", b"qcow2", b"cluster", b"guest", b"libvirt", b"the", b"of", b"\n",
             b"error", b"info", b"request", b"completed", b"2026-11-24T10:00:00Z"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) + str(rng.randrange(100000)).encode() for _ in range(64)) + b"\n"
    return bytes(out[:n])


VIRTNBD_PACKAGES = ("virtnbdbackup", "python3-lz4")  # Debian 12: 1.9.15; lz4 for its --compress


def ensure_virtnbdbackup(log) -> str:
    """virtnbdbackup and python3-lz4, installed with apt-get for this mode if missing (not by
    scripts/setup: only the benchmark compares against it); its version."""
    missing = [p for p in VIRTNBD_PACKAGES if "install ok installed" not in subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout]
    if missing:
        log(f"bench: compress: installing {' '.join(missing)} (apt-get) to compare with virtnbdbackup --compress")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        p = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                           capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"bench: compress: apt-get install {' '.join(missing)} failed ({p.returncode}): "
                             f"{p.stderr[-500:]}; install them by hand (Debian 12 has both) and run again")
    p = subprocess.run(["virtnbdbackup", "--version"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: compress: virtnbdbackup --version failed ({p.returncode}): {p.stderr[-500:]}")
    return p.stdout.strip()


def bench_compress(args, work: pathlib.Path, opts: dict, rng: random.Random, add, log) -> dict:
    """Full pull with and without --compress of the same disk, and virtnbdbackup -l full
    --compress (lz4, its own stream format), alternating."""
    disk_mib, text_mib, random_mib = 1024, 512, 64
    virtnbd_version = ensure_virtnbdbackup(log)
    vm = lab.LabVM([(disk_mib * MiB, "qcow2")], name="lvb-bench-compress", track=False)
    lab.remove_domain(vm.conn, vm.name)
    stored: dict[str, list[int]] = {}
    try:
        vm.create_images()
        chunk = work / "text.bin"
        chunk.write_bytes(text_like(rng, 64 * MiB))
        rnd = work / "random.bin"
        rnd.write_bytes(rng.randbytes(random_mib * MiB))
        cmds = []
        for i in range(text_mib // 64):  # spread with holes between the pieces
            cmds += ["-c", f"write -s {chunk} {i * 96 * MiB + 4096} {64 * MiB}"]
        cmds += ["-c", f"write -s {rnd} {(disk_mib - random_mib - 8) * MiB} {random_mib * MiB}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(vm.disks[0].path)], check=True, capture_output=True)
        chunk.unlink()
        rnd.unlink()
        vm.start(images_ready=True)
        log(f"bench: compress: {text_mib} MiB of text-like data and {random_mib} MiB of random data on a "
            f"{disk_mib} MiB disk")

        def full(key: str, r: int, extra: list[str]):
            repo = work / f"{key}{r}"
            repo.mkdir(mode=0o700)
            got = timed([CLI, "pull", vm.name, "--repo", str(repo), "--checkpoint", f"{key}{r}", *opts["pull"], *extra])
            stored.setdefault(key, []).append(sum(p.stat().st_size for p in (repo / vm.name).glob("*/*.qcow2")))
            shutil.rmtree(repo)
            return got

        def virtnbd(r: int):
            """virtnbdbackup's full backup with --compress, then sync of its files (as durable as
            ours when it returns). Its checkpoint (virtnbdbackup.0) and ours go before and after
            (not timed): each full backup starts from a VM without checkpoints."""
            out = work / f"compress_virtnbdbackup{r}"
            run = work / "virtnbd-run"  # its NBD socket (QEMU makes it): nothing left in /var/tmp
            run.mkdir(mode=0o700)
            os.chown(run, *qemu_ids())
            delete_checkpoints(vm)
            try:
                got = timed(["bash", "-c", f"set -e; virtnbdbackup -d {vm.name} -l full -o {out} --compress -n "
                                           f"-S {work / 'scratch'} -f {run}/nbd.sock >/dev/null 2>&1 || "
                                           f"{{ e=$?; tail -5 {out}/*.log >&2; exit $e; }}; sync {out}/* {out}"])
                data = list(out.glob("*.data"))
                if not data:
                    raise SystemExit(f"bench: compress: virtnbdbackup wrote no .data file in {out}")
                stored.setdefault("compress_virtnbdbackup", []).append(sum(p.stat().st_size for p in data))
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(run, ignore_errors=True)
                delete_checkpoints(vm)
            if vm.checkpoints():
                raise SystemExit(f"bench: compress: checkpoints left after virtnbdbackup: {vm.checkpoints()}")
            return got

        for r in range(args.rounds):
            log(f"bench: compress: round {r + 1}/{args.rounds}")
            alternate(r, [("compress_off", lambda: full("compress_off", r, [])),
                          ("compress_on", lambda: full("compress_on", r, ["--compress"])),
                          ("compress_virtnbdbackup", lambda: virtnbd(r))], add)
            delete_checkpoints(vm)
    finally:
        destroy_vm(vm)
    return {"disk_bytes": disk_mib * MiB, "data_bytes": (text_mib + random_mib) * MiB,
            "stored_bytes": {k: max(v) for k, v in stored.items()}, "virtnbdbackup": virtnbd_version}


def print_compress(comp: dict, med: dict, rss: dict, ratios: dict) -> None:
    data = comp["data_bytes"]
    print(f"compress: {data / MiB:.0f} MiB of data (7/8 text-like, 1/8 random) on a {comp['disk_bytes'] / MiB:.0f} "
          "MiB disk, full pull")
    for k in ("compress_off", "compress_on", "compress_virtnbdbackup"):
        print(f"  {k:<22} {med[k]:8.3f} s   {data / MiB / med[k]:7.1f} MiB/s   stored "
              f"{comp['stored_bytes'][k] / MiB:8.1f} MiB   peak RSS {rss[k] / 1024:7.1f} MiB")
    print(f"  stored_ratio (off / on) {ratios['compress_stored_ratio']:6.2f}   time ratio (on / off) "
          f"{ratios['compress_time_ratio']:6.2f}")
    print(f"  virtnbdbackup: stored_ratio (off / it) {ratios['compress_virtnbdbackup_stored_ratio']:6.2f}   time ratio "
          f"(our on / it) {ratios['compress_on_vs_virtnbdbackup']:6.2f}")
    print(f"  note: virtnbdbackup {comp['virtnbdbackup']} (-l full --compress: lz4, then sync) writes its own stream "
          "format (vda.full.data, counted alone), not qcow2: it is restored with virtnbdrestore, not booted or "
          "read as an image; ours are qcow2 images (.qcow2 files counted)")


REMOTE_RUNS = (("remote_local", "local libvirt, unix socket"),
               ("remote_tls", "remote, NBD over TCP + TLS"),
               ("remote_tcp", "remote, NBD over plain TCP"))


def remote_variants(sshd, client: pathlib.Path) -> dict[str, list[str]]:
    """The options that make each variant of the remote mode's full pull."""
    uri = sshd.uri()
    return {"remote_local": [], "remote_tls": ["--uri", uri, "--tls-dir", str(client)],
            "remote_tcp": ["--uri", uri, "--no-tls"]}


def export_server(vm, work: pathlib.Path, extra: list[str]) -> str:
    """The <server/> element of the backup XML that the pull with ``extra`` would give libvirt
    (--dry-run): the transport each variant measures really is the one it claims."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415

    repo = work / "dry-run"
    repo.mkdir(mode=0o700)
    try:
        p = subprocess.run([CLI, "pull", vm.name, "--repo", str(repo), "--level", "full", "--quiesce", "no",
                            "--dry-run", "--json", *extra], capture_output=True, text=True)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: remote: pull --dry-run {' '.join(extra)} failed ({p.returncode}): "
                         f"{p.stderr[-500:]}")
    server = ET.fromstring(json.loads(p.stdout)["backup_xml"]).find("server")
    attrs = dict(server.attrib) if server is not None else {}
    if attrs.get("transport") == "unix":
        return "unix socket"
    return f"{attrs.get('transport')} {attrs.get('name')}:{attrs.get('port')} tls={attrs.get('tls', 'no')}"


def remote_full(vm, work: pathlib.Path, key: str, r: int, pull: list[str], extra: list[str],
                copied: dict) -> tuple[float, int]:
    """One timed full pull into a new repository; then (not timed) the bytes it copied, and the
    repository and the VM's checkpoints go, so that every run starts from the same state."""
    repo = work / f"{key}-{r}"
    repo.mkdir(mode=0o700)
    try:
        result = timed([CLI, "pull", vm.name, "--repo", str(repo), "--level", "full", "--quiesce", "no",
                        "--checkpoint", f"{key}-{r}", *pull, *extra])
        copied.setdefault(key, []).append(repo_usage(repo, vm.name)[1])
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        delete_checkpoints(vm)
    return result


def print_remote(args, rem: dict, med: dict, rss: dict, ratios: dict) -> None:
    print(f"remote: full pull of the same VM ({args.data_mib} MiB of random data on a {args.disk_mib} MiB qcow2 "
          f"disk), local libvirt against {rem['uri']} (a private sshd to this host's libvirtd; client "
          f"certificate {rem['tls_dir']}), alternating")
    print(f"  {'variant':<30} {'export':<34} {'seconds':>9} {'MiB/s':>8}  {'vs local':>8}   peak RSS")
    for k, label in REMOTE_RUNS:
        ratio = "" if k == "remote_local" else f"{ratios[f'{k}_vs_local']:8.2f}"
        print(f"  {label:<30} {rem['export'][k]:<34} {med[k]:7.3f} s {rem['mib_per_s'][k]:8.1f}  {ratio:>8}"
              f"   {rss[k] / 1024:6.1f} MiB")


GOALS = {  # issue 13 ("Done when"), README section Performance
    "full_vs_best_hand": 1.05,
    "inc_cost_per_dirty_byte_vs_full_per_data_byte": 1.3,
    "restore_vs_qemu_img": 1.05,
    "inc_slope_per_dirty_byte_vs_full_per_data_byte": 1.3,  # (5% - 1%) / bytes: no fixed cost in it
    "inc_empty_minus_hand_seconds": 0.05,  # the fixed cost of a command
    "inc_empty_served_minus_hand_seconds": 0.05,  # the same through libvbackup serve
    "served_full_vs_best_hand": 1.05,
    "served_restore_vs_qemu_img": 1.05,
    "served_push_full_vs_libvirt_job": 1.2,
    "push_full_vs_libvirt_job": 1.2,
    **{f"big_{c}_vs_small": 3.0 for c, _ in BIG_COMMANDS},
}
BIG_RSS_GOAL_MIB = 256
# The goals' ratios again round by round (the two sides of a round ran next to each other, so a
# disk that slows down for a while moves both): ratio -> (ours, the hand sides (the best one
# counts), "ratio" or "minus"). Printed as the range beside the ratio of the medians.
PAIRED = {
    "full_vs_best_hand": ("full_libvbackup", ("full_nbdcopy", "full_qemu_img"), "ratio"),
    "served_full_vs_best_hand": ("full_served", ("full_nbdcopy", "full_qemu_img"), "ratio"),
    "restore_vs_qemu_img": ("restore_libvbackup", ("restore_qemu_img",), "ratio"),
    "served_restore_vs_qemu_img": ("restore_served", ("restore_qemu_img",), "ratio"),
    "inc_empty_minus_hand_seconds": ("inc_empty", ("inc_empty_hand",), "minus"),
    "inc_empty_served_minus_hand_seconds": ("inc_empty_served", ("inc_empty_hand",), "minus"),
    "push_full_vs_libvirt_job": ("push_full_libvbackup", ("push_full_libvirt",), "ratio"),
    "served_push_full_vs_libvirt_job": ("push_full_served", ("push_full_libvirt",), "ratio"),
}


def round_ratios(res: dict[str, list]) -> dict[str, list[float]]:
    """Each paired ratio of ``PAIRED`` per round, from the rounds' (seconds, ...) rows."""
    out = {}
    for key, (ours, hands, kind) in PAIRED.items():
        rows = [res.get(k) for k in (ours, *hands)]
        if not all(rows) or len({len(r) for r in rows}) != 1:
            continue
        per = []
        for i, row in enumerate(res[ours]):
            hand = min(res[h][i][0] for h in hands)
            per.append(row[0] / hand if kind == "ratio" else row[0] - hand)
        out[key] = per
    return out
MODES = ("pull", "push", "big", "chain", "remote", "compress", "s3", "instant", "many")
DEFAULT_MODES = ("pull", "push")


def reachable_by_qemu(path: pathlib.Path) -> None:
    """QEMU (libvirt-qemu) must traverse every directory above the work directory."""
    for d in [path, *path.parents]:
        if not os.stat(d).st_mode & 0o001:
            raise SystemExit(f"bench: {d} is not searchable by others (o+x); QEMU's user must reach {path}")


def print_big(args, big: dict, med: dict, rss: dict, ratios: dict) -> None:
    tib = f"{args.big_tib} TiB"
    print(f"big: {big['data_bytes'] / MiB:.0f} MiB of data at the same offsets on a thin {tib} and a 4 GiB qcow2 "
          f"disk (one VM each), {big['dirty_bytes'] / MiB:.0f} MiB changed for the incremental")
    print(f"  {'command':<34} {tib:>9} {'4 GiB':>9}  {'ratio':>5} (goal <= 3)   peak RSS {tib} / 4 GiB "
          f"(goal < {BIG_RSS_GOAL_MIB} MiB)")
    for c, label in BIG_COMMANDS:
        b, s = f"big_{c}_big", f"big_{c}_small"
        flag = "" if ratios[f"big_{c}_vs_small"] <= 3 else "  ratio over goal"
        if max(rss[b], rss[s]) / 1024 >= BIG_RSS_GOAL_MIB:
            flag += "  RSS over goal"
        print(f"  {label:<34} {med[b]:7.3f} s {med[s]:7.3f} s  {ratios[f'big_{c}_vs_small']:5.2f}"
              f"{'':14}{rss[b] / 1024:6.1f} / {rss[s] / 1024:5.1f} MiB{flag}")
    print("  repository on disk (du) against the data copied (goal: <= copied + 1 MiB per point):")
    for k, label in (("big", tib), ("small", "4 GiB")):
        stored, copied, n = big["repo_bytes_on_disk"][k], big["repo_bytes_copied"][k], big["points"][k]
        limit = copied + n * MiB
        print(f"    {label:<7} {stored / MiB:7.2f} MiB on disk for {copied / MiB:6.2f} MiB copied in {n} points "
              f"(limit {limit / MiB:.2f} MiB){'' if stored <= limit else '  over goal'}")


def print_chain(chain: dict, med: dict, rss: dict, ratios: dict) -> None:
    n = chain["points"]
    print(f"chain: {chain['data_bytes'] / MiB:.0f} MiB of random data on a {chain['disk_bytes'] / MiB:.0f} MiB qcow2 "
          f"disk, 1 full + {n - 1} incrementals (made in-process in {chain['setup_seconds']:.1f} s); repository "
          f"{chain['repo_bytes_on_disk'] / MiB:.1f} MiB on disk, {chain['repo_bytes_copied'] / MiB:.1f} MiB copied")
    print(f"  {'verify, all ' + str(n) + ' points':<34} {med['chain_verify']:8.3f} s   "
          f"peak RSS {rss['chain_verify'] / 1024:6.1f} MiB")
    print(f"  {'restore of point ' + str(n) + ' to raw':<34} {med['chain_restore_raw']:8.3f} s   "
          f"peak RSS {rss['chain_restore_raw'] / 1024:6.1f} MiB")
    print(f"  {'verify / restore':<34} {ratios['chain_verify_vs_restore']:8.2f}     goal: about 1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--disk-mib", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repo-dir", default="/var/tmp", metavar="DIR",
                    help="where the repositories and the hand pipelines' outputs go, in a new lvb-bench-* "
                         "directory (DIR is created if missing, and then removed); /dev/shm/... takes the disk "
                         "out [default: /var/tmp]")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated: {', '.join(MODES)} [default: {','.join(DEFAULT_MODES)}]; big: a thin "
                         "16 TiB disk against a 4 GiB one with the same data; chain: verify of a 60-point chain "
                         "against restore of its newest point; remote: full pull from a remote libvirt (qemu+ssh, NBD "
                         "over TLS and plain TCP) against the local unix socket; compress: full pull with and without "
                         "--compress of text-like data; s3: copy to a real S3 server against boto3's upload_file, and restore "
                         "from the bucket against the local repository; instant: restore --instant of the tiny guest to its "
                         "guest-ping (then finalize) against a full restore --start of the same disk")
    ap.add_argument("--big-tib", type=int, default=16, help="size of the big mode's thin disk [default: 16]")
    ap.add_argument("--chain-points", type=int, default=60, help="points of the chain mode [default: 60]")
    ap.add_argument("--s3-mib", type=int, default=256, help="random data of the s3 mode's point [default: 256]")
    ap.add_argument("--many-vms", type=int, default=2, help="VMs of the many mode, each with --data-mib on a "
                                                            "--disk-mib disk [default: 2]")
    ap.add_argument("--instant-mib", type=int, default=2048,
                    help="random data (and size) of the instant mode's disk [default: 2048]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = set(args.modes.split(","))
    if not modes or modes - set(MODES):
        ap.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    if args.big_tib < 1 or args.chain_points < 2:
        ap.error("--big-tib must be at least 1 and --chain-points at least 2")
    rng = random.Random(42)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if "remote" in modes:
        # Before the first ensure_libvirtd(): libvirtd gets the test PKI's backup_tls_x509_cert_dir
        # (tests/lab.py; restarted once if qemu.conf had to change, its VMs keep running).
        os.environ["LVB_TEST_TLS"] = "1"

    base = pathlib.Path(args.repo_dir).absolute()
    made_base = not base.exists()
    if made_base:
        base.mkdir(mode=0o755)  # its parent must exist
        os.chmod(base, 0o755)
    work = None
    res: dict[str, list] = {}
    dirty_bytes = dirty5_bytes = push_dirty_bytes = 0
    big = chain = comp = s3 = inst = many = None
    sshd = rem = None
    remote_copied: dict[str, list[int]] = {}

    def add(key, value):
        res.setdefault(key, []).append(value)

    # The VMs' own disks stay in /var/tmp whatever --repo-dir says: only the outputs move.
    vm = served = None
    if modes & {"pull", "push", "remote"}:
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
        where = {"repo": storage(work), "vm_disk": storage(vm.workdir if vm else pathlib.Path("/var/tmp"))}
        log(f"bench: outputs in {work} ({where['repo']['fstype']} {where['repo']['device']})")
        if vm is not None:
            vm.create_images()
            log(f"bench: writing {args.data_mib} MiB of random data into a {args.disk_mib} MiB disk")
            populate(vm.disks[0].path, args.data_mib, args.disk_mib, rng)
            vm.start(images_ready=True)
        if "remote" in modes:
            sshd = remote.Sshd()
            client = remote.pki().client
            variants = remote_variants(sshd, client)
            rem = {"uri": f"qemu+ssh://root@127.0.0.1:{sshd.port}/system", "tls_dir": str(client),
                   "export": {k: export_server(vm, work, variants[k]) for k, _ in REMOTE_RUNS}}
            want = {"remote_local": "unix", "remote_tls": "tls=yes", "remote_tcp": "tls=no"}
            for k, w in want.items():
                if w not in rem["export"][k]:
                    raise SystemExit(f"bench: remote: {k} would export on {rem['export'][k]!r}, not {w!r}")
            log(f"bench: remote: {rem['uri']}; exports: "
                + ", ".join(f"{k} {v}" for k, v in rem["export"].items()))
        if modes & {"pull", "push"}:
            served = Served(work)
        serving = served is not None and served.proc is not None
        for r in range(args.rounds if vm is not None else 0):
            log(f"bench: round {r + 1}/{args.rounds}")
            if "pull" in modes:
                repo = work / f"repo{r}"
                repo.mkdir(mode=0o700)
                pull = [CLI, "pull", vm.name, "--repo", str(repo), *opts["pull"]]
                full = [
                    ("full_libvbackup", lambda: timed(pull + ["--checkpoint", f"b{r}-full"])),
                    ("full_nbdcopy", lambda: hand_pipeline(vm, work, "nbdcopy")),
                    ("full_qemu_img", lambda: hand_pipeline(vm, work, "qemu-img")),
                ]
                served_repo = work / f"served{r}"  # the served full pull's own repository: one chain each
                if serving:
                    served_repo.mkdir(mode=0o700)
                    full.append(("full_served", lambda: served.timed(
                        [CLI, "pull", vm.name, "--repo", str(served_repo), *opts["pull"], "--checkpoint", f"b{r}-fs"])))
                alternate(r, full, add)
                # Not timed: the served pull's checkpoint goes, so that the chain libvirt keeps is
                # the same as without a server for everything measured next.
                if f"b{r}-fs" in vm.checkpoints():
                    vm.dom.checkpointLookupByName(f"b{r}-fs").delete(0)
                # All since the full point, with nothing dirty; the served one runs in `libvbackup serve`.
                empty = [  # (the served one: `libvbackup serve` started for the bench)
                    ("inc_empty", lambda: timed(pull + ["--checkpoint", f"b{r}-i0", "--incremental", f"b{r}-full"])),
                    ("inc_empty_hand", lambda: hand_empty(vm, work, f"b{r}-full")),
                ]
                if serving:
                    empty.append(("inc_empty_served", lambda: served.timed(
                        pull + ["--checkpoint", f"b{r}-s0", "--incremental", f"b{r}-full"])))
                alternate(r, empty, add)
                dirty_bytes = dirty(vm, args.disk_mib, rng)
                add("inc_1pct", timed(pull + ["--checkpoint", f"b{r}-i1", "--incremental", f"b{r}-i0"]))
                # 5% more: the slope from 1% to 5% is the cost per dirty byte without the fixed
                # cost, whose libvirt part (backupBegin, abortJob) varies by tens of ms per run.
                dirty5_bytes = dirty(vm, args.disk_mib, rng, fraction=0.05, extents=64)
                add("inc_5pct", timed(pull + ["--checkpoint", f"b{r}-i5", "--incremental", f"b{r}-i1"]))
                top = repo / vm.name / f"b{r}-i1" / "vda.qcow2"
                out = work / "restore"
                chain_files = sorted((repo / vm.name).glob("*/vda.qcow2"))
                # Each restore reads the chain from the disk, as a restore long after the backup does
                # (the pull left it out of the page cache; the first reader would warm it for the second).
                restore = [CLI, "restore", vm.name, "--repo", str(repo), "--checkpoint", f"b{r}-i1",
                           "--progress", "none"]
                restores = [
                    ("restore_libvbackup", lambda: evicted(chain_files) and timed(restore + ["--output", str(out)])),
                    ("restore_qemu_img", lambda: evicted(chain_files) and timed(
                        ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "qcow2", str(top),
                         str(work / "ref.qcow2")])),
                ]
                if serving:
                    restores.append(("restore_served", lambda: evicted(chain_files) and served.timed(
                        restore + ["--output", str(work / "restore-served")])))
                alternate(r, restores, add)
                shutil.rmtree(out)
                shutil.rmtree(work / "restore-served", ignore_errors=True)
                shutil.rmtree(served_repo, ignore_errors=True)
                (work / "ref.qcow2").unlink()
                shutil.rmtree(repo)
            if "push" in modes:
                repo = work / f"push{r}"
                repo.mkdir(mode=0o700)
                push = [CLI, "push", vm.name, "--repo", str(repo), *opts["push"]]
                served_push = work / f"push{r}s"  # the served push's own repository
                before = set(vm.checkpoints())
                pushes = [
                    ("push_full_libvbackup", lambda: timed(push)),
                    ("push_full_libvirt", lambda: hand_push(vm, work)),
                ]
                if serving:
                    served_push.mkdir(mode=0o700)
                    pushes.append(("push_full_served", lambda: served.timed(
                        [CLI, "push", vm.name, "--repo", str(served_push), *opts["push"]])))
                alternate(r, pushes, add)
                made = sorted(set(vm.checkpoints()) - before)
                if len(made) != 1 + serving:
                    raise SystemExit(f"bench: expected {1 + serving} new checkpoints from the full pushes, "
                                     f"found {made}")
                # The incrementals are since the point of `push`'s repository; the served push's
                # checkpoint goes (not timed), as the served pull's does.
                ours = json.loads((repo / vm.name / "manifest.json").read_text())["points"][-1]["checkpoint"]
                for other in set(made) - {ours}:
                    vm.dom.checkpointLookupByName(other).delete(0)
                made = [ours]
                shutil.rmtree(served_push, ignore_errors=True)
                push_dirty_bytes = dirty(vm, args.disk_mib, rng)
                # Both copy what changed since the full push's checkpoint, whichever runs first.
                alternate(r, [
                    ("push_inc_libvbackup", lambda: timed(push + ["--level", "inc"])),
                    ("push_inc_libvirt", lambda: hand_push(vm, work, incremental=made[0])),
                ], add)
                shutil.rmtree(repo)
            if "remote" in modes:
                alternate(r, [(k, lambda k=k: remote_full(vm, work, k, r, opts["pull"], variants[k], remote_copied))
                              for k, _ in REMOTE_RUNS], add)
            delete_checkpoints(vm)
        if vm is not None:  # its VM is not needed by the other modes: it goes now
            destroy_vm(vm)
            vm = None
        if "big" in modes:
            big = bench_big(args, work, opts, rng, add, log)
        if "chain" in modes:
            chain = bench_chain(args, work, scratch, rng, add, log)
        if "compress" in modes:
            comp = bench_compress(args, work, opts, rng, add, log)
        if "s3" in modes:
            from bench_s3 import bench_s3

            s3 = bench_s3(args, work, opts, rng, add, log, timed, CLI, alternate, destroy_vm)
        if "instant" in modes:
            from bench_instant import bench_instant

            inst = bench_instant(args, work, opts, rng, add, log, timed, CLI)
        if "many" in modes:
            from bench_many import bench_many

            many = bench_many(args, work, opts, rng, add, log, timed, CLI, alternate, destroy_vm, populate, pull_xml,
                              qemu_ids, delete_checkpoints)
    finally:
        try:
            if served is not None:
                served.stop()
            if sshd is not None:
                sshd.stop()
        finally:
            if vm is not None:
                destroy_vm(vm)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if made_base:
            shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v[0] for v in vals) for k, vals in res.items()}
    rss = {k: max(v[1] for v in vals) for k, vals in res.items()}
    cpu = {k: statistics.median(v[2] for v in vals) for k, vals in res.items() if all(len(v) > 2 for v in vals)}
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
            "inc_slope_per_dirty_byte_vs_full_per_data_byte":
                max(med["inc_5pct"] - med["inc_1pct"], 0) / (dirty5_bytes - dirty_bytes) / full_per_byte,
            "restore_vs_qemu_img": med["restore_libvbackup"] / med["restore_qemu_img"],
            "inc_empty_minus_hand_seconds": med["inc_empty"] - med["inc_empty_hand"],
        })
        if "inc_empty_served" in med:
            ratios["served_full_vs_best_hand"] = med["full_served"] / best_hand
            ratios["served_restore_vs_qemu_img"] = med["restore_served"] / med["restore_qemu_img"]
            ratios["inc_empty_served_minus_hand_seconds"] = med["inc_empty_served"] - med["inc_empty_hand"]
    if "push" in modes:
        ratios.update({
            "push_full_vs_libvirt_job": med["push_full_libvbackup"] / med["push_full_libvirt"],
            "push_inc_vs_libvirt_job": med["push_inc_libvbackup"] / med["push_inc_libvirt"],
        })
        if "push_full_served" in med:
            ratios["served_push_full_vs_libvirt_job"] = med["push_full_served"] / med["push_full_libvirt"]
    if rem is not None:
        for k, _ in REMOTE_RUNS:
            if min(remote_copied[k]) < data:
                raise SystemExit(f"bench: remote: {k} copied {min(remote_copied[k])} bytes, less than the "
                                 f"{data} bytes of data")
        ratios.update({f"{k}_vs_local": med[k] / med["remote_local"] for k in ("remote_tls", "remote_tcp")})
        rem["mib_per_s"] = {k: args.data_mib / med[k] for k, _ in REMOTE_RUNS}
        rem["bytes_copied"] = {k: max(v) for k, v in remote_copied.items()}
    if big is not None:
        ratios.update({f"big_{c}_vs_small": med[f"big_{c}_big"] / med[f"big_{c}_small"] for c, _ in BIG_COMMANDS})
    if chain is not None:
        ratios["chain_verify_vs_restore"] = med["chain_verify"] / med["chain_restore_raw"]
    if comp is not None:
        ratios["compress_stored_ratio"] = comp["stored_bytes"]["compress_off"] / comp["stored_bytes"]["compress_on"]
        ratios["compress_time_ratio"] = med["compress_on"] / med["compress_off"]
        ratios["compress_virtnbdbackup_stored_ratio"] = (comp["stored_bytes"]["compress_off"]
                                                         / comp["stored_bytes"]["compress_virtnbdbackup"])
        ratios["compress_on_vs_virtnbdbackup"] = med["compress_on"] / med["compress_virtnbdbackup"]
    if s3 is not None:
        ratios["s3_copy_vs_upload_file"] = med["s3_copy_libvbackup"] / med["s3_upload_file_boto3"]
        ratios["s3_restore_bucket_vs_local"] = med["s3_restore_bucket"] / med["s3_restore_local"]
        ratios["s3_restore_bucket_vs_download_file"] = med["s3_restore_bucket"] / med["s3_download_file_boto3"]
    if many is not None:
        ratios["many_vs_nbdcopy"] = med["many_libvbackup"] / med["many_nbdcopy"]
    if inst is not None:
        from bench_instant import instant_ratios

        ratios.update(instant_ratios(med))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
        "data_mib": args.data_mib, "disk_mib": args.disk_mib, "rounds": args.rounds,
        "storage": where,
        "dirty_bytes": dirty_bytes, "dirty5_bytes": dirty5_bytes, "push_dirty_bytes": push_dirty_bytes,
        "median_seconds": med, "median_cpu_seconds": cpu, "peak_rss_kib": rss, "ratios": ratios,
        "goals": {k: v for k, v in GOALS.items() if k in ratios},
        "ratios_by_round": round_ratios(res),
    }
    if big is not None:
        report["big"] = {**big, "peak_rss_goal_mib": BIG_RSS_GOAL_MIB,
                         "repo_goal": "bytes on disk <= bytes copied + 1 MiB per point"}
    if chain is not None:
        report["chain"] = {**chain, "goal": "chain_verify_vs_restore about 1"}
    if rem is not None:
        report["remote"] = rem
    if comp is not None:
        report["compress"] = comp
    if s3 is not None:
        report["s3"] = s3
    if inst is not None:
        report["instant"] = inst
    if many is not None:
        report["many"] = many
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    print(f"libvbackup benchmark, {report['date']}, {report['machine']}")
    print(f"modes {','.join(m for m in MODES if m in modes)}, {args.rounds} rounds, medians")
    for role, label in (("repo", "repository and hand outputs"), ("vm_disk", "VM disks (source)")):
        st = where[role]
        print(f"  {label}: {st['dir']} on {st['fstype']} {st['device']} (mounted on {st['mount']})")
    if modes & {"pull", "push"}:
        print(f"{args.data_mib} MiB of random data on a {args.disk_mib} MiB qcow2 disk")
        for k in med:
            if not k.startswith(("big_", "chain_", "remote_", "compress_", "s3_", "instant_", "many_")):
                used = f"   CPU {cpu[k]:6.3f} s" if k in cpu else ""
                print(f"  {k:<22} {med[k]:8.3f} s   peak RSS {rss[k] / 1024:7.1f} MiB{used}")
        by_round = report["ratios_by_round"]
        for k, v in ratios.items():
            if not k.startswith(("big_", "chain_", "remote_", "compress_", "s3_", "instant_", "many_")):
                goal = f"   goal <= {GOALS[k]:.2f}" if k in GOALS else ""
                spread = (f"   rounds {min(by_round[k]):.2f}-{max(by_round[k]):.2f}" if k in by_round else "")
                print(f"  {k:<48} {v:6.2f}{goal}{spread}")
    if rem is not None:
        print_remote(args, rem, med, rss, ratios)
    if big is not None:
        print_big(args, big, med, rss, ratios)
    if chain is not None:
        print_chain(chain, med, rss, ratios)
    if comp is not None:
        print_compress(comp, med, rss, ratios)
    if s3 is not None:
        from bench_s3 import print_s3

        print_s3(s3, med, rss, ratios)
    if inst is not None:
        from bench_instant import print_instant

        print_instant(inst, med, rss, ratios)
    if many is not None:
        from bench_many import print_many

        print_many(many, med, rss, ratios, cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
