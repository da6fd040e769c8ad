"""Verify a repository: every chain complete, every byte equal to what was backed up.

Each stored image is checked once, as a *layer*: it must exist and name the expected backing
file; its point's digests must match the manifest; and the image's own layer, read by the copy
engine straight from the file (``imagefile``: only what this image holds, zero and unallocated
ranges by their extents, data read and hashed), merged with the parent point's stored digests
for the rest, must give exactly the point's stored digests, a merge of two sorted streams. By
induction from the full image, a point is good when every layer of its chain is: verifying a
whole repository costs about what reading its stored data once costs, not points x disk data.
Memory holds a window of digests, whatever the disk size.
"""

from __future__ import annotations

import dataclasses
import logging

from . import checksum, engine, imagefile, instantrec, qcow2, qcow2map, records
from .errors import Error, NotFound
from .manifest import Manifest, Point, PointDisk
from .repo import Repository
from .outcomes import InstantUse, VerifiedDisk, VerifiedPoint, VerifyResult

log = logging.getLogger(__name__)

MAX_REPORTED = 10


@dataclasses.dataclass
class _Layer:
    problems: list[str]
    bad_blocks: int = 0


class _Compare:
    """The stored records against the ones the hasher produces, both in block order: runs the
    hasher passes through from the parent are compared as bytes, record by record only where
    they differ."""

    def __init__(self, stored: records.Records, block: int, digest_size: int):
        self.stored = stored
        self.block = block
        self.k = digest_size
        self.bad: list[int] = []
        self.count = 0

    def _mismatch(self, index: int) -> None:
        self.count += 1
        if len(self.bad) < MAX_REPORTED:
            self.bad.append(index * self.block)

    def produced_raw(self, raw: bytes) -> None:
        if self.stored.peek_bytes(len(raw)) == raw:
            self.stored.skip_bytes(len(raw))
            return
        for index, digest in records.decode(raw, self.k):
            self.produced(index, digest)

    def produced(self, index: int, digest: bytes) -> None:
        nxt = self.stored.peek()
        while nxt is not None and nxt < index:
            self._mismatch(nxt)  # stored as data, reads as zeroes now
            self.stored.next()
            nxt = self.stored.peek()
        if nxt == index:
            if self.stored.next()[1] != digest:
                self._mismatch(index)
        else:
            self._mismatch(index)  # data now where the backup had zeroes

    def finish(self) -> None:
        while (rec := self.stored.next()) is not None:
            self._mismatch(rec[0])


