"""A VM back from a point: a new domain on the restored images, or the data put back in place.

``restore_as_vm`` (``restore --define NAME [--start]``)::

    check everything     the point, its chains, the name is free, QEMU can reach the output
    define               the saved domain XML made another machine (``domdef``): new name and
                         UUID, new MACs, its disks the restored images, no checkpoints
    restore the images   into the output directory (traversable, not listable, by QEMU's user)
    start                if asked; a failure undoes the definition and the images

``restore_in_place`` (``restore --in-place --yes``), for a shut-off domain::

    check everything     shut off, every disk of the point is a file of the domain now
    restore              each disk into a temporary file beside the original (nothing changed yet)
    drop checkpoints     libvirt's metadata, and their bitmaps from the images left alone: the
                         restored images hold none, so the next backup is a full one
    replace              each original, atomically (rename), owner and mode kept

A domain started while an in-place restore runs makes it fail before any original is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import stat

from . import domdef, domxml, journal
from .errors import Error, NotFound, RepositoryError, StateError, UsageError
from .repo import Repository, fsync_dir
from .restore import FORMATS, check_output, select, write_disk, write_images
from .outcomes import DefinedResult, InPlaceResult, RestoredDisk
from .signals import umask
from .virt import Connection

log = logging.getLogger(__name__)


def restore_as_vm(vm: str, *, repo: str, output: str, name: str, checkpoint: str | None = None,
                  fmt: str = "qcow2", start: bool = False, uri: str | None = None,
                  progress: str = "none") -> DefinedResult:
    """Restore every disk of the point into ``output`` and define domain ``name`` on them."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not domdef.valid_name(name):
        raise UsageError(f"{name!r} is not a usable domain name (letters, digits, '_.+-')")
    repository = Repository(repo)
    m, point, names = select(repository, vm, checkpoint)
    if not point.domain_xml:
        raise RepositoryError(f"point {point.checkpoint!r} holds no domain XML to define a VM from",
                              "restore the images with --output and define the VM by hand")
    out = check_output(output)
    with Connection(uri) as conn:
        if not conn.local:
            raise UsageError("--define needs libvirt on this host (the restored images are written here)")
        if conn.has_domain(name):
            raise StateError(f"libvirt already has a VM named {name!r}", "choose another --define NAME")
        _check_reachable(out)
        images = {n: (str(out / f"{n}.{fmt}"), fmt) for n in names}
        definition = domdef.restored_domain(point.domain_xml, name, images)
        created = not out.exists()
        new = conn.define(definition.xml)
        disks = None
        try:
            # QEMU's user must traverse the directory (libvirt chowns the images it starts on).
            disks = write_images(repository, m, point, names, str(out), fmt, progress, dir_mode=0o711)
            if start:
                new.start()
        except BaseException:
            with contextlib.suppress(Error):
                new.undefine()
            if disks is not None:  # (write_images removes its own files when it fails)
                _remove_images(out if created else None, images)
            raise
        for disk in definition.left_out:
            log.warning("disk %s of VM %r was not in point %s: the new VM %r has no such disk",
                        disk, vm, point.checkpoint, name)
        return DefinedResult(vm, point.checkpoint, name, new.uuid(), start, disks, definition.left_out)


def _check_reachable(out: pathlib.Path) -> None:
    """Every existing directory above the output must be searchable by others: QEMU runs as
    its own user (libvirt-qemu) and opens the images by path."""
    for parent in out.parents:
        if parent.exists():
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise UsageError(f"QEMU cannot reach {out}: {parent} is not searchable by other users",
                                 f"choose a directory QEMU can reach (e.g. under /var/lib/libvirt/images) "
                                 f"or chmod o+x {parent}")


def _remove_images(created: pathlib.Path | None, images: dict) -> None:
    for path, _fmt in images.values():
        with contextlib.suppress(OSError):
            os.unlink(path)
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()


def restore_in_place(vm: str, *, repo: str, checkpoint: str | None = None, confirm: bool = False,
                     uri: str | None = None, progress: str = "none") -> InPlaceResult:
    """Write the point's disks back over the disk files of the shut-off domain ``vm``."""
    if not confirm:
        raise UsageError(f"--in-place overwrites the disks of VM {vm!r} with the point's data; add --yes to confirm")
    repository = Repository(repo)
    m, point, names = select(repository, vm, checkpoint)
    with Connection(uri) as conn:
        dom = conn.domain(vm)
        if not conn.local:
            raise UsageError("--in-place needs libvirt on this host (it writes the domain's disk files)")
        if dom.is_running():
            raise StateError(f"VM {vm!r} is running; --in-place restores a shut-off VM only",
                             f"shut it down first (virsh shutdown {vm}), or restore with --define NEWNAME")
        current = {d.target: d for d in domxml.parse_disks(dom.xml())}
        targets = {}
        for n in names:
            d = current.get(n)
            if d is None:
                raise NotFound(f"VM {vm!r} has no disk {n!r} now; point {point.checkpoint!r} cannot go back in place",
                               "restore with --define NEWNAME or --output DIR instead")
            if d.format not in FORMATS or not d.source or not os.path.isfile(d.source):
                raise UsageError(f"disk {n} of VM {vm!r} is not a qcow2 or raw file ({d.source or 'no source'}); "
                                 "--in-place writes image files only")
            targets[n] = (pathlib.Path(d.source), d.format)
        left_alone = tuple(t for t, d in current.items() if t not in targets and d.device == "disk")
        with repository.lock(vm), umask(0o077):
            tmps = {n: path.with_name(f".{path.name}.lvb-restore") for n, (path, _f) in targets.items()}
            try:
                for n, (path, fmt) in targets.items():
                    with contextlib.suppress(FileNotFoundError):
                        tmps[n].unlink()  # left by an in-place restore that was killed
                    write_disk(repository, m, point.disks[n], str(tmps[n]), fmt, progress)
                if dom.is_running():
                    raise StateError(f"VM {vm!r} was started during the restore; its disks were left as they were",
                                     "shut it down and restore again")
                dropped = _drop_checkpoints(dom)
                restored = {}
                for n, (path, fmt) in targets.items():
                    st = os.stat(path)
                    os.chown(tmps[n], st.st_uid, st.st_gid)
                    os.chmod(tmps[n], stat.S_IMODE(st.st_mode))
                    os.replace(tmps[n], path)
                    fsync_dir(path.parent)
                    restored[n] = RestoredDisk(str(path), point.disks[n].size, fmt)
            finally:
                for tmp in tmps.values():
                    with contextlib.suppress(OSError):
                        tmp.unlink()
        return InPlaceResult(vm, point.checkpoint, restored, left_alone, dropped)


def _drop_checkpoints(dom) -> tuple[str, ...]:
    """Every checkpoint of the shut-off domain goes from libvirt's metadata (libvirt 9.0
    deletes checkpoints of running domains only), and its bitmaps from the images."""
    dropped = []
    for name in dom.checkpoint_names():
        xml = dom.checkpoint_xml(name)
        dom.delete_checkpoint(name, metadata_only=True)
        left = journal.remove_bitmaps_offline(dom, xml)
        if left:
            log.warning("bitmap %s is left in disk(s) %s", name, ", ".join(left))
        dropped.append(name)
    return tuple(dropped)
