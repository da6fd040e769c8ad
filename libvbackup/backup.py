"""Pull-mode backup: libvirt exports a point-in-time view over NBD, we copy it into qcow2.

Order of a run, each step recorded in ``<vm>/.run.json`` *before* it creates anything, so
that a later run can finish the clean-up of a run that died (``recover``)::

    plan (pure, may refuse)  ->  journal  ->  scratch dir  ->  <chk>.partial/
      ->  backupBegin (job + checkpoint)  ->  images + copy  ->  flush  ->  abortJob
      ->  rename <chk>.partial/ to <chk>/  ->  manifest (atomic)  ->  journal removed

A point enters the manifest only after all of its disks are complete and flushed. On any
failure the job is aborted, the new checkpoint is deleted (its backup never completed, so no
incremental may build on it), and the partial images and scratch files are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import subprocess
import datetime
import logging
import os
import pathlib
import pwd
import shutil
import signal
import threading
import time
from typing import Callable, Iterator, Sequence

from . import checksum, domxml, manifest as mf, nbdio, qemuimg, target as tgt, xmlgen
from .errors import CopyError, Error, Interrupted, RepositoryError, StateError, UsageError
from .plan import BackupPlan, ParentChoice, choose_parent, plan_backup
from .progress import Progress
from .repo import Repository, fsync_dir
from .virt import Connection, Domain

log = logging.getLogger(__name__)

DEFAULT_SCRATCH_BASE = "/var/tmp"
SCRATCH_RESERVE = 256 << 20  # abort the backup before the scratch file system has less free
WATCH_INTERVAL = 0.5
QEMU_USERS = ("libvirt-qemu", "qemu")
_JOB_OPERATION_BACKUP = 9  # libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP (this module does not import libvirt)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _qemu_ids() -> tuple[int, int] | None:
    for name in QEMU_USERS:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    return None


@dataclasses.dataclass(frozen=True)
class Documents:
    plan: BackupPlan
    run_dir: pathlib.Path
    socket: str | None
    backup_xml: str
    checkpoint_xml: str
    mode: str = "pull"


def checkpoint_description(plan: BackupPlan, repository: Repository | None) -> str:
    where = f" in repository {repository.root}" if repository is not None else ""
    return f"libvbackup {plan.level} backup of {plan.vm}{where}"


def documents(plan: BackupPlan, run_dir: pathlib.Path, repository: Repository | None = None,
              mode: str = "pull") -> Documents:
    """The <domainbackup> and <domaincheckpoint> for a plan; names derive from ``run_dir``.

    Pull: an NBD socket and one scratch image per disk there. Push: one target image per disk.
    """
    socket = str(run_dir / "nbd.sock") if mode == "pull" else None
    bdisks = [
        xmlgen.BackupDisk(name=d.name, full=d.full,
                          scratch=str(run_dir / f"{d.name}.scratch.qcow2") if mode == "pull" else None,
                          target=str(run_dir / f"{d.name}.qcow2") if mode == "push" else None)
        for d in plan.disks
    ]
    bspec = xmlgen.BackupSpec(socket=socket, disks=bdisks, incremental=plan.parent)
    build = xmlgen.backup_pull_xml if mode == "pull" else xmlgen.backup_push_xml
    cspec = xmlgen.CheckpointSpec(
        name=plan.checkpoint,
        disks=[xmlgen.CheckpointDisk(d.name, d.bitmap) for d in plan.disks],
        description=checkpoint_description(plan, repository),
    )
    return Documents(plan, run_dir, socket, build(bspec), xmlgen.checkpoint_xml(cspec), mode)


def plan_summary(plan: BackupPlan) -> dict:
    return {
        "vm": plan.vm,
        "checkpoint": plan.checkpoint,
        "parent": plan.parent,
        "level": plan.level,
        "disks": {
            d.name: {"mode": "full" if d.full else "incremental", "bitmap": d.bitmap, "reason": d.reason}
            for d in plan.disks
        },
    }


def _scratch_base(scratch_dir: str | None) -> pathlib.Path:
    base = pathlib.Path(scratch_dir or DEFAULT_SCRATCH_BASE).absolute()
    if not base.is_dir():
        raise UsageError(f"scratch directory {base} does not exist or is not a directory")
    st = os.statvfs(base)
    if st.f_bavail * st.f_frsize < SCRATCH_RESERVE:
        raise StateError(f"scratch directory {base} has less than {SCRATCH_RESERVE >> 20} MiB free; "
                         "guest writes during the backup would fail",
                         "use --scratch-dir on a file system with more free space")
    return base


def _unusable_fn(dom: Domain, manifest: mf.Manifest, dry_run: bool, redefined: list[str],
                 valid: set[str]):
    """Why a checkpoint of the repository cannot serve an incremental backup, or None.

    When libvirt lost checkpoints (VM undefined and defined again, moved to another host) but
    the bitmaps are still in the qcow2 images, they are redefined from the XML the repository
    saved, oldest first, and validated by libvirt (REDEFINE_VALIDATE). A checkpoint found valid
    is not validated again in the same run (``valid``; the run plans twice, see ``backup``).
    """
    def unusable(chk: str) -> str | None:
        names = set(dom.checkpoint_names())
        if chk not in names:
            if dry_run:
                return f"libvirt lost checkpoint {chk!r}; a real run would redefine it from the repository"
            for p in manifest.chain(chk):
                if p.checkpoint not in names and p.checkpoint_xml:
                    why = dom.redefine_checkpoint(p.checkpoint_xml)
                    if why is None:
                        log.info("redefined checkpoint %s from the repository", p.checkpoint)
                        redefined.append(p.checkpoint)
                        names.add(p.checkpoint)
                    elif p.checkpoint == chk:
                        return f"libvirt lost it and it cannot be redefined: {why}"
            if chk not in names:
                return f"libvirt no longer has checkpoint {chk!r}"
        if chk in valid:
            return None
        why = dom.validate_checkpoint(chk)
        if why is None:
            valid.add(chk)
        return why
    return unusable


def _prepare(dom: Domain, repository: Repository, *, checkpoint, incremental, level=None,
             disks, exclude, scratch_dir, dry_run=False, mode="pull",
             redefined: list | None = None, valid: set | None = None,
             ) -> tuple[str, Documents, mf.Manifest, ParentChoice]:
    vm = dom.name
    if not dom.is_running():
        raise StateError(f"VM {vm!r} is not running; a backup needs a running VM",
                         f"start it with: virsh start {vm}")
    if dom.has_backup_job():
        raise StateError(f"VM {vm!r} already has a backup job running (another tool's?)",
                         f"end it with: virsh domjobabort {vm}")
    domain_xml = dom.xml()
    chosen = domxml.select_disks(domxml.parse_disks(domain_xml), disks, exclude)
    manifest = repository.load(vm)
    choice = choose_parent(manifest, level=level, incremental=incremental,
                           unusable=_unusable_fn(dom, manifest, dry_run,
                                                 redefined if redefined is not None else [],
                                                 valid if valid is not None else set()))
    plan = plan_backup(manifest, chosen, libvirt_checkpoints=dom.checkpoint_names(),
                       checkpoint=checkpoint, incremental=choice.parent,
                       prefix=repository.checkpoint_prefix)
    for d in plan.disks:
        if d.backing and not repository.image(vm, d.backing).is_file():
            raise RepositoryError(
                f"image {repository.image(vm, d.backing)} of point {plan.parent!r} is missing",
                "run a full backup (without --incremental) to start a new chain",
            )
    run_dir = _scratch_base(scratch_dir) / f"libvbackup-{vm}-{plan.checkpoint}"
    return domain_xml, documents(plan, run_dir, repository, mode), manifest, choice


def pull(vm: str, **kw) -> dict:
    """Pull-mode backup: libvirt exports each disk over NBD and libvbackup copies it."""
    return backup(vm, mode="pull", **kw)


def push(vm: str, **kw) -> dict:
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
    on_job_started: Callable[[], None] | None = None,
) -> dict:
    """Take a backup of a running VM (``mode`` pull or push); returns a JSON-able summary.

    ``on_job_started`` is called once the point in time is fixed (job and checkpoint exist)
    and before copying starts: the place to thaw guest file systems frozen before the call.

    Guest writes during the backup copy old data into the scratch images. libvirt 9.0 / QEMU 7.2
    fail the *guest's* write when the scratch space runs out, so the run watches it and aborts
    the backup first: when libvirt reports more than ``scratch_limit`` bytes in use, or when
    less than SCRATCH_RESERVE bytes are left on the scratch file system.
    """
    repository = Repository(repo)
    if dry_run:
        repository.check_readable()
    else:
        repository.check_writable(create_default=True)
    with Connection(uri) as conn:
        dom = conn.domain(vm)
        if not dry_run and repository.read_run(vm) is not None:
            # A run died: finish its clean-up before its checkpoint confuses the plan.
            with repository.lock(vm), _umask(0o077):
                recover(repository, vm, dom)
        redefined: list[str] = []
        kw = dict(checkpoint=checkpoint, incremental=incremental, level=level, disks=disks,
                  exclude=exclude, scratch_dir=scratch_dir, dry_run=dry_run, redefined=redefined,
                  valid=set(), mode=mode)
        # Plan before taking the lock, so that bad input changes nothing, not even a directory.
        domain_xml, docs, manifest, choice = _prepare(dom, repository, **kw)
        extra = {"requested_level": level or ("inc" if incremental else "full"),
                 "fallback_reason": choice.reason, "redefined": redefined}
        if dry_run:
            return {**plan_summary(docs.plan), **extra, "dry_run": True,
                    "backup_xml": docs.backup_xml, "checkpoint_xml": docs.checkpoint_xml}
        if choice.reason:  # reported to the caller in the result; the CLI prints it
            log.info("%s", choice.reason)
        with repository.lock(vm), _signals_raise(), _umask(0o077):
            recover(repository, vm, dom)
            # Plan again under the lock: another run may have changed the repository.
            domain_xml, docs, manifest, choice = _prepare(dom, repository, **kw)
            extra["fallback_reason"] = choice.reason
            result = _run(repository, dom, domain_xml, docs, manifest, progress, on_job_started,
                          scratch_limit)
            return {**result, **extra}


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM raise Interrupted in the main thread, so the run can clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list]:
    """Hold SIGINT/SIGTERM while cleaning up; the caller re-raises what arrived."""
    got: list = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _make_run_dir(path: pathlib.Path) -> None:
    """Private to root and QEMU's user: QEMU creates the socket and scratch images here."""
    path.mkdir(mode=0o700)
    ids = _qemu_ids()
    if ids and os.geteuid() == 0:
        os.chown(path, ids[0], ids[1])


