"""The offline transport: a shut-off domain backed up from its disk images, in the same chain.

::

    plan       the checkpoints' bitmaps are checked in the images themselves (``validator``):
               libvirt 9.0 validates bitmaps of running domains only
    JOB        (journal) the new checkpoint may exist from here on
    define     the new checkpoint, REDEFINE (libvirt 9.0 cannot create a checkpoint of an
               inactive domain, but takes one back): parent the newest checkpoint, its bitmaps
               named after it, which do not exist yet
    copy       each image served read-only by a qemu-nbd of our own (``nbdio.image``): a full
               backup reads what is allocated, an incremental what the persistent bitmap of its
               parent checkpoint marks (QEMU stores every checkpoint's bitmap in the qcow2 image
               when it stops, each still recording: since its checkpoint, all writes)
    bitmaps    ``qemu-img bitmap --add --enable NEW`` on each qcow2 image: what the guest writes
               after it starts again is what the next (online) incremental copies
    commit     as for every transport

Starting the domain while its images are being read is refused by QEMU itself: qemu-nbd holds
each image's read lock, and QEMU cannot take the write lock ("Failed to get 'write' lock").
A domain started in the moment between the end of the copy and the new bitmaps makes
``qemu-img bitmap`` fail for the same reason: the run fails and is cleaned up (the checkpoint
goes), and the next backup takes what the guest has then. Either way no disk is written by two.
"""

from __future__ import annotations

import contextlib
import time

from lxml import etree

from . import domxml, nbdio, parallel, qemuimg, target as tgt
from .errors import Error, LibvirtError, StateError
from .transport import DiskResult, RunContext

CONNECTIONS = 2


def bitmap_names(checkpoint_xml: str) -> dict[str, str]:
    """disk -> bitmap name, for the disks a checkpoint tracks (checkpoint='bitmap')."""
    root = etree.fromstring(checkpoint_xml.encode())
    name = root.findtext("name") or ""
    return {d.get("name"): d.get("bitmap") or name for d in root.iterfind("./disks/disk")
            if d.get("checkpoint", "bitmap") == "bitmap" and d.get("name")}


def validator(dom, manifest):
    """For ``checkpoints.Probe``: why a checkpoint's bitmaps cannot serve an offline
    incremental, in libvirt's own words ("missing or broken bitmap 'B' for disk 'D'"), or None.
    A bitmap QEMU did not store when it stopped (killed) is missing or marked in-use."""
    sources = {d.target: d for d in domxml.parse_disks(dom.xml())}
    names = set(dom.checkpoint_names())

    def why(chk: str) -> str | None:
        try:
            xml = dom.checkpoint_xml(chk) if chk in names else manifest.get(chk).checkpoint_xml
        except Error as e:
            return e.message
        for disk, bitmap in bitmap_names(xml).items():
            d = sources.get(disk)
            if d is None or d.format != "qcow2" or not d.source:
                continue  # not a disk of this domain now: the plan takes it in full or not at all
            try:
                flags = qemuimg.bitmaps(d.source).get(bitmap)
            except Error as e:
                return f"missing or broken bitmap '{bitmap}' for disk '{disk}': {e.message}"
            if flags is None or "in-use" in flags or "auto" not in flags:
                state = "not in the image" if flags is None else ", ".join(flags) or "disabled"
                return f"missing or broken bitmap '{bitmap}' for disk '{disk}' ({state})"
        return None

    return why


def _newest(dom) -> str | None:
    best, when = None, -1
    for name in dom.checkpoint_names():
        root = etree.fromstring(dom.checkpoint_xml(name).encode())
        t = int(root.findtext("creationTime") or 0)
        if t > when:
            best, when = name, t
    return best


def checkpoint_xml(docs_xml: str, parent: str | None, now: int) -> str:
    """The new checkpoint as REDEFINE takes it: parent, creation time, bitmap names."""
    root = etree.fromstring(docs_xml.encode())
    name = root.findtext("name")
    after = root.find("description")
    at = list(root).index(after) + 1 if after is not None else 1
    if parent:
        p = etree.Element("parent")
        etree.SubElement(p, "name").text = parent
        root.insert(at, p)
        at += 1
    t = etree.Element("creationTime")
    t.text = str(now)
    root.insert(at, t)
    for d in root.iterfind("./disks/disk"):
        if d.get("checkpoint") == "bitmap":
            d.set("bitmap", name)
    return etree.tostring(root, encoding="unicode")


def run(ctx: RunContext) -> list[DiskResult]:
    plan, docs, dom = ctx.plan, ctx.docs, ctx.dom
    if dom.is_running():
        raise StateError(f"VM {plan.vm!r} was started before its offline backup began", "back it up again")
    sources = {d.target: d for d in domxml.parse_disks(dom.xml())}
    parent_bitmaps = bitmap_names(dom.checkpoint_xml(plan.parent)) if plan.parent else {}
    xml = checkpoint_xml(docs.checkpoint_xml, _newest(dom), int(time.time()))
    why = dom.redefine_checkpoint(xml, validate=False)
    if why is not None:
        raise LibvirtError(f"cannot define checkpoint {plan.checkpoint!r} of VM {plan.vm!r}: {why}")
    jobs, sums = [], {}
    with contextlib.ExitStack() as opened:
        for d in plan.disks:
            src_disk = sources[d.name]
            bitmap = None if d.full else parent_bitmaps[d.name]
            src = opened.enter_context(nbdio.image(src_disk.source, src_disk.format or "raw",
                                                   connections=CONNECTIONS, bitmap=bitmap))
            dst = opened.enter_context(contextlib.closing(
                tgt.open_target(str(ctx.image(d.name)), src.size, backing=ctx.backing(d), compress=ctx.compress)))
            sums[d.name] = opened.enter_context(contextlib.closing(ctx.digests(d, src.size)))
            jobs.append(parallel.Job(d.name, src, dst, sums[d.name].hasher))
        stats = parallel.copy_all(jobs, ctx.progress, sink=ctx.sink, vm=plan.vm)
        results = [DiskResult(j.name, j.source.size, stats[j.name].bytes_copied, stats[j.name].bytes_zeroed,
                              sums[j.name].complete(), sums[j.name].layout.block,
                              sums[j.name].layout.algorithm_name,
                              compression=getattr(j.target, "compression", None)) for j in jobs]
    # The images are ours no more (qemu-nbd exited): the new checkpoint's bitmaps go in now.
    for disk in bitmap_names(xml):
        d = sources.get(disk)
        if d is not None and d.format == "qcow2":
            try:
                qemuimg.add_bitmap(d.source, plan.checkpoint)
            except Error as e:
                if dom.is_running():
                    raise StateError(f"VM {plan.vm!r} was started during its offline backup; the backup "
                                     "was abandoned", "back it up again (online now)") from e
                raise
    if dom.is_running():
        raise StateError(f"VM {plan.vm!r} was started during its offline backup; the backup was abandoned",
                         "back it up again (online now)")
    return results
