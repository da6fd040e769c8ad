"""Demo: back up a throwaway VM with the libvbackup CLI and prove the restores are exact."""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests import lab  # noqa: E402

MiB = 1 << 20
CLI = [str(pathlib.Path(sys.executable).parent / "libvbackup")]


def run(*args: str) -> str:
    print("$ libvbackup " + " ".join(args), flush=True)
    p = subprocess.run(CLI + list(args), text=True, capture_output=True)
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"demo: libvbackup {args[0]} failed with exit {p.returncode}")
    return p.stdout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="keep the repository (the VM is always removed)")
    ap.add_argument("--size", type=int, default=64, help="size of the first disk in MiB (default 64)")
    args = ap.parse_args()
    rng = random.Random(1)
    base = pathlib.Path(tempfile.mkdtemp(prefix="lvb-demo-", dir="/var/tmp"))
    repo, out = base / "repo", base / "restore"
    repo.mkdir(mode=0o700)
    vm = lab.LabVM([(args.size * MiB, "qcow2"), (16 * MiB, "qcow2")], name="libvbackup-demo")
    try:
        lab.remove_domain(vm.conn, vm.name)  # a leftover of an earlier demo run
        vm.start()
        print(f"demo: VM {vm.name} running with disks vda ({args.size} MiB) and vdb (16 MiB)")
        vm["vda"].write(0, rng.randbytes(8 * MiB))
        vm["vda"].write(20 * MiB + 7, rng.randbytes(3 * MiB))
        vm["vdb"].fill(MiB, 2 * MiB, 0x42)
        full = {d.target: d.snapshot() for d in vm.disks}
        run("pull", vm.name, "--repo", str(repo), "--checkpoint", "demo-full")

        print("demo: guest writes 1 MiB of new data, zeroes 2 MiB (unmap) and changes a few bytes")
        vm["vda"].write(4 * MiB + 3, rng.randbytes(MiB))
        vm["vda"].zero(0, 2 * MiB, unmap=True)
        vm["vdb"].write(MiB + 5, b"libvbackup demo")
        inc = {d.target: d.snapshot() for d in vm.disks}
        run("pull", vm.name, "--repo", str(repo), "--checkpoint", "demo-inc", "--incremental", "demo-full")
        run("list", vm.name, "--repo", str(repo))

        ok = True
        for chk, model in (("demo-full", full), ("demo-inc", inc)):
            dest = out / chk
            run("restore", vm.name, "--repo", str(repo), "--checkpoint", chk, "--output", str(dest),
                "--format", "raw")
            for disk, expected in model.items():
                got = (dest / f"{disk}.raw").read_bytes()
                same = got == expected
                ok &= same
                print(f"demo: {chk}/{disk}: restored {sha(got)}, guest wrote {sha(expected)}: "
                      f"{'MATCH' if same else 'MISMATCH'}")
        print("demo: every restore equals what the guest had" if ok else "demo: FAILED")
        return 0 if ok else 1
    finally:
        vm.destroy()
        if args.keep:
            print(f"demo: repository kept in {repo}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
