"""Single files of a backup point: a directory of one of its file systems listed, files and
trees copied out, through libguestfs (the only module that imports ``guestfs``, and only when
it is used).

One disk of the point is opened with its backing chain, read-only (``add_drive_opts(...,
readonly=True)``: libguestfs puts a throwaway overlay over it, so even the journal replay that a
crash-consistent point's ext4 needs touches nothing in the repository), in an appliance that
boots once per command (about 16-20 s under TCG here). One file system of the disk is mounted
read-only at ``/``: the only one there is, or the one ``fs`` names (``/dev/sda1``; libguestfs
names the disk ``/dev/sda``).

Extraction walks the guest's tree itself rather than piping ``tar-out`` into a host tar: what a
guest's file system holds is not trusted, and here nothing is ever written through a path that
already exists, a guest symlink is recreated as a symlink and never followed, and device nodes,
fifos and sockets are left out (named in the result). Modes, owners (numeric, when root) and
modification times are kept (the access time is set to the modification time: guests mount
with relatime or noatime); hard links become separate files; extended attributes and ACLs are
not copied. Files are read with pread, holes left where a file reads as zeroes.

Environment: libguestfs's own (``LIBGUESTFS_BACKEND``, ``LIBGUESTFS_BACKEND_SETTINGS``, …); on
machines where QEMU cannot use KVM, ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import posixpath
import shutil
import stat
import time
from typing import Iterator, Sequence

from .errors import Interrupted, NotFound, ToolError, UsageError
from .progress import Progress
from .repo import Repository
from .restore import select_disk
from .outcomes import ExtractResult, FileEntry, FilesResult
from .signals import raising

log = logging.getLogger(__name__)

TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
# What libguestfs's list_filesystems calls a device that holds no file system it can mount.
NOT_A_FS = frozenset({"unknown", "swap", ""})
# Bytes per pread: libguestfs's messages are at most 4 MiB.
CHUNK = 2 << 20


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class PointFS:
    """One file system of one disk of a point, mounted read-only at ``/`` in a running
    appliance. Made by ``open_point``; paths are the guest's (absolute, ``/`` its root)."""

    def __init__(self, g, vm: str, checkpoint: str, disk: str, device: str, fstype: str):
        self.g, self.vm, self.checkpoint, self.disk = g, vm, checkpoint, disk
        self.device, self.fstype = device, fstype

    def where(self) -> str:
        return f"{self.device} ({self.fstype}) of disk {self.disk} at point {self.checkpoint!r}"

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            raise ToolError(f"libguestfs: {what}: {_one_line(e)}") from e

    def entry(self, path: str) -> FileEntry:
        """The entry at ``path`` itself (a symlink is not followed, but symlinks to directories
        above it are, inside the guest's file system); NotFound if there is none."""
        path = guest_path(path)
        if path == "/":
            st = self._call("lstat /", self.g.lstatns, "/")
            return _entry("/", "/", st, None)
        parent, name = posixpath.split(path)
        try:
            real = self.g.realpath(parent)  # (resolved within the mounted file system)
            found = self.listdir(real, names=[name]) if self.g.is_dir(real) else []
        except RuntimeError:
            found = []
        if not found:
            raise NotFound(f"{path}: no such file or directory in {self.where()}")
        return dataclasses.replace(found[0], path=path)

    def resolve(self, path: str) -> str:
        """``path`` with every symlink followed (within the guest's file system)."""
        return self._call(f"realpath {path}", self.g.realpath, path)

    def listdir(self, path: str, names: Sequence[str] | None = None) -> list[FileEntry]:
        """The entries of directory ``path`` (or only ``names`` of them, those that exist), by name."""
        if names is None:
            names = sorted(self._call(f"ls {path}", self.g.ls, path))
        if not names:
            return []
        stats = self._call(f"lstat in {path}", self.g.lstatnslist, path, list(names))
        links = [n for n, st in zip(names, stats) if st["st_ino"] != -1 and stat.S_ISLNK(st["st_mode"])]
        targets = dict(zip(links, self._call(f"readlink in {path}", self.g.readlinklist, path, links))) if links else {}
        return [_entry(n, posixpath.join(path, n), st, targets.get(n))
                for n, st in zip(names, stats) if st["st_ino"] != -1]

    def copy_file(self, entry: FileEntry, local: pathlib.Path, advance) -> None:
        """The regular file ``entry`` into a new file ``local`` (never one that exists, never
        through a symlink), holes where it reads as zeroes; ``advance(n)`` as bytes come."""
        # pread rather than download: libguestfs's file transfer costs about 0.2 s per file here
        # (TCG), a pread 1-2 ms plus 35 ms per 2 MiB.
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            while offset < entry.size:
                data = self._call(f"read {entry.path}", self.g.pread, entry.path, CHUNK, offset)
                if not data:
                    break  # (shorter than lstat said: it cannot be, the disk is read-only)
                if data.count(0) == len(data):
                    os.lseek(fd, len(data), os.SEEK_CUR)
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                offset += len(data)
                advance(len(data))
            os.ftruncate(fd, offset)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(local)  # ours: O_EXCL made it
            raise
        finally:
            os.close(fd)


