"""Restore and listing: a backup point becomes one standalone image per disk.

A restore is a copy by the same engine as a backup: qemu-nbd serves the point's chain
(read-only), block status says which ranges hold data, and the engine writes them into a new
qcow2 image (our writer) or a sparse raw file; ranges that read as zeroes are never read.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Sequence

from . import engine, imagefile, nbdio, qcow2, qcow2map, target
from .errors import NotFound, RepositoryError, UsageError
from .progress import Progress
from .repo import Repository, fsync_dir as repo_fsync_dir
from .signals import umask
from .outcomes import ListResult, PointDiskInfo, PointInfo, RestoredDisk, RestoreResult

FORMATS = ("qcow2", "raw")


def list_points(vm: str, *, repo: str) -> ListResult:
    repository = Repository(repo)
    repository.check_readable()
    m = repository.load(vm)
    if not m.points and not repository.vm_dir(vm).exists():
        raise NotFound(f"repository {repository.root} holds no backups of VM {vm!r}")
    return ListResult(vm, str(repository.root), tuple(
        PointInfo(p.checkpoint, p.parent, p.level, p.mode, p.completed, p.seconds, {
            n: PointDiskInfo(str(repository.image(vm, d.image)), d.size, d.bytes_copied, d.bytes_zeroed,
                             compression=d.compression, stored_bytes=d.stored_bytes)
            for n, d in p.disks.items()}, p.consistency, p.frozen_seconds)
        for p in m.points))


def restore(
    vm: str,
    *,
    repo: str,
    output: str,
    checkpoint: str | None = None,
    fmt: str = "qcow2",
    disks: Sequence[str] = (),
    progress: str = "none",
    compress: bool = False,
) -> RestoreResult:
    """Write ``output/<disk>.<fmt>`` for each disk, as it was when ``checkpoint`` was created
    (``compress``: qcow2 with compressed clusters)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    repository = Repository(repo)
    m, point, names = select(repository, vm, checkpoint, disks)
    return RestoreResult(vm, point.checkpoint, write_images(repository, m, point, names, output, fmt, progress,
                                                            compress=compress))


def select(repository: Repository, vm: str, checkpoint: str | None, disks: Sequence[str] = ()):
    """The manifest, the point (default: the newest) and the disks to restore, every image of
    their chains checked to be there: before anything is written."""
    repository.check_readable()
    m = repository.load(vm)
    if checkpoint is None:
        if m.newest is None:
            raise NotFound(f"repository {repository.root} holds no backups of VM {vm!r}")
        checkpoint = m.newest.checkpoint
    point = m.get(checkpoint)
    chain = m.chain(checkpoint)
    names = list(dict.fromkeys(disks)) or list(point.disks)
    for n in names:
        if n not in point.disks:
            raise NotFound(f"point {checkpoint!r} holds no disk {n!r} (it has {', '.join(point.disks)})")
    # Every image of every chain must be there before anything is written.
    for n in names:
        for p in chain:
            pd = p.disks.get(n)
            if pd is None and p is not point:
                continue
            path = repository.image(vm, pd.image)
            if not path.is_file():
                raise RepositoryError(f"image {path} of point {p.checkpoint!r} is missing; "
                                      f"point {checkpoint!r} cannot be restored")
    return m, point, names


def select_disk(repository: Repository, vm: str, checkpoint: str | None, disk: str | None):
    """The manifest, the point and the one disk to open (``disk`` is needed when the point has
    several), its chain checked as by ``select``: (manifest, point, disk, the point's image)."""
    m, point, names = select(repository, vm, checkpoint, [disk] if disk else ())
    if disk is None:
        if len(names) > 1:
            raise UsageError(f"point {point.checkpoint!r} has disks {', '.join(names)}; choose one with --disk")
        disk = names[0]
    return m, point, disk, str(repository.image(vm, point.disks[disk].image))


def check_output(output: str) -> pathlib.Path:
    out = pathlib.Path(output).absolute()
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output {out} exists and is not a directory")
        if any(out.iterdir()):
            raise UsageError(f"output directory {out} is not empty; restore into a new or empty directory")
    return out


def write_images(repository: Repository, m, point, names, output: str, fmt: str, progress: str,
                 dir_mode: int = 0o700, source=None, compress: bool = False) -> dict[str, RestoredDisk]:
    """``output/<disk>.<fmt>`` for each disk; on failure nothing of it is left. ``source(pd)``
    opens a disk's chain for reading (default: the repository's files)."""
    out = check_output(output)
    created_dir = False
    if not out.exists():
        try:
            out.mkdir(mode=dir_mode, parents=True)
            os.chmod(out, dir_mode)  # whatever the umask
        except OSError as e:
            raise UsageError(f"cannot create output directory {out}: {e.strerror}") from e
        created_dir = True
    written = []
    with umask(0o077):
        return _write_images(repository, m, point, names, out, fmt, progress, created_dir, written, source, compress)


def _write_images(repository, m, point, names, out, fmt, progress, created_dir, written, source=None,
                  compress=False):
    try:
        result = {}
        for n in names:
            dst = out / f"{n}.{fmt}"
            tmp = out / f".{n}.{fmt}.partial"
            written.append(tmp)
            write_disk(repository, m, point.disks[n], str(tmp), fmt, progress, source, compress)
            os.replace(tmp, dst)
            repo_fsync_dir(out)
            written[-1] = dst
            result[n] = RestoredDisk(str(dst), point.disks[n].size, fmt)
        return result
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        if created_dir:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _chain_files(repository: Repository, m, pd) -> list[str] | None:
    """The files of a point's disk chain, its own image first, as the images themselves name
    their backing files (read from their headers); None if they disagree with the manifest."""
    owner = {d.image: d for p in m.points for d in p.disks.values()}
    files = []
    while pd is not None:
        path = repository.image(m.vm, pd.image)
        try:
            with open(path, "rb") as f:
                _size, backing = qcow2map.read_header(f.read(qcow2.CLUSTER))
        except (OSError, ValueError):
            return None
        if backing != (repository.backing_name(pd.backing) if pd.backing else None):
            return None
        files.append(str(path))
        pd = owner.get(pd.backing) if pd.backing else None
        if pd is None and backing is not None:
            return None
    return files


def _source(repository: Repository, m, pd):
    """The chain read straight from its files; through qemu-nbd when they cannot be (their
    headers disagree with the manifest)."""
    files = _chain_files(repository, m, pd)
    if files is None:
        return nbdio.image(str(repository.image(m.vm, pd.image)))
    return imagefile.FileSource(files[0], pd.size, chain=files)


def write_disk(repository: Repository, m, pd, output: str, fmt: str, progress: str, source=None,
               compress: bool = False) -> None:
    """One disk of a point, as it was, into a new image file ``output`` (flushed)."""
    with (source(pd) if source else _source(repository, m, pd)) as src, \
            contextlib.closing(target.open_target(output, src.size, fmt, compress=compress)) as dst:
        prog = Progress(progress, vm=m.vm)
        prog.add(pd.name, engine.planned_bytes(src, dst) if prog.shown else 0)
        with prog:
            engine.copy(src, dst, progress=prog.callback(pd.name))
