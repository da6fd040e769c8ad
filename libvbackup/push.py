"""Push transport: QEMU writes each disk into an image libvbackup prepared; we wait for the job.

The targets are created in the run directory, because QEMU's user cannot reach into the
private repository; an incremental target already carries its final relative backing file
(``../<parent>/<disk>.qcow2``, unresolvable there and not needed by QEMU: the job runs with
REUSE_EXTERNAL, which libvirt 9.0 needs, as it would otherwise point an incremental target at
the live disk). When the job succeeded, each image is moved into ``<chk>.partial/`` (root,
0600), where its backing file resolves, and its digests are computed by the engine from the
image's own layer, read from the file (``imagefile``): data and zero clusters are read or
noted, the rest keeps the parent's digests. Its fsync overlaps that pass. The modules of that
pass are imported while the job runs (``preload``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib

import threading
import time

from . import qemuimg, scratch
from .errors import CopyError, RepositoryError
from .preload import Preload
from .progress import Progress
from .transport import DiskResult, RunContext

_JOB_OPERATION_BACKUP = 9  # libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP (virt is the only libvirt import)
POLL = 0.01  # seconds between two looks at the job (each a libvirt call of about 1 ms)
WATCH = 0.5  # seconds between two looks of the scratch guard while the job runs (as a pull's)
# imported while the job runs: only the digest pass after it needs them
DIGEST_MODULES = ("libvbackup.engine", "libvbackup.imagefile", "libvbackup.parallel", "hashlib", "xxhash")


def run(ctx: RunContext) -> list[DiskResult]:
    plan, docs, dom = ctx.plan, ctx.docs, ctx.dom
    sizes = {d.name: d.size if d.size is not None else dom.disk_capacity(d.name) for d in plan.disks}
    for d in plan.disks:
        path = docs.push_target(d.name)
        qemuimg.create(str(path), sizes[d.name], backing=ctx.backing(d), unsafe=True)
        scratch.give_to_qemu(path)
    with Preload(DIGEST_MODULES):
        ctx.begin_job(reuse_external=True)
        _wait(ctx)
    from . import engine, imagefile, parallel

    done = dom.completed_job_stats()
    if not done.get("success", False):
        raise CopyError(f"the push backup failed: {done.get('errmsg') or 'libvirt reports no reason'}")
    jobs, syncs, sums = [], [], {}
    with contextlib.ExitStack() as opened:
        opened.callback(lambda: [s.wait() for s in syncs])
        for d in plan.disks:
            image = ctx.image(d.name)
            _move_private(docs.push_target(d.name), image)
            syncs.append(_Fsync(image))
            # The image is ours, in place, under the VM's lock: its digests are taken from a map of it.
            src = opened.enter_context(imagefile.FileSource(str(image), sizes[d.name], own_layer=not d.full,
                                                            mapped=True))
            sums[d.name] = opened.enter_context(contextlib.closing(ctx.digests(d, sizes[d.name])))
            jobs.append(parallel.Job(d.name, src, engine.Discard(sizes[d.name], reads_as_zero=d.full),
                                     sums[d.name].hasher))
        stats = parallel.copy_all(jobs, "none")
        return [DiskResult(j.name, sizes[j.name], stats[j.name].bytes_copied, stats[j.name].bytes_zeroed,
                           sums[j.name].complete(), sums[j.name].layout.block, sums[j.name].layout.algorithm_name)
                for j in jobs]


def _wait(ctx: RunContext) -> None:
    """Until the job is gone, with progress from libvirt's statistics and the scratch guard."""
    prog = Progress(ctx.progress, sink=ctx.sink, vm=ctx.plan.vm, phase="wait")
    prog.add("all disks", 0)
    watch = scratch.watch(ctx.dom, ctx.docs.run_dir, ctx.scratch_limit)
    last = 0.0
    with prog:
        while True:
            st = ctx.dom.job_stats()
            if st.get("operation") != _JOB_OPERATION_BACKUP or not st.get("type"):
                return
            prog.totals["all disks"] = st.get("disk_total", 0)
            prog.done["all disks"] = st.get("disk_processed", 0)
            if time.monotonic() - last >= WATCH:
                last = time.monotonic()
                watch()
            time.sleep(POLL)


class _Fsync:
    """fsync a file in a thread (it overlaps the checksum pass); ``wait`` raises its error."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name=f"fsync-{path.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.error = e

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise RepositoryError(f"cannot flush {self.path}: {self.error.strerror}")


def _move_private(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move an image QEMU wrote into the repository: root-owned, 0600 (its fsync follows)."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise RepositoryError(f"cannot move {src} into the repository: {e.strerror}") from e
        # Another file system: copy sparsely (holes stay holes), then drop the original.
        try:
            with open(src, "rb") as fin, open(dst, "xb") as fout:
                _sparse_copy(fin, fout)
        except OSError as e2:
            raise RepositoryError(f"cannot copy {src} into the repository: {e2.strerror}") from e2
        src.unlink()
    if os.geteuid() == 0:
        os.chown(dst, 0, 0)
    os.chmod(dst, 0o600)


def _sparse_copy(fin, fout) -> None:
    """Copy data ranges only (SEEK_DATA/SEEK_HOLE), keeping holes."""
    size = os.fstat(fin.fileno()).st_size
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
        fin.seek(data)
        fout.seek(data)
        left = hole - data
        while left:
            chunk = fin.read(min(left, 8 << 20))
            fout.write(chunk)
            left -= len(chunk)
        pos = hole
    fout.truncate(size)
    fout.flush()


