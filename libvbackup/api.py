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
     +-- ToolError             exit 8   qemu-img / qemu-nbd / libguestfs failed
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

from typing import TYPE_CHECKING, Callable, Sequence

# The operation modules are imported by the functions that use them: a command (or a program)
# then loads only what its operation needs (README, "Where the time goes").
from .errors import UsageError
from .results import ProgressEvent
from .progress import MODES
from .retention import Policy

if TYPE_CHECKING:  # annotations only: the outcome classes load with the operations that make them
    from .mapping import Mapping
    from .outcomes import (AbortResult, CheckpointsResult, CopyResult, DefinedResult, ExtractResult, FilesResult,
                           FinalizeResult, InPlaceResult, InstantResult, ListResult, RestoreResult, StatusResult,
                           VerifyResult)
    from .results import BackupResult, PruneResult, RunReport, VmRun

__all__ = ["pull", "push", "backup_many", "list_points", "restore", "verify", "prune", "run", "map_point", "checkpoints",
           "status", "abort", "files", "extract", "ProgressEvent", "Mapping",
           "finalize"]

OnProgress = Callable[[ProgressEvent], None]


def __getattr__(name: str):
    if name == "Mapping":  # what map_point returns (its module loads only when asked for)
        from .mapping import Mapping

        return Mapping
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _progress(on_progress: OnProgress | None, progress: str) -> object:
    if progress not in MODES:
        raise UsageError(f"progress {progress!r}: use one of {', '.join(MODES)}")
    return on_progress if on_progress is not None else progress


def pull(vm: str, *, repo: str, uri: str | None = None, level: str | None = None, incremental: str | None = None,
         checkpoint: str | None = None, disks: Sequence[str] = (), exclude: Sequence[str] = (),
         quiesce: str = "auto", scratch_dir: str | None = None, scratch_limit: int | None = None,
         dry_run: bool = False, on_progress: OnProgress | None = None, progress: str = "none",
         nbd_address: str | None = None, nbd_port: str | None = None, tls_dir: str | None = None,
         tls: bool = True, compress: bool = False) -> BackupResult:
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
    ``compress``: the images' clusters compressed (zstd when python3-zstandard is installed, else
    zlib), each on its own; ``compression`` and ``stored_bytes`` of each disk of the result.
    """
    from . import backup as _backup

    return _backup.backup(vm, mode="pull", repo=repo, uri=uri, checkpoint=checkpoint, incremental=incremental,
                          level=level, disks=disks, exclude=exclude, scratch_dir=scratch_dir, dry_run=dry_run,
                          progress=_progress(on_progress, progress), scratch_limit=scratch_limit, quiesce=quiesce,
                          nbd_address=nbd_address, nbd_port=nbd_port, tls_dir=tls_dir, tls=tls, compress=compress)


def push(vm: str, *, repo: str, uri: str | None = None, level: str | None = None, incremental: str | None = None,
         checkpoint: str | None = None, disks: Sequence[str] = (), exclude: Sequence[str] = (),
         quiesce: str = "auto", scratch_dir: str | None = None, scratch_limit: int | None = None,
         dry_run: bool = False, on_progress: OnProgress | None = None, progress: str = "none",
         nbd_address: str | None = None, nbd_port: str | None = None, tls_dir: str | None = None,
         tls: bool = True) -> BackupResult:
    """Push-mode backup: QEMU writes each disk's image itself (into ``scratch_dir``, best on
    the repository's file system), then libvbackup checks and moves it into the repository.
    Same arguments and result as ``pull``."""
    from . import backup as _backup

    return _backup.backup(vm, mode="push", repo=repo, uri=uri, checkpoint=checkpoint, incremental=incremental,
                          level=level, disks=disks, exclude=exclude, scratch_dir=scratch_dir, dry_run=dry_run,
                          progress=_progress(on_progress, progress), scratch_limit=scratch_limit, quiesce=quiesce,
                          nbd_address=nbd_address, nbd_port=nbd_port, tls_dir=tls_dir, tls=tls)


def _s3(repo: str | None) -> bool:
    return bool(repo) and str(repo).startswith("s3://")


def _local_only(what: str, **given) -> None:
    if any(given.values()):
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k, v in given.items() if v)} "
                         f"apply to s3:// repositories only ({what})")


def list_points(vm: str, *, repo: str, key_file: str | None = None, s3_endpoint: str | None = None,
                no_encrypt: bool = False) -> ListResult:
    """The VM's backup points in ``repo`` (a directory, or ``s3://BUCKET/PREFIX``), oldest first."""
    if _s3(repo):
        from . import s3repo

        return s3repo.list_points(vm, repo=repo, endpoint=s3_endpoint, key_file=key_file, no_encrypt=no_encrypt)
    _local_only("list", key_file=key_file, s3_endpoint=s3_endpoint, no_encrypt=no_encrypt)
    from . import restore as _restore

    return _restore.list_points(vm, repo=repo)


