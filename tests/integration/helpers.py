"""Helpers for integration tests: random guest writes, restore-and-compare, CLI runs."""

from __future__ import annotations

import contextlib
import json
import pathlib
import random
import shutil
import subprocess
import sys
import textwrap

from libvbackup.restore import restore

MiB = 1 << 20
KiB = 1 << 10


def stalling_child(body: str, stream: str = "sys.stdout") -> str:
    """A Python program whose copies stall for 120 s after their first completed request (each
    writes a line COPYING on ``stream`` first: print() of two threads can interleave as
    "COPYINGCOPYING"), then runs ``body``: a run to kill or stop mid-copy,
    with its job, checkpoint, partial images and NBD connections alive."""
    return textwrap.dedent(f"""
        import sys, time
        from libvbackup import engine
        real_copy = engine.copy
        def stalling_copy(src, dst, **kw):
            inner = kw.get("progress")
            def progress(n):
                if inner:
                    inner(n)
                {stream}.write("COPYING\\n")  # one write: two copies' lines never interleave
                {stream}.flush()
                time.sleep(120)
            kw["progress"] = progress
            return real_copy(src, dst, **kw)
        engine.copy = stalling_copy
    """) + textwrap.dedent(body)


def wait_copying(p: subprocess.Popen, stream: str = "stdout") -> None:
    """Until a ``stalling_child`` says COPYING; if it says anything else it is killed first (a
    stalled child never ends by itself, so reading its stderr would wait forever)."""
    line = getattr(p, stream).readline()
    if line.strip() != "COPYING":
        p.kill()
        _out, err = p.communicate(timeout=30)
        raise AssertionError(f"the stalled run said {line!r}, not COPYING: {err}")


def random_writes(disk, rng: random.Random, n: int = 12) -> None:
    """Data at unaligned offsets, fills, zero writes with and without unmap, a tail write."""
    size = disk.size
    for _ in range(n):
        kind = rng.choice(["data", "data", "fill", "zero", "zero-unmap", "tiny"])
        if kind == "zero-unmap":  # cluster-aligned so qcow2 can really unmap
            length = rng.choice([64, 128, 512]) * KiB
            offset = rng.randrange(0, (size - length) // (64 * KiB)) * 64 * KiB
        elif kind == "tiny":
            length = rng.randint(1, 700)
            offset = rng.randrange(0, size - length)
        else:
            length = rng.randint(1, 3 * 256 * KiB)
            offset = rng.randrange(0, size - length)
        if kind == "data" or kind == "tiny":
            disk.write(offset, rng.randbytes(length))
        elif kind == "fill":
            disk.fill(offset, length, rng.randrange(1, 256))
        else:
            disk.zero(offset, length, unmap=(kind == "zero-unmap"))
    # The last bytes of the disk, unaligned, so the end of the export is exercised.
    tail = rng.randint(1, 5000)
    disk.write(size - tail, rng.randbytes(tail))


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(a))) if a[k] != b[k])
            return f"first difference at byte {j}: got {a[j]:#x}, expected {b[j]:#x}"
    return "equal"


def read_image(path: pathlib.Path, fmt: str) -> bytes:
    if fmt == "raw":
        return path.read_bytes()
    raw = path.with_suffix(".check.raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def assert_restores(repo, vm_name: str, checkpoint: str, expected: dict[str, bytes],
                    workdir: pathlib.Path, fmt: str = "raw") -> None:
    out = workdir / f"restore-{checkpoint}-{fmt}"
    result = restore(vm_name, repo=str(repo), output=str(out), checkpoint=checkpoint, fmt=fmt)
    try:
        assert sorted(result.disks) == sorted(expected)
        for target, data in expected.items():
            path = out / f"{target}.{fmt}"
            info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                             capture_output=True, text=True, check=True).stdout)
            assert info["format"] == fmt and "backing-filename" not in info
            if fmt == "qcow2":  # written by libvbackup's own qcow2 writer
                subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
            got = read_image(path, fmt)
            assert got == data, f"{checkpoint}/{target}: {first_difference(got, data)}"
    finally:
        shutil.rmtree(out, ignore_errors=True)


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libvbackup.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def tree(path: pathlib.Path) -> dict:
    """Every file below ``path`` with its size and content hash: to show nothing changed."""
    import hashlib

    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _scratch_dirs(scratch_base: str) -> set[str]:
    return {str(p) for p in pathlib.Path(scratch_base).glob("libvbackup-*")}


# Scratch directories that were there before this test run (another run's crash) are not ours to judge.
_BEFORE = _scratch_dirs("/var/tmp")


def leftovers(scratch_base: str = "/var/tmp") -> list[str]:
    """Scratch directories of libvbackup runs left behind since the test run started."""
    return sorted(_scratch_dirs(scratch_base) - _BEFORE)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str, options: str = ""):
    """A small tmpfs mounted on ``path`` for the duration (a full or read-only file system)."""
    path.mkdir(exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def snap(vm) -> dict[str, bytes]:
    """What the guest wrote so far, disk by disk: what a backup taken now must restore."""
    return {d.target: d.snapshot() for d in vm.disks}