def _run(repository: Repository, dom: Domain, domain_xml: str, docs: Documents,
         manifest: mf.Manifest, progress_mode: str,
         on_job_started: Callable[[], None] | None = None,
         scratch_limit: int | None = None) -> dict:
    plan = docs.plan
    vm = plan.vm
    vm_dir = repository.ensure_vm_dir(vm)
    partial = vm_dir / f"{plan.checkpoint}.partial"
    final = vm_dir / plan.checkpoint
    state = {
        "pid": os.getpid(), "started": _now(), "vm": vm, "checkpoint": plan.checkpoint,
        "run_dir": str(docs.run_dir), "partial": str(partial), "final": str(final), "job": False,
        "mode": docs.mode,
    }
    started, t0 = _now(), time.monotonic()
    repository.write_run(vm, state)
    handles: list = []
    try:
        _make_run_dir(docs.run_dir)
        partial.mkdir(mode=0o700)
        state["job"] = True
        repository.write_run(vm, state)
        log.info("starting %s %s backup %s of %s", plan.level, docs.mode, plan.checkpoint, vm)
        phase = _pull_phase if docs.mode == "pull" else _push_phase
        results = phase(repository, dom, docs, manifest, partial, progress_mode, on_job_started,
                        scratch_limit, handles)
        for d, _size, _stats, hasher in results:
            _write_private(partial / f"{d.name}.sums", hasher.sums)
        chk_xml = dom.checkpoint_xml(plan.checkpoint)

        os.rename(partial, final)
        fsync_dir(vm_dir)
        disks = {
            d.name: mf.PointDisk(
                name=d.name, image=f"{plan.checkpoint}/{d.name}.qcow2", backing=d.backing,
                size=size, bytes_copied=stats.bytes_copied,
                bytes_zeroed=stats.bytes_zeroed, bitmap=d.bitmap, source_format=d.format,
                blkhash=checksum.digest_of(hasher.sums), block_size=hasher.block,
                checksum=hasher.algorithm.name,
            )
            for d, size, stats, hasher in results
        }
        seconds = round(time.monotonic() - t0, 3)
        point = mf.Point(
            checkpoint=plan.checkpoint, parent=plan.parent, level=plan.level, mode=docs.mode,
            started=started, completed=_now(), seconds=seconds, disks=disks,
            domain_xml=domain_xml, checkpoint_xml=chk_xml,
        )
        manifest.uuid = manifest.uuid or dom.uuid()
        manifest.points.append(point)
        repository.save(manifest)
        _remove_tree(docs.run_dir)
        repository.clear_run(vm)
    except BaseException as e:
        with _signals_deferred() as pending:
            for h in handles:
                with contextlib.suppress(Exception):
                    _release(h)
            handles.clear()
            try:
                cleanup(repository, vm, dom, state)
            except Error as ce:
                log.error("clean-up after the failed backup was incomplete: %s", ce)
        if pending and not isinstance(e, Interrupted):
            raise Interrupted(pending[0]) from e
        raise
    return {
        **plan_summary(plan),
        "mode": docs.mode,
        "seconds": seconds,
        "disks": {
            name: {
                "image": str(repository.image(vm, pd.image)),
                "backing": pd.backing,
                "size": pd.size,
                "bytes_copied": pd.bytes_copied,
                "bytes_zeroed": pd.bytes_zeroed,
                "mode": "full" if pd.backing is None else "incremental",
                "reason": next(d.reason for d in plan.disks if d.name == name),
            }
            for name, pd in disks.items()
        },
    }