def copy(vms: Sequence[str] = (), *, repo: str, to: str, all_vms: bool = False, key_file: str | None = None,
         s3_endpoint: str | None = None, no_encrypt: bool = False, dry_run: bool = False,
         on_progress: OnProgress | None = None, progress: str = "none") -> CopyResult:
    """Copy the completed points of ``vms`` (or ``all_vms``) from the local ``repo`` to the
    bucket ``to`` (``s3://BUCKET/PREFIX``), oldest first, each only if the bucket lacks it.
    Encrypted on this host with ``key_file`` unless ``no_encrypt``; a point appears in the
    bucket when all its objects are there; an interrupted copy resumes where it stopped."""
    from . import s3repo

    if _s3(repo):
        raise UsageError("copy reads a local repository (--repo DIR) and writes a bucket (--to s3://…)")
    return s3repo.copy(vms, repo=repo, to=to, all_vms=all_vms, endpoint=s3_endpoint, key_file=key_file,
                       no_encrypt=no_encrypt, dry_run=dry_run, progress=_progress(on_progress, progress))


def restore(vm: str, *, repo: str, output: str | None = None, checkpoint: str | None = None,
            format: str = "qcow2", disks: Sequence[str] = (), define: str | None = None, start: bool | None = None,
            in_place: bool = False, confirm: bool = False, uri: str | None = None,
            on_progress: OnProgress | None = None, progress: str = "none",
            instant: bool = False, key_file: str | None = None, s3_endpoint: str | None = None,
            no_encrypt: bool = False, compress: bool = False) -> RestoreResult | DefinedResult | InPlaceResult | InstantResult:
    """Restore point ``checkpoint`` (default: the newest) of ``vm``.

    - ``output``: a new or empty directory; ``<disk>.<format>`` standalone images in it
      (``RestoreResult``). ``disks`` restricts the disks.
    - ``output`` and ``define=NAME`` (``start`` to start it): a new domain NAME defined from the
      domain XML saved with the point, its disks the restored images (``DefinedResult``).
    - ``in_place=True`` and ``confirm=True``: the shut-off VM's own disk files get the point's
      data and its checkpoints are dropped; its next backup is a full one (``InPlaceResult``).
    - ``instant=True``, ``output`` and ``define=NAME``: domain NAME runs within seconds (``start``
      defaults to True) on new qcow2 overlays in ``output`` whose backing is the point's chain,
      served read-only over NBD by detached qemu-nbd processes (``InstantResult``); its writes go
      to the overlays. Until ``finalize(NAME)`` the repository keeps the points it reads.
    - ``compress``: the ``output`` images (qcow2) have compressed clusters, as ``pull``'s.
    """
    progress = _progress(on_progress, progress)
    if compress and (format != "qcow2" or instant or define or in_place or _s3(repo)):
        raise UsageError("--compress restores qcow2 images into --output DIR only (not raw, --define, "
                         "--instant, --in-place or a bucket)")
    if _s3(repo):
        if instant or define or in_place or start:
            raise UsageError("a bucket restores images only (--output DIR); restore them, or copy the points "
                             "to a local repository, for --define, --instant or --in-place")
        if output is None:
            raise UsageError("--output DIR is required")
        from . import s3repo

        return s3repo.restore(vm, repo=repo, output=output, checkpoint=checkpoint, fmt=format, disks=disks,
                              progress=progress, endpoint=s3_endpoint, key_file=key_file, no_encrypt=no_encrypt)
    _local_only("restore", key_file=key_file, s3_endpoint=s3_endpoint, no_encrypt=no_encrypt)
    from . import instant as _instant, restore as _restore, vmrestore as _vmrestore

    if instant:
        if in_place or disks or format != "qcow2":
            raise UsageError("--instant takes none of --in-place, --disk, --format (the overlays are qcow2)")
        if not define or output is None:
            raise UsageError("--instant needs --define NAME and --output DIR (the overlays go there)")
        return _instant.restore_instant(vm, repo=repo, output=output, name=define, checkpoint=checkpoint,
                                        start=True if start is None else start, uri=uri)
    start = bool(start)
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
                            progress=progress, compress=compress)


