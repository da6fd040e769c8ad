"""The quiesce plan (pure) and the freeze/begin/thaw order of ``Freezer`` against a scripted
domain: the journal is told before the freeze, the guest is thawed in every path."""

from __future__ import annotations

import pytest

from libvbackup import quiesce
from libvbackup.domdef import restored_domain
from libvbackup.domxml import agent_state
from libvbackup.errors import StateError, UsageError

CONNECTED = """<domain type='qemu' id='7'><name>vm1</name><devices>
<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-vm1/org.qemu.guest_agent.0'/>
<target type='virtio' name='org.qemu.guest_agent.0' state='connected'/><alias name='channel0'/></channel>
</devices></domain>"""


def test_agent_state_from_live_xml():
    assert agent_state(CONNECTED) == "connected"
    assert agent_state(CONNECTED.replace("state='connected'", "state='disconnected'")) == "disconnected"
    assert agent_state(CONNECTED.replace("state='connected'", "")) == "disconnected"
    assert agent_state("<domain><devices/></domain>") is None
    other = CONNECTED.replace("org.qemu.guest_agent.0'/>", "com.example.other'/>", 1)
    assert agent_state(other.replace("name='org.qemu.guest_agent.0'", "name='x'")) is None


def test_plan():
    assert quiesce.plan("vm1", "auto", "connected") == quiesce.QuiescePlan("auto", True)
    p = quiesce.plan("vm1", "auto", None)
    assert not p.freeze and "no guest agent channel" in p.why_not
    p = quiesce.plan("vm1", "auto", "disconnected")
    assert not p.freeze and "not connected" in p.why_not
    assert not quiesce.plan("vm1", "no", "connected").freeze
    assert quiesce.plan("vm1", "yes", "connected").freeze
    for state in (None, "disconnected"):
        with pytest.raises(StateError, match="cannot quiesce VM 'vm1'"):
            quiesce.plan("vm1", "yes", state)
    with pytest.raises(UsageError):
        quiesce.plan("vm1", "maybe", "connected")


class FakeDom:
    name = "vm1"

    def __init__(self, events, freeze_error=None, thaw_failures=0, agent="connected"):
        self.events, self.freeze_error, self.thaw_failures, self.agent = events, freeze_error, thaw_failures, agent

    def fs_freeze(self):
        self.events.append("freeze")
        if self.freeze_error:
            raise StateError(self.freeze_error)
        return 2

    def fs_thaw(self):
        self.events.append("thaw")
        if self.thaw_failures:
            self.thaw_failures -= 1
            raise StateError("agent busy")
        return 2

    def is_running(self):
        return True

    def xml(self):
        return CONNECTED.replace("connected", self.agent)


@pytest.fixture(autouse=True)
def no_guard(monkeypatch):
    """The guard is a real child process; its own test is an integration test."""
    class Guard:
        def __init__(self, events):
            self.events = events

        def done(self):
            self.events.append("guard done")

    monkeypatch.setattr(quiesce._Guard, "start", classmethod(lambda cls, uri, vm: Guard(EVENTS)))
    monkeypatch.setattr(quiesce.time, "sleep", lambda s: None)
    EVENTS.clear()


EVENTS: list = []


def _freezer(dom, mode="auto"):
    qplan = quiesce.QuiescePlan(mode, True)
    return quiesce.Freezer(dom, qplan, "qemu:///system", lambda state: EVENTS.append(f"journal {state}"))


def test_freeze_begin_thaw_in_order():
    f = _freezer(FakeDom(EVENTS))
    f.run(lambda: EVENTS.append("begin"))
    assert EVENTS == ["journal True", "freeze", "begin", "thaw", "journal False", "guard done"]
    assert f.consistency == "quiesced" and f.frozen_seconds is not None and f.note is None


def test_thawed_when_begin_fails():
    f = _freezer(FakeDom(EVENTS))

    def begin():
        EVENTS.append("begin")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        f.run(begin)
    assert EVENTS == ["journal True", "freeze", "begin", "thaw", "journal False", "guard done"]