def _pull_phase(repository, dom, docs, manifest, partial, progress_mode, on_job_started,
                scratch_limit, handles) -> list:
    """Start the pull job and copy every disk's export into a new image in ``partial``."""
    plan, vm = docs.plan, docs.plan.vm
    dom.backup_begin(docs.backup_xml, docs.checkpoint_xml)
    bitmaps = xmlgen.export_bitmaps(dom.backup_xml())
    if on_job_started is not None:
        on_job_started()
    jobs = []
    for d in plan.disks:
        bitmap = None if d.full else bitmaps.get(d.name)
        if not d.full and bitmap is None:
            raise StateError(f"libvirt exported disk {d.name} without a dirty bitmap")
        src = nbdio.connect_export(docs.socket, d.name, bitmap)
        handles.append(src)
        more = nbdio.more_connections(src, docs.socket, d.name, bitmap, nbdio.CONNECTIONS - 1)
        handles.extend(more)
        size = nbdio.size(src)
        image = partial / f"{d.name}.qcow2"
        dst = tgt.Qcow2Target(str(image), size, backing=f"../{d.backing}" if d.backing else None)
        handles.append(dst)
        src = [src, *more]
        jobs.append((d, src, dst, bitmap, size, _hasher(repository, vm, manifest, plan, d, size)))
    watch = _scratch_watch(dom, docs.run_dir, scratch_limit)
    watch()  # the guest may have written a lot already (e.g. while on_job_started ran)
    stats = _copy_all(jobs, progress_mode, watch, lambda doc: repository.write_progress(vm, doc))
    for h in handles:
        _release(h)
    handles.clear()
    dom.abort_job()
    return [(d, size, stats[d.name], hasher) for d, _s, _d, _b, size, hasher in jobs]


