"""What the pull and push transports share: the context of a run and a disk's result.

A transport starts the libvirt job, fills ``<chk>.partial/<disk>.qcow2`` for every planned disk
and computes its block digests, and returns one ``DiskResult`` per disk; it opens and closes
its own sources and targets. The pipeline (``backup``) records, commits and cleans up.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

from . import checksum, sums
from .documents import Documents
from .errors import RepositoryError
from .manifest import Manifest
from .plan import BackupPlan, PlannedDisk
from .repo import Repository


@dataclasses.dataclass
class RunContext:
    repository: Repository
    dom: object  # virt.Domain
    docs: Documents
    manifest: Manifest
    partial: pathlib.Path
    progress: str = "none"
    scratch_limit: int | None = None
    on_job_started: Callable[[], None] | None = None
    freezer: object | None = None  # quiesce.Freezer: the guest frozen around backupBegin
    net: object | None = None  # netexport.NetExport: the export is on TCP
    remote: bool = False  # libvirt runs on another host (the scratch images are there)
    compress: bool = False  # pull: the images' clusters compressed (``target.CompressedQcow2Target``)
    # A transport whose job is still ending when it returns (pull) leaves its ender here, with
    # ``wait()`` (raises what ending it raised) and ``join()``: see ``end_job``.
    job_end: object | None = None

    @property
    def plan(self) -> BackupPlan:
        return self.docs.plan

    def begin_job(self, reuse_external: bool = False) -> None:
        """Start the libvirt job (the point in time), the guest frozen around it if planned;
        then tell the caller the point in time is fixed (``on_job_started``)."""
        def begin() -> None:
            self.dom.backup_begin(self.docs.backup_xml, self.docs.checkpoint_xml, reuse_external=reuse_external)

        if self.freezer is None:
            begin()
        else:
            self.freezer.run(begin)
        if self.on_job_started is not None:
            self.on_job_started()

    def end_job(self) -> None:
        """After the commit: wait until the job has ended. libvirt ends a pull job (its scratch
        images, its export) while the pipeline commits the point; the run directory is removed
        only after this."""
        ender, self.job_end = self.job_end, None
        if ender is not None:
            ender.wait()

    def forget_job(self) -> None:
        """On failure, before the clean-up: only wait until a job's end in progress is done
        (the clean-up then sees whether the job is still there)."""
        ender, self.job_end = self.job_end, None
        if ender is not None:
            ender.join()

    def sink(self, doc: dict) -> None:
        self.repository.write_progress(self.plan.vm, doc)

    def image(self, disk: str) -> pathlib.Path:
        return Repository.image_file(self.partial, disk)

    def backing(self, d: PlannedDisk) -> str | None:
        return Repository.backing_name(d.backing) if d.backing else None

    def digests(self, d: PlannedDisk, size: int) -> "Digests":
        """The new point's digests of one disk: from nothing for a full image; an incremental
        streams its parent's (same block size and algorithm; a grown disk's new blocks are zero)."""
        return Digests(self, d, size)


class Digests:
    """A disk's ``.sums`` in ``<chk>.partial/``, written as the block hasher (the copy's
    observer) emits its records; the parent's records are read as they are needed."""

    def __init__(self, ctx: RunContext, d: PlannedDisk, size: int):
        self._parent_file = None
        parent = parent_size = None
        block, algo = checksum.BLOCK, checksum.DEFAULT
        if not d.full:
            pd = ctx.manifest.get(ctx.plan.parent).disks[d.name]
            self._parent_file, parent = ctx.repository.open_sums(ctx.plan.vm, pd)
            parent_size, block, algo = pd.size, pd.block_size, pd.checksum
        try:
            self._file = ctx.repository.create_sums(ctx.partial, d.name)
        except BaseException:
            self.close()
            raise
        self.layout = sums.Layout(size, block, algo)
        self._writer = sums.SumsWriter(self._file, self.layout)
        self.hasher = checksum.BlockHasher(size, parent=parent, parent_size=parent_size, block=block,
                                           algorithm_name=algo, sink=self._writer.add,
                                           sink_raw=self._writer.add_raw)

    def complete(self) -> str:
        """After the copy: the last records written, the file on disk; returns the blkhash."""
        try:
            self.hasher.done()
        except ValueError as e:
            raise RepositoryError(f"the parent's checksums do not fit this disk: {e}") from e
        blkhash = self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        return blkhash

    def close(self) -> None:
        for f in (getattr(self, "_file", None), self._parent_file):
            if f is not None:
                f.close()


@dataclasses.dataclass(frozen=True)
class DiskResult:
    name: str
    size: int
    bytes_copied: int
    bytes_zeroed: int
    blkhash: str
    block: int
    algorithm: str
    sums_format: int = sums.SPARSE
    compression: str | None = None  # zstd | zlib: the image's clusters are compressed
