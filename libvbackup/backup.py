"""The backup pipeline, the same for every transport (pull, push).

::

    look (read-only)  ->  plan (pure, may refuse)          nothing exists yet: bad input stops here
    lock the VM       ->  recover a dead run's leftovers   (journal.recover)
                      ->  plan again only if the repository or libvirt changed meanwhile
                      ->  redefine lost checkpoints        (a step of the plan; undone if refused)
    journal DIRS      ->  run dir, <chk>.partial/          each state recorded before its effect
                      ->  JOB: the transport (``pull``/``push``) starts the job and fills the images
                      ->  commit: sums, fsync, rename, manifest (``Repository.commit_point``)
                      ->  journal removed

A point enters the manifest only after all of its disks are complete and on disk. On any
failure the job is aborted, the new checkpoint is deleted (its backup never completed, so no
incremental may build on it), and the partial images and scratch files are removed; a run
that was killed is cleaned up by the next one, which finds its journal under the lock.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pathlib
import stat
import time
from typing import Callable, Sequence

from . import checkpoints, domxml, journal, manifest as mf
from . import netexport, quiesce, scratch, xmlgen
from .documents import Documents, documents
from .errors import Error, Interrupted, LibvirtError, RepositoryError, StateError, UsageError
from .journal import RunRecord, RunState
from .plan import ParentChoice, choose_parent, needs_bitmap, plan_backup
from .repo import Repository
from .results import BackupDisk, BackupResult
from .signals import deferred, raising, umask
from .transport import DiskResult, RunContext
from .virt import Connection

log = logging.getLogger(__name__)

MODES = ("pull", "push")  # what a caller asks for; a shut-off VM's pull goes offline
TRANSPORTS = ("pull", "push", "offline")  # modules with run(RunContext): imported by the run that uses one


def _transport(name: str):
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}")
    return importlib.import_module(f".{name}", __package__).run


def _offline_validator(dom, manifest):
    from . import offline  # a shut-off VM's images: only that run needs the module

    return offline.validator(dom, manifest)


@dataclasses.dataclass(frozen=True)
class Request:
    """What the caller asked for, as given."""

    vm: str
    mode: str = "pull"
    checkpoint: str | None = None
    incremental: str | None = None
    level: str | None = None
    disks: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    scratch_dir: str | None = None
    quiesce: str = "auto"
    nbd_address: str | None = None
    nbd_port: str | None = None
    tls_dir: str | None = None
    tls: bool = True
    compress: bool = False

    @property
    def requested_level(self) -> str:
        return self.level or ("inc" if self.incremental else "full")


@dataclasses.dataclass(frozen=True)
class Planned:
    domain_xml: str
    docs: Documents
    manifest: mf.Manifest
    choice: ParentChoice
    quiesce: quiesce.QuiescePlan
    seen: tuple
    offline: bool = False  # the VM is shut off: its images are read directly (``offline``)
    mode: str = "pull"
    net: netexport.NetExport | None = None  # the export is on TCP (remote libvirt)
    remote: bool = False  # libvirt runs on another host
    unchecked: str | None = None  # the parent checkpoint, its bitmaps left for backupBegin to check

    @property
    def transport(self) -> str:
        return "offline" if self.offline else self.mode  # what the plan was made from, to tell whether it must be made again


def pull(vm: str, **kw) -> BackupResult:
    """Pull-mode backup: libvirt exports each disk over NBD and libvbackup copies it."""
    return backup(vm, mode="pull", **kw)


def push(vm: str, **kw) -> BackupResult:
    """Push-mode backup: QEMU writes each disk into an image libvbackup prepared."""
    return backup(vm, mode="push", **kw)


def backup(
    vm: str,
    *,
    mode: str = "pull",
    repo: str,
    uri: str | None = None,
    checkpoint: str | None = None,
    incremental: str | None = None,
    level: str | None = None,
    disks: Sequence[str] = (),
    exclude: Sequence[str] = (),
    scratch_dir: str | None = None,
    dry_run: bool = False,
    progress: str = "none",
    scratch_limit: int | None = None,
    quiesce: str = "auto",
    nbd_address: str | None = None,
    nbd_port: str | None = None,
    tls_dir: str | None = None,
    tls: bool = True,
    on_job_started: Callable[[], None] | None = None,
    compress: bool = False,
) -> BackupResult:
    """Take a backup of a running VM (``mode`` pull or push).

    ``quiesce``: ``auto`` freezes the guest's file systems through its agent while the job
    begins when an agent is connected, and warns otherwise (the point is then crash-consistent);
    ``yes`` refuses to run without a connected agent; ``no`` never freezes. The guest is thawed
    as soon as the job exists, in every path (``quiesce``).

    With a remote ``uri`` (or ``nbd_address``) the pull export is on TCP, TLS required unless
    ``tls`` is False (``netexport``); ``scratch_dir`` then names a directory on the hypervisor.

    ``on_job_started`` is called once the point in time is fixed (job and checkpoint exist)
    and before copying starts: the place to thaw guest file systems frozen before the call.
    Guest writes during the backup go to scratch images; the run is aborted (never the guest)
    past ``scratch_limit`` bytes or when the scratch file system runs low (``scratch``).

    ``compress`` (pull): the images' clusters are compressed (zstd, else zlib), each on its
    own; what does not compress is stored as it is.
    """
    if mode not in MODES:
        raise UsageError(f"unknown backup mode {mode!r}; use pull or push")
    if compress and mode == "push":
        raise UsageError("--compress is for pull backups: in push mode QEMU writes the images",
                         "use pull, or compress a point later with qemu-img convert -c")
    req = Request(vm, mode, checkpoint, incremental, level, tuple(disks), tuple(exclude), scratch_dir, quiesce,
                  nbd_address, nbd_port, tls_dir, tls, compress)
    repository = Repository(repo)
    if dry_run:
        repository.check_readable()
    else:
        repository.check_writable(create_default=True)
    with Connection(uri) as conn:
        dom = conn.domain(vm)
        if not dry_run and repository.has_run(vm) and not repository.run_is_live(vm):
            # A run died: finish its clean-up before its checkpoint confuses the plan.
            with repository.lock(vm), umask(0o077):
                journal.recover(repository, vm, dom)
        # The parent's bitmaps are checked by backupBegin itself (a dry run asks libvirt first).
        planned = _plan(dom, repository, req, checked=dry_run)
        if dry_run:
            return _result(repository, planned, req, None, dry_run=True)
        with repository.lock(vm), raising(), umask(0o077):
            journal.recover(repository, vm, dom)
            if _seen(dom, repository, vm) != planned.seen:
                planned = _plan(dom, repository, req, checked=False)  # another run changed things meanwhile
            while True:
                planned = _redefine(dom, repository, req, planned)
                if planned.choice.reason:
                    log.info("%s", planned.choice.reason)
                try:
                    return _execute(repository, dom, planned, req, progress, scratch_limit, on_job_started)
                except LibvirtError as e:
                    if planned.unchecked is None or not checkpoints.bitmap_lost(e.message):
                        raise
                    # Refused over the parent's bitmaps, nothing created (the run cleaned up): plan
                    # again with them validated first, as a plan without trust does (auto: full).
                    log.info("%s; planning again with checkpoint %s validated", e.message, planned.unchecked)
                journal.recover(repository, vm, dom)
                planned = _plan(dom, repository, req)


def _seen(dom, repository: Repository, vm: str) -> tuple:
    try:
        st = repository.manifest_path(vm).stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        stamp = None
    return stamp, frozenset(dom.checkpoint_names())


def _running_job_error(dom, repository: Repository) -> StateError:
    vm = dom.name
    ours = checkpoints.running_backup(dom)
    if ours is not None:
        chk, repo = ours
        if repo == str(repository.root):
            holder = repository.lock_holder(vm)
            where = "this repository" + (f", pid {holder}" if holder and holder > 0 else "")
        else:
            where = f"repository {repo or 'unknown'}"
        return StateError(f"VM {vm!r} is being backed up by another libvbackup run for {where} "
                          f"(checkpoint {chk})",
                          "wait for it to finish, or see: libvbackup status " + vm
                          + ("" if repo is None else f" --repo {repo}"))
    return StateError(f"VM {vm!r} already has a backup job running (another tool's?)",
                      f"if it is stuck, end it with: virsh domjobabort {vm}")


def _plan(dom, repository: Repository, req: Request, failed: dict[str, str] | None = None,
          checked: bool = True) -> Planned:
    """Look (read-only) and plan (pure): every check before anything exists; ``checked``
    False: a running VM's parent checkpoint is not validated here (backupBegin does)."""
    vm = dom.name
    running = dom.is_running()
    if not running:
        if req.mode == "push":
            raise StateError(f"VM {vm!r} is shut off; a push backup needs QEMU running",
                             f"use pull: it backs up a shut-off VM from its images (libvbackup pull {vm})")
        if not dom.local:
            raise StateError(f"VM {vm!r} is shut off and libvirt is remote: an offline backup reads the "
                             "images, which are on the hypervisor",
                             "start the VM, or run libvbackup on the hypervisor")
    elif dom.has_backup_job():
        raise _running_job_error(dom, repository)
    net = netexport.plan(dom.uri, dom.local, req.nbd_address, req.nbd_port, req.tls_dir, req.tls)
    if net is not None and req.mode == "push":
        raise UsageError("push mode needs libvirt on this host (QEMU writes the images where it runs); "
                         "back up a remote VM with pull" if not dom.local else
                         "--nbd-address is for pull mode (push writes images, it exports nothing)")
    seen = _seen(dom, repository, vm)
    domain_xml = dom.xml()
    chosen = domxml.select_disks(domxml.parse_disks(domain_xml), req.disks, req.exclude)
    manifest = repository.load(vm)
    sizes = {d.target: dom.disk_capacity(d.target) for d in chosen}
    identities = _identities(dom, chosen)
    probe = checkpoints.Probe(dom, manifest, failed,
                              needed=lambda chk: needs_bitmap(manifest.get(chk), chosen, sizes, identities),
                              validate=None if running else _offline_validator(dom, manifest), names=seen[1],
                              trust=running and not checked)
    choice = choose_parent(manifest, level=req.level, incremental=req.incremental, unusable=probe.unusable)
    plan = plan_backup(manifest, chosen, libvirt_checkpoints=probe.checkpoint_names, checkpoint=req.checkpoint,
                       incremental=choice.parent, prefix=repository.checkpoint_prefix, sizes=sizes,
                       redefine=probe.needs_redefine, identities=identities)
    for d in plan.disks:
        if d.backing and not repository.image(vm, d.backing).is_file():
            raise RepositoryError(f"image {repository.image(vm, d.backing)} of point {plan.parent!r} is missing",
                                  "run a full backup (--level full) to start a new chain")
    if running:
        qplan = quiesce.plan(vm, req.quiesce, domxml.agent_state(domain_xml))
    else:  # nothing to freeze: the disks are at rest
        qplan = quiesce.QuiescePlan(req.quiesce, False, "the VM is shut off")
    if dom.local:
        scratch_base = scratch.base(req.scratch_dir)
    else:  # a directory of the hypervisor: nothing here can check it (libvirt does at backupBegin)
        scratch_base = scratch.remote_base(req.scratch_dir)
    run_dir = scratch.run_dir(scratch_base, vm, plan.checkpoint)
    tcp = xmlgen.TcpServer(net.address, net.ports[0], net.tls) if net else None
    docs = documents(plan, run_dir, str(repository.root), req.mode, tcp=tcp, remote=not dom.local)
    unchecked = plan.parent if probe.trust and plan.parent in probe.names else None
    return Planned(domain_xml, docs, manifest, choice, qplan, seen, offline=not running, mode=req.mode,
                   net=net, remote=not dom.local, unchecked=unchecked)


