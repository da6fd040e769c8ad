"""The <domainbackup> and <domaincheckpoint> documents of a plan (pure).

File names derive from the run directory: pull mode puts the NBD socket and one scratch image
per disk there, push mode one target image per disk.
"""

from __future__ import annotations

import dataclasses
import pathlib

from . import checkpoints, xmlgen
from .plan import BackupPlan


@dataclasses.dataclass(frozen=True)
class Documents:
    plan: BackupPlan
    run_dir: pathlib.Path
    socket: str | None
    backup_xml: str
    checkpoint_xml: str
    mode: str = "pull"

    def push_target(self, disk: str) -> pathlib.Path:
        return self.run_dir / f"{disk}.qcow2"


def documents(plan: BackupPlan, run_dir: pathlib.Path, repository_root: str, mode: str = "pull") -> Documents:
    socket = str(run_dir / "nbd.sock") if mode == "pull" else None
    bdisks = [
        xmlgen.BackupDisk(name=d.name, full=d.full,
                          scratch=str(run_dir / f"{d.name}.scratch.qcow2") if mode == "pull" else None,
                          target=str(run_dir / f"{d.name}.qcow2") if mode == "push" else None)
        for d in plan.disks
    ]
    bspec = xmlgen.BackupSpec(socket=socket, disks=bdisks, incremental=plan.parent)
    build = xmlgen.backup_pull_xml if mode == "pull" else xmlgen.backup_push_xml
    cspec = xmlgen.CheckpointSpec(
        name=plan.checkpoint,
        disks=[xmlgen.CheckpointDisk(d.name, d.bitmap) for d in plan.disks],
        description=checkpoints.description(plan.level, plan.vm, repository_root),
    )
    return Documents(plan, run_dir, socket, build(bspec), xmlgen.checkpoint_xml(cspec), mode)
