"""The repository on disk.

::

    <repo>/                       0700
      <vm>/                       0700
        manifest.json             0600, replaced atomically (write, fsync, rename, fsync dir)
        .lock                     flock held by the one operation running on this VM
        .run.json                 what the running (or a crashed) backup created; see backup.py
        <checkpoint>/<disk>.qcow2 one image per disk per point, backing = the parent's image
        <checkpoint>.partial/     images being written; renamed to <checkpoint>/ when complete
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib
from typing import Iterator

from . import manifest as mf
from .errors import RepositoryError, StateError
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
        probe = self.root / f".probe-{os.getpid()}"
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
        return self.vm_dir(vm) / relpath

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

    # -- run journal (what a backup is about to create) -------------------------------------
    def read_run(self, vm: str) -> dict | None:
        try:
            return json.loads(self.run_path(vm).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def write_run(self, vm: str, state: dict) -> None:
        write_atomic(self.run_path(vm), json.dumps(state, indent=2) + "\n")

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
    @contextlib.contextmanager
    def lock(self, vm: str) -> Iterator[None]:
        """One operation per VM per repository; the lock dies with its process."""
        d = self.ensure_vm_dir(vm)
        path = d / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise StateError(
                    f"another libvbackup operation (pid {holder}) holds VM {vm!r} in {self.root}"
                ) from e
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                # Unlinked while still held, so no lock file outlives the operation.
                with contextlib.suppress(OSError):
                    path.unlink()
        finally:
            os.close(fd)