def test_failed_freeze_auto_thaws_and_goes_on_crash_consistent():
    f = _freezer(FakeDom(EVENTS, freeze_error="agent did not answer", thaw_failures=2))
    f.run(lambda: EVENTS.append("begin"))
    assert EVENTS == ["journal True", "freeze", "thaw", "thaw", "thaw", "journal False", "guard done", "begin"]
    assert f.consistency == "crash" and "agent did not answer" in f.note


def test_failed_freeze_yes_fails_before_begin():
    f = _freezer(FakeDom(EVENTS, freeze_error="agent did not answer"), mode="yes")
    with pytest.raises(StateError, match="agent did not answer"):
        f.run(lambda: EVENTS.append("begin"))
    assert "begin" not in EVENTS and EVENTS[-2:] == ["journal False", "guard done"]


def test_an_agent_gone_is_not_thawed():
    f = _freezer(FakeDom(EVENTS, freeze_error="not connected", agent="disconnected"))
    f.run(lambda: EVENTS.append("begin"))
    assert "thaw" not in EVENTS and EVENTS[-1] == "begin"


def test_a_thaw_that_keeps_failing_leaves_the_journal_frozen(monkeypatch):
    monkeypatch.setattr(quiesce, "THAW_DEADLINE", 0.0)
    f = _freezer(FakeDom(EVENTS, thaw_failures=10 ** 6))
    with pytest.raises(StateError, match="may still be frozen"):
        f.run(lambda: EVENTS.append("begin"))
    assert "journal False" not in EVENTS and "guard done" not in EVENTS


def test_not_planned_means_no_freeze():
    f = quiesce.Freezer(FakeDom(EVENTS), quiesce.QuiescePlan("no", False, "--quiesce no"), "u", EVENTS.append)
    f.run(lambda: EVENTS.append("begin"))
    assert EVENTS == ["begin"] and f.consistency == "crash"


SAVED = """<domain type='qemu' id='3'><name>vm1</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/images/vm1-a.qcow2' index='2'/><backingStore type='file' index='3'><format type='qcow2'/>
<source file='/images/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/images/vm1-b.raw'/>
<target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso/x.iso'/>
<target dev='sda' bus='sata'/><readonly/></disk>
<interface type='network'><mac address='52:54:00:01:02:03'/><source network='default'/>
<target dev='vnet3'/><model type='virtio'/><alias name='ua-net0'/></interface>
<serial type='pty'><source path='/dev/pts/4'/><target port='0'/></serial>
<serial type='file'><source path='/var/log/vm1-console.log'/><target port='1'/></serial>
<console type='pty'><source path='/dev/pts/5'/><target type='serial' port='1'/><log file='/var/log/c.log'/></console>
<console type='pty' tty='/dev/pts/4'><source path='/dev/pts/4'/><target type='serial' port='0'/></console>
""" + CONNECTED.split("<devices>")[1].split("</devices>")[0] + """
<graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'/>
</devices><seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel></domain>"""


def test_restored_domain_is_another_machine():
    from lxml import etree

    d = restored_domain(SAVED, "vm1-copy", {"vda": ("/r/vda.qcow2", "qcow2")})
    root = etree.fromstring(d.xml.encode())
    assert root.get("id") is None and root.findtext("name") == "vm1-copy"
    assert root.find("uuid") is None and root.find("seclabel") is None
    disks = root.findall("./devices/disk")
    assert [x.find("target").get("dev") for x in disks] == ["vda", "sda"]  # vdb not restored: left out
    assert d.left_out == ("vdb",)
    vda = disks[0]
    assert vda.find("source").attrib == {"file": "/r/vda.qcow2"} and vda.find("backingStore") is None
    assert vda.find("driver").get("type") == "qcow2" and vda.find("alias") is None
    iface = root.find("./devices/interface")
    assert iface.find("mac") is None and iface.find("target") is None
    assert iface.find("alias").get("name") == "ua-net0"  # a user alias is configuration
    serials = root.findall("./devices/serial")
    assert [x.get("type") for x in serials] == ["pty", "pty"] and all(x.find("source") is None for x in serials)
    assert root.find("./devices/console").get("tty") is None and root.find(".//log") is None
    assert "/var/log/" not in d.xml
    ch = root.find("./devices/channel")
    assert ch.find("source") is None and ch.find("target").get("state") is None
    assert root.find("./devices/graphics").get("port") is None
