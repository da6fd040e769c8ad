"""libvbackup's Python API: every operation of the command line, for programs that drive it.

Each function takes the VM's name and keyword arguments only, returns a frozen dataclass from
``libvbackup.results`` (``to_dict()`` gives the document that ``--json`` prints), and raises
``libvbackup.errors.Error`` or one of its subclasses, each with ``exit_code`` (the command
line's) and ``hint`` (what to do next)::

    Error                      exit 1
     +-- UsageError            exit 2   arguments that contradict each other or name nothing
     +-- NotFound              exit 3   an unknown VM, checkpoint, disk or point
     +-- StateError            exit 4   the VM, libvirt or the repository is not in a state to do it
     +-- RepositoryError       exit 5   the repository cannot be read or written
     +-- LibvirtError          exit 6   libvirt refused or failed
     +-- CopyError             exit 7   reading the export or writing an image failed
     +-- ToolError             exit 8   qemu-img / qemu-nbd failed
     +-- VerifyError           exit 9   stored backups differ from what was backed up
     +-- Interrupted           exit 130/143  SIGINT / SIGTERM (main thread only)

A backup, restore or verify that fails has cleaned up after itself when the error reaches the
caller (and a process that was killed is cleaned up by the next operation on that VM).

Progress: ``progress`` is ``none`` (the default), ``plain`` (a line every 10 s on stderr),
``bar`` (a live line on a terminal) or ``json`` (one object per line on stderr, the schema
``libvbackup/schemas/progress.json``); or ``on_progress`` receives a ``results.ProgressEvent``
about every second for each disk being copied, from a helper thread, and one more per disk
when the copy ends (phase ``done`` or ``failed``). Keep it quick; it must not call back into
libvbackup.

Threads: operations on different VMs may run at once in one process (one thread each); two
operations on the same VM and repository exclude each other through the VM's lock (the second
fails with StateError at once, naming the holder). SIGINT/SIGTERM become ``Interrupted``
only when an operation runs in the main thread; elsewhere signals stay the program's.

Example::

    from libvbackup import api

    full = api.pull("vm1", repo="/backups")
    inc = api.pull("vm1", repo="/backups", level="inc")
    print(inc.checkpoint, {d.name: d.bytes_copied for d in inc.disks.values()})
    api.restore("vm1", repo="/backups", checkpoint=full.checkpoint, output="/srv/restore/vm1")
    assert api.verify("vm1", repo="/backups").ok
    api.prune("vm1", repo="/backups", keep_last=7, keep_weekly=4)
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import backup as _backup, lifecycle as _lifecycle, prune as _prune, restore as _restore
from . import config as _config, mapping as _mapping, runner as _runner, verify as _verify
from . import vmrestore as _vmrestore
from .mapping import Mapping
from .errors import UsageError
from .results import (AbortResult, BackupResult, CheckpointsResult, DefinedResult, InPlaceResult, ListResult,
                      ProgressEvent, PruneResult, RestoreResult, RunReport, StatusResult, VerifyResult, VmRun)
from .progress import MODES
from .retention import Policy

__all__ = ["pull", "push", "backup_many", "list_points", "restore", "verify", "prune", "run", "map_point", "checkpoints",
           "status", "abort", "ProgressEvent", "Mapping"]

OnProgress = Callable[[ProgressEvent], None]


def _progress(on_progress: OnProgress | None, progress: str) -> object:
    if progress not in MODES:
        raise UsageError(f"progress {progress!r}: use one of {', '.join(MODES)}")
    return on_progress if on_progress is not None else progress


def pull(vm: str, *, repo: str, uri: str | None = None, level: str | None = None, incremental: str | None = None,
         checkpoint: str | None = None, disks: Sequence[str] = (), exclude: Sequence[str] = (),
         quiesce: str = "auto", scratch_dir: str | None = None, scratch_limit: int | None = None,
         dry_run: bool = False, on_progress: OnProgress | None = None, progress: str = "none",
         nbd_address: str | None = None, nbd_port: str | None = None, tls_dir: str | None = None,
         tls: bool = True) -> BackupResult:
    """Pull-mode backup of a running VM: libvirt exports each disk over NBD at a point in time
    and a new checkpoint; libvbackup copies what is needed into the repository ``repo``.

    ``level``: ``full``, ``inc`` (since the newest point), ``diff`` (since the newest full),
    ``auto`` (inc when the chain is usable, else full: ``fallback_reason`` says why); or
    ``incremental``: the checkpoint to copy changes since. Default: a full backup.
    ``checkpoint``: the new checkpoint's name (default ``lvb-<repository tag>-<UTC time>``).
    ``disks`` / ``exclude``: targets (``vda``) to back up or leave out.
    ``quiesce``: ``auto`` freezes the guest's file systems through its agent while the job
    begins if an agent is connected; ``yes`` refuses without one; ``no`` never freezes
    (``consistency`` of the result: ``quiesced`` or ``crash``).
    ``scratch_dir``: where QEMU keeps the old data of guest writes during the backup;
    ``scratch_limit``: bytes of it after which the backup (never the guest) is aborted.
    ``dry_run``: plan only (the result carries the XML that would be passed to libvirt).
    A VM that is shut off is backed up from its images (``mode`` of the result: ``offline``).
    With a remote ``uri`` (``qemu+ssh://root@host/system``) the export is on TCP at
    ``nbd_address`` (default: the URI's host), the first free port of ``nbd_port`` (``"10809"``
    or ``"10809-10909"``, the default), TLS with the client certificate in ``tls_dir`` (default
    ``/etc/pki/qemu``) unless ``tls=False``; ``scratch_dir`` is then a directory there.
    """
    return _backup.backup(vm, mode="pull", repo=repo, uri=uri, checkpoint=checkpoint, incremental=incremental,
                          level=level, disks=disks, exclude=exclude, scratch_dir=scratch_dir, dry_run=dry_run,
                          progress=_progress(on_progress, progress), scratch_limit=scratch_limit, quiesce=quiesce,
                          nbd_address=nbd_address, nbd_port=nbd_port, tls_dir=tls_dir, tls=tls)


def push(vm: str, *, repo: str, uri: str | None = None, level: str | None = None, incremental: str | None = None,
         checkpoint: str | None = None, disks: Sequence[str] = (), exclude: Sequence[str] = (),
         quiesce: str = "auto", scratch_dir: str | None = None, scratch_limit: int | None = None,
         dry_run: bool = False, on_progress: OnProgress | None = None, progress: str = "none",
         nbd_address: str | None = None, nbd_port: str | None = None, tls_dir: str | None = None,
         tls: bool = True) -> BackupResult:
    """Push-mode backup: QEMU writes each disk's image itself (into ``scratch_dir``, best on
    the repository's file system), then libvbackup checks and moves it into the repository.
    Same arguments and result as ``pull``."""
    return _backup.backup(vm, mode="push", repo=repo, uri=uri, checkpoint=checkpoint, incremental=incremental,
                          level=level, disks=disks, exclude=exclude, scratch_dir=scratch_dir, dry_run=dry_run,
                          progress=_progress(on_progress, progress), scratch_limit=scratch_limit, quiesce=quiesce,
                          nbd_address=nbd_address, nbd_port=nbd_port, tls_dir=tls_dir, tls=tls)


def list_points(vm: str, *, repo: str) -> ListResult:
    """The VM's backup points in ``repo``, oldest first."""
    return _restore.list_points(vm, repo=repo)


def restore(vm: str, *, repo: str, output: str | None = None, checkpoint: str | None = None,
            format: str = "qcow2", disks: Sequence[str] = (), define: str | None = None, start: bool = False,
            in_place: bool = False, confirm: bool = False, uri: str | None = None,
            on_progress: OnProgress | None = None, progress: str = "none") -> RestoreResult | DefinedResult | InPlaceResult:
    """Restore point ``checkpoint`` (default: the newest) of ``vm``.

    - ``output``: a new or empty directory; ``<disk>.<format>`` standalone images in it
      (``RestoreResult``). ``disks`` restricts the disks.
    - ``output`` and ``define=NAME`` (``start`` to start it): a new domain NAME defined from the
      domain XML saved with the point, its disks the restored images (``DefinedResult``).
    - ``in_place=True`` and ``confirm=True``: the shut-off VM's own disk files get the point's
      data and its checkpoints are dropped; its next backup is a full one (``InPlaceResult``).
    """
    progress = _progress(on_progress, progress)
    if in_place:
        if output or define or start or disks or format != "qcow2":
            raise UsageError("--in-place takes none of --output, --define, --start, --disk, --format")
        return _vmrestore.restore_in_place(vm, repo=repo, checkpoint=checkpoint, confirm=confirm, uri=uri,
                                           progress=progress)
    if output is None:
        raise UsageError("--output DIR is required (or --in-place)")
    if start and not define:
        raise UsageError("--start needs --define NAME")
    if define:
        if disks:
            raise UsageError("--define restores every disk of the point; leave out --disk")
        return _vmrestore.restore_as_vm(vm, repo=repo, output=output, name=define, checkpoint=checkpoint,
                                        fmt=format, start=start, uri=uri, progress=progress)
    return _restore.restore(vm, repo=repo, output=output, checkpoint=checkpoint, fmt=format, disks=disks,
                            progress=progress)


def verify(vm: str, *, repo: str, checkpoint: str | None = None) -> VerifyResult:
    """Re-read every image of each point's chain (or of ``checkpoint`` only) and compare it with
    the checksums taken at backup time. ``ok`` is False when anything is missing or damaged;
    the points and disks say what (the command line then exits 9)."""
    return _verify.verify(vm, repo=repo, checkpoint=checkpoint)


def prune(vm: str, *, repo: str, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
          keep_monthly: int = 0, keep_yearly: int = 0, uri: str | None = None, dry_run: bool = False) -> PruneResult:
    """Keep the points the rules select (borg's semantics, see ``libvbackup.retention``); every kept
    point stays restorable (rebased onto its nearest kept ancestor, or made standalone); the
    others and their libvirt checkpoints are removed. The newest point is always kept."""
    policy = Policy(last=keep_last, daily=keep_daily, weekly=keep_weekly, monthly=keep_monthly, yearly=keep_yearly)
    return _prune.prune(vm, repo=repo, keep=policy, uri=uri, dry_run=dry_run)


def run(*, config: str | None = None, vms: Sequence[str] = (), jobs: int | None = None, dry_run: bool = False,
        on_vm: Callable[[VmRun], None] | None = None) -> RunReport:
    """Back up every VM a policy of the configuration file names (``config``, else
    ``$LIBVBACKUP_CONFIG``, else ``/etc/libvbackup.toml``), or only ``vms``, ``jobs`` at a time,
    each pruned by its policy's rules afterwards. One VM's failure never stops the others: its
    ``VmRun`` in the report has the error and exit code (``report.exit_code``: 0, the single VM's
    code, or 10). ``on_vm`` receives each VM's result when it is done, from a worker thread.
    Raises only for a configuration that cannot run (UsageError, NotFound) or libvirt that cannot
    list its domains."""
    return _runner.run_policies(_config.load(config), vms=list(vms) or None, jobs=jobs, dry_run=dry_run,
                                on_event=on_vm)


def map_point(vm: str, *, repo: str, checkpoint: str | None = None, disk: str | None = None,
              port: int | None = None, address: str | None = None, tls_dir: str | None = None) -> Mapping:
    """Serve one disk of a point (default: the newest; ``disk`` needed when it has several)
    read-only over NBD, with its backing chain: a private unix socket, or TCP ``port`` on
    ``address`` (127.0.0.1; any other address needs ``tls_dir`` with a server certificate).
    Returns a ``Mapping`` (``.uri``, ``.result``): use it in a ``with`` or ``close()`` it."""
    return _mapping.map_point(vm, repo=repo, checkpoint=checkpoint, disk=disk, port=port, address=address,
                              tls_dir=tls_dir)


def backup_many(vms: Sequence[str] = (), *, all_vms: bool = False, repo: str, mode: str = "pull",
                uri: str | None = None, level: str | None = None, quiesce: str = "auto",
                scratch_dir: str | None = None, jobs: int = 2, dry_run: bool = False,
                on_vm: Callable[[VmRun], None] | None = None) -> RunReport:
    """Back up several VMs at once (``vms``, or ``all_vms``: every domain of the libvirt at
    ``uri``), ``jobs`` at a time, each as ``pull``/``push`` would with these arguments; no
    pruning. One VM's failure never stops the others (see ``run`` for the report)."""
    if bool(vms) == all_vms:
        raise UsageError("name the VMs to back up, or ask for all of them (--all), not both")
    settings = dict(repo=repo, scratch_dir=scratch_dir, uri=uri, mode=mode, level=level or "full", quiesce=quiesce)
    policy = _config.Policy(index=0, match=tuple(vms) or ("*",), settings=_config.Settings(**settings), keep=None)
    config = _config.Config(None, _config.Defaults(**settings, jobs=jobs), (policy,))
    return _runner.run_policies(config, vms=list(vms) or None, jobs=jobs, dry_run=dry_run, on_event=on_vm)


def checkpoints(vm: str, *, repo: str, uri: str | None = None) -> CheckpointsResult:
    """libvirt's checkpoints of ``vm`` beside the repository's points, each with its owner."""
    return _lifecycle.checkpoints(vm, repo=repo, uri=uri)


def status(vm: str, *, repo: str, uri: str | None = None) -> StatusResult:
    """The backup of ``vm`` running in ``repo`` (or dead, ``stale``), how far it is."""
    return _lifecycle.status(vm, repo=repo, uri=uri)


def abort(vm: str, *, repo: str, uri: str | None = None) -> AbortResult:
    """Stop the running backup of ``vm`` (it aborts its job and cleans up), or finish the
    clean-up of one that died (a frozen guest is thawed first)."""
    return _lifecycle.abort(vm, repo=repo, uri=uri)
