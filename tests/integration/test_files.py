"""Single files of a point, through libguestfs: ``files`` lists what the guest had at each point
and ``extract`` gives it back byte for byte with mode, owner and times; a missing path and a
disk without a file system are one-line errors.

Each libguestfs appliance boots for 15-20 s under TCG, so the commands run at once, as
subprocesses, after both points are taken (the environment, LIBGUESTFS_BACKEND=direct and
LIBGUESTFS_BACKEND_SETTINGS=force_tcg, comes from tests/conftest.py)."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
import time
import uuid

import jsonschema
import pytest

from libvbackup import api, schemas

pytestmark = pytest.mark.integration

MiB = 1 << 20
WHEN1 = "2021-03-04 05:06:07"
WHEN2 = "2022-11-12 13:14:15"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def guest_stat(guest, paths: list[str]) -> dict[str, tuple[int, int, int, int, int]]:
    """name -> (mode with type, size, mtime, uid, gid), as the guest's busybox stat says."""
    out = guest.check(["stat", "-c", "%n %f %s %Y %u %g", *paths]).decode()
    got = {}
    for line in out.splitlines():
        name, mode, size, mtime, uid, gid = line.split()
        got[os.path.basename(name)] = (int(mode, 16), int(size), int(mtime), int(uid), int(gid))
    return got


def assert_local(path: pathlib.Path, want: tuple[int, int, int, int, int]) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):  # (a directory's size is its file system's business)
        want = (want[0], st.st_size, *want[2:])
    assert (st.st_mode, st.st_size, int(st.st_mtime), st.st_uid, st.st_gid) == want, path