class _Verifier:
    def __init__(self, repository: Repository, m: Manifest):
        self.repository = repository
        self.m = m
        self.owner = {d.image: (p, d) for p in m.points for d in p.disks.values()}
        self.layers: dict[str, _Layer] = {}

    def chain(self, pd: PointDisk) -> list[PointDisk | str]:
        """The disk's images from the point's own down to its full image (a name when an image
        belongs to no point)."""
        out: list[PointDisk | str] = [pd]
        seen = {pd.image}
        while pd.backing is not None and pd.backing not in seen:
            seen.add(pd.backing)
            owner = self.owner.get(pd.backing)
            if owner is None:
                out.append(pd.backing)
                break
            pd = owner[1]
            out.append(pd)
        return out

    def disk(self, pd: PointDisk) -> VerifiedDisk:
        problems: list[str] = []
        bad = 0
        for i, layer in enumerate(self.chain(pd)):
            if isinstance(layer, str):
                problems.append(f"image {layer} belongs to no point of the manifest")
                continue
            result = self.layer(layer)
            where = "" if i == 0 else f"in {layer.image}, below: "
            problems += [where + p for p in result.problems]
            bad += result.bad_blocks
        return VerifiedDisk(not problems, tuple(problems), bad, pd.blkhash)

    def layer(self, pd: PointDisk) -> _Layer:
        if pd.image not in self.layers:
            log.info("verifying %s", pd.image)
            self.layers[pd.image] = self._check(pd)
        return self.layers[pd.image]

    # -- where the layers are read from (a bucket repository overrides these) -----------------
    def _where(self, pd: PointDisk) -> str:
        return str(self.repository.image(self.m.vm, pd.image))

    def _header(self, pd: PointDisk) -> tuple[int, str | None] | None:
        """(virtual size, backing file) from the image's header; None when it is missing."""
        path = self.repository.image(self.m.vm, pd.image)
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            return qcow2map.read_header(f.read(qcow2.CLUSTER))

    def _open_sums(self, pd: PointDisk):
        return self.repository.open_sums(self.m.vm, pd)

    def _own_source(self, pd: PointDisk, own_layer: bool):
        return imagefile.FileSource(self._where(pd), pd.size, own_layer=own_layer)

    def _check(self, pd: PointDisk) -> _Layer:
        path = self._where(pd)
        try:
            header = self._header(pd)
        except (OSError, ValueError) as e:
            return _Layer([f"image {path} cannot be read: {getattr(e, 'strerror', None) or e}"])
        except Error as e:
            return _Layer([f"image {path} cannot be read: {e.message}"])
        if header is None:
            return _Layer([f"image {path} is missing"])
        size, backing = header
        want = self.repository.backing_name(pd.backing) if pd.backing else None
        if backing != want:
            return _Layer([f"image {path} has backing file {backing!r}, expected {want!r}"])
        if size != pd.size:
            return _Layer([f"image size {size} differs from the recorded {pd.size}"])
        parent = self.owner[pd.backing][1] if pd.backing else None
        files = []
        try:
            try:
                f, stored = self._open_sums(pd)
            except Error as e:
                return _Layer([e.message])
            files.append(f)
            parent_records = None
            if parent is not None:
                try:
                    pf, parent_records = self._open_sums(parent)
                except Error:
                    return _Layer([f"cannot be checked: the checksums of {parent.image} are damaged"])
                files.append(pf)
            compare = _Compare(stored, pd.block_size, checksum.algorithm(pd.checksum).size)
            hasher = checksum.BlockHasher(pd.size, parent=parent_records, parent_size=parent.size if parent else None,
                                          block=pd.block_size, algorithm_name=pd.checksum, sink=compare.produced,
                                          sink_raw=compare.produced_raw)
            with self._own_source(pd, parent is not None) as src:
                engine.copy(src, engine.Discard(pd.size, reads_as_zero=parent is None), observer=hasher)
            hasher.done()
            compare.finish()
        except ValueError as e:
            return _Layer([f"checksums of {pd.image} are malformed: {e}"])
        except Error as e:
            return _Layer([f"reading {path} failed: {e}"])
        finally:
            for f in files:
                f.close()
        if compare.count:
            shown = ", ".join(str(o) for o in compare.bad)
            return _Layer([f"{compare.count} block(s) of {pd.block_size} bytes differ from the backup, "
                           f"at offsets {shown}{' …' if compare.count > len(compare.bad) else ''}"],
                          compare.count)
        return _Layer([])


def verify(vm: str, *, repo: str, checkpoint: str | None = None) -> VerifyResult:
    """Verify every point (or one point and the chain it needs) of ``vm``."""
    repository = Repository(repo)
    repository.check_readable()
    m = repository.load(vm)
    if not m.points:
        raise NotFound(f"repository {repository.root} holds no backups of VM {vm!r}")
    points: list[Point] = [m.get(checkpoint)] if checkpoint else m.points
    v = _Verifier(repository, m)
    out = []
    for p in points:
        disks = {name: v.disk(pd) for name, pd in p.disks.items()}
        out.append(VerifiedPoint(p.checkpoint, all(d.ok for d in disks.values()), disks))
    # Points an instant VM reads (served read-only by qemu-nbd): verified like the others, and
    # named, since prune keeps them until that VM is finalized.
    in_use = tuple(InstantUse(r.name, r.checkpoint, r.points) for r in instantrec.in_use(repository, vm))
    return VerifyResult(vm, str(repository.root), all(p.ok for p in out), tuple(out), in_use)
