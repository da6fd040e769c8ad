"""Instant recovery: a VM running from a point within seconds, whatever its disk size, then
made independent of the repository while it runs.

``restore_instant`` (``restore --instant --define NAME``)::

    check everything     the point and its chains, the name is free, QEMU can reach the output,
                         QEMU's group exists, no server is left in the socket directory
    record               <repo>/<vm>/.instant/<NAME>.json, before anything it names exists
    serve                one detached qemu-nbd per disk: the point's chain, read-only, raw, on
                         a socket QEMU's group may use (see ``instantrec``)
    overlays             <output>/<disk>.qcow2, backing nbd+unix:///<disk>?socket=… (raw)
    define, start        the saved XML made another machine (``domdef``) on the overlays, its
                         UUID chosen here (so the record has it first), <metadata> naming the
                         record; a failure undoes everything, the record last

``finalize NAME``: each disk's backing chain is pulled into its overlay (``virDomainBlockPull``
while the domain runs; ``qemu-img rebase -b ''`` in safe mode when it is shut off), then the
servers are stopped, the socket directory and the record removed; the overlays are ordinary
standalone images and the domain no longer names the repository.

Why a block pull, not a block copy and pivot: the overlay already holds what the guest wrote
since the start, and it is where the disk stays; a pull writes into it what the chain holds,
ends by itself and leaves no second file, no mirror to pivot and no window in which guest
writes go to two places. A copy would write every byte again elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import time
import uuid as uuidlib

from lxml import etree

from . import domdef, instantrec, qcow2, qcow2map, qemuimg
from .errors import Error, LibvirtError, RepositoryError, StateError, UsageError
from .progress import Progress
from .repo import Repository
from .restore import check_output, select
from .outcomes import FinalizedDisk, FinalizeResult, InstantDisk, InstantResult
from .signals import umask
from .virt import Connection
from .vmrestore import _check_reachable

log = logging.getLogger(__name__)

NS = "https://libvbackup.invalid/instant/1"
KEY = "lvb"


def _meta(**attrs: str) -> str:
    el = etree.Element(f"{{{NS}}}instant", nsmap={KEY: NS})
    for k, v in attrs.items():
        el.set(k, v)
    return etree.tostring(el, encoding="unicode")


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def definition(saved_xml: str, name: str, uuid: str, overlays: dict[str, str], repo: str, vm: str,
               checkpoint: str) -> domdef.Definition:
    """The new domain on the overlays, with its UUID and our <metadata> (pure)."""
    d = domdef.restored_domain(saved_xml, name, {t: (p, "qcow2") for t, p in overlays.items()})
    root = etree.fromstring(d.xml.encode())
    el = etree.Element("uuid")
    el.text = uuid
    root.find("name").addnext(el)
    meta = root.find("metadata")
    if meta is None:
        meta = etree.Element("metadata")
        el.addnext(meta)
    for old in meta.findall(f"{{{NS}}}instant"):
        meta.remove(old)
    meta.append(etree.fromstring(_meta(repo=repo, vm=vm, checkpoint=checkpoint)))
    return domdef.Definition(etree.tostring(root, encoding="unicode"), d.left_out)


def restore_instant(vm: str, *, repo: str, output: str, name: str, checkpoint: str | None = None,
                    start: bool = True, uri: str | None = None) -> InstantResult:
    t0 = time.monotonic()
    if not domdef.valid_name(name):
        raise UsageError(f"{name!r} is not a usable domain name (letters, digits, '_.+-')")
    repository = Repository(repo)
    repository.check_writable()
    m, point, names = select(repository, vm, checkpoint)
    if not point.domain_xml:
        raise RepositoryError(f"point {point.checkpoint!r} holds no domain XML to define a VM from",
                              "restore the images with --output and define the VM by hand")
    out = check_output(output)
    gid = instantrec.qemu_group()
    rd = instantrec.run_dir(name)
    with Connection(uri) as conn:
        if not conn.local:
            raise UsageError("--instant needs libvirt on this host (it serves the point to QEMU here)")
        if conn.has_domain(name):
            raise StateError(f"libvirt already has a VM named {name!r}", "choose another --define NAME")
        _check_reachable(out)
        if rd.exists() and instantrec.busy(rd):
            raise StateError(f"{rd} is still served by a qemu-nbd of another instant VM {name!r}",
                             f"finalize it (libvbackup finalize {name}) or choose another --define NAME")
        new_uuid = str(uuidlib.uuid4())
        disks = {n: instantrec.ServedDisk(
            n, str(repository.image(vm, point.disks[n].image)), point.disks[n].size, str(out / f"{n}.qcow2"),
            str(rd / f"{n}.sock"), str(rd / f"{n}.lock")) for n in names}
        definition_ = definition(point.domain_xml, name, new_uuid, {n: d.overlay for n, d in disks.items()},
                                 str(repository.root), vm, point.checkpoint)
        rec = instantrec.Record(name, new_uuid, vm, str(repository.root), point.checkpoint,
                                tuple(p.checkpoint for p in m.chain(point.checkpoint)), str(rd), conn.uri,
                                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), disks)
        with repository.lock(vm), umask(0o077):
            if rd.exists():
                shutil.rmtree(rd)  # left by an instant VM that is gone (no lock held in it)
            instantrec.write(repository, rec)  # before anything it names exists
            created = not out.exists()
            dom = None
            try:
                instantrec.make_run_dir(rec, gid)
                for n, d in disks.items():
                    disks[n] = dataclasses.replace(d, pid=instantrec.serve(d, gid))
                    rec = dataclasses.replace(rec, disks=dict(disks))
                    instantrec.write(repository, rec)
                if created:
                    out.mkdir(mode=0o711, parents=True)
                    os.chmod(out, 0o711)  # QEMU's user traverses it (libvirt chowns the overlays)
                for d in disks.values():
                    qemuimg.create(d.overlay, d.size, backing=d.uri, backing_format="raw")
                dom = conn.define(definition_.xml)
                if start:
                    dom.start()
            except BaseException:
                if dom is not None:
                    with contextlib.suppress(Error):
                        dom.undefine()
                for d in disks.values():
                    with contextlib.suppress(OSError):
                        os.unlink(d.overlay)
                if created:
                    with contextlib.suppress(OSError):
                        out.rmdir()
                with contextlib.suppress(Error, OSError):
                    instantrec.tear_down(repository, rec)
                raise
    for disk in definition_.left_out:
        log.warning("disk %s of VM %r was not in point %s: the new VM %r has no such disk",
                    disk, vm, point.checkpoint, name)
    return InstantResult(vm, point.checkpoint, name, new_uuid, start,
                         {n: InstantDisk(d.overlay, d.uri, d.image, d.size, d.pid) for n, d in disks.items()},
                         rec.points, str(instantrec.path(repository, vm, name)), round(time.monotonic() - t0, 3),
                         definition_.left_out)


def _record_of(dom) -> tuple[Repository, instantrec.Record]:
    text = dom.metadata(NS)
    if text is None:
        raise StateError(f"VM {dom.name!r} is not an instant VM (restore --instant made no such VM)",
                         "nothing to finalize: its disks are its own")
    el = etree.fromstring(text.encode())
    if el.get("finalized"):
        raise StateError(f"VM {dom.name!r} was finalized already ({el.get('finalized')}): its disks are standalone")
    repository = Repository(el.get("repo") or "")
    rec = instantrec.read(repository, el.get("vm") or "", dom.name)
    if rec is None:
        raise StateError(f"instant VM {dom.name!r} has no record in {repository.root} any more "
                         f"({instantrec.path(repository, el.get('vm') or '', dom.name)})",
                         "its disks may still need the repository: see virsh domblklist --details")
    if rec.uuid != dom.uuid():
        raise StateError(f"VM {dom.name!r} is not the instant VM its record describes (another UUID)")
    return repository, rec


def _backing_of(path: str) -> str | None:
    with open(path, "rb") as f:
        return qcow2map.read_header(f.read(qcow2.CLUSTER))[1]


def finalize(name: str, *, uri: str | None = None, progress="none") -> FinalizeResult:
    """Pull the repository's data into the overlays of instant VM ``name``, then stop serving."""
    t0 = time.monotonic()
    with Connection(uri) as conn:
        if not conn.local:
            raise UsageError("finalize needs libvirt on this host (the servers are here)")
        dom = conn.domain(name)
        repository, rec = _record_of(dom)
        gid = instantrec.qemu_group()
        # Servers that died (a reboot emptied /run) are started again: the overlays name them.
        pending = {n: d for n, d in rec.disks.items() if _backing_of(d.overlay) is not None}
        for n, d in pending.items():
            if not instantrec.alive(d):
                log.warning("the NBD server of disk %s of %r is not running: starting it again", n, name)
                instantrec.make_run_dir(rec, gid)
                d = dataclasses.replace(d, pid=instantrec.serve(d, gid))
                rec = dataclasses.replace(rec, disks={**rec.disks, n: d})
                instantrec.write(repository, rec)
        running = dom.is_running()
        done = {}
        with Progress(progress, vm=name) as prog:
            for n, d in rec.disks.items():
                prog.add(n, d.size)
            for n, d in rec.disks.items():
                if n in pending:
                    if running:
                        _pull(dom, n, prog)
                    else:
                        qemuimg.rebase(d.overlay, None)
                        prog.advance(n, d.size - prog.done.get(n, 0))
                else:
                    prog.advance(n, d.size - prog.done.get(n, 0))
                if _backing_of(d.overlay) is not None:
                    raise LibvirtError(f"disk {n} of VM {name!r} still has a backing file after the "
                                       f"{'block pull' if running else 'rebase'}; run finalize again")
                done[n] = FinalizedDisk(d.overlay, d.size, "block-pull" if running else "rebase")
        # Nothing names the export any more: say so in the domain, then stop serving.
        # (setMetadata takes the element without its namespace: libvirt puts it in ours.)
        done_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        dom.set_metadata(f'<instant vm="{_attr(rec.vm)}" checkpoint="{_attr(rec.checkpoint)}" finalized="{done_at}"/>',
                         KEY, NS)
        instantrec.tear_down(repository, rec)
    return FinalizeResult(name, rec.vm, rec.checkpoint, running, done, rec.points, round(time.monotonic() - t0, 3))


def _pull(dom, disk: str, prog: Progress) -> None:
    """Block pull of one disk of the running domain; returns when the job is gone."""
    if not dom.block_job(disk):
        dom.block_pull(disk)
    while True:
        info = dom.block_job(disk)
        if not info:
            return
        if info.get("end"):
            prog.advance(disk, min(int(info.get("cur", 0)), prog.totals.get(disk, 0)) - prog.done.get(disk, 0))
        time.sleep(0.05)
        if not dom.is_running():
            raise StateError(f"VM {dom.name!r} stopped during the block pull of disk {disk}; run finalize again")
