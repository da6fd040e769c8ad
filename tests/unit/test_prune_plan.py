"""plan_prune (pure)."""

from __future__ import annotations

import pytest

from libvbackup import errors
from libvbackup.manifest import Manifest, Point, PointDisk
from libvbackup.plan import plan_prune


def point(name, parent=None, raw=False):
    disks = {"vda": PointDisk(name="vda", image=f"{name}/vda.qcow2",
                              backing=f"{parent}/vda.qcow2" if parent else None, size=1)}
    disks["vdb"] = PointDisk(name="vdb", image=f"{name}/vdb.qcow2", backing=None, size=1)
    return Point(checkpoint=name, parent=parent, level="x", mode="pull", started="", completed="",
                 seconds=0.0, disks=disks)


M = Manifest(vm="vm", points=[point("f"), point("i1", "f"), point("i2", "i1"), point("d", "f"),
                              point("i3", "d")])


@pytest.mark.parametrize("keep,kept,flat", [
    (1, ("i3",), (("i3", "vda"),)),
    (2, ("d", "i3"), (("d", "vda"),)),
    (3, ("i2", "d", "i3"), (("i2", "vda"), ("d", "vda"))),
    (5, ("f", "i1", "i2", "d", "i3"), ()),
    (9, ("f", "i1", "i2", "d", "i3"), ()),
])
def test_plan(keep, kept, flat):
    p = plan_prune(M, keep)
    assert p.keep == kept
    assert set(p.remove) == {q.checkpoint for q in M.points} - set(kept)
    assert p.flatten == flat


def test_keep_must_be_positive():
    with pytest.raises(errors.UsageError):
        plan_prune(M, 0)
