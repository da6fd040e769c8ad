"""The tiny real guest of tests/guest.py: its agent answers, files written inside it read back,
and its file systems freeze and thaw through libvirt (what a quiesced backup does)."""

from __future__ import annotations

import hashlib
import os

import pytest

pytestmark = pytest.mark.integration


def test_agent_answers_ping(guest):
    assert guest.agent("guest-ping") == {}
    assert guest.fsfreeze_status() == "thawed"


def test_exec_gives_exit_code_and_output(guest):
    code, out, err = guest.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out, err) == (3, b"out\n", b"err\n")


def test_data_disks_are_mounted_ext4(guest):
    mounts = guest.check(["cat", "/proc/mounts"]).decode()
    for d in guest.disks:
        assert f"/dev/{d.target} {d.mount} ext4 rw," in mounts


def test_written_file_reads_back(guest):
    # More than one agent write, not a multiple of the piece size.
    data = os.urandom(200_000)
    path = f"{guest.disks[0].mount}/written.bin"
    guest.write_file(path, data)
    assert guest.read_file(path) == data
    # And the guest itself sees these bytes (not only qemu-ga's file handle).
    assert guest.check(["sha256sum", path]).split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_fsfreeze_then_thaw(guest):
    try:
        assert guest.dom.fsFreeze() == len(guest.disks)
        assert guest.fsfreeze_status() == "frozen"
        assert guest.dom.fsThaw() == len(guest.disks)
    finally:
        guest.thaw()  # never leave the shared guest frozen (a no-op once thawed)
    assert guest.fsfreeze_status() == "thawed"
    # Thawed means writable again (qemu-ga refuses guest-exec while frozen).
    guest.write_file(f"{guest.disks[1].mount}/after-thaw", b"ok\n")
