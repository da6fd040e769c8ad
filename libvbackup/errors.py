"""The one exception hierarchy of libvbackup.

::

    Error                      exit 1   anything libvbackup reports to its caller
     +-- UsageError            exit 2   options that contradict each other or name nothing
     +-- NotFound              exit 3   an unknown VM, checkpoint, disk or backup point
     +-- StateError            exit 4   the VM / libvirt / repository is not in a state to do this
     +-- RepositoryError       exit 5   the repository cannot be read or written
     +-- LibvirtError          exit 6   libvirt refused or failed (wraps libvirt.libvirtError)
     +-- CopyError             exit 7   reading the export or writing an image failed
     +-- ToolError             exit 8   qemu-img / qemu-nbd / libguestfs failed
     +-- VerifyError           exit 9   stored backups differ from what was backed up
     +-- Interrupted           exit 130/143  SIGINT / SIGTERM

Every error carries a one-line message meant for an administrator, and ``hint``: what to do
next. The CLI maps them to exit codes in one place (``libvbackup.cli.main``). Errors that wrap
a lower-level failure keep it as ``__cause__``.
"""

from __future__ import annotations

import logging

# Every module of libvbackup that logs imports this one: a program that embeds libvbackup and
# configures no logging sees nothing of it (QEMU's python/qemu/qmp does the same).
logging.getLogger("libvbackup").addHandler(logging.NullHandler())


class Error(Exception):
    """Base class: a failure libvbackup understood and can explain in one line."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(Error):
    """The options contradict each other or are malformed: fix the command line."""

    exit_code = 2


class NotFound(Error):
    """Something named on the command line does not exist: check the name."""

    exit_code = 3


class StateError(Error):
    """The VM, libvirt or the repository is not in a state that allows the operation."""

    exit_code = 4


class RepositoryError(Error):
    """The repository is missing, unwritable, locked, corrupt or of a newer format."""

    exit_code = 5


class LibvirtError(Error):
    """libvirt refused a call or failed during it; the message is libvirt's own."""

    exit_code = 6


class CopyError(Error):
    """Reading the NBD export or writing a backup image failed."""

    exit_code = 7


class ToolError(Error):
    """An external tool (qemu-img, qemu-nbd, libguestfs) failed."""

    exit_code = 8


class VerifyError(Error):
    """Verification found missing or damaged images: the points named cannot be trusted."""

    exit_code = 9


class Interrupted(Error):
    """The run was stopped by a signal; it cleaned up before exiting."""

    def __init__(self, signum: int):
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; the backup job was aborted and cleaned up")
        self.exit_code = 128 + signum


# The command line's exit codes, for --help and the README.
EXIT_CODES = (
    (0, "success"),
    (1, "error (any other failure libvbackup explained)"),
    (UsageError.exit_code, "usage: options that contradict each other or are malformed"),
    (NotFound.exit_code, "not found: an unknown VM, checkpoint, disk or point"),
    (StateError.exit_code, "state: the VM, libvirt or the repository does not allow it now"),
    (RepositoryError.exit_code, "repository: missing, unwritable, corrupt or of a newer format"),
    (LibvirtError.exit_code, "libvirt refused or failed"),
    (CopyError.exit_code, "copy: reading the export or writing an image failed"),
    (ToolError.exit_code, "a tool failed: qemu-img, qemu-nbd, libguestfs"),
    (VerifyError.exit_code, "verify: stored backups are missing or damaged"),
    (10, "run: some of the VMs failed (the report names them)"),
    (70, "internal error: a bug (--debug shows where)"),
    (130, "interrupted by SIGINT (cleaned up)"),
    (143, "interrupted by SIGTERM (cleaned up)"),
)
