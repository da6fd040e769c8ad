"""The repository on disk.

::

    <repo>/                       0700
      <vm>/                       0700
        manifest.json             0600, replaced atomically (write, fsync, rename, fsync dir)
        .lock                     flock held by the one operation running on this VM (never removed)
        .run.json                 what the running (or a crashed) backup created; see journal.py
        <checkpoint>/<disk>.qcow2 one image per disk per point, backing = the parent's image
        <checkpoint>.partial/     images being written; renamed to <checkpoint>/ when complete
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import threading
from typing import BinaryIO

from . import lock as lock_mod, manifest as mf, records, sums
from .errors import RepositoryError
from .plan import check_name

DEFAULT_REPO = "/var/lib/libvbackup"

log = logging.getLogger(__name__)


def default_repo() -> str:
    return os.environ.get("LIBVBACKUP_REPO") or DEFAULT_REPO


def write_atomic(path: pathlib.Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RepositoryError(f"cannot write {path}: {e.strerror}") from e
    fsync_dir(path.parent)


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Repository:
    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).absolute()

    @property
    def tag(self) -> str:
        """A short name for this repository, in the names of the checkpoints it creates.

        Derived from its path, so two repositories backing up one VM create checkpoints that
        are told apart at a glance (``lvb-<tag>-<time>``); the manifest stays the authority on
        which checkpoints belong to which repository.
        """
        import hashlib

        return hashlib.sha256(str(self.root).encode()).hexdigest()[:6]

    @property
    def checkpoint_prefix(self) -> str:
        return f"lvb-{self.tag}"

    # -- checks ---------------------------------------------------------------------------
    def check_readable(self) -> None:
        if not self.root.exists():
            raise RepositoryError(f"repository {self.root} does not exist")
        if not self.root.is_dir():
            raise RepositoryError(f"repository {self.root} is not a directory")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise RepositoryError(f"repository {self.root} is not readable")

    def check_writable(self, create_default: bool = False) -> None:
        """The repository must exist (the default one is created) and accept new files."""
        if not self.root.exists() and create_default and str(self.root) == DEFAULT_REPO:
            try:
                self.root.mkdir(mode=0o700, parents=True)
            except OSError as e:
                raise RepositoryError(f"cannot create repository {self.root}: {e.strerror}") from e
        if not self.root.exists():
            raise RepositoryError(
                f"repository {self.root} does not exist", f"create it with: mkdir -m 700 {self.root}"
            )
        self.check_readable()
        # os.access() says yes to root even on a read-only file system: try for real.
        probe = self.root / f".probe-{os.getpid()}-{threading.get_ident()}"  # (threads of one process too)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as e:
            raise RepositoryError(f"repository {self.root} is not writable: {e.strerror}") from e

    # -- paths ----------------------------------------------------------------------------
    def vm_dir(self, vm: str) -> pathlib.Path:
        check_name(vm, "VM name for the repository")
        return self.root / vm

    def manifest_path(self, vm: str) -> pathlib.Path:
        return self.vm_dir(vm) / "manifest.json"

    def run_path(self, vm: str) -> pathlib.Path:
        return self.vm_dir(vm) / ".run.json"

    def image(self, vm: str, relpath: str) -> pathlib.Path:
        """An image named as the manifest names it (relative to the VM's directory)."""
        return self.vm_dir(vm) / relpath

    @staticmethod
    def image_name(checkpoint: str, disk: str) -> str:
        """How the manifest names a point's image of ``disk``: ``<checkpoint>/<disk>.qcow2``."""
        return f"{checkpoint}/{disk}.qcow2"

    @staticmethod
    def backing_name(image_name: str) -> str:
        """The backing file an incremental image records for its parent's image: a path
        relative to the image's own directory, so the repository can move as a whole."""
        return f"../{image_name}"

    def point_dir(self, vm: str, checkpoint: str) -> pathlib.Path:
        return self.vm_dir(vm) / checkpoint

    def partial_dir(self, vm: str, checkpoint: str) -> pathlib.Path:
        """Where a point's files are written; renamed to ``point_dir`` once complete."""
        return self.vm_dir(vm) / f"{checkpoint}.partial"

    @staticmethod
    def image_file(directory: pathlib.Path, disk: str) -> pathlib.Path:
        return directory / f"{disk}.qcow2"

    @staticmethod
    def sums_file(directory: pathlib.Path, disk: str) -> pathlib.Path:
        return directory / f"{disk}.sums"

    def sums_path(self, vm: str, image_name: str) -> pathlib.Path:
        """The block digests stored beside a point's image."""
        return self.image(vm, image_name).with_suffix(".sums")

    def lock_path(self, vm: str) -> pathlib.Path:
        return self.vm_dir(vm) / ".lock"

    def vms(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/manifest.json"))

    # -- manifest -------------------------------------------------------------------------
    def load(self, vm: str) -> mf.Manifest:
        path = self.manifest_path(vm)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return mf.Manifest(vm=vm)
        except OSError as e:
            raise RepositoryError(f"cannot read {path}: {e.strerror}") from e
        m = mf.loads(text, str(path))
        if m.vm != vm:
            raise RepositoryError(f"{path} belongs to VM {m.vm!r}, not {vm!r}")
        return m

    def save(self, m: mf.Manifest) -> None:
        self.ensure_vm_dir(m.vm)
        write_atomic(self.manifest_path(m.vm), mf.dumps(m))

    def ensure_vm_dir(self, vm: str) -> pathlib.Path:
        d = self.vm_dir(vm)
        try:
            d.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise RepositoryError(f"cannot create {d}: {e.strerror}") from e
        return d

    # -- points ---------------------------------------------------------------------------
    def open_sums(self, vm: str, pd: mf.PointDisk) -> tuple[BinaryIO, records.Records]:
        """A point's stored digests of one disk, checked against the manifest, as an open file
        (the caller closes it) and the stream of its records, read as they are needed."""
        path = self.sums_path(vm, pd.image)
        layout = sums.Layout(pd.size, pd.block_size, pd.checksum, pd.sums_format)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise RepositoryError(f"cannot read checksums {path}: {e.strerror}",
                                  "run a full backup (--level full) to start a new chain") from e
        try:
            ok = layout.file_size_ok(os.fstat(f.fileno()).st_size) and layout.blkhash_of(f) == pd.blkhash
        except OSError as e:
            f.close()
            raise RepositoryError(f"cannot read checksums {path}: {e.strerror}") from e
        if not ok:
            f.close()
            raise RepositoryError(f"checksums {path} do not match the manifest (corrupted?)",
                                  "run 'libvbackup verify', then a full backup")
        f.seek(0)
        return f, layout.stream(f)

    def create_sums(self, directory: pathlib.Path, disk: str) -> BinaryIO:
        """A new private sums file in a point's directory (the caller fsyncs and closes it)."""
        path = self.sums_file(directory, disk)
        try:
            return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")
        except OSError as e:
            raise RepositoryError(f"cannot create {path}: {e.strerror}") from e

    def commit_point(self, m: mf.Manifest, point: mf.Point) -> None:
        """Make a point whose files are complete in ``<chk>.partial/`` part of the repository,
        in the order that survives a power cut at any moment:

        1. each image and ``.sums`` file fsynced by its writer;
        2. ``<chk>.partial/`` fsynced: its entries are on disk;
        3. renamed to ``<chk>/``, then the VM directory fsynced: the rename is on disk;
        4. the manifest replaced atomically (temporary file fsynced, renamed, directory fsynced).

        Until step 4 the point does not exist for anyone; after it, everything it names is there.
        """
        vm = m.vm
        partial = self.partial_dir(vm, point.checkpoint)
        fsync_dir(partial)
        os.rename(partial, self.point_dir(vm, point.checkpoint))
        fsync_dir(self.vm_dir(vm))
        m.points.append(point)
        self.save(m)

    # -- run journal (what a backup is about to create) -------------------------------------
    def has_run(self, vm: str) -> bool:
        return self.run_path(vm).exists()

    def write_run(self, vm: str, text: str) -> None:
        """The run journal (``journal.RunRecord``), replaced atomically."""
        write_atomic(self.run_path(vm), text)

    def progress_path(self, vm: str) -> pathlib.Path:
        return self.vm_dir(vm) / ".progress.json"

    def write_progress(self, vm: str, doc: dict) -> None:
        """Progress for ``libvbackup status``: advisory, so replaced without fsync."""
        path = self.progress_path(vm)
        tmp = path.with_name(".progress.json.tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("cannot write progress: %s", e)

    def read_progress(self, vm: str) -> dict | None:
        try:
            return json.loads(self.progress_path(vm).read_text())
        except (OSError, ValueError):
            return None

    def clear_run(self, vm: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.progress_path(vm).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.run_path(vm).unlink()
            fsync_dir(self.vm_dir(vm))

    # -- lock -----------------------------------------------------------------------------
    def lock(self, vm: str) -> lock_mod.VmLock:
        """One operation per VM per repository: ``with repository.lock(vm): ...``. The lock dies
        with its process and its file is never removed (see ``lock``)."""
        self.ensure_vm_dir(vm)
        return lock_mod.VmLock(self.lock_path(vm), vm=vm)

    def lock_holder(self, vm: str) -> int | None:
        """The pid proven to hold the VM's lock now (``lock.UNKNOWN_HOLDER`` when held by a
        process that cannot be identified), or None: no operation is running."""
        path = self.lock_path(vm)
        return lock_mod.holder(path) if path.exists() else None

    def run_is_live(self, vm: str) -> bool:
        """Whether the run that wrote the journal may still be running: its lock is held."""
        return self.lock_holder(vm) is not None
