"""Off-site copies: points copied to a bucket, and the bucket used as a repository (list,
restore, verify, prune), read from the bucket alone.

``copy`` sends a VM's completed points oldest first, each only when the bucket lacks it: its
files (images and digests, sealed in frames, large ones as parallel multipart uploads), then its
point object, last. A copy killed at any moment leaves no half point visible, and the next one
sends only what is missing (objects there with their size are kept; the parts of an unfinished
upload that match are kept). The local repository is only read, under the VM's lock.

A bucket's prune applies its own retention; since its images are immutable (no rebase in a
bucket), a point the policy drops stays as long as a kept point's chain needs its images.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
from typing import Sequence

from . import offsite, restore as restore_mod, retention, seal, sums, verify as verify_mod
from .errors import Error, NotFound, RepositoryError, UsageError
from .manifest import Manifest, Point, PointDisk
from .offsite import Store
from .progress import Progress
from .remotesource import RemoteSource
from .repo import Repository
from .results import PruneResult
from .outcomes import (CopiedPoint, CopyResult, ListResult, PointDiskInfo, PointInfo, RestoreResult, VerifiedPoint,
                       VerifyResult)

log = logging.getLogger(__name__)


def _store(url: str, endpoint: str | None, key_file: str | None, no_encrypt: bool, create: bool = False) -> Store:
    return Store.open(url, endpoint=endpoint, key_file=key_file, no_encrypt=no_encrypt, create=create)


# -- copy ----------------------------------------------------------------------------------------
def copy(vms: Sequence[str] = (), *, repo: str, to: str, all_vms: bool = False, endpoint: str | None = None,
         key_file: str | None = None, no_encrypt: bool = False, dry_run: bool = False,
         progress: str = "none") -> CopyResult:
    """Send the points of ``vms`` (``all_vms``: every VM of ``repo``) the bucket ``to`` lacks."""
    repository = Repository(repo)
    repository.check_readable()
    if all_vms and vms:
        raise UsageError("name VMs or give --all, not both")
    names = repository.vms() if all_vms else list(dict.fromkeys(vms))
    if not names:
        raise UsageError(f"repository {repository.root} holds no VMs" if all_vms else "name a VM, or give --all")
    manifests = {}
    for vm in names:
        m = repository.load(vm)
        if not m.points and not all_vms:
            raise NotFound(f"repository {repository.root} holds no backups of VM {vm!r}")
        if m.points:  # --all: a VM whose points were all pruned has nothing to send
            manifests[vm] = m
    names = list(manifests)
    with contextlib.closing(_store(to, endpoint, key_file, no_encrypt, create=True)) as store:
        return _copy(repository, store, names, manifests, dry_run, progress)


def _copy(repository: Repository, store: Store, names: list[str], manifests: dict, dry_run: bool,
          progress: str) -> CopyResult:
    plans = {vm: _plan(repository, store, m) for vm, m in manifests.items()}
    if dry_run:
        return CopyResult(str(repository.root), store.url, True, tuple(
            CopiedPoint(vm, p.checkpoint, "present" if present else "would copy", sum(sizes.values()), 0)
            for vm, plan in plans.items() for p, present, sizes in plan), 0)
    store.ensure_header()
    out: list[CopiedPoint] = []
    for vm in names:
        with repository.lock(vm):
            m = repository.load(vm)  # what it is now, under the lock
            out += _copy_vm(repository, store, m, _plan(repository, store, m), progress)
    return CopyResult(str(repository.root), store.url, False, tuple(out), sum(c.bytes_sent for c in out))


def _plan(repository: Repository, store: Store, m: Manifest):
    """(point, already in the bucket, {file: local size}) for every point, oldest first; every
    file checked to be there before anything is sent.

    A point in the bucket one of whose objects is missing or has the wrong size (truncated, or
    deleted by hand) is sent again when the local files are the ones it was copied from (the
    sizes its point object records): the objects that are right stay, the others go up again."""
    listing = store.names(m.vm)
    present = set(store.point_names(m.vm, listing))
    out = []
    for p in m.points:
        sizes = {}
        for rel in offsite.point_files(p):
            path = repository.image(m.vm, rel)
            try:
                sizes[rel] = os.stat(path).st_size
            except OSError as e:
                if p.checkpoint in present:
                    sizes[rel] = 0
                    continue
                raise RepositoryError(f"cannot read {path} of point {p.checkpoint!r}: {e.strerror}",
                                      "run 'libvbackup verify' on the local repository") from e
        whole = p.checkpoint in present and not _damaged(store, m.vm, p.checkpoint, sizes, listing)
        out.append((p, whole, sizes))
    return out


def _damaged(store: Store, vm: str, checkpoint: str, sizes: dict[str, int], listing: dict[str, int]) -> bool:
    """A point in the bucket whose objects do not all have their sizes, and that the local files
    (the same sizes as it records) can repair."""
    enc = store.sealer.encrypted
    if all(listing.get(offsite.file_name(vm, rel)) == seal.sealed_size(n, enc) for rel, n in sizes.items()):
        return False
    stored, _uuid = store.read_point(vm, checkpoint)
    if {rel: info.size for rel, info in stored.files.items()} != sizes:
        log.warning("point %s of %s in %s has damaged objects that the local files cannot repair "
                    "(they changed since the copy); run verify on the bucket", checkpoint, vm, store.url)
        return False
    log.warning("point %s of %s in %s has missing or truncated objects: sending them again", checkpoint, vm, store.url)
    return True


def _copy_vm(repository: Repository, store: Store, m: Manifest, plan, progress: str) -> list[CopiedPoint]:
    listing = store.names(m.vm)
    sequence = max((store.read_point(m.vm, c)[0].sequence for c in store.point_names(m.vm, listing)), default=0)
    out = []
    for p, present, sizes in plan:
        if present:
            out.append(CopiedPoint(m.vm, p.checkpoint, "present", sum(sizes.values()), 0))
            continue
        prog = Progress(progress, vm=m.vm)
        prog.add(p.checkpoint, sum(sizes.values()))
        files, sent = {}, 0
        with prog:
            for rel, size in sizes.items():
                name = offsite.file_name(m.vm, rel)
                info, n = store.upload(name, str(repository.image(m.vm, rel)), size,
                                       prog.callback(p.checkpoint), present=listing.get(name))
                files[rel] = info
                sent += n
        sequence += 1
        store.write_point(m.vm, m.uuid, p, files, sequence)
        log.info("copied point %s of %s to %s (%d bytes sent)", p.checkpoint, m.vm, store.url, sent)
        out.append(CopiedPoint(m.vm, p.checkpoint, "copied", sum(sizes.values()), sent))
    return out


# -- the bucket as a repository -----------------------------------------------------------------
def list_points(vm: str, *, repo: str, endpoint: str | None = None, key_file: str | None = None,
                no_encrypt: bool = False) -> ListResult:
    with contextlib.closing(_store(repo, endpoint, key_file, no_encrypt)) as store:
        m, _files = store.manifest(vm)
    if not m.points:
        raise NotFound(f"{store.url} holds no backups of VM {vm!r}")
    return ListResult(vm, store.url, tuple(
        PointInfo(p.checkpoint, p.parent, p.level, p.mode, p.completed, p.seconds, {
            n: PointDiskInfo(f"{store.url}/{offsite.file_name(vm, d.image)}", d.size, d.bytes_copied,
                             d.bytes_zeroed)
            for n, d in p.disks.items()}, p.consistency, p.frozen_seconds)
        for p in m.points))


class _Bucket:
    """One VM's points in a bucket, opened: the manifest, each point's files, readers."""

    def __init__(self, store: Store, vm: str):
        self.store = store
        self.vm = vm
        self.m, self.stored = store.manifest(vm)
        if not self.m.points:
            raise NotFound(f"{store.url} holds no backups of VM {vm!r}")
        self.owner = {d.image: (p, d) for p in self.m.points for d in p.disks.values()}

    def info(self, rel: str) -> offsite.FileInfo:
        for sp in self.stored.values():
            if rel in sp.files:
                return sp.files[rel]
        raise RepositoryError(f"no point of {self.store.url} lists {rel}")

    def reader(self, rel: str) -> offsite.RemoteFile:
        return self.store.reader(self.vm, rel, self.info(rel).size)

    def chain(self, pd: PointDisk) -> list[PointDisk]:
        out, seen = [pd], {pd.image}
        while pd.backing is not None:
            if pd.backing in seen or pd.backing not in self.owner:
                raise RepositoryError(f"image {pd.image} of {self.store.url} is based on {pd.backing}, "
                                      "which no point of the bucket holds")
            seen.add(pd.backing)
            pd = self.owner[pd.backing][1]
            out.append(pd)
        return out

    def source(self, pd: PointDisk) -> RemoteSource:
        return RemoteSource([self.reader(layer.image) for layer in self.chain(pd)], pd.size)


def restore(vm: str, *, repo: str, output: str, checkpoint: str | None = None, fmt: str = "qcow2",
            disks: Sequence[str] = (), progress: str = "none", endpoint: str | None = None,
            key_file: str | None = None, no_encrypt: bool = False) -> RestoreResult:
    """A point restored from the bucket alone, read by ranges (never a whole image first)."""
    if fmt not in restore_mod.FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(restore_mod.FORMATS)}")
    restore_mod.check_output(output)
    with contextlib.closing(_store(repo, endpoint, key_file, no_encrypt)) as store:
        return _restore(_Bucket(store, vm), vm, output, checkpoint, fmt, disks, progress)


def _restore(b: "_Bucket", vm, output, checkpoint, fmt, disks, progress) -> RestoreResult:
    point = b.m.get(checkpoint) if checkpoint else b.m.newest
    names = list(dict.fromkeys(disks)) or list(point.disks)
    for n in names:
        if n not in point.disks:
            raise NotFound(f"point {point.checkpoint!r} holds no disk {n!r} (it has {', '.join(point.disks)})")
        for layer in b.chain(point.disks[n]):
            b.info(layer.image)
    written = restore_mod.write_images(None, b.m, point, names, output, fmt, progress, source=b.source)
    return RestoreResult(vm, point.checkpoint, written)


class _BucketVerifier(verify_mod._Verifier):
    """verify's layer checks, each layer read from the bucket; then every frame of its image not
    read yet is fetched and opened (or, unencrypted, the whole object hashed), so a changed
    byte anywhere in an object is found."""

    def __init__(self, b: _Bucket):
        # The local verifier uses its repository only for path conventions (backing names),
        # which a bucket shares; every read goes through the hooks below.
        super().__init__(Repository("/nonexistent"), b.m)
        self.b = b

    def _where(self, pd: PointDisk) -> str:
        return f"{self.b.store.url}/{offsite.file_name(self.b.vm, pd.image)}"

    def _header(self, pd: PointDisk):
        from . import qcow2, qcow2map

        try:
            r = self.b.reader(pd.image)
        except RepositoryError:
            return None
        try:
            return qcow2map.read_header(r.pread(qcow2.CLUSTER, 0))
        finally:
            r.close()

    def _open_sums(self, pd: PointDisk):
        rel = sums_name(pd)
        r = self.b.reader(rel)
        try:
            data = r.pread(r.size, 0)
        finally:
            r.close()
        f = io.BytesIO(data)
        layout = sums.Layout(pd.size, pd.block_size, pd.checksum, pd.sums_format)
        if not (layout.file_size_ok(len(data)) and layout.blkhash_of(f) == pd.blkhash):
            raise RepositoryError(f"checksums {self.b.store.url}/{offsite.file_name(self.b.vm, rel)} "
                                  "do not match the point")
        f.seek(0)
        return f, layout.stream(f)

    def _own_source(self, pd: PointDisk, own_layer: bool):
        return RemoteSource([self.b.reader(pd.image)], pd.size, own_layer=own_layer)

    def _check(self, pd: PointDisk):
        layer = super()._check(pd)
        for rel in (pd.image, sums_name(pd)):
            problem = _whole(self.b, rel)
            if problem:
                layer.problems.append(problem)
        return layer


def sums_name(pd: PointDisk) -> str:
    return offsite.disk_files(pd)[1]


def _whole(b: _Bucket, rel: str) -> str | None:
    """Every frame of an object opened (sealed), or its SHA-256 checked (unencrypted)."""
    import hashlib

    try:
        info = b.info(rel)
    except RepositoryError as e:
        return e.message
    r = b.reader(rel)
    try:
        digests = [hashlib.sha256(r.fetch(i)).digest() for i in range(r.count)]
    except Error as e:
        return e.message
    if offsite.files_digest(digests) != info.sha256:
        return f"object {r.name} differs from the file that was copied (SHA-256)"
    return None


def verify(vm: str, *, repo: str, checkpoint: str | None = None, endpoint: str | None = None,
           key_file: str | None = None, no_encrypt: bool = False) -> VerifyResult:
    with contextlib.closing(_store(repo, endpoint, key_file, no_encrypt)) as store:
        return _verify(_Bucket(store, vm), checkpoint)


def _verify(b: "_Bucket", checkpoint: str | None) -> VerifyResult:
    points: list[Point] = [b.m.get(checkpoint)] if checkpoint else b.m.points
    v = _BucketVerifier(b)
    out = []
    for p in points:
        disks = {name: v.disk(pd) for name, pd in p.disks.items()}
        out.append(VerifiedPoint(p.checkpoint, all(d.ok for d in disks.values()), disks))
    return VerifyResult(b.vm, b.store.url, all(p.ok for p in out), tuple(out))


def prune(vm: str, *, repo: str, keep: retention.Policy, dry_run: bool = False,
          tz: datetime.tzinfo | None = None, endpoint: str | None = None, key_file: str | None = None,
          no_encrypt: bool = False) -> PruneResult:
    """The bucket's own retention: the points ``keep`` drops go, unless a kept point's chain
    needs their images (kept then, with the reason)."""
    with contextlib.closing(_store(repo, endpoint, key_file, no_encrypt)) as store:
        return _prune(_Bucket(store, vm), keep, dry_run, tz)


def _prune(b: "_Bucket", keep: retention.Policy, dry_run: bool, tz) -> PruneResult:
    vm = b.vm
    selection = retention.select(b.m.points, keep, tz)
    reasons = dict(selection.kept)
    needed = set(selection.kept)
    for c in selection.kept:
        for pd in b.m.get(c).disks.values():
            for layer in b.chain(pd)[1:]:
                owner = b.owner[layer.image][0].checkpoint
                if owner not in needed:
                    needed.add(owner)
                    reasons[owner] = f"needed by {c}"
                elif owner not in reasons:
                    reasons[owner] = f"needed by {c}"
    order = [p.checkpoint for p in b.m.points]
    keep_names = tuple(c for c in order if c in needed)
    remove = tuple(c for c in order if c not in needed)
    if not dry_run:
        for c in reversed(remove):
            sp = b.stored[c]
            # The point object first: from then on the point is not in the bucket, and what is
            # left of its files (a crash) is sent again only if a copy needs it.
            b.store.bucket.delete([offsite.point_name(vm, c)])
            b.store.bucket.delete([offsite.file_name(vm, rel) for rel in sp.files])
    return PruneResult(vm, keep_names, remove, (), dry_run, reasons=reasons,
                       completed={p.checkpoint: p.completed for p in b.m.points}, policy=str(keep))
