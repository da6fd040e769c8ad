"""What the pull and push transports share: the context of a run and a disk's result.

A transport starts the libvirt job, fills ``<chk>.partial/<disk>.qcow2`` for every planned disk
and computes its block digests, and returns one ``DiskResult`` per disk; it opens and closes
its own sources and targets. The pipeline (``backup``) records, commits and cleans up.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

from . import checksum
from .documents import Documents
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

    @property
    def plan(self) -> BackupPlan:
        return self.docs.plan

    def job_started(self) -> None:
        """The point in time is fixed (job and checkpoint exist): e.g. thaw the guest now."""
        if self.on_job_started is not None:
            self.on_job_started()

    def sink(self, doc: dict) -> None:
        self.repository.write_progress(self.plan.vm, doc)

    def image(self, disk: str) -> pathlib.Path:
        return Repository.image_file(self.partial, disk)

    def backing(self, d: PlannedDisk) -> str | None:
        return Repository.backing_name(d.backing) if d.backing else None

    def hasher(self, d: PlannedDisk, size: int) -> checksum.BlockHasher:
        """Digests of the new point: from nothing for a full image; an incremental starts
        from its parent's (same block size and algorithm; a grown disk's new blocks are zero)."""
        if d.full:
            return checksum.BlockHasher(size)
        pd = self.manifest.get(self.plan.parent).disks[d.name]
        sums = self.repository.read_sums(self.plan.vm, pd)
        return checksum.BlockHasher(size, parent_sums=sums, parent_size=pd.size, block=pd.block_size,
                                    algorithm_name=pd.checksum)


@dataclasses.dataclass(frozen=True)
class DiskResult:
    name: str
    size: int
    bytes_copied: int
    bytes_zeroed: int
    hasher: checksum.BlockHasher