def guest_path(path: str) -> str:
    """An absolute, normalised guest path (a relative one is taken from the root)."""
    if not path:
        raise UsageError("an empty path names nothing; give a path in the guest's file system, e.g. /etc")
    p = posixpath.normpath("/" + path)
    return "/" + p.lstrip("/")  # (normpath keeps a leading "//")


def _entry(name: str, path: str, st: dict, target: str | None) -> FileEntry:
    mode = st["st_mode"]
    return FileEntry(name, path, TYPES.get(stat.S_IFMT(mode), "unknown"), stat.S_IMODE(mode), st["st_size"],
                     st["st_mtime_sec"], st["st_mtime_nsec"], st["st_uid"], st["st_gid"], target)


def _filesystems(g) -> dict[str, str]:
    return {dev: t for dev, t in sorted(g.list_filesystems().items()) if t not in NOT_A_FS}


@contextlib.contextmanager
def open_point(vm: str, *, repo: str, checkpoint: str | None = None, disk: str | None = None,
               fs: str | None = None) -> Iterator[PointFS]:
    """The point's disk (``disk`` needed when it has several) in a libguestfs appliance, one of
    its file systems mounted read-only: checked before the appliance starts, closed on leaving."""
    repository = Repository(repo)
    m, point, disk, image = select_disk(repository, vm, checkpoint, disk)
    try:
        import guestfs
    except ImportError as e:
        raise ToolError("libguestfs's Python binding is not installed (python3-guestfs)", "run scripts/setup") from e
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        started = time.monotonic()
        try:
            g.set_program("libvbackup")
            # Backing files resolve relative to the image, as the repository names them.
            g.add_drive_opts(image, format="qcow2", readonly=True)
            g.launch()
        except RuntimeError as e:
            raise ToolError(f"libguestfs cannot start its appliance: {_one_line(e)}",
                            "libguestfs-test-tool shows why; where QEMU cannot use KVM set "
                            "LIBGUESTFS_BACKEND_SETTINGS=force_tcg") from e
        log.info("libguestfs appliance up in %.1f s", time.monotonic() - started)
        found = _filesystems(g)
        if not found:
            raise NotFound(f"disk {disk} of point {point.checkpoint!r} holds no file system that libguestfs knows",
                           f"the point has disks {', '.join(point.disks)}" if len(point.disks) > 1 else None)
        if fs is None:
            if len(found) > 1:
                raise UsageError(f"disk {disk} of point {point.checkpoint!r} holds several file systems: "
                                 f"{_listed(found)}; choose one with --fs")
            device = next(iter(found))
        else:
            device = fs if fs.startswith("/dev/") else "/dev/" + fs
            if device not in found:
                raise NotFound(f"disk {disk} of point {point.checkpoint!r} has no file system {fs}",
                               f"it has {_listed(found)}")
        try:
            g.mount_ro(device, "/")
        except RuntimeError as e:
            raise ToolError(f"cannot mount {device} ({found[device]}) of disk {disk} read-only: {_one_line(e)}") from e
        yield PointFS(g, vm, point.checkpoint, disk, device, found[device])
    finally:
        with contextlib.suppress(RuntimeError):
            g.shutdown()
        g.close()


def _listed(found: dict[str, str]) -> str:
    return ", ".join(f"{dev} ({t})" for dev, t in found.items())


@contextlib.contextmanager
def _interruptible(what: str, after: str = "") -> Iterator[None]:
    """SIGINT/SIGTERM raise Interrupted (in the main thread), named for this command: the
    appliance is shut down on the way out."""
    try:
        with raising():
            yield
    except Interrupted as e:
        e.message = f"{what} interrupted by {'SIGINT' if e.exit_code == 130 else 'SIGTERM'}{after}"
        e.args = (e.message,)
        raise


def files(vm: str, *, repo: str, checkpoint: str | None = None, disk: str | None = None, path: str = "/",
          fs: str | None = None) -> FilesResult:
    """The entries of directory ``path`` of the point's file system (or the entry itself, when
    ``path`` is not a directory)."""
    follow = path.endswith("/") and path.strip("/") != ""  # "link/" lists what it points to, as ls does
    path = guest_path(path)
    with _interruptible("files"), open_point(vm, repo=repo, checkpoint=checkpoint, disk=disk, fs=fs) as pfs:
        top = pfs.entry(path)
        if follow and top.type == "symlink":
            target = pfs.resolve(path)
            top = dataclasses.replace(pfs.entry(target), path=path) if pfs.g.is_dir(target) else top
        entries = pfs.listdir(path) if top.type == "dir" else [top]
        return FilesResult(vm, pfs.checkpoint, pfs.disk, pfs.device, pfs.fstype, path, top.type, tuple(entries))


# ---------------------------------------------------------------------------------------------
# extract

class _Plan:
    def __init__(self):
        self.items: list[tuple[FileEntry, pathlib.Path]] = []  # parents before their children
        self.skipped: list[str] = []
        self.bytes = 0