def _identities(dom, disks) -> dict[str, str]:
    """"device:inode" of each disk's source file, when libvirt runs on this host: a file put in
    place of another at the same path is another image, whatever its name."""
    if not dom.local:
        return {}
    out = {}
    for d in disks:
        try:
            st = os.stat(d.source)
        except (OSError, TypeError):
            continue
        if stat.S_ISREG(st.st_mode):
            out[d.target] = f"{st.st_dev}:{st.st_ino}"
    return out


def _redefine(dom, repository: Repository, req: Request, planned: Planned) -> Planned:
    """Carry out the plan's redefinitions; when libvirt refuses one, plan again knowing it
    (``--level auto`` then takes a full backup, an explicit request is refused)."""
    names = planned.docs.plan.redefine
    if not names:
        return planned
    failure = checkpoints.redefine(dom, planned.manifest, names)
    if failure is None:
        return planned
    return _plan(dom, repository, req, failed={failure.checkpoint: failure.reason})


def _execute(repository: Repository, dom, planned: Planned, req: Request, progress: str,
             scratch_limit: int | None, on_job_started) -> BackupResult:
    docs, plan = planned.docs, planned.docs.plan
    vm = plan.vm
    partial = repository.partial_dir(vm, plan.checkpoint)
    # The first record on disk is DIRS: PLANNED (nothing exists) needs no record of its own, and
    # writing it first cost two fsyncs that recorded nothing new.
    record = RunRecord(vm=vm, checkpoint=plan.checkpoint, mode=planned.transport, started=journal.now(),
                       pid=os.getpid(), run_dir=None if planned.remote else str(docs.run_dir), partial=str(partial),
                       final=str(repository.point_dir(vm, plan.checkpoint)), state=RunState.DIRS)
    t0 = time.monotonic()
    repository.ensure_vm_dir(vm)
    journal.write(repository, record)
    ctx: RunContext | None = None
    try:
        if not planned.remote:
            scratch.make_run_dir(docs.run_dir)
        partial.mkdir(mode=0o700)
        record.state = RunState.JOB
        journal.write(repository, record)
        def frozen(state: bool) -> None:
            record.frozen = state
            journal.write(repository, record)

        freezer = quiesce.Freezer(dom, planned.quiesce, dom.uri, frozen)
        ctx = RunContext(repository, dom, docs, planned.manifest, partial, progress, scratch_limit, on_job_started,
                         freezer, planned.net, planned.remote, compress=req.compress)
        results = _transport(planned.transport)(ctx)
        point = _point(repository, dom, planned, req, record, results, time.monotonic() - t0, freezer)
        repository.commit_point(planned.manifest, point)
        _end_job(ctx, vm, plan.checkpoint)
        journal.cleanup(repository, dom, record)  # the point is in the manifest: only the run dir goes
    except BaseException as e:
        if ctx is not None:
            ctx.forget_job()
        with deferred() as pending:
            try:
                journal.cleanup(repository, dom, record)
            except Error as ce:
                log.error("clean-up after the failed backup was incomplete: %s", ce)
        if pending and not isinstance(e, Interrupted):
            raise Interrupted(pending[0]) from e
        if isinstance(e, Error) and not isinstance(e, Interrupted) and not planned.offline and not _still_running(dom):
            raise StateError(f"VM {vm!r} stopped during the backup (QEMU exited); the backup was "
                             "abandoned and cleaned up",
                             "start the VM again and take a full backup (--level auto does)") from e
        raise
    return _result(repository, planned, req, point, note=freezer.note)