def test_files_and_extract_of_two_points(guest, grepo, workdir, make_vm):
    d = f"{guest.disks[0].mount}/lvbfiles-{uuid.uuid4().hex[:6]}"  # the guest is shared: a directory of our own
    rel = d.removeprefix(guest.disks[0].mount)  # the same directory in the disk's file system
    text1 = b"first version\n"
    inner = b"inside the subdirectory"
    guest.check(["mkdir", "-p", f"{d}/sub"])
    guest.write_file(f"{d}/notes.txt", text1)
    # Random bytes of an unaligned size, more than one read (2 MiB); a sparse file.
    guest.check(["sh", "-c", f"dd if=/dev/urandom of={d}/blob.bin bs=4099 count=613 2>/dev/null && "
                             f"truncate -s 3M {d}/sparse.bin"])
    blob = guest.read_file(f"{d}/blob.bin")
    assert len(blob) == 4099 * 613
    guest.write_file(f"{d}/sub/inner.txt", inner)
    guest.check(["sh", "-c", f"cd {d} && ln -s notes.txt link && ln -s /nowhere/at/all dangling && mkfifo pipe && "
                             f"chmod 0640 notes.txt && chmod 0750 sub && chown 1000:1001 blob.bin && "
                             f"touch -d '{WHEN1}' notes.txt blob.bin sub/inner.txt sub && sync"])
    names = ["notes.txt", "blob.bin", "sparse.bin", "sub", "link", "dangling", "pipe"]
    at1 = guest_stat(guest, [f"{d}/{n}" for n in names])
    assert stat.S_IMODE(at1["notes.txt"][0]) == 0o640 and at1["blob.bin"][3:] == (1000, 1001)
    api.pull(guest.name, repo=str(grepo), checkpoint="f1", quiesce="no")

    text2 = b"second version, longer than the first\n"
    guest.write_file(f"{d}/notes.txt", text2)
    guest.check(["sh", "-c", f"cd {d} && rm blob.bin && chmod 0600 notes.txt && touch -d '{WHEN2}' notes.txt && "
                             f"rm link && ln -s sub/inner.txt link && ln -s sub dirlink && sync"])
    at2 = guest_stat(guest, [f"{d}/{n}" for n in ("notes.txt", "link", "sub")])
    inc = api.pull(guest.name, repo=str(grepo), level="inc", checkpoint="f2", quiesce="no")
    assert inc.level == "incremental"

    # A disk with no file system: raw data written over a qcow2 disk.
    raw = make_vm((8 * MiB, "qcow2"))
    raw["vda"].write(0, os.urandom(MiB))
    rrepo = workdir / "raw-repo"
    rrepo.mkdir(mode=0o700)
    api.pull(raw.name, repo=str(rrepo), checkpoint="r1")

    r, vm = str(grepo), guest.name
    started = time.monotonic()
    procs = {
        "files1": start("files", vm, rel, "--repo", r, "--checkpoint", "f1", "--disk", "vda"),
        "files2": start("files", vm, rel, "--repo", r, "--disk", "vda", "--json"),  # the newest: f2
        "extract1": start("extract", vm, rel, f"{rel}/notes.txt", "--repo", r, "--checkpoint", "f1", "--disk", "vda",
                          "--output", str(workdir / "out1"), "--json"),
        "extract2": start("extract", vm, f"{rel}/notes.txt", f"{rel}/link", f"{rel}/dirlink/inner.txt", "--repo", r,
                          "--checkpoint", "f2",
                          "--disk", "vda", "--output", str(workdir / "out2")),
        "missing": start("files", vm, f"{rel}/blob.bin", "--repo", r, "--checkpoint", "f2", "--disk", "vda"),
        "nofs": start("files", raw.name, "--repo", str(rrepo), "--json"),
    }
    got = {k: finish(p) for k, p in procs.items()}
    print(f"six commands, six appliances at once: {time.monotonic() - started:.1f} s")
    for k in ("files1", "files2", "extract1", "extract2"):
        assert got[k].returncode == 0, (k, got[k].stderr)

    # files, point 1, as text: ls -l's columns.
    lines = got["files1"].stdout.splitlines()
    assert lines[0].startswith(f"{rel} in /dev/sda (ext4) of {vm}'s disk vda at f1: 7 entries")
    by_name = {line.split(maxsplit=5)[5].split(" -> ")[0].rstrip("/"): line for line in lines[1:]}
    assert sorted(by_name) == sorted(names)
    assert by_name["notes.txt"].split()[:3] == ["-rw-r-----", "0:0", str(len(text1))]
    assert " ".join(by_name["notes.txt"].split()[3:5]) == WHEN1  # (the guest's clock is UTC)
    assert by_name["blob.bin"].split()[:3] == [stat.filemode(at1["blob.bin"][0]), "1000:1001", str(len(blob))]
    assert by_name["link"].endswith("link -> notes.txt") and by_name["link"].startswith("l")
    assert by_name["sub"].startswith("drwxr-x---") and by_name["pipe"].startswith("p")

    # files, point 2, typed.
    doc = json.loads(got["files2"].stdout)
    jsonschema.Draft202012Validator(schemas.load("files")).validate(doc)
    assert doc["checkpoint"] == "f2" and doc["path"] == rel and doc["type"] == "dir"
    assert doc["filesystem"] == "/dev/sda" and doc["fstype"] == "ext4"
    entries = {e["name"]: e for e in doc["entries"]}
    assert sorted(entries) == sorted(set(names) - {"blob.bin"} | {"dirlink"})
    notes = entries["notes.txt"]
    assert (notes["type"], notes["mode"], notes["size"], notes["mtime"]) == ("file", 0o600, len(text2),
                                                                            at2["notes.txt"][2])
    assert entries["link"]["type"] == "symlink" and entries["link"]["target"] == "sub/inner.txt"
    assert entries["sub"]["type"] == "dir" and entries["sub"]["mode"] == 0o750

    # extract, point 1: the tree byte for byte, modes, owners, times; the symlinks as symlinks.
    res = json.loads(got["extract1"].stdout)
    jsonschema.Draft202012Validator(schemas.load("extract")).validate(res)
    top = workdir / "out1" / os.path.basename(rel)
    assert res["written"] == [str(top), str(workdir / "out1" / "notes.txt")]
    assert (res["files"], res["directories"], res["symlinks"]) == (5, 2, 2)  # notes.txt twice
    assert res["bytes"] == 2 * len(text1) + len(blob) + 3 * MiB + len(inner) and res["skipped"] == [f"{rel}/pipe"]
    assert (top / "notes.txt").read_bytes() == text1 == (workdir / "out1" / "notes.txt").read_bytes()
    assert (top / "blob.bin").read_bytes() == blob
    assert (top / "sparse.bin").read_bytes() == bytes(3 * MiB) and os.stat(top / "sparse.bin").st_blocks == 0
    assert (top / "sub" / "inner.txt").read_bytes() == inner
    for n in ("notes.txt", "blob.bin", "sparse.bin", "sub", "link", "dangling"):
        assert_local(top / n, at1[n])
    assert os.readlink(top / "link") == "notes.txt" and os.readlink(top / "dangling") == "/nowhere/at/all"
    assert not os.path.lexists(top / "pipe")
    assert stat.S_IMODE(os.stat(workdir / "out1").st_mode) == 0o700

    # extract, point 2: the new contents; the link points elsewhere now.
    out2 = workdir / "out2"
    assert (out2 / "notes.txt").read_bytes() == text2
    assert_local(out2 / "notes.txt", at2["notes.txt"])
    assert os.readlink(out2 / "link") == "sub/inner.txt" and at2["link"][2] == os.lstat(out2 / "link").st_mtime // 1
    assert (out2 / "inner.txt").read_bytes() == inner  # through a symlinked directory of the guest's
    assert "extracted from /dev/sda (ext4)" in got["extract2"].stdout

    # Errors: one line each, with their exit codes; nothing half-written.
    miss = got["missing"]
    assert miss.returncode == 3 and miss.stderr.count("\n") == 1, miss.stderr
    assert f"{rel}/blob.bin: no such file or directory" in miss.stderr and "Traceback" not in miss.stderr
    nofs = got["nofs"]
    assert nofs.returncode == 3 and nofs.stderr.count("\n") == 1, nofs.stderr
    assert "holds no file system" in nofs.stderr and json.loads(nofs.stdout)["type"] == "NotFound"

    # Refused before an appliance starts: an existing file is never overwritten without --force.
    again = subprocess.run([sys.executable, "-m", "libvbackup.cli.main", "extract", vm, f"{rel}/notes.txt", "--repo",
                            r, "--disk", "vda", "--output", str(out2)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    assert (out2 / "notes.txt").read_bytes() == text2