def finalize(name: str, *, uri: str | None = None, on_progress: OnProgress | None = None,
             progress: str = "none") -> FinalizeResult:
    """Make instant VM ``name`` (``restore(..., instant=True)``) independent of the repository:
    each disk's chain is pulled into its overlay while the VM runs (``virDomainBlockPull``; a
    shut-off VM: ``qemu-img rebase`` offline), then its NBD servers are stopped and its record
    removed, so that prune may remove the points it read."""
    from . import instant as _instant

    return _instant.finalize(name, uri=uri, progress=_progress(on_progress, progress))


def verify(vm: str, *, repo: str, checkpoint: str | None = None, key_file: str | None = None,
           s3_endpoint: str | None = None, no_encrypt: bool = False) -> VerifyResult:
    """Re-read every image of each point's chain (or of ``checkpoint`` only) and compare it with
    the checksums taken at backup time. ``ok`` is False when anything is missing or damaged;
    the points and disks say what (the command line then exits 9)."""
    if _s3(repo):
        from . import s3repo

        return s3repo.verify(vm, repo=repo, checkpoint=checkpoint, endpoint=s3_endpoint, key_file=key_file,
                             no_encrypt=no_encrypt)
    _local_only("verify", key_file=key_file, s3_endpoint=s3_endpoint, no_encrypt=no_encrypt)
    from . import verify as _verify

    return _verify.verify(vm, repo=repo, checkpoint=checkpoint)


def prune(vm: str, *, repo: str, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
          keep_monthly: int = 0, keep_yearly: int = 0, uri: str | None = None, dry_run: bool = False,
          key_file: str | None = None, s3_endpoint: str | None = None, no_encrypt: bool = False) -> PruneResult:
    """Keep the points the rules select (borg's semantics, see ``libvbackup.retention``); every kept
    point stays restorable (rebased onto its nearest kept ancestor, or made standalone); the
    others and their libvirt checkpoints are removed. The newest point is always kept."""
    policy = Policy(last=keep_last, daily=keep_daily, weekly=keep_weekly, monthly=keep_monthly, yearly=keep_yearly)
    if _s3(repo):
        from . import s3repo

        return s3repo.prune(vm, repo=repo, keep=policy, dry_run=dry_run, endpoint=s3_endpoint, key_file=key_file,
                            no_encrypt=no_encrypt)
    _local_only("prune", key_file=key_file, s3_endpoint=s3_endpoint, no_encrypt=no_encrypt)
    from . import prune as _prune

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
    from . import config as _config, runner as _runner

    return _runner.run_policies(_config.load(config), vms=list(vms) or None, jobs=jobs, dry_run=dry_run,
                                on_event=on_vm)


def map_point(vm: str, *, repo: str, checkpoint: str | None = None, disk: str | None = None,
              port: int | None = None, address: str | None = None, tls_dir: str | None = None) -> Mapping:
    """Serve one disk of a point (default: the newest; ``disk`` needed when it has several)
    read-only over NBD, with its backing chain: a private unix socket, or TCP ``port`` on
    ``address`` (127.0.0.1; any other address needs ``tls_dir`` with a server certificate).
    Returns a ``Mapping`` (``.uri``, ``.result``): use it in a ``with`` or ``close()`` it."""
    from . import mapping as _mapping

    return _mapping.map_point(vm, repo=repo, checkpoint=checkpoint, disk=disk, port=port, address=address,
                              tls_dir=tls_dir)