def _walk(pfs: PointFS, top: FileEntry, dest: pathlib.Path, plan: _Plan) -> None:
    if top.type not in ("file", "dir", "symlink"):
        plan.skipped.append(top.path)
        return
    plan.items.append((top, dest))
    if top.type == "file":
        plan.bytes += top.size
    elif top.type == "dir":
        for e in pfs.listdir(top.path):
            _walk(pfs, e, dest / e.name, plan)


def _destinations(paths: Sequence[str], out: pathlib.Path, force: bool) -> list[tuple[str, pathlib.Path]]:
    """(guest path, where it goes): ``out/<its name>``, or ``out`` itself for ``/``; checked
    against what exists before the appliance starts."""
    if not paths:
        raise UsageError("name at least one path of the guest's file system to extract")
    pairs, seen = [], {}
    for p in paths:
        gp = guest_path(p)
        dest = out if gp == "/" else out / posixpath.basename(gp)
        if dest in seen:
            raise UsageError(f"{seen[dest]} and {gp} would both be written to {dest}; extract them one at a time")
        seen[dest] = gp
        pairs.append((gp, dest))
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if not force:
        for gp, dest in pairs:
            if dest == out:
                if out.exists() and any(out.iterdir()):
                    raise UsageError(f"output directory {out} is not empty, and / would be extracted into it",
                                     "--force replaces what is there")
            elif os.path.lexists(dest):
                raise UsageError(f"{dest} exists; libvbackup does not overwrite it", "--force replaces it")
    return pairs


def _clear(dest: pathlib.Path, entry: FileEntry) -> None:
    """With --force: what is at ``dest`` goes unless it is a directory a directory merges into
    (a symlink on the host is removed, never followed)."""
    if not os.path.lexists(dest):
        return
    if entry.type == "dir" and dest.is_dir() and not dest.is_symlink():
        return
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    else:
        dest.unlink()


def _finish(entry: FileEntry, dest: pathlib.Path, root: bool) -> None:
    """Owner, mode and times as the guest had them (the owner first: chown clears set-id bits)."""
    link = entry.type == "symlink"
    if root:
        os.chown(dest, entry.uid, entry.gid, follow_symlinks=False)
    if not link:
        os.chmod(dest, entry.mode)
    ns = entry.mtime * 1_000_000_000 + entry.mtime_nsec
    os.utime(dest, ns=(ns, ns), follow_symlinks=False)


def extract(vm: str, *, repo: str, paths: Sequence[str], output: str, checkpoint: str | None = None,
            disk: str | None = None, fs: str | None = None, force: bool = False,
            progress: object = "none") -> ExtractResult:
    """Copy files and directory trees of the point's file system into ``output`` (created when
    missing): ``output/<name>`` for each path, the root's contents into ``output`` itself.
    Nothing that exists is overwritten unless ``force``. On failure what this call created is
    removed again."""
    out = pathlib.Path(output).absolute()
    pairs = _destinations(paths, out, force)
    started = time.monotonic()
    created: list[pathlib.Path] = []
    made_out = False
    try:
        with _interruptible("extract", f"; what it had written into {out} was removed"), \
                open_point(vm, repo=repo, checkpoint=checkpoint, disk=disk, fs=fs) as pfs:
            plan = _Plan()
            for gp, dest in pairs:
                _walk(pfs, pfs.entry(gp), dest, plan)
            if not out.exists():
                out.mkdir(mode=0o700, parents=True)  # the guest's files may be anyone's secrets
                os.chmod(out, 0o700)
                made_out = True
            counts = {"file": 0, "dir": 0, "symlink": 0}
            prog = Progress(progress, vm=vm)
            prog.add(pfs.disk, plan.bytes)
            root = os.geteuid() == 0
            tops = {d for _gp, d in pairs}
            dirs: list[tuple[FileEntry, pathlib.Path]] = []
            with prog:
                for entry, dest in plan.items:
                    if force:
                        _clear(dest, entry)
                    if dest in tops and not os.path.lexists(dest):
                        created.append(dest)  # (a directory merged into with --force is not ours)
                    if entry.type == "dir":
                        if not dest.is_dir():
                            dest.mkdir(mode=0o700)
                        dirs.append((entry, dest))  # finished when filled: its mode may forbid writing
                    elif entry.type == "symlink":
                        os.symlink(entry.target, dest)
                        _finish(entry, dest, root)
                    else:
                        pfs.copy_file(entry, dest, prog.callback(pfs.disk))
                        _finish(entry, dest, root)
                    counts[entry.type] += 1
                for entry, dest in reversed(dirs):
                    _finish(entry, dest, root)
            return ExtractResult(vm, pfs.checkpoint, pfs.disk, pfs.device, pfs.fstype, str(out),
                                 tuple(str(d) for _gp, d in pairs), counts["file"], counts["dir"], counts["symlink"],
                                 plan.bytes, tuple(plan.skipped), round(time.monotonic() - started, 3))
    except BaseException:
        for dest in reversed(created):
            with contextlib.suppress(OSError):
                shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
        if made_out:
            with contextlib.suppress(OSError):
                shutil.rmtree(out)
        raise