def _end_job(ctx: RunContext, vm: str, checkpoint: str) -> None:
    try:
        ctx.end_job()
    except LibvirtError as e:
        raise LibvirtError(f"point {checkpoint} is complete and in the repository; {e.message}",
                           f"end the job by hand: virsh domjobabort {vm}") from e


def _still_running(dom) -> bool:
    try:
        return dom.is_running()
    except Error:
        return True  # cannot tell: report the original error


def _point(repository: Repository, dom, planned: Planned, req: Request, record: RunRecord,
           results: list[DiskResult], seconds: float, freezer: quiesce.Freezer) -> mf.Point:
    plan = planned.docs.plan
    by_name = {d.name: d for d in plan.disks}
    disks = {
        r.name: mf.PointDisk(
            name=r.name, image=repository.image_name(plan.checkpoint, r.name), backing=by_name[r.name].backing,
            size=r.size, bytes_copied=r.bytes_copied, bytes_zeroed=r.bytes_zeroed,
            bitmap=by_name[r.name].bitmap, source_format=by_name[r.name].format,
            blkhash=r.blkhash, block_size=r.block, checksum=r.algorithm, sums_format=r.sums_format,
            reason=by_name[r.name].reason, identity=by_name[r.name].identity,
            compression=r.compression, stored_bytes=_stored(record, r.name),
        )
        for r in results
    }
    planned.manifest.uuid = planned.manifest.uuid or dom.uuid()
    return mf.Point(checkpoint=plan.checkpoint, parent=plan.parent, level=plan.level, mode=planned.transport,
                    started=record.started, completed=journal.now(), seconds=round(seconds, 3), disks=disks,
                    domain_xml=planned.domain_xml, checkpoint_xml=dom.checkpoint_xml(plan.checkpoint),
                    consistency="offline" if planned.offline else freezer.consistency,
                    frozen_seconds=freezer.frozen_seconds)


