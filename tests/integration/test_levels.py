"""--level full|inc|diff|auto, the fallback to full, and checkpoints redefined from the repository."""

from __future__ import annotations

import json

import libvirt
import libvirt_qemu
import pytest

from libvbackup.backup import pull
from libvbackup.repo import Repository

from .helpers import MiB, assert_restores, cli, snap

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))



def remove_bitmap(vm, name: str) -> None:
    """Delete a checkpoint's bitmap behind libvirt's back, as a crash or another tool might."""
    nodes = json.loads(libvirt_qemu.qemuMonitorCommand(
        vm.dom, '{"execute":"query-named-block-nodes","arguments":{"flat":true}}', 0))["return"]
    for n in nodes:
        if n["drv"] == "qcow2" and n["file"].endswith("vda.qcow2"):
            libvirt_qemu.qemuMonitorCommand(vm.dom, json.dumps(
                {"execute": "block-dirty-bitmap-remove", "arguments": {"node": n["node-name"], "name": name}}), 0)
            return
    raise AssertionError("no qcow2 node for vda")


def test_auto_picks_full_then_inc_and_falls_back_after_the_bitmap_is_lost(vm, repo, workdir):
    vm["vda"].fill(0, MiB, 0x10)
    r1 = pull(vm.name, repo=str(repo), level="auto")
    assert (r1.level, r1.parent) == ("full", None) and "no backup" in r1.fallback_reason
    vm["vda"].fill(2 * MiB, MiB, 0x11)
    r2 = pull(vm.name, repo=str(repo), level="auto", checkpoint="a2")
    assert (r2.level, r2.parent, r2.fallback_reason) == ("incremental", r1.checkpoint, None)
    vm["vdb"].fill(0, MiB, 0x12)
    # diff: since the newest full point, not the newest point.
    r3 = pull(vm.name, repo=str(repo), level="diff", checkpoint="d3")
    assert (r3.level, r3.parent) == ("differential", r1.checkpoint)
    assert_restores(repo, vm.name, "d3", snap(vm), workdir)

    remove_bitmap(vm, "d3")
    vm["vda"].fill(5 * MiB, MiB, 0x13)
    res = cli("pull", vm.name, "--repo", str(repo), "--level", "inc", "--checkpoint", "x")
    assert res.returncode == 4 and "d3" in res.stderr and "full" in res.stderr, res.stderr
    r4 = pull(vm.name, repo=str(repo), level="auto", checkpoint="a4")
    assert (r4.level, r4.parent) == ("full", None)
    assert "d3" in r4.fallback_reason and "bitmap" in r4.fallback_reason
    assert_restores(repo, vm.name, "a4", snap(vm), workdir)
    vm["vdb"].fill(3 * MiB, 4096, 0x14)
    r5 = pull(vm.name, repo=str(repo), level="inc", checkpoint="i5")
    assert (r5.level, r5.parent) == ("incremental", "a4")
    assert_restores(repo, vm.name, "i5", snap(vm), workdir)


def test_checkpoints_redefined_after_the_domain_is_undefined_and_defined_again(vm, repo, workdir):
    vm["vda"].fill(0, 2 * MiB, 0x21)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    vm["vda"].fill(MiB, MiB, 0x22)
    pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1")
    # libvirt loses its checkpoint metadata (the domain undefined and defined again, or moved to
    # another host); the bitmaps stay in the qcow2 images. (Undefining a *running* domain keeps
    # its checkpoints in memory, so the loss is made with metadata-only deletion.)
    xml = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    vm.dom.checkpointLookupByName("c1").delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
                                               | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
    vm.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    vm.dom = vm.conn.defineXML(xml)
    assert vm.checkpoints() == []
    vm["vdb"].write(12345, b"after the redefinition")
    res = cli("pull", vm.name, "--repo", str(repo), "--level", "inc", "--checkpoint", "c3", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["level"], out["parent"]) == ("incremental", "c2")
    assert out["redefined"] == ["c1", "c2"]
    assert vm.checkpoints() == ["c1", "c2", "c3"]
    assert_restores(repo, vm.name, "c3", snap(vm), workdir)
    assert [p.checkpoint for p in Repository(repo).load(vm.name).points] == ["c1", "c2", "c3"]