def _push_phase(repository, dom, docs, manifest, partial, progress_mode, on_job_started,
                scratch_limit, handles) -> list:
    """QEMU writes each disk into a target we created in the run directory; we wait for the job.

    The targets live in the run directory because QEMU's user cannot reach into the private
    repository; an incremental target already carries its final relative backing file
    (``../<parent>/<disk>.qcow2``, unresolvable there and not needed by QEMU), and is moved
    into ``partial`` when the job succeeded. Checksums are then computed by re-reading only the
    blocks that the image's own layer holds.
    """
    plan, vm = docs.plan, docs.plan.vm
    ids = _qemu_ids()
    sizes = {}
    for d in plan.disks:
        sizes[d.name] = dom.disk_capacity(d.name)
        target = docs.run_dir / f"{d.name}.qcow2"
        qemuimg.create(str(target), sizes[d.name], backing=f"../{d.backing}" if d.backing else None,
                       unsafe=True)
        if ids and os.geteuid() == 0:
            os.chown(target, *ids)
    dom.backup_begin(docs.backup_xml, docs.checkpoint_xml, reuse_external=True)
    if on_job_started is not None:
        on_job_started()
    prog = Progress(progress_mode, sink=lambda doc: repository.write_progress(vm, doc))
    prog.add("all disks", 0)
    watch = _scratch_watch(dom, docs.run_dir, scratch_limit)
    with prog:
        while True:
            st = dom.job_stats()
            if st.get("operation") != _JOB_OPERATION_BACKUP or not st.get("type"):
                break
            prog.totals["all disks"] = st.get("disk_total", 0)
            prog.done["all disks"] = st.get("disk_processed", 0)
            watch()
            time.sleep(0.1)
    done = dom.completed_job_stats()
    if not done.get("success", False):
        raise CopyError(f"the push backup failed: {done.get('errmsg') or 'libvirt reports no reason'}")
    results = []
    for d in plan.disks:
        image = partial / f"{d.name}.qcow2"
        _move_private(docs.run_dir / f"{d.name}.qcow2", image)
        size = sizes[d.name]
        hasher = _hasher(repository, vm, manifest, plan, d, size)
        stats = nbdio.CopyStats()
        touched = set()
        for start, length, zero in qemuimg.own_extents(str(image)):
            if zero:
                stats.bytes_zeroed += length
            else:
                stats.bytes_copied += length
            touched.update(range(start // hasher.block, (start + length - 1) // hasher.block + 1))
        h = nbdio.open_image(str(image), readonly=True)
        handles.append(h)
        for b in sorted(touched):
            off = b * hasher.block
            hasher.set_block(off, nbdio.pread(h, min(hasher.block, size - off), off))
        nbdio.close(h)
        handles.remove(h)
        results.append((d, size, stats, hasher))
    return results


def _release(h) -> None:
    """Close an NBD handle (a socket-activated qemu-nbd exits with it) or an image target."""
    if isinstance(h, tgt.Target):
        h.close()
    else:
        nbdio.close(h)


def _move_private(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move an image QEMU wrote into the repository: root-owned, 0600, on disk."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # Another file system: copy sparsely (holes stay holes), then drop the original.
        subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
        src.unlink()
    os.chown(dst, 0, 0) if os.geteuid() == 0 else None
    os.chmod(dst, 0o600)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scratch_watch(dom: Domain, run_dir: pathlib.Path, limit: int | None) -> Callable[[], None]:
    def check() -> None:
        used = dom.job_stats().get("disk_temp_used", 0)
        if limit is not None and used > limit:
            raise StateError(f"the backup was aborted: guest writes put {used} bytes in the scratch "
                             f"images, more than --scratch-limit {limit}; the VM was not affected",
                             "use a larger --scratch-limit or back up at a quieter time")
        st = os.statvfs(run_dir)
        free = st.f_bavail * st.f_frsize
        if free < SCRATCH_RESERVE:
            raise StateError(f"the backup was aborted: only {free} bytes left where the scratch images "
                             f"live ({run_dir.parent}), and guest writes must not fail",
                             "use --scratch-dir on a file system with more free space")
    return check


def _copy_all(jobs, progress_mode: str, watch: Callable[[], None] = lambda: None,
              sink: Callable[[dict], None] | None = None) -> dict[str, nbdio.CopyStats]:
    """Copy every disk at once, one thread each; the first failure stops the others.

    Daemon threads with a bounded join: an interrupted run must clean up and exit even when
    a copy thread is stuck (a hung NBD server), instead of waiting for it forever.
    """
    stop = threading.Event()
    prog = Progress(progress_mode, sink=sink)
    results: dict[str, nbdio.CopyStats] = {}
    errors: list[BaseException] = []

    def one(d, src, dst, bitmap, hasher):
        try:
            results[d.name] = nbdio.copy(src, dst, bitmap=bitmap, progress=prog.callback(d.name),
                                         should_stop=stop.is_set, hasher=hasher)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            if not stop.is_set():
                errors.append(e)
            stop.set()

    for d, src, dst, bitmap, _size, _hasher in jobs:
        prog.add(d.name, nbdio.planned_bytes(src[0], bitmap, dst.reads_as_zero, dst.granularity))
    threads = [threading.Thread(target=one, args=(d, src, dst, bitmap, hasher), name=f"copy-{d.name}",
                                daemon=True)
               for d, src, dst, bitmap, _, hasher in jobs]
    with prog:
        for t in threads:
            t.start()
        try:
            last = time.monotonic()
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
                    if time.monotonic() - last >= WATCH_INTERVAL:
                        last = time.monotonic()
                        watch()
        except BaseException:
            stop.set()
            deadline = time.monotonic() + 10
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            raise
    if errors:
        raise errors[0]
    return results


def _write_private(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _hasher(repository, vm, manifest, plan, d, size) -> checksum.BlockHasher:
    if d.full:
        return checksum.BlockHasher(size)
    sums, block, algorithm = _parent_sums(repository, vm, manifest, plan, d.name, size)
    return checksum.BlockHasher(size, parent_sums=sums, block=block, algorithm_name=algorithm)


def _parent_sums(repository: Repository, vm: str, manifest: mf.Manifest, plan: BackupPlan,
                 disk: str, size: int) -> tuple[bytes, int, str]:
    """The parent point's block digests of ``disk``, their block size and algorithm, checked
    against the manifest (an incremental continues with its parent's block size and algorithm)."""
    pd = manifest.get(plan.parent).disks[disk]
    path = repository.image(vm, pd.image).with_suffix(".sums")
    try:
        sums = path.read_bytes()
    except OSError as e:
        raise RepositoryError(f"cannot read checksums {path}: {e.strerror}",
                              "run a full backup (without --incremental) to start a new chain") from e
    if (pd.blkhash != checksum.digest_of(sums)
            or len(sums) != checksum.block_count(size, pd.block_size) * checksum.algorithm(pd.checksum).size):
        raise RepositoryError(f"checksums {path} do not match the manifest (corrupted?)",
                              "run 'libvbackup verify', then a full backup")
    return sums, pd.block_size, pd.checksum


def _remove_tree(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(repository: Repository, vm: str, dom: Domain | None, state: dict) -> None:
    """Undo what a run recorded in its journal, except what the manifest already holds.

    Every step is tried even when an earlier one fails (QEMU gone, libvirtd restarted); the
    journal is removed only when all succeeded, so that a later run can finish the rest.
    """
    chk = state.get("checkpoint")
    failures: list[str] = []
    try:
        completed = chk is not None and repository.load(vm).find(chk) is not None
    except Error as e:
        failures.append(str(e))
        completed = True  # cannot tell: keep what might be a completed point
    # backupBegin creates the job and our (uniquely named) checkpoint together: the job is
    # ours only if that checkpoint exists. Another tool's job is never aborted.
    if state.get("job") and dom is not None and chk and not completed:
        try:
            if dom.has_checkpoint(chk):
                if dom.has_backup_job():
                    dom.abort_job()
                log.info("deleting checkpoint %s of an incomplete backup", chk)
                dom.delete_checkpoint(chk)
        except Error as e:
            failures.append(str(e))
    for key in ("partial",) + (() if completed else ("final",)):
        if state.get(key):
            _remove_tree(pathlib.Path(state[key]))
    if state.get("run_dir"):
        _remove_tree(pathlib.Path(state["run_dir"]))
    if failures:
        raise StateError("clean-up of the interrupted backup is incomplete: " + "; ".join(failures),
                         "the next run for this VM finishes it")
    repository.clear_run(vm)


def recover(repository: Repository, vm: str, dom: Domain | None) -> dict | None:
    """Finish the clean-up of a run that died; returns its journal, or None if there was none."""
    state = repository.read_run(vm)
    if state is None:
        return None
    pid = state.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        raise StateError(f"a backup of VM {vm!r} by pid {pid} is still running")
    log.warning("cleaning up after an interrupted backup (%s)", state.get("checkpoint", "unknown"))
    cleanup(repository, vm, dom, state)
    return state
