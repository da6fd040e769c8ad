"""libvbackup.xmlgen: backup and checkpoint documents, checked against libvirt's RNG schemas."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from libvbackup import errors, plan, xmlgen
from libvbackup.xmlgen import BackupDisk, BackupSpec, CheckpointDisk, CheckpointSpec

SCHEMAS = pathlib.Path("/usr/share/libvirt/schemas")
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"

RUN = "/run/libvbackup/vm1"
SOCKET = f"{RUN}/nbd.sock"


def _schema(name: str) -> etree.RelaxNG:
    path = SCHEMAS / name
    if not path.is_file():
        pytest.skip(f"libvirt's schema {path} is not installed (package libvirt-daemon / libvirt-common)")
    # Parsed from the file path so that the relative <include href=...> resolve.
    return etree.RelaxNG(etree.parse(str(path)))


@pytest.fixture(scope="module")
def backup_rng() -> etree.RelaxNG:
    return _schema("domainbackup.rng")


@pytest.fixture(scope="module")
def checkpoint_rng() -> etree.RelaxNG:
    return _schema("domaincheckpoint.rng")


def _valid(rng: etree.RelaxNG, text: str) -> etree._Element:
    doc = etree.fromstring(text.encode())
    if not rng.validate(doc):
        pytest.fail(f"does not validate: {rng.error_log}\n{text}")
    return doc


def _disk(name: str, **kw) -> BackupDisk:
    return BackupDisk(name, scratch=f"{RUN}/{name}.scratch.qcow2", **kw)


FULL = BackupSpec(socket=SOCKET, disks=[_disk("vda"), _disk("vdb"), BackupDisk("sda", backup=False)])
INCREMENTAL = BackupSpec(
    socket=SOCKET,
    disks=[_disk("vda"), _disk("vdb", full=True), BackupDisk("sda", backup=False)],
    incremental="chk1",
)
CHECKPOINT = CheckpointSpec(
    "chk2", [CheckpointDisk("vda", True), CheckpointDisk("vdb", False), CheckpointDisk("sda", False)]
)


# --------------------------------------------------------------------------- the sanity of the schemas


def test_schemas_reject_a_broken_document(backup_rng, checkpoint_rng):
    # Without this, a schema that accepts anything would make every test below pass.
    assert not backup_rng.validate(etree.fromstring(b'<domainbackup mode="pull"><bogus/></domainbackup>'))
    assert not backup_rng.validate(
        etree.fromstring(b'<domainbackup mode="pull"><server transport="unix" socket="relative"/></domainbackup>')
    )
    assert not checkpoint_rng.validate(etree.fromstring(b"<domaincheckpoint><name>a/b</name></domaincheckpoint>"))


# --------------------------------------------------------------------------- <domainbackup>


def test_full_backup_xml(backup_rng):
    doc = _valid(backup_rng, xmlgen.backup_pull_xml(FULL))
    assert doc.tag == "domainbackup" and doc.get("mode") == "pull"
    assert doc.find("incremental") is None
    server = doc.find("server")
    assert server.get("transport") == "unix" and server.get("socket") == SOCKET
    assert server.get("name") is None and server.get("port") is None  # no TCP
    disks = doc.findall("disks/disk")
    assert [d.get("name") for d in disks] == ["vda", "vdb", "sda"]
    for d in disks[:2]:
        name = d.get("name")
        assert d.get("backup") == "yes"
        assert d.get("type") == "file"
        assert d.get("exportname") == name
        assert d.find("scratch").get("file") == f"{RUN}/{name}.scratch.qcow2"
        assert d.find("driver").get("type") == "qcow2"
        assert d.get("backupmode") is None and d.get("incremental") is None
    assert dict(disks[2].attrib) == {"name": "sda", "backup": "no"}
    assert len(disks[2]) == 0


def test_incremental_backup_xml(backup_rng):
    doc = _valid(backup_rng, xmlgen.backup_pull_xml(INCREMENTAL))
    assert doc.findtext("incremental") == "chk1"
    assert doc.find("server").get("socket") == SOCKET
    vda, vdb, sda = doc.findall("disks/disk")
    assert vda.get("backupmode") == "incremental" and vda.get("incremental") == "chk1"
    assert vda.get("exportname") == "vda"
    assert vda.find("scratch").get("file") == f"{RUN}/vda.scratch.qcow2"
    # A disk copied in full inside an incremental job names no checkpoint.
    assert vdb.get("backupmode") == "full" and vdb.get("incremental") is None
    assert vdb.get("exportname") == "vdb"
    assert vdb.find("scratch").get("file") == f"{RUN}/vdb.scratch.qcow2"
    assert dict(sda.attrib) == {"name": "sda", "backup": "no"}


def test_incremental_backup_xml_with_every_disk_incremental(backup_rng):
    spec = BackupSpec(socket="/tmp/x y/nbd.sock", disks=[_disk("vda"), _disk("sdb")], incremental="c.1_x-y")
    doc = _valid(backup_rng, xmlgen.backup_pull_xml(spec))
    assert doc.find("server").get("socket") == "/tmp/x y/nbd.sock"
    assert doc.findtext("incremental") == "c.1_x-y"
    assert [(d.get("name"), d.get("backupmode"), d.get("incremental")) for d in doc.iterfind("disks/disk")] == [
        ("vda", "incremental", "c.1_x-y"),
        ("sdb", "incremental", "c.1_x-y"),
    ]


def test_full_flag_is_ignored_outside_an_incremental_job(backup_rng):
    spec = BackupSpec(socket=SOCKET, disks=[_disk("vda", full=True)])
    doc = _valid(backup_rng, xmlgen.backup_pull_xml(spec))
    assert doc.find("disks/disk").get("backupmode") is None


def test_backed_up_disk_needs_a_scratch_file():
    with pytest.raises(ValueError, match="vdb"):
        xmlgen.backup_pull_xml(BackupSpec(socket=SOCKET, disks=[_disk("vda"), BackupDisk("vdb")]))


def test_disk_left_out_needs_no_scratch_file(backup_rng):
    spec = BackupSpec(socket=SOCKET, disks=[_disk("vda"), BackupDisk("vdb", backup=False)])
    _valid(backup_rng, xmlgen.backup_pull_xml(spec))


def test_templates_are_not_modified_by_use():
    first = xmlgen.backup_pull_xml(INCREMENTAL)
    full = xmlgen.backup_pull_xml(FULL)
    assert "incremental" not in full
    assert full.count("<disk ") == 3
    assert xmlgen.backup_pull_xml(INCREMENTAL) == first
    other = xmlgen.checkpoint_xml(CheckpointSpec("other", [CheckpointDisk("vdc", True)]))
    assert "chk2" not in other and "vda" not in other
    assert etree.fromstring(other.encode()).findall("disks/disk")[0].get("name") == "vdc"


# --------------------------------------------------------------------------- <domaincheckpoint>


def test_checkpoint_xml(checkpoint_rng):
    doc = _valid(checkpoint_rng, xmlgen.checkpoint_xml(CHECKPOINT))
    assert doc.findtext("name") == "chk2"
    assert doc.findtext("description") == "created by libvbackup"
    assert [(d.get("name"), d.get("checkpoint")) for d in doc.iterfind("disks/disk")] == [
        ("vda", "bitmap"),
        ("vdb", "no"),
        ("sda", "no"),
    ]
    assert doc.find("parent") is None and doc.find("creationTime") is None


def test_checkpoint_description_is_escaped(checkpoint_rng):
    spec = CheckpointSpec("c1", [CheckpointDisk("vda", True)], description='a <b> & "c"')
    doc = _valid(checkpoint_rng, xmlgen.checkpoint_xml(spec))
    assert doc.findtext("description") == 'a <b> & "c"'


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.from_regex(plan.NAME_RE, fullmatch=True))
def test_every_name_check_name_accepts_is_a_valid_libvirt_checkpoint_name(checkpoint_rng, name):
    assert plan.check_name(name) == name
    doc = _valid(checkpoint_rng, xmlgen.checkpoint_xml(CheckpointSpec(name, [CheckpointDisk("vda", True)])))
    assert doc.findtext("name") == name


def test_plus_is_rejected_by_check_name_and_by_libvirt(checkpoint_rng):
    # check_name once accepted '+', which libvirt's checkpointName pattern does not.
    text = xmlgen.checkpoint_xml(CheckpointSpec("daily+1", [CheckpointDisk("vda", True)]))
    assert not checkpoint_rng.validate(etree.fromstring(text.encode()))
    with pytest.raises(errors.UsageError):
        plan.check_name("daily+1")


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize(
    "golden, make",
    [
        ("backup-pull-full.xml", lambda: xmlgen.backup_pull_xml(FULL)),
        ("backup-pull-incremental.xml", lambda: xmlgen.backup_pull_xml(INCREMENTAL)),
        ("checkpoint.xml", lambda: xmlgen.checkpoint_xml(CHECKPOINT)),
    ],
)
def test_golden(golden, make, backup_rng, checkpoint_rng):
    expected = (GOLDEN / golden).read_text()
    got = make()
    assert got == expected
    _valid(checkpoint_rng if golden.startswith("checkpoint") else backup_rng, expected)


# --------------------------------------------------------------------------- what libvirt returns

LIBVIRT_JOB = (
    "<domainbackup mode='pull'><incremental>c1</incremental>"
    "<server transport='unix' socket='/x/nbd.sock'/><disks>"
    "<disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='c1' "
    "exportname='vda' exportbitmap='backup-vda'><driver type='qcow2'/>"
    "<scratch file='/x/vda.scratch.qcow2'/></disk>"
    "<disk name='vdb' backup='no'/></disks></domainbackup>"
)

LIBVIRT_JOB_MIXED = (
    "<domainbackup mode='pull'><incremental>c1</incremental>"
    "<server transport='unix' socket='/x/nbd.sock'/><disks>"
    "<disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='c1' "
    "exportname='export-a' exportbitmap='backup-vda'><driver type='qcow2'/>"
    "<scratch file='/x/vda.scratch.qcow2'/></disk>"
    "<disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb'>"
    "<driver type='qcow2'/><scratch file='/x/vdb.scratch.qcow2'/></disk>"
    "<disk name='vdc' type='file'><scratch file='/x/vdc.scratch.qcow2'/></disk>"
    "<disk name='sda' backup='no'/></disks></domainbackup>"
)


def test_libvirt_samples_are_valid_backup_documents(backup_rng):
    _valid(backup_rng, LIBVIRT_JOB)
    _valid(backup_rng, LIBVIRT_JOB_MIXED)


def test_export_bitmaps_and_names_from_libvirt_job():
    assert xmlgen.export_bitmaps(LIBVIRT_JOB) == {"vda": "backup-vda"}
    assert xmlgen.export_names(LIBVIRT_JOB) == {"vda": "vda"}


def test_export_bitmaps_and_names_with_full_and_default_disks():
    # vdb is copied in full (no bitmap); vdc has neither backup= nor exportname= (defaults:
    # backed up, exported under its own name); sda is left out.
    assert xmlgen.export_bitmaps(LIBVIRT_JOB_MIXED) == {"vda": "backup-vda"}
    assert xmlgen.export_names(LIBVIRT_JOB_MIXED) == {"vda": "export-a", "vdb": "vdb", "vdc": "vdc"}


def test_export_bitmaps_of_a_full_job_is_empty():
    text = xmlgen.backup_pull_xml(FULL)
    assert xmlgen.export_bitmaps(text) == {}
    assert xmlgen.export_names(text) == {"vda": "vda", "vdb": "vdb"}