def _stored(record: RunRecord, disk: str) -> int | None:
    """The bytes the image takes in the repository (its file size)."""
    try:
        return os.stat(Repository.image_file(pathlib.Path(record.partial), disk)).st_size
    except (OSError, TypeError):
        return None


def _result(repository: Repository, planned: Planned, req: Request, point: mf.Point | None,
            dry_run: bool = False, note: str | None = None) -> BackupResult:
    plan = planned.docs.plan
    disks = {}
    for d in plan.disks:
        pd = point.disks[d.name] if point is not None else None
        disks[d.name] = BackupDisk(
            name=d.name, mode="full" if d.full else "incremental", reason=d.reason, bitmap=d.bitmap,
            image=str(repository.image(plan.vm, pd.image)) if pd else None, backing=d.backing, size=pd.size if pd else d.size,
            bytes_copied=pd.bytes_copied if pd else 0, bytes_zeroed=pd.bytes_zeroed if pd else 0,
            compression=pd.compression if pd else None, stored_bytes=pd.stored_bytes if pd else None)
    return BackupResult(
        vm=plan.vm, checkpoint=plan.checkpoint, parent=plan.parent, level=plan.level, mode=planned.transport,
        requested_level=req.requested_level, fallback_reason=planned.choice.reason, redefined=plan.redefine,
        disks=disks, seconds=point.seconds if point is not None else None, dry_run=dry_run,
        consistency=point.consistency if point is not None else (
            "offline" if planned.offline else "quiesced" if planned.quiesce.freeze else "crash"),
        frozen_seconds=point.frozen_seconds if point is not None else None,
        consistency_note=note if point is not None else planned.quiesce.why_not,
        backup_xml=planned.docs.backup_xml if dry_run else None,
        checkpoint_xml=planned.docs.checkpoint_xml if dry_run else None)
