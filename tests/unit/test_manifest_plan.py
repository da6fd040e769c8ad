"""libvbackup.manifest (reading and writing the repository's record) and libvbackup.plan."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvbackup import errors, manifest, plan
from libvbackup.domxml import Disk
from libvbackup.manifest import Manifest, Point, PointDisk

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def _point(name, parent=None, level="full", disks=None):
    if disks is None:
        disks = {
            "vda": PointDisk("vda", f"{name}/vda.qcow2", None if parent is None else f"{parent}/vda.qcow2",
                             10 << 30, bytes_copied=123, bytes_zeroed=4096, bitmap=True, source_format="qcow2"),
            "vdb": PointDisk("vdb", f"{name}/vdb.qcow2", None, 1 << 30, bitmap=False, source_format="raw"),
        }
    return Point(
        checkpoint=name,
        parent=parent,
        level=level,
        mode="pull",
        started="2024-05-01T10:00:00Z",
        completed="2024-05-01T10:05:00Z",
        seconds=300.25,
        disks=disks,
        domain_xml="<domain><name>vm1</name></domain>",
        checkpoint_xml="<domaincheckpoint><name>%s</name></domaincheckpoint>" % name,
    )


def _manifest():
    """c1 (full) <- c2 (incremental) <- c3 (incremental)."""
    return Manifest(
        vm="vm1",
        uuid="0f8fad5b-d9cb-469f-a165-70867728950e",
        points=[_point("c1"), _point("c2", "c1", "incremental"), _point("c3", "c2", "incremental")],
    )


def _doc():
    return json.loads(manifest.dumps(_manifest()))


def _loads_doc(doc):
    return manifest.loads(json.dumps(doc))


# --------------------------------------------------------------------------- round trip


def test_round_trip():
    m = _manifest()
    text = manifest.dumps(m)
    assert text.endswith("\n")
    assert json.loads(text)["format"] == manifest.FORMAT
    assert manifest.loads(text) == m


def test_a_point_record_is_the_whole_point():
    """point_record's shallow copy holds every field, as a deep copy would: no field may hold a
    record of its own unnoticed."""
    m = _manifest()
    assert json.loads(manifest.dumps(m))["points"] == [dataclasses.asdict(p) for p in m.points]
    for p in m.points:
        for value in (*vars(p).values(), *(v for d in p.disks.values() for v in vars(d).values())):
            assert value is None or isinstance(value, (str, int, float, bool, dict)), value


def test_round_trip_empty():
    m = Manifest(vm="vm1")
    assert manifest.loads(manifest.dumps(m)) == m


def test_loads_fills_optional_fields_and_ignores_unknown_ones():
    doc = {
        "format": 1,
        "vm": "vm1",
        "future": {"x": 1},
        "points": [
            {
                "checkpoint": "c1", "parent": None, "level": "full", "mode": "pull",
                "started": "s", "completed": "c", "seconds": 1.5, "added-later": True,
                "disks": {"vda": {"name": "vda", "image": "c1/vda.qcow2", "backing": None,
                                  "size": 512, "added-later": 1}},
            }
        ],
    }
    m = _loads_doc(doc)
    assert m.uuid is None
    p = m.get("c1")
    assert p.domain_xml == "" and p.checkpoint_xml == ""
    assert p.disks == {"vda": PointDisk("vda", "c1/vda.qcow2", None, 512)}
    assert p.disks["vda"].bitmap is True and p.disks["vda"].bytes_copied == 0


def test_loads_minimal_point_takes_defaults():
    doc = {"format": 1, "vm": "vm1", "points": [
        {"checkpoint": "c1", "level": "full", "disks": {"vda": {"image": "c1/vda.qcow2", "size": 512}}},
    ]}
    p = _loads_doc(doc).get("c1")
    assert (p.parent, p.mode, p.started, p.completed, p.seconds) == (None, "pull", "", "", 0.0)
    assert p.disks == {"vda": PointDisk("vda", "c1/vda.qcow2", None, 512)}


def test_loads_names_a_disk_by_its_key():
    doc = _doc()
    doc["points"][0]["disks"]["vda"]["name"] = "other"
    del doc["points"][0]["disks"]["vdb"]["name"]
    disks = _loads_doc(doc).get("c1").disks
    assert disks["vda"].name == "vda" and disks["vdb"].name == "vdb"


def test_loads_accepts_integer_seconds():
    doc = _doc()
    doc["points"][0]["seconds"] = 12
    assert _loads_doc(doc).get("c1").seconds == 12


def test_loads_an_older_format():
    doc = _doc()
    doc["format"] = 0
    assert _loads_doc(doc) == _manifest()


def test_loads_ignores_a_malformed_uuid():
    doc = _doc()
    doc["uuid"] = 42
    assert _loads_doc(doc).uuid is None


# --------------------------------------------------------------------------- loads errors


def _mutated(fn):
    doc = _doc()
    fn(doc)
    return json.dumps(doc)


def _del(path):
    def fn(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        del doc[last]
    return fn


def _set(path, value):
    def fn(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        doc[last] = value
    return fn


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("{", "not valid JSON", id="truncated"),
        pytest.param("", "not valid JSON", id="empty"),
        pytest.param("\x00garbage", "not valid JSON", id="garbage"),
        pytest.param("[" * 100_000 + "]" * 100_000, "not valid JSON", id="deeply-nested"),
        pytest.param("[]", "not a JSON object", id="list"),
        pytest.param("null", "not a JSON object", id="null"),
        pytest.param('"text"', "not a JSON object", id="string"),
        pytest.param("{}", "no format version", id="no-format"),
        pytest.param(_mutated(_set(["format"], "1")), "no format version", id="format-string"),
        pytest.param(_mutated(_set(["format"], 1.0)), "no format version", id="format-float"),
        pytest.param(_mutated(_set(["format"], True)), "no format version", id="format-bool"),
        pytest.param(_mutated(_set(["format"], manifest.FORMAT + 1)), "newer libvbackup", id="newer-format"),
        pytest.param(_mutated(_del(["vm"])), "'vm'", id="no-vm"),
        pytest.param(_mutated(_set(["vm"], None)), "'vm'", id="vm-null"),
        pytest.param(_mutated(_del(["points"])), "'points'", id="no-points"),
        pytest.param(_mutated(_set(["points"], {})), "'points'", id="points-object"),
        pytest.param(_mutated(_set(["points", 1], [])), "point 1 is not an object", id="point-list"),
        pytest.param(_mutated(_del(["points", 1, "checkpoint"])), "point 1: field 'checkpoint'",
                     id="no-checkpoint"),
        pytest.param(_mutated(_set(["points", 1, "checkpoint"], 7)), "point 1: field 'checkpoint'",
                     id="checkpoint-int"),
        pytest.param(_mutated(_del(["points", 0, "level"])), "point 0: field 'level'", id="no-level"),
        pytest.param(_mutated(_set(["points", 0, "seconds"], "5m")), "field 'seconds'", id="seconds-string"),
        pytest.param(_mutated(_set(["points", 0, "domain_xml"], None)), "field 'domain_xml'",
                     id="domain-xml-null"),
        pytest.param(_mutated(_del(["points", 0, "disks"])), "'disks'", id="no-disks"),
        pytest.param(_mutated(_set(["points", 0, "disks"], [])), "'disks'", id="disks-list"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda"], "x")), "disk 'vda' is not an object",
                     id="disk-string"),
        pytest.param(_mutated(_del(["points", 0, "disks", "vda", "image"])), "disk 'vda': field 'image'",
                     id="disk-no-image"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "image"], None)), "disk 'vda': field 'image'",
                     id="disk-image-null"),
        pytest.param(_mutated(_del(["points", 0, "disks", "vda", "size"])), "disk 'vda': field 'size'",
                     id="disk-no-size"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "size"], "10G")), "field 'size'",
                     id="disk-size-string"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "size"], True)), "field 'size'",
                     id="disk-size-bool"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "bitmap"], "yes")), "field 'bitmap'",
                     id="disk-bitmap-string"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "backing"], 3)), "field 'backing'",
                     id="disk-backing-int"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "checksum"], "md4")),
                     "unknown checksum algorithm 'md4'", id="disk-checksum-unknown"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "checksum"], 1)), "field 'checksum'",
                     id="disk-checksum-int"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "block_size"], 0)), "field 'block_size'",
                     id="disk-block-size-zero"),
        pytest.param(_mutated(_set(["points", 0, "disks", "vda", "block_size"], 1000)), "field 'block_size'",
                     id="disk-block-size-odd"),
        pytest.param(_mutated(_set(["points", 2, "checkpoint"], "c1")), "lists point 'c1' twice",
                     id="duplicate-point"),
        pytest.param(_mutated(_set(["points", 1, "parent"], "c9")), "names parent 'c9', which precedes it nowhere",
                     id="unknown-parent"),
        pytest.param(_mutated(_set(["points", 1, "parent"], "c3")), "names parent 'c3', which precedes it nowhere",
                     id="parent-comes-later"),
        pytest.param(_mutated(_set(["points", 0, "parent"], "c1")), "names parent 'c1', which precedes it nowhere",
                     id="own-parent"),
        # Each of these once escaped as TypeError (unhashable) from `parent not in names`.
        pytest.param(_mutated(_set(["points", 1, "parent"], [])), "field 'parent'", id="parent-list"),
        pytest.param(_mutated(_set(["points", 1, "parent"], ["c1"])), "field 'parent'", id="parent-list-name"),
        pytest.param(_mutated(_set(["points", 1, "parent"], {"c": 1})), "field 'parent'", id="parent-object"),
        pytest.param(_mutated(_set(["points", 1, "parent"], 1)), "field 'parent'", id="parent-int"),
    ],
)
def test_loads_errors(text, message):
    with pytest.raises(errors.RepositoryError) as ei:
        manifest.loads(text, where="/repo/vm1/manifest.json")
    assert message in str(ei.value)
    assert ei.value.exit_code == 5


def test_loads_newer_format_hints_at_an_upgrade():
    with pytest.raises(errors.RepositoryError) as ei:
        manifest.loads(json.dumps({"format": manifest.FORMAT + 1, "vm": "vm1", "points": []}))
    assert ei.value.hint == "upgrade libvbackup"
    assert f"format {manifest.FORMAT + 1}" in ei.value.message


def test_loads_names_the_file():
    with pytest.raises(errors.RepositoryError, match="/repo/vm1/manifest.json"):
        manifest.loads("{", where="/repo/vm1/manifest.json")


def test_loads_chains_the_json_error():
    with pytest.raises(errors.RepositoryError) as ei:
        manifest.loads("{")
    assert isinstance(ei.value.__cause__, ValueError)


def test_loads_deeply_nested_json_chains_the_recursion_error():
    # json.loads raises RecursionError, not ValueError, for deep nesting.
    with pytest.raises(errors.RepositoryError) as ei:
        manifest.loads("[" * 100_000 + "]" * 100_000)
    assert isinstance(ei.value.__cause__, RecursionError)


# --------------------------------------------------------------------------- loads never crashes

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


def _loads_or_repository_error(text):
    try:
        m = manifest.loads(text)
    except errors.RepositoryError:
        return None
    assert isinstance(m, Manifest)
    return m


@PROPERTY
@given(st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_property_garbage_text_parses_or_is_a_repository_error(text):
    _loads_or_repository_error(text)


@PROPERTY
@given(JSON)
def test_property_random_json_parses_or_is_a_repository_error(value):
    _loads_or_repository_error(json.dumps(value))


@st.composite
def damaged_documents(draw):
    """A valid manifest document with one value replaced or one key removed at a random place."""
    doc = _doc()
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            return
        for k, v in items:
            paths.append(path + [k])
            walk(v, path + [k])

    walk(doc, [])
    path = draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return doc


@PROPERTY
@given(damaged_documents())
def test_property_damaged_manifest_parses_or_is_a_repository_error(doc):
    m = _loads_or_repository_error(json.dumps(doc))
    if m is not None:
        # What was accepted is well typed and chains consistently.
        for p in m.points:
            assert isinstance(p.checkpoint, str) and isinstance(p.parent, (str, type(None)))
            assert [q.checkpoint for q in m.chain(p.checkpoint)][-1] == p.checkpoint
            for d in p.disks.values():
                assert isinstance(d.image, str) and type(d.size) is int and type(d.bitmap) is bool


@PROPERTY
@given(st.sampled_from([0, 1, 2]), JSON)
def test_property_any_parent_value_parses_or_is_a_repository_error(i, value):
    # The parent is compared with a set of names: an unhashable value once raised TypeError.
    _loads_or_repository_error(_mutated(_set(["points", i, "parent"], value)))


NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


@st.composite
def manifests(draw):
    names = draw(st.lists(NAMES, unique=True, max_size=5))
    points = []
    for i, name in enumerate(names):
        parent = draw(st.none() | st.sampled_from(names[:i])) if i else None
        disks = {
            dname: draw(st.builds(
                PointDisk, name=st.just(dname), image=st.text(max_size=10),
                backing=st.none() | st.text(max_size=5), size=st.integers(0, 1 << 62),
                bytes_copied=st.integers(0, 1 << 40), bytes_zeroed=st.integers(0, 1 << 40),
                bitmap=st.booleans(), source_format=st.none() | st.sampled_from(["qcow2", "raw"]),
            ))
            for dname in draw(st.lists(NAMES, unique=True, max_size=3))
        }
        points.append(Point(
            checkpoint=name, parent=parent, level=draw(st.sampled_from(["full", "incremental", "differential"])),
            mode="pull", started=draw(st.text(max_size=5)), completed=draw(st.text(max_size=5)),
            seconds=draw(st.floats(0, 1e6, allow_nan=False)), disks=disks,
            domain_xml=draw(st.text(max_size=10)), checkpoint_xml=draw(st.text(max_size=10)),
        ))
    return Manifest(vm=draw(NAMES), uuid=draw(st.none() | st.uuids().map(str)), points=points)


@settings(PROPERTY, max_examples=100)
@given(manifests())
def test_property_round_trip(m):
    assert manifest.loads(manifest.dumps(m)) == m


# --------------------------------------------------------------------------- Manifest queries


def test_chain_runs_from_the_full_backup_to_the_target():
    m = _manifest()
    assert [p.checkpoint for p in m.chain("c3")] == ["c1", "c2", "c3"]
    assert [p.checkpoint for p in m.chain("c2")] == ["c1", "c2"]
    assert [p.checkpoint for p in m.chain("c1")] == ["c1"]


def test_chain_of_a_differential_point_skips_its_siblings():
    m = _manifest()
    m.points.append(_point("d4", "c1", "differential"))
    assert [p.checkpoint for p in m.chain("d4")] == ["c1", "d4"]


def test_chain_with_a_cycle_is_a_repository_error():
    m = Manifest(vm="vm1", points=[_point("a", "b"), _point("b", "a")])
    with pytest.raises(errors.RepositoryError, match="cycle"):
        m.chain("a")


def test_chain_with_a_missing_parent_is_not_found():
    m = Manifest(vm="vm1", points=[_point("c2", "c1")])
    with pytest.raises(errors.NotFound, match="'c1'"):
        m.chain("c2")


def test_get_and_find():
    m = _manifest()
    assert m.get("c2") is m.points[1]
    assert m.find("c2") is m.points[1]
    assert m.find("nope") is None
    assert m.newest is m.points[-1]
    assert Manifest(vm="x").newest is None


def test_get_unknown_is_not_found():
    with pytest.raises(errors.NotFound) as ei:
        _manifest().get("c9")
    assert "'c9'" in str(ei.value) and "'vm1'" in str(ei.value)
    assert "c1, c2, c3" in str(ei.value)
    with pytest.raises(errors.NotFound, match="none"):
        Manifest(vm="vm1").get("c1")
    with pytest.raises(errors.NotFound):
        _manifest().chain("c9")


# --------------------------------------------------------------------------- plan_backup

QCOW = Disk(target="vda", device="disk", format="qcow2", source="/img/vda.qcow2")
RAW = Disk(target="vdb", device="disk", format="raw", source="/dev/vg/vdb")
NEW = Disk(target="vdc", device="disk", format="qcow2", source="/img/vdc.qcow2")
NOFMT = Disk(target="vde", device="disk", format=None, source="/img/vde")
LIBVIRT = {"c1", "c2", "c3"}


def _plan(disks=(QCOW, RAW), **kw):
    kw.setdefault("libvirt_checkpoints", LIBVIRT)
    kw.setdefault("checkpoint", "c4")
    return plan.plan_backup(_manifest(), list(disks), **kw)


def test_plan_full_without_incremental():
    p = _plan()
    assert (p.vm, p.checkpoint, p.parent, p.level, p.incremental) == ("vm1", "c4", None, "full", None)
    assert p.disks == (
        plan.PlannedDisk("vda", full=True, bitmap=True, backing=None, format="qcow2"),
        plan.PlannedDisk("vdb", full=True, bitmap=False, backing=None, format="raw"),
    )


def test_plan_full_into_an_empty_repository():
    p = plan.plan_backup(Manifest(vm="vm1"), [QCOW], libvirt_checkpoints=set(), checkpoint="first")
    assert (p.checkpoint, p.parent, p.level) == ("first", None, "full")
    assert p.disks[0].full and p.disks[0].backing is None and p.disks[0].reason is None


def test_plan_incremental_from_the_newest_point():
    p = _plan(incremental="c3")
    assert (p.parent, p.level, p.incremental) == ("c3", "incremental", "c3")
    vda, vdb = p.disks
    assert vda == plan.PlannedDisk("vda", full=False, bitmap=True, backing="c3/vda.qcow2", format="qcow2")
    # A raw disk has no bitmap: copied in full, inside the incremental backup, with the reason.
    assert vdb.full and vdb.backing is None and not vdb.bitmap
    assert vdb.reason == "raw-format disk holds no dirty bitmap"


def test_plan_differential_from_an_older_point():
    p = _plan(incremental="c1")
    assert (p.parent, p.level) == ("c1", "differential")
    assert p.disks[0].backing == "c1/vda.qcow2" and not p.disks[0].full


def test_plan_disk_missing_from_the_parent_is_full():
    p = _plan(disks=[QCOW, NEW], incremental="c3")
    assert p.level == "incremental"
    vda, vdc = p.disks
    assert not vda.full
    assert vdc.full and vdc.bitmap and vdc.backing is None
    assert vdc.reason == "not in point c3"


def test_plan_disk_without_a_bitmap_in_the_parent_is_full():
    m = _manifest()
    m.points[-1].disks["vda"].bitmap = False  # e.g. left out of the parent's checkpoint
    p = plan.plan_backup(m, [QCOW, NEW], libvirt_checkpoints=LIBVIRT, checkpoint="c4", incremental="c3")
    assert p.disks[0].full and p.disks[0].bitmap and p.disks[0].backing is None
    assert p.disks[0].reason is not None


def test_plan_disk_of_unknown_format_is_full():
    m = _manifest()
    m.points[-1].disks["vde"] = PointDisk("vde", "c3/vde.qcow2", None, 1 << 20)
    p = plan.plan_backup(m, [QCOW, NOFMT], libvirt_checkpoints=LIBVIRT, checkpoint="c4", incremental="c3")
    assert p.level == "incremental"
    assert p.disks[1].full and not p.disks[1].bitmap
    assert p.disks[1].reason == "unknown-format disk holds no dirty bitmap"


def test_plan_all_disks_full_makes_a_full_backup():
    p = _plan(disks=[RAW], incremental="c3")
    assert (p.parent, p.level, p.incremental) == (None, "full", None)
    assert p.disks[0].full and p.disks[0].backing is None
    p = _plan(disks=[RAW, NEW], incremental="c3")
    assert (p.parent, p.level) == (None, "full")
    assert all(d.full and d.backing is None for d in p.disks)


def test_plan_unknown_incremental_is_not_found():
    with pytest.raises(errors.NotFound, match="'c9'") as ei:
        _plan(incremental="c9", libvirt_checkpoints=LIBVIRT | {"c9"})
    assert ei.value.hint and "full backup" in ei.value.hint


def test_plan_incremental_missing_in_libvirt_is_a_state_error():
    with pytest.raises(errors.StateError, match="'c3'") as ei:
        _plan(incremental="c3", libvirt_checkpoints={"c1", "c2"})
    assert ei.value.exit_code == 4
    assert ei.value.hint and "full backup" in ei.value.hint


@pytest.mark.parametrize(
    "name, where", [("c2", "repository"), ("lx", "libvirt"), ("c3", "libvirt")]
)
def test_plan_checkpoint_name_taken_is_a_usage_error(name, where):
    with pytest.raises(errors.UsageError, match=where):
        _plan(checkpoint=name, libvirt_checkpoints={"c1", "c3", "lx"})


def test_plan_checkpoint_same_as_incremental_is_a_usage_error():
    with pytest.raises(errors.UsageError):
        _plan(checkpoint="c3", incremental="c3")


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-dash", "a/b", "a b", "é", "a\tb", "x" * 101, "a\nb", "../c1", "+plus", "a+b", "a:b"],
)
def test_plan_invalid_checkpoint_name_is_a_usage_error(name):
    with pytest.raises(errors.UsageError, match="invalid checkpoint name"):
        _plan(checkpoint=name)
    with pytest.raises(errors.UsageError):
        plan.check_name(name)


@pytest.mark.parametrize("name", ["c", "x" * 100, "0", "daily.2024-05-01_1", "A.b_c-d", "_under"])
def test_check_name_accepts(name):
    assert plan.check_name(name) == name
    assert _plan(checkpoint=name).checkpoint == name


def test_check_name_says_what_was_checked():
    with pytest.raises(errors.UsageError, match="invalid VM name 'a/b'"):
        plan.check_name("a/b", "VM name")


# A trailing newline once passed: NAME_RE ended in '$' and was used with re.match.
@pytest.mark.parametrize("name", ["c1\n", "vm1\n", "c1\n\n", "\nc1"])
def test_check_name_rejects_newlines(name):
    with pytest.raises(errors.UsageError):
        plan.check_name(name)
    with pytest.raises(errors.UsageError, match="invalid checkpoint name"):
        _plan(checkpoint=name)


def test_default_checkpoint_name():
    assert plan.default_checkpoint_name(0) == "lvb-19700101T000000"
    assert plan.default_checkpoint_name(1714557600) == "lvb-20240501T100000"


def test_default_checkpoint_name_avoids_taken_names():
    taken = {"lvb-19700101T000000"}
    assert plan.default_checkpoint_name(0, taken) == "lvb-19700101T000000-2"
    taken |= {"lvb-19700101T000000-2", "lvb-19700101T000000-3"}
    assert plan.default_checkpoint_name(0, taken) == "lvb-19700101T000000-4"


def test_default_checkpoint_name_is_a_valid_name():
    name = plan.default_checkpoint_name()
    assert re.fullmatch(r"lvb-\d{8}T\d{6}", name)
    assert plan.check_name(name) == name


def test_plan_default_checkpoint_avoids_libvirt_and_repository_names(monkeypatch):
    fixed = types.SimpleNamespace(gmtime=lambda now=None: time.gmtime(0 if now is None else now),
                                  strftime=time.strftime)
    monkeypatch.setattr(plan, "time", fixed)
    m = _manifest()
    m.points.append(_point("lvb-19700101T000000-2", "c3", "incremental"))
    p = plan.plan_backup(m, [QCOW], libvirt_checkpoints=LIBVIRT | {"lvb-19700101T000000"}, checkpoint=None)
    assert p.checkpoint == "lvb-19700101T000000-3"


def test_plan_does_not_modify_the_manifest():
    m = _manifest()
    before = copy.deepcopy(m)
    plan.plan_backup(m, [QCOW, RAW, NEW], libvirt_checkpoints=LIBVIRT, checkpoint="c4", incremental="c2")
    assert m == before


# --------------------------------------------------------------------------- disks that changed since the parent


def _domain(*disks: Disk) -> str:
    devs = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='{d.format}'/>"
                   f"<source file='{d.source}'/><target dev='{d.target}' bus='virtio'/></disk>" for d in disks)
    return f"<domain><name>vm1</name><devices>{devs}</devices></domain>"


def _manifest_taken_from(*disks: Disk) -> Manifest:
    m = _manifest()
    m.points[-1].domain_xml = _domain(*disks)
    return m


def test_plan_disk_grown_since_the_parent_stays_incremental_and_says_so():
    p = _plan(disks=[QCOW], incremental="c3", sizes={"vda": (10 << 30) + 4096})
    (vda,) = p.disks
    assert (p.level, vda.full, vda.backing, vda.size) == ("incremental", False, "c3/vda.qcow2", (10 << 30) + 4096)
    assert vda.reason == f"grew from {10 << 30} to {(10 << 30) + 4096} bytes since c3"
    assert _plan(disks=[QCOW], incremental="c3", sizes={"vda": 10 << 30}).disks[0].reason is None


def test_plan_disk_shrunk_since_the_parent_starts_a_new_chain():
    p = _plan(disks=[QCOW, NEW], incremental="c3", sizes={"vda": 1 << 30})
    assert p.disks[0].full and p.disks[0].backing is None
    assert p.disks[0].reason == f"shrunk from {10 << 30} to {1 << 30} bytes since c3: a new chain"


def test_plan_disk_replaced_since_the_parent_is_full_and_the_others_go_on():
    other = Disk(target="vda", device="disk", format="qcow2", source="/img/vda-new.qcow2")
    m = _manifest_taken_from(QCOW)
    m.points[-1].disks["vdc"] = PointDisk("vdc", "c3/vdc.qcow2", None, 1 << 20)
    p = plan.plan_backup(m, [other, NEW], libvirt_checkpoints=LIBVIRT, checkpoint="c4", incremental="c3")
    vda, vdc = p.disks
    assert vda.full and vda.backing is None
    assert vda.reason == "replaced since c3 (/img/vda.qcow2 is now /img/vda-new.qcow2): a new chain"
    assert (p.level, vdc.full, vdc.backing) == ("incremental", False, "c3/vdc.qcow2")  # not in c3's XML: unknown


def test_plan_disk_whose_format_changed_is_replaced():
    raw = Disk(target="vda", device="disk", format="raw", source=QCOW.source)
    m = _manifest_taken_from(QCOW)
    p = plan.plan_backup(m, [raw], libvirt_checkpoints=LIBVIRT, checkpoint="c4", incremental="c3")
    assert p.disks[0].full and "format changed from qcow2 to raw" in p.disks[0].reason


def test_plan_same_source_is_not_replaced_and_no_saved_xml_tells_nothing():
    m = _manifest_taken_from(QCOW)
    assert not plan.plan_backup(m, [QCOW], libvirt_checkpoints=LIBVIRT, checkpoint="c4", incremental="c3").disks[0].full
    for xml in ("", "<domain><name>vm1</name></domain>", "not xml <"):
        m.points[-1].domain_xml = xml
        assert plan.disks_of(m.points[-1]) == {}
        assert not plan.plan_backup(m, [QCOW], libvirt_checkpoints=LIBVIRT, checkpoint="c4",
                                    incremental="c3").disks[0].full


def test_needs_bitmap_names_only_the_disks_that_go_on_incrementally():
    other = Disk(target="vda", device="disk", format="qcow2", source="/img/vda-new.qcow2")
    m = _manifest_taken_from(QCOW)
    m.points[-1].disks["vdc"] = PointDisk("vdc", "c3/vdc.qcow2", None, 1 << 20)
    parent = m.get("c3")
    assert plan.needs_bitmap(parent, [QCOW, RAW, NEW]) == {"vda", "vdc"}
    assert plan.needs_bitmap(parent, [other, NEW]) == {"vdc"}  # replaced
    assert plan.needs_bitmap(parent, [NEW]) == {"vdc"}  # left out or removed
    assert plan.needs_bitmap(parent, [QCOW], {"vda": 1 << 20}) == set()  # shrunk


class _Dom:
    def __init__(self, names, invalid=None):
        self.names, self.invalid, self.asked = names, invalid or {}, []

    def checkpoint_names(self):
        return list(self.names)

    def validate_checkpoint(self, chk):
        self.asked.append(chk)
        return self.invalid.get(chk)


def test_probe_serves_the_other_disks_when_a_disk_taken_in_full_has_a_broken_bitmap():
    from libvbackup import checkpoints

    why = "checkpoint inconsistent: missing or broken bitmap 'c3' for disk 'vdb'"
    assert checkpoints.broken_disk(why) == "vdb" and checkpoints.broken_disk("other trouble") is None
    assert checkpoints.bitmap_lost(why) and checkpoints.bitmap_lost("bitmap 'c3' not found in backing chain of 'vda'")
    assert not checkpoints.bitmap_lost("cannot acquire state change lock")
    dom = _Dom(LIBVIRT, {"c3": why})
    assert checkpoints.Probe(dom, _manifest()).unusable("c3") == why
    assert checkpoints.Probe(dom, _manifest(), needed=lambda chk: {"vda"}).unusable("c3") is None
    assert checkpoints.Probe(dom, _manifest(), needed=lambda chk: {"vda", "vdb"}).unusable("c3") == why
    other = _Dom(LIBVIRT, {"c3": "checkpoint inconsistent: something else"})
    assert checkpoints.Probe(other, _manifest(), needed=lambda chk: set()).unusable("c3") is not None


def test_probe_with_trust_leaves_a_present_checkpoint_to_backup_begin_and_still_plans_lost_ones():
    from libvbackup import checkpoints

    dom = _Dom(LIBVIRT, {"c3": "checkpoint inconsistent: missing or broken bitmap 'c3' for disk 'vda'"})
    probe = checkpoints.Probe(dom, _manifest(), trust=True, names=LIBVIRT)
    assert probe.unusable("c3") is None and dom.asked == []
    assert checkpoints.Probe(dom, _manifest(), names=LIBVIRT).unusable("c3") is not None and dom.asked == ["c3"]
