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
    tcp: xmlgen.TcpServer | None = None  # the export is on the network (remote libvirt)

    def push_target(self, disk: str) -> pathlib.Path:
        return self.run_dir / f"{disk}.qcow2"


def documents(plan: BackupPlan, run_dir: pathlib.Path, repository_root: str, mode: str = "pull",
              tcp: xmlgen.TcpServer | None = None, remote: bool = False) -> Documents:
    """``tcp``: the export listens there instead of on a socket in the run directory.
    ``remote``: libvirt runs on another host, where no run directory can be made from here: the
    scratch images go beside its name, in the scratch directory of the hypervisor (libvirt
    creates them, and removes them when the job ends)."""
    socket = str(run_dir / "nbd.sock") if mode == "pull" and tcp is None else None

    def scratch(disk: str) -> str:
        return f"{run_dir}.{disk}.scratch.qcow2" if remote else str(run_dir / f"{disk}.scratch.qcow2")

    bdisks = [
        xmlgen.BackupDisk(name=d.name, full=d.full,
                          scratch=scratch(d.name) if mode == "pull" else None,
                          target=str(run_dir / f"{d.name}.qcow2") if mode == "push" else None)
        for d in plan.disks
    ]
    bspec = xmlgen.BackupSpec(socket=socket, disks=bdisks, incremental=plan.parent, tcp=tcp)
    build = xmlgen.backup_pull_xml if mode == "pull" else xmlgen.backup_push_xml
    cspec = xmlgen.CheckpointSpec(
        name=plan.checkpoint,
        disks=[xmlgen.CheckpointDisk(d.name, d.bitmap) for d in plan.disks],
        description=checkpoints.description(plan.level, plan.vm, repository_root),
    )
    return Documents(plan, run_dir, socket, build(bspec), xmlgen.checkpoint_xml(cspec), mode, tcp)
