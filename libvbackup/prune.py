"""Prune: keep the newest N points restorable byte-exact, remove the rest and their checkpoints.

Order, so that a crash at any step leaves a consistent repository:
1. flatten the kept points whose parent goes (safe-mode rebase: still valid with the old chain);
2. write the manifest without the removed points (atomic);
3. delete the removed points' directories, then their libvirt checkpoints (ours only).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil

from . import qemuimg
from .errors import Error
from .plan import plan_prune
from .repo import Repository
from .results import PruneResult
from .virt import Connection

log = logging.getLogger(__name__)


def prune(vm: str, *, repo: str, keep: int, uri: str | None = None, dry_run: bool = False) -> PruneResult:
    repository = Repository(repo)
    if dry_run:
        repository.check_readable()
    else:
        repository.check_writable()
    m = repository.load(vm)
    plan = plan_prune(m, keep)
    deleted: list[str] = []
    warnings: list[str] = []

    def result() -> PruneResult:
        return PruneResult(vm, plan.keep, plan.remove, tuple(f"{p}/{d}" for p, d in plan.flatten), dry_run,
                           tuple(deleted), tuple(warnings))

    if dry_run or not plan.remove:
        return result()
    with repository.lock(vm):
        m = repository.load(vm)
        plan = plan_prune(m, keep)
        for point, disk in plan.flatten:
            log.info("flattening %s/%s", point, disk)
            qemuimg.flatten(str(repository.image(vm, m.get(point).disks[disk].image)))
        removed = set(plan.remove)
        kept = []
        for p in m.points:
            if p.checkpoint in removed:
                continue
            if p.parent in removed:
                p = dataclasses.replace(
                    p, parent=None,
                    disks={n: dataclasses.replace(d, backing=None) for n, d in p.disks.items()})
            kept.append(p)
        m.points = kept
        repository.save(m)
        for name in plan.remove:
            shutil.rmtree(repository.vm_dir(vm) / name, ignore_errors=True)
        try:
            with Connection(uri) as conn:
                dom = conn.domain(vm)
                have = set(dom.checkpoint_names())
                # Newest first: a checkpoint's changes are merged into its parent on deletion.
                for name in reversed(plan.remove):
                    if name in have:
                        dom.delete_checkpoint(name)
                        deleted.append(name)
        except Error as e:
            warnings.append(f"libvirt checkpoints were not deleted: {e}")
            log.warning("libvirt checkpoints were not deleted: %s", e)
    return result()
