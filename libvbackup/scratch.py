"""The run directory and the scratch guard.

Each run has a directory under the scratch base (``libvbackup-<vm>-<checkpoint>``), private to
root and QEMU's user: QEMU creates the NBD socket and the scratch images there (pull), or
writes the push targets there. libvirt 9.0 / QEMU 7.2 fail the *guest's* writes when the
scratch images can no longer grow, so a running backup is aborted first: past
``--scratch-limit``, or when less than ``RESERVE`` bytes are left where the scratch lives.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
from typing import Callable

from .errors import StateError, UsageError

DEFAULT_BASE = "/var/tmp"
RESERVE = 256 << 20
QEMU_USERS = ("libvirt-qemu", "qemu")


def qemu_ids() -> tuple[int, int] | None:
    for name in QEMU_USERS:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    return None


def base(scratch_dir: str | None) -> pathlib.Path:
    """The scratch base, checked (exists, enough free space) before anything is created."""
    path = pathlib.Path(scratch_dir or DEFAULT_BASE).absolute()
    if not path.is_dir():
        raise UsageError(f"scratch directory {path} does not exist or is not a directory")
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize < RESERVE:
        raise StateError(f"scratch directory {path} has less than {RESERVE >> 20} MiB free; "
                         "guest writes during the backup would fail",
                         "use --scratch-dir on a file system with more free space")
    return path


def remote_base(scratch_dir: str | None) -> pathlib.Path:
    """A directory on a remote hypervisor: it must be absolute; only libvirt can check it."""
    path = pathlib.PurePosixPath(scratch_dir or DEFAULT_BASE)
    if not path.is_absolute():
        raise UsageError(f"--scratch-dir {scratch_dir!r} must be an absolute path on the hypervisor")
    return pathlib.Path(path)


def run_dir(scratch_base: pathlib.Path, vm: str, checkpoint: str) -> pathlib.Path:
    return scratch_base / f"libvbackup-{vm}-{checkpoint}"


def make_run_dir(path: pathlib.Path) -> None:
    """Private to root and QEMU's user."""
    path.mkdir(mode=0o700)
    ids = qemu_ids()
    if ids and os.geteuid() == 0:
        os.chown(path, ids[0], ids[1])


def give_to_qemu(path: pathlib.Path) -> None:
    ids = qemu_ids()
    if ids and os.geteuid() == 0:
        os.chown(path, *ids)


def watch(dom, directory: pathlib.Path | None, limit: int | None) -> Callable[[], None]:
    """A check to call now and then while the job runs; raises StateError to abort it.
    ``directory`` None: the scratch images are on another host (remote libvirt), whose file
    system cannot be seen from here: only libvirt's job statistics (``limit``) guard them."""
    def check() -> None:
        # Job statistics only for a limit: with a job running they are a QEMU round trip (10 ms).
        used = dom.job_stats().get("disk_temp_used", 0) if limit is not None else 0
        if limit is not None and used > limit:
            raise StateError(f"the backup was aborted: guest writes put {used} bytes in the scratch "
                             f"images, more than --scratch-limit {limit}; the VM was not affected",
                             "use a larger --scratch-limit or back up at a quieter time")
        if directory is None:
            return
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if free < RESERVE:
            raise StateError(f"the backup was aborted: only {free} bytes left where the scratch images "
                             f"live ({directory.parent}), and guest writes must not fail",
                             "use --scratch-dir on a file system with more free space")
    return check