def files(vm: str, *, repo: str, checkpoint: str | None = None, disk: str | None = None, path: str = "/",
          fs: str | None = None) -> FilesResult:
    """List directory ``path`` (default ``/``) of a point's file system (default: the newest
    point; ``disk`` needed when it has several; ``fs``, e.g. ``/dev/sda1``, when the disk holds
    several file systems), read-only through libguestfs; a path that is not a directory gives
    that entry alone. NotFound: no such path, or no file system on the disk."""
    from . import guestfiles as _guestfiles

    return _guestfiles.files(vm, repo=repo, checkpoint=checkpoint, disk=disk, path=path, fs=fs)


def extract(vm: str, *, repo: str, paths: Sequence[str], output: str, checkpoint: str | None = None,
            disk: str | None = None, fs: str | None = None, force: bool = False, progress: str = "none",
            on_progress: OnProgress | None = None) -> ExtractResult:
    """Copy files and directory trees of a point's file system into ``output`` (created when
    missing): ``output/<name>`` per path (``/``: its contents into ``output``), modes, owners
    and modification times kept, symlinks as symlinks, device nodes, fifos and sockets skipped (named in
    the result). Refuses to overwrite anything unless ``force``; on failure what it wrote is
    removed. Disk and file system chosen as for ``files``."""
    from . import guestfiles as _guestfiles

    return _guestfiles.extract(vm, repo=repo, paths=paths, output=output, checkpoint=checkpoint, disk=disk, fs=fs,
                               force=force, progress=_progress(on_progress, progress))


def backup_many(vms: Sequence[str] = (), *, all_vms: bool = False, repo: str, mode: str = "pull",
                uri: str | None = None, level: str | None = None, quiesce: str = "auto",
                scratch_dir: str | None = None, jobs: int = 2, dry_run: bool = False,
                on_vm: Callable[[VmRun], None] | None = None, compress: bool = False) -> RunReport:
    """Back up several VMs at once (``vms``, or ``all_vms``: every domain of the libvirt at
    ``uri``), ``jobs`` at a time, each as ``pull``/``push`` would with these arguments; no
    pruning. One VM's failure never stops the others (see ``run`` for the report)."""
    from . import config as _config, runner as _runner

    if bool(vms) == all_vms:
        raise UsageError("name the VMs to back up, or ask for all of them (--all), not both")
    if compress and mode != "pull":
        raise UsageError("--compress is for pull backups: in push mode QEMU writes the images")
    settings = dict(repo=repo, scratch_dir=scratch_dir, uri=uri, mode=mode, level=level or "full", quiesce=quiesce,
                    compress=compress)
    policy = _config.Policy(index=0, match=tuple(vms) or ("*",), settings=_config.Settings(**settings), keep=None)
    config = _config.Config(None, _config.Defaults(**settings, jobs=jobs), (policy,))
    return _runner.run_policies(config, vms=list(vms) or None, jobs=jobs, dry_run=dry_run, on_event=on_vm)


def checkpoints(vm: str, *, repo: str, uri: str | None = None) -> CheckpointsResult:
    """libvirt's checkpoints of ``vm`` beside the repository's points, each with its owner."""
    from . import lifecycle as _lifecycle

    return _lifecycle.checkpoints(vm, repo=repo, uri=uri)


def status(vm: str, *, repo: str, uri: str | None = None) -> StatusResult:
    """The backup of ``vm`` running in ``repo`` (or dead, ``stale``), how far it is."""
    from . import lifecycle as _lifecycle

    return _lifecycle.status(vm, repo=repo, uri=uri)


def abort(vm: str, *, repo: str, uri: str | None = None) -> AbortResult:
    """Stop the running backup of ``vm`` (it aborts its job and cleans up), or finish the
    clean-up of one that died (a frozen guest is thawed first)."""
    from . import lifecycle as _lifecycle

    return _lifecycle.abort(vm, repo=repo, uri=uri)
