"""Pull transport: libvirt exports each disk's point in time over NBD, the engine copies it.

backupBegin (pull mode) creates the job and the checkpoint; each disk's export is read through
``nbdio.export`` (``export_tcp`` for a remote libvirt: TCP, TLS; for an incremental, with the
dirty bitmap libvirt names in the job's XML) and
written by ``target.Qcow2Target`` into ``<chk>.partial/<disk>.qcow2`` with the block hasher
watching; every disk is copied at once. The job is ended once every image is complete and
flushed (a pull job lasts until it is aborted), and the pipeline commits the point while
libvirt ends it (``RunContext.end_job``). The modules only the copy needs are imported while
backupBegin runs (``preload``).
"""

from __future__ import annotations

import contextlib
import logging
import threading

from . import scratch, xmlgen
from .documents import documents
from .errors import LibvirtError, StateError
from .preload import Preload
from .transport import DiskResult, RunContext

log = logging.getLogger(__name__)

# imported while backupBegin runs: nothing before it needs them
COPY_MODULES = ("libvbackup.nbdio", "libvbackup.parallel", "libvbackup.target", "hashlib", "xxhash")

STALL = 600.0  # seconds without a byte copied from a remote export before the run gives up on it
# (long: an incremental of a huge thin disk asks block status for minutes before its first byte)


def _begin_on_a_free_port(ctx: RunContext) -> None:
    """Over TCP the export takes the first port of the range that is free on the hypervisor
    (only QEMU there can tell: a port in use fails backupBegin, which then created nothing)."""
    net = ctx.net
    for i, port in enumerate(net.ports):
        ctx.docs = documents(ctx.plan, ctx.docs.run_dir, str(ctx.repository.root), "pull",
                             tcp=xmlgen.TcpServer(net.address, port, net.tls), remote=ctx.remote)
        try:
            ctx.begin_job()
            return
        except LibvirtError as e:
            if "in use" not in e.message or i == len(net.ports) - 1:
                if "nbd-server-start" not in e.message:
                    raise
                raise LibvirtError(f"{e.message} (the export was to listen at {net.address}:{port} on the "
                                   "hypervisor)", "give --nbd-address an address of the hypervisor that this "
                                   "host reaches, and --nbd-port a range with free ports") from e
            log.info("NBD port %d is in use on the hypervisor; trying %d", port, net.ports[i + 1])


def _source(ctx: RunContext, name: str, bitmap: str | None):
    from . import nbdio

    if ctx.net is None:
        return nbdio.export(ctx.docs.socket, name, bitmap)
    tcp = ctx.docs.tcp
    return nbdio.export_tcp(tcp.address, tcp.port, name, bitmap, tls_dir=ctx.net.tls_dir)


def run(ctx: RunContext) -> list[DiskResult]:
    plan, dom = ctx.plan, ctx.dom
    with Preload(COPY_MODULES):
        if ctx.net is None:
            ctx.begin_job()
        else:
            _begin_on_a_free_port(ctx)
    from . import parallel, target as tgt

    docs = ctx.docs
    bitmaps = xmlgen.export_bitmaps(dom.backup_xml())
    jobs, sums = [], {}
    with contextlib.ExitStack() as opened:
        for d in plan.disks:
            bitmap = None if d.full else bitmaps.get(d.name)
            if not d.full and bitmap is None:
                raise StateError(f"libvirt exported disk {d.name} without a dirty bitmap")
            src = opened.enter_context(_source(ctx, d.name, bitmap))
            dst = opened.enter_context(contextlib.closing(
                tgt.open_target(str(ctx.image(d.name)), src.size, backing=ctx.backing(d), compress=ctx.compress)))
            sums[d.name] = opened.enter_context(contextlib.closing(ctx.digests(d, src.size)))
            jobs.append(parallel.Job(d.name, src, dst, sums[d.name].hasher))
        watch = scratch.watch(dom, None if ctx.remote else docs.run_dir, ctx.scratch_limit)
        watch()  # the guest may have written a lot already (e.g. while on_job_started ran)
        ender = _JobEnder(dom)
        try:
            stats = parallel.copy_all(jobs, ctx.progress, watch, ctx.sink, vm=plan.vm,
                                      stall=STALL if ctx.net is not None else None, on_sources_done=ender.start)
        except BaseException:
            ender.join()  # never a libvirt call of ours left running behind the run's clean-up
            raise
        ctx.job_end = ender  # the pipeline waits for it after the commit (or joins it on failure)
        ender.requested()
        results = [DiskResult(j.name, j.source.size, stats[j.name].bytes_copied, stats[j.name].bytes_zeroed,
                              sums[j.name].complete(), sums[j.name].layout.block,
                              sums[j.name].layout.algorithm_name,
                              compression=getattr(j.target, "compression", None)) for j in jobs]
    return results


class _JobEnder:
    """Ends the backup job in a thread once the export is no longer read, while the images get
    their metadata and fsync and the point is committed (15-20 ms of a run's end: ``abortJob``,
    then libvirt's end of the job). ``requested`` returns once libvirt has been asked to end
    the job (before the commit: a committed point never leaves a job that nobody ends, even if
    this process dies right after it); ``wait`` until the job is gone. Both end it here if that
    never started, and raise what ending it raised; ``join`` only waits for the thread."""

    def __init__(self, dom):
        self.dom = dom
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._asked = threading.Event()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="job-end", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.dom.request_abort()
            self._asked.set()
            self.dom.wait_job_gone()
        except BaseException as e:  # noqa: BLE001 - raised by requested() or wait()
            self.error = e
        finally:
            self._asked.set()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def requested(self) -> None:
        if self.thread is None:
            self.dom.request_abort()
            self._asked.set()
            return
        self._asked.wait()
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        if self.thread is None:
            if not self._asked.is_set():
                self.dom.request_abort()
            self.dom.wait_job_gone()
            return
        self.join()
        if self.error is not None:
            raise self.error
