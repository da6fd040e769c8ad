"""Pull transport: libvirt exports each disk's point in time over NBD, the engine copies it.

backupBegin (pull mode) creates the job and the checkpoint; each disk's export is read through
``nbdio.export`` (for an incremental, with the dirty bitmap libvirt names in the job's XML) and
written by ``target.Qcow2Target`` into ``<chk>.partial/<disk>.qcow2`` with the block hasher
watching; every disk is copied at once. The job is ended once every image is complete and
flushed (a pull job lasts until it is aborted).
"""

from __future__ import annotations

import contextlib

from . import nbdio, parallel, scratch, target as tgt, xmlgen
from .errors import StateError
from .transport import DiskResult, RunContext


def run(ctx: RunContext) -> list[DiskResult]:
    plan, docs, dom = ctx.plan, ctx.docs, ctx.dom
    ctx.begin_job()
    bitmaps = xmlgen.export_bitmaps(dom.backup_xml())
    jobs, sums = [], {}
    with contextlib.ExitStack() as opened:
        for d in plan.disks:
            bitmap = None if d.full else bitmaps.get(d.name)
            if not d.full and bitmap is None:
                raise StateError(f"libvirt exported disk {d.name} without a dirty bitmap")
            src = opened.enter_context(nbdio.export(docs.socket, d.name, bitmap))
            dst = opened.enter_context(contextlib.closing(
                tgt.Qcow2Target(str(ctx.image(d.name)), src.size, backing=ctx.backing(d))))
            sums[d.name] = opened.enter_context(contextlib.closing(ctx.digests(d, src.size)))
            jobs.append(parallel.Job(d.name, src, dst, sums[d.name].hasher))
        watch = scratch.watch(dom, docs.run_dir, ctx.scratch_limit)
        watch()  # the guest may have written a lot already (e.g. while on_job_started ran)
        stats = parallel.copy_all(jobs, ctx.progress, watch, ctx.sink, vm=plan.vm)
        results = [DiskResult(j.name, j.source.size, stats[j.name].bytes_copied, stats[j.name].bytes_zeroed,
                              sums[j.name].complete(), sums[j.name].layout.block,
                              sums[j.name].layout.algorithm_name) for j in jobs]
    dom.abort_job()
    return results
