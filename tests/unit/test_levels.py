"""choose_parent: --level and --incremental to a parent checkpoint (pure)."""

from __future__ import annotations

import pytest

from libvbackup import errors
from libvbackup.manifest import Manifest, Point, PointDisk
from libvbackup.plan import choose_parent


def point(name, parent=None):
    return Point(checkpoint=name, parent=parent, level="full" if parent is None else "incremental",
                 mode="pull", started="", completed="", seconds=0.0,
                 disks={"vda": PointDisk(name="vda", image=f"{name}/vda.qcow2", backing=None, size=1)})


M = Manifest(vm="vm1", points=[point("f1"), point("i1", "f1"), point("f2"), point("i2", "f2"), point("i3", "i2")])
OK = lambda c: None  # noqa: E731
BROKEN = lambda c: "missing or broken bitmap"  # noqa: E731


@pytest.mark.parametrize("level,parent", [("full", None), ("inc", "i3"), ("diff", "f2"), ("auto", "i3"),
                                          (None, None)])
def test_levels_pick_the_parent(level, parent):
    assert choose_parent(M, level=level, incremental=None, unusable=OK).parent == parent


def test_explicit_incremental_is_kept_and_checked():
    assert choose_parent(M, level=None, incremental="i1", unusable=OK).parent == "i1"
    with pytest.raises(errors.StateError, match="bitmap"):
        choose_parent(M, level=None, incremental="i1", unusable=BROKEN)
    # Unknown to the repository: left to plan_backup, which names the problem.
    assert choose_parent(M, level=None, incremental="nope", unusable=BROKEN).parent == "nope"


def test_auto_falls_back_to_full_and_says_why():
    c = choose_parent(M, level="auto", incremental=None, unusable=BROKEN)
    assert c.parent is None and "i3" in c.reason and "bitmap" in c.reason
    c = choose_parent(Manifest(vm="vm1"), level="auto", incremental=None, unusable=OK)
    assert c.parent is None and "no backup" in c.reason


@pytest.mark.parametrize("level", ["inc", "diff"])
def test_inc_and_diff_fail_when_unusable_or_empty(level):
    with pytest.raises(errors.StateError):
        choose_parent(M, level=level, incremental=None, unusable=BROKEN)
    with pytest.raises(errors.NotFound):
        choose_parent(Manifest(vm="vm1"), level=level, incremental=None, unusable=OK)


def test_contradictions_and_unknown_levels():
    with pytest.raises(errors.UsageError, match="contradict"):
        choose_parent(M, level="inc", incremental="i1", unusable=OK)
    with pytest.raises(errors.UsageError, match="level"):
        choose_parent(M, level="weekly", incremental=None, unusable=OK)
