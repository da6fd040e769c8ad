"""Prune: keep the points a retention policy selects, restorable byte-exact; remove the rest
and their checkpoints.

Which points stay is ``retention.select`` (``--keep N`` is ``Policy(last=N)``); how the kept
ones stay whole is ``plan.plan_prune``. Order, so that a crash at any step leaves a
consistent repository:

1. rebase the kept images whose backing image goes onto the nearest kept image of their chain,
   or onto nothing (safe mode: the image reads the same with its old chain and with the new one,
   before, during and after; ``qemuimg.rebase`` writes through, so the new header reaches the
   disk only after the data it needs);
2. write the manifest without the removed points, with the new parents and backing images
   (atomic);
3. delete the removed points' directories, then their libvirt checkpoints (ours only), newest
   first.

A crash after 1 leaves images whose header names a kept image while the manifest still names
the old one: both chains exist and read the same (restore follows the headers), and the next
prune, whatever its policy, first puts every kept image on the backing file its own plan gives
it (it reads each header), then goes on. A crash after 2 leaves directories and checkpoints
that no point names any more: nothing reads those directories, and ``checkpoints`` shows the
checkpoints as orphans. A prune with nothing to remove still takes the lock when some kept
image is not yet on its planned backing file.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil

from . import instantrec, qcow2, qcow2map, qemuimg
from .errors import Error
from .manifest import Manifest
from .plan import PrunePlan, plan_prune
from .repo import Repository
from .results import PruneResult
from .retention import Policy
from .virt import Connection

log = logging.getLogger(__name__)


def prune(vm: str, *, repo: str, keep: int | Policy, uri: str | None = None, dry_run: bool = False,
          tz: datetime.tzinfo | None = None) -> PruneResult:
    """Apply ``keep`` (a ``Policy``; an int N keeps the newest N) to ``vm``'s points.

    ``tz``: the time zone of the calendar rules' days, weeks, months and years (None: local).
    """
    repository = Repository(repo)
    if dry_run:
        repository.check_readable()
    else:
        repository.check_writable()
    m = repository.load(vm)
    plan = plan_prune(m, keep, tz)
    deleted: list[str] = []
    warnings: list[str] = []
    work = _image_work(repository, m, plan)
    if dry_run or not (plan.remove or work):
        warnings += [w.note for w in work if w.note]
        if dry_run and plan.remove:  # what the real prune would refuse
            for rec in instantrec.in_use(repository, vm):
                held = [p for p in rec.points if p in plan.remove]
                if held:
                    warnings.append(f"point(s) {', '.join(held)} are in use by instant VM {rec.name!r}: "
                                    f"prune refuses until 'libvbackup finalize {rec.name}'")
        return _result(m, plan, dry_run, deleted, warnings)
    with repository.lock(vm):
        m = repository.load(vm)
        plan = plan_prune(m, keep, tz)
        # An instant VM reads its point's whole chain through qemu-nbd: none of it may go.
        instantrec.refuse_removal(repository, vm, plan.remove)
        for w in _image_work(repository, m, plan):
            if w.note:
                log.warning("%s", w.note)
                warnings.append(w.note)
            log.info("rebasing %s onto %s", w.image, w.backing or "nothing")
            qemuimg.rebase(str(repository.image(vm, w.image)),
                           Repository.backing_name(w.backing) if w.backing else None)
        if plan.remove or plan.rebase:
            repository.save(plan.pruned(m))
        for name in plan.remove:
            shutil.rmtree(repository.point_dir(vm, name), ignore_errors=True)
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
    return _result(m, plan, dry_run, deleted, warnings)


@dataclasses.dataclass(frozen=True)
class _Rebase:
    image: str  # as the manifest names it
    backing: str | None  # the image it goes onto; None: nothing
    note: str | None = None  # not in the plan: left on another backing file by a prune that died


def _image_work(repository: Repository, m: Manifest, plan: PrunePlan) -> list[_Rebase]:
    """The kept images whose header does not yet name the backing file the plan gives them:
    the plan's rebases, and any image a prune that died left on another backing file."""
    planned = {(r.point, r.disk): r.backing for r in plan.rebase}
    out = []
    for name in plan.keep:
        for disk, d in m.get(name).disks.items():
            want = planned.get((name, disk), d.backing)
            header = _backing_file(repository.image(m.vm, d.image))
            if header == (Repository.backing_name(want) if want else ""):
                continue  # done already (the header changes last), or nothing to do
            if (name, disk) in planned:
                out.append(_Rebase(d.image, want))
            elif header is not None:  # an unreadable image is verify's to report, not prune's to touch
                out.append(_Rebase(d.image, want, f"image {d.image} was based on {header or 'nothing'} "
                                                  f"(a prune was interrupted): rebased onto {want or 'nothing'}"))
    return out


def _backing_file(path) -> str | None:
    """The backing file named in an image's header ("" for none), None when it cannot be read
    (then only the plan's own rebases run, and qemu-img reports the damage)."""
    try:
        with open(path, "rb") as f:
            _size, backing = qcow2map.read_header(f.read(qcow2.CLUSTER))
    except (OSError, ValueError):
        return None
    return backing or ""


def _result(m: Manifest, plan: PrunePlan, dry_run: bool, deleted: list[str], warnings: list[str]) -> PruneResult:
    return PruneResult(
        m.vm, plan.keep, plan.remove, tuple(f"{p}/{d}" for p, d in plan.flatten), dry_run,
        tuple(deleted), tuple(warnings),
        reasons=dict(plan.reasons),
        rebase={f"{r.point}/{r.disk}": r.backing for r in plan.rebase},
        completed={p.checkpoint: p.completed for p in m.points},
        policy=str(plan.policy),
    )
