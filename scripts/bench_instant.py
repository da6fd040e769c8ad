"""The instant mode of scripts/bench: `restore --instant` against a full restore of the same disk.

The tiny guest of tests/guest.py (kernel and initramfs from Debian packages, qemu-ga) gets one
data disk of --instant-mib MiB holding that much random data (written with qemu-io before it
starts); one full `libvbackup pull` of it, then the guest is shut off and, alternating each
round:
  (a) `libvbackup restore VM --checkpoint C --instant --define NEW --output DIR`, then guest-ping
      of NEW polled (every 0.1 s) until its agent answers: seconds from the command's start to the
      answer; then `libvbackup finalize NEW` (a block pull of the whole disk while NEW runs),
      timed; NEW is then removed;
  (b) `libvbackup restore VM --checkpoint C --define NEW2 --output DIR2 --start` (the whole disk
      written first), then the seconds to NEW2's guest-ping the same way.
Dirty pages are written (sync) before each command starts, not timed. After every round: no
domain, qemu-nbd, socket directory (/run/libvbackup/instant/NEW) or instant record is left.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests import lab  # noqa: E402

MiB = 1 << 20
SOURCE = "lvb-bench-instant"
INSTANT = "lvb-bench-instant-now"
FULL = "lvb-bench-instant-full"
PING_TIMEOUT = 180.0
KEYS = (("instant_restore_cmd", "restore --instant (command)"),
        ("instant_to_ping", "restore --instant to guest-ping"),
        ("instant_finalize", "finalize (block pull, running)"),
        ("instant_full_restore_cmd", "full restore --start (command)"),
        ("instant_full_to_ping", "full restore --start to guest-ping"))


class _Libvirt:
    """A connection to libvirtd made again when it broke: other runs on this machine restart
    libvirtd (its domains keep running)."""

    def __init__(self):
        self.conn = None

    def __call__(self):
        if self.conn is not None:
            try:
                if self.conn.isAlive():
                    return self.conn
            except lab.libvirt.libvirtError:
                pass
            try:
                self.conn.close()
            except lab.libvirt.libvirtError:
                pass
        self.conn = lab.ensure_libvirtd()
        return self.conn

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except lab.libvirt.libvirtError:
                pass


def _ping(lv, name: str, t0: float) -> float:
    """Seconds from ``t0`` until the agent of domain ``name`` answers guest-ping (polled every
    0.1 s, as tests.guest.wait_agent_of does, but through a connection made again if libvirtd
    restarts meanwhile)."""
    import libvirt_qemu  # noqa: PLC0415
    from tests.guest import console_tail  # noqa: PLC0415

    last = None
    while True:
        try:
            dom = lv().lookupByName(name)
            libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
            return time.perf_counter() - t0
        except lab.libvirt.libvirtError as e:
            last = e
        if time.perf_counter() - t0 > PING_TIMEOUT:
            try:
                tail = console_tail(lv().lookupByName(name))
            except lab.libvirt.libvirtError as e:
                tail = str(e)
            raise SystemExit(f"bench: instant: the agent of {name} did not answer within {PING_TIMEOUT:g} s "
                             f"(last: {last}); console:\n{tail}")
        time.sleep(0.1)


def _qemu_nbd_of(paths: list[str]) -> list[int]:
    """Pids of qemu-nbd processes whose command line names one of ``paths``."""
    found = []
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and any(s.encode() in a for a in argv for s in paths):
            found.append(int(p.name))
    return found


def _remove(lv, name: str, repo: pathlib.Path | None, out: pathlib.Path | None) -> None:
    """The domain, the instant records of the source VM (their servers stopped by tear_down),
    the output directory."""
    from libvbackup import instantrec  # noqa: PLC0415
    from libvbackup.repo import Repository  # noqa: PLC0415

    lab.remove_domain(lv(), name)
    if repo is not None and repo.exists():
        repository = Repository(str(repo))
        for rec in instantrec.records(repository, SOURCE):
            instantrec.tear_down(repository, rec)
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)


def _left_behind(lv, repo: pathlib.Path) -> list[str]:
    from libvbackup import instantrec  # noqa: PLC0415
    from libvbackup.repo import Repository  # noqa: PLC0415

    left = []
    for name in (INSTANT, FULL):
        try:
            lv().lookupByName(name)
            left.append(f"domain {name}")
        except lab.libvirt.libvirtError:
            pass
        if instantrec.run_dir(name).exists():
            left.append(str(instantrec.run_dir(name)))
    if repo.exists() and instantrec.records(Repository(str(repo)), SOURCE):
        left.append(f"instant records under {repo}")
    pids = _qemu_nbd_of([str(repo), str(instantrec.run_dir(INSTANT))])
    if pids:
        left.append(f"qemu-nbd pids {pids}")
    return left


def bench_instant(args, work: pathlib.Path, opts: dict, rng, add, log, timed, cli: str) -> dict:
    from tests.guest import GuestVM  # noqa: PLC0415

    data_mib = args.instant_mib
    lv = _Libvirt()
    for name in (SOURCE, INSTANT, FULL):
        lab.remove_domain(lv(), name)  # left by an interrupted run
    vm = None
    repo = work / "instant-repo"
    outs = {INSTANT: None, FULL: None}
    try:
        vm = GuestVM(disks=[data_mib * MiB], name=SOURCE, conn=lv())
        image = vm.disks[0].path
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(data_mib * MiB)], check=True)
        chunk = work / "instant-chunk.bin"
        t = time.perf_counter()
        for at in range(0, data_mib, 64):
            n = min(64, data_mib - at)
            chunk.write_bytes(rng.randbytes(n * MiB))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {chunk} {at * MiB} {n * MiB}", str(image)],
                           check=True, capture_output=True)
        chunk.unlink()
        os.chmod(image, 0o644)
        vm.start(images_ready=True)
        boot = _ping(lv, SOURCE, time.perf_counter())
        log(f"bench: instant: {data_mib} MiB of random data written in {time.perf_counter() - t:.1f} s; "
            f"{SOURCE} answered guest-ping {boot:.1f} s after its start")
        repo.mkdir(mode=0o700)
        quiesce = ["--quiesce", "no"] if "--quiesce" in subprocess.run(
            [cli, "pull", "--help"], capture_output=True, text=True).stdout else []
        pulled = timed([cli, "pull", SOURCE, "--repo", str(repo), "--checkpoint", "ifull", *opts["pull"], *quiesce])[0]
        point = sum(p.stat().st_size for p in (repo / SOURCE / "ifull").glob("*.qcow2"))
        lv().lookupByName(SOURCE).destroy()  # shut off (still defined): the restores run from the repository alone
        log(f"bench: instant: full pull of {point / MiB:.0f} MiB in {pulled:.1f} s; {SOURCE} shut off")

        def instant(r: int) -> None:
            out = outs[INSTANT] = work / f"instant-now-{r}"
            os.sync()
            t0 = time.perf_counter()
            got = timed([cli, "restore", SOURCE, "--repo", str(repo), "--checkpoint", "ifull", "--instant",
                         "--define", INSTANT, "--output", str(out), "--progress", "none"])
            cmd, rss = got[0], got[1]  # (timed() may give more: CPU seconds)
            ping = _ping(lv, INSTANT, t0)
            add("instant_restore_cmd", got)
            add("instant_to_ping", (ping, rss))
            fin = timed([cli, "finalize", INSTANT, "--progress", "none"])
            add("instant_finalize", fin)
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(out / "vda.qcow2")],
                                             capture_output=True, text=True, check=True).stdout)
            dom = lv().lookupByName(INSTANT)
            if "backing-filename" in info or "nbd" in dom.XMLDesc(0):
                raise SystemExit(f"bench: instant: {INSTANT} still has a backing file after finalize")
            if not dom.isActive():
                raise SystemExit(f"bench: instant: {INSTANT} stopped during finalize")
            _remove(lv, INSTANT, repo, out)
            log(f"bench: instant: restore --instant {cmd:.2f} s, guest-ping after {ping:.2f} s, "
                f"finalize {fin[0]:.2f} s")

        def full(r: int) -> None:
            out = outs[FULL] = work / f"instant-full-{r}"
            os.sync()
            t0 = time.perf_counter()
            got = timed([cli, "restore", SOURCE, "--repo", str(repo), "--checkpoint", "ifull",
                         "--define", FULL, "--output", str(out), "--start", "--progress", "none"])
            cmd, rss = got[0], got[1]
            ping = _ping(lv, FULL, t0)
            add("instant_full_restore_cmd", got)
            add("instant_full_to_ping", (ping, rss))
            _remove(lv, FULL, None, out)
            log(f"bench: instant: full restore --start {cmd:.2f} s, guest-ping after {ping:.2f} s")

        for r in range(args.rounds):
            log(f"bench: instant: round {r + 1}/{args.rounds}")
            for run in ((instant, full) if r % 2 == 0 else (full, instant)):
                run(r)
            left = _left_behind(lv, repo)
            if left:
                raise SystemExit(f"bench: instant: left behind after round {r + 1}: {', '.join(left)}")
        return {"data_bytes": data_mib * MiB, "point_bytes": point, "pull_seconds": pulled,
                "names": {"source": SOURCE, "instant": INSTANT, "full": FULL}}
    finally:
        try:
            for name, out in outs.items():
                _remove(lv, name, repo, out)
            if vm is not None:
                vm.destroy()
            left = _left_behind(lv, repo)
            if left:
                print(f"bench: instant: could not clean up: {', '.join(left)}", file=sys.stderr)
        finally:
            lv.close()


def instant_ratios(med: dict) -> dict:
    return {"instant_full_vs_instant_to_ping": med["instant_full_to_ping"] / med["instant_to_ping"]}


def print_instant(inst: dict, med: dict, rss: dict, ratios: dict) -> None:
    print(f"instant: the tiny guest (tests/guest.py, TCG) with {inst['data_bytes'] / MiB:.0f} MiB of random data on "
          f"its disk, one full point ({inst['point_bytes'] / MiB:.0f} MiB); restore of it from the repository")
    for k, label in KEYS:
        print(f"  {label:<38} {med[k]:8.3f} s   peak RSS {rss[k] / 1024:7.1f} MiB")
    print(f"  full restore to ping / instant to ping {ratios['instant_full_vs_instant_to_ping']:6.2f}   "
          f"(finalize afterwards: {med['instant_finalize']:.2f} s while the guest runs)")
