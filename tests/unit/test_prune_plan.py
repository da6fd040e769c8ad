"""plan_prune (pure): what a retention policy removes, and how the kept points stay whole."""

from __future__ import annotations

import datetime

import pytest

from libvbackup import errors
from libvbackup.manifest import Manifest, Point, PointDisk, dumps, loads
from libvbackup.plan import PruneRebase, plan_prune
from libvbackup.retention import Policy

UTC = datetime.timezone.utc


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


def test_an_int_is_keep_last():
    assert plan_prune(M, 3) == plan_prune(M, Policy(last=3))
    assert plan_prune(M, 3).reasons == {"i3": "last #1", "d": "last #2", "i2": "last #3"}


# --------------------------------------------------------------------------- calendar rules

def gpoint(name, completed, parent=None, disks=("vda",), full=()):
    """A point whose disks back onto the parent's images, except those named in ``full``."""
    return Point(checkpoint=name, parent=parent, level="full" if parent is None else "incremental",
                 mode="pull", started="", completed=completed, seconds=0.0,
                 disks={n: PointDisk(name=n, image=f"{name}/{n}.qcow2", size=1,
                                     backing=f"{parent}/{n}.qcow2" if parent and n not in full else None)
                        for n in disks})


def test_kept_points_are_rebased_onto_their_nearest_kept_ancestor():
    m = Manifest(vm="vm", points=[
        gpoint("f", "2026-01-01T10:00:00Z", disks=("vda", "vdb")),
        gpoint("i1", "2026-01-02T09:00:00Z", "f", disks=("vda", "vdb")),
        gpoint("i2", "2026-01-02T18:00:00Z", "i1", disks=("vda", "vdb"), full=("vdb",)),
        gpoint("i3", "2026-01-03T09:00:00Z", "i2", disks=("vda", "vdb")),
        gpoint("i4", "2026-01-03T18:00:00Z", "i3", disks=("vda", "vdb")),
    ])
    p = plan_prune(m, Policy(daily=3), tz=UTC)
    assert p.keep == ("f", "i2", "i4") and p.remove == ("i1", "i3")
    assert p.reasons == {"f": "daily #3", "i2": "daily #2", "i4": "daily #1"}
    # i2's vdb is full (replaced in i2): nothing to do for it.
    assert p.rebase == (PruneRebase("i2", "vda", "f/vda.qcow2", "i1/vda.qcow2"),
                        PruneRebase("i4", "vda", "i2/vda.qcow2", "i3/vda.qcow2"),
                        PruneRebase("i4", "vdb", "i2/vdb.qcow2", "i3/vdb.qcow2"))
    assert p.flatten == () and p.parents == {"i2": "f", "i4": "i2"}
    after = p.pruned(m)
    assert [(q.checkpoint, q.parent) for q in after.points] == [("f", None), ("i2", "f"), ("i4", "i2")]
    assert {(q.checkpoint, n): d.backing for q in after.points for n, d in q.disks.items()} == {
        ("f", "vda"): None, ("f", "vdb"): None, ("i2", "vda"): "f/vda.qcow2", ("i2", "vdb"): None,
        ("i4", "vda"): "i2/vda.qcow2", ("i4", "vdb"): "i2/vdb.qcow2"}
    assert loads(dumps(after)) == after  # a valid manifest: parents precede their children
    assert m.get("i4").parent == "i3" and m.get("i4").disks["vda"].backing == "i3/vda.qcow2"  # untouched


def test_a_kept_point_with_no_kept_ancestor_is_flattened():
    m = Manifest(vm="vm", points=[
        gpoint("f", "2026-01-01T10:00:00Z"), gpoint("i1", "2026-01-02T08:00:00Z", "f"),
        gpoint("i2", "2026-01-02T20:00:00Z", "i1"), gpoint("f2", "2026-01-03T08:00:00Z"),
        gpoint("i3", "2026-01-03T20:00:00Z", "f2"),
    ])
    p = plan_prune(m, Policy(daily=2), tz=UTC)
    assert p.keep == ("i2", "i3") and p.remove == ("f", "i1", "f2")
    assert p.rebase == (PruneRebase("i2", "vda", None, "i1/vda.qcow2"), PruneRebase("i3", "vda", None, "f2/vda.qcow2"))
    assert p.flatten == (("i2", "vda"), ("i3", "vda")) and p.parents == {"i2": None, "i3": None}
    assert [(q.checkpoint, q.parent, q.disks["vda"].backing) for q in p.pruned(m).points] == [
        ("i2", None, None), ("i3", None, None)]


def test_each_disk_follows_its_own_chain():
    # vdb was replaced in i2 (full there) and vdc added in i2; f is kept, i1 and i2 go.
    m = Manifest(vm="vm", points=[
        gpoint("f", "2026-01-20T10:00:00Z", disks=("vda", "vdb")),
        gpoint("i1", "2026-02-01T10:00:00Z", "f", disks=("vda", "vdb")),
        gpoint("i2", "2026-02-02T10:00:00Z", "i1", disks=("vda", "vdb", "vdc"), full=("vdb", "vdc")),
        gpoint("i3", "2026-02-03T10:00:00Z", "i2", disks=("vda", "vdb", "vdc")),
    ])
    p = plan_prune(m, Policy(monthly=2), tz=UTC)
    assert p.keep == ("f", "i3") and p.reasons == {"f": "monthly #2", "i3": "monthly #1"}
    assert p.rebase == (PruneRebase("i3", "vda", "f/vda.qcow2", "i2/vda.qcow2"),  # down i2, i1 to f
                        PruneRebase("i3", "vdb", None, "i2/vdb.qcow2"),  # its chain starts in i2
                        PruneRebase("i3", "vdc", None, "i2/vdc.qcow2"))
    assert p.parents == {"i3": "f"}
    assert {n: d.backing for n, d in p.pruned(m).get("i3").disks.items()} == {
        "vda": "f/vda.qcow2", "vdb": None, "vdc": None}


def test_nothing_changes_for_kept_points_whose_parents_stay():
    m = Manifest(vm="vm", points=[gpoint("f", "2026-01-01T10:00:00Z"), gpoint("i1", "2026-01-02T10:00:00Z", "f"),
                                  gpoint("i2", "2026-01-03T10:00:00Z", "i1")])
    p = plan_prune(m, Policy(last=2, yearly=1), tz=UTC)
    assert p.keep == ("f", "i1", "i2") and p.remove == () and p.rebase == () and p.parents == {}
    assert p.reasons["f"] == "yearly[oldest] #1"  # 2026 was used up by i2, counting nothing
    assert p.pruned(m) == m


def test_an_image_based_on_no_point_is_a_repository_error():
    m = Manifest(vm="vm", points=[gpoint("f", "2026-01-01T10:00:00Z"), gpoint("i1", "2026-01-02T10:00:00Z", "f")])
    m.points[1].disks["vda"].backing = "elsewhere/vda.qcow2"
    with pytest.raises(errors.RepositoryError, match="belongs to no point"):
        plan_prune(m, 1)
