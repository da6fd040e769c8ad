"""Backups from a remote libvirt for real: qemu+ssh to this machine's libvirtd through a private
sshd, the pull export on NBD over TCP with TLS (libvirt's backup_tls_x509_cert_dir, configured by
tests.lab.ensure_libvirtd), certificates made by the tests. Full -> incremental -> differential
restore byte-exact; a wrong certificate, an address QEMU cannot listen on and sshd down are
one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import random
import socket

import pytest

from libvbackup import api
from libvbackup.repo import Repository

from .helpers import MiB, assert_restores, cli, leftovers, random_writes, snap, tree

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((16 * MiB, "qcow2"), (6 * MiB, "qcow2"))


def scratch_files() -> list[str]:
    import glob

    return sorted(glob.glob("/var/tmp/libvbackup-*.scratch.qcow2"))


def test_full_incremental_differential_over_ssh_and_tls(vm, repo, pki, sshd, workdir):
    uri = sshd.uri()
    r = str(repo)
    rng = random.Random(51)
    for d in vm.disks:
        random_writes(d, rng, 8)
    full = api.pull(vm.name, repo=r, uri=uri, tls_dir=str(pki.client), checkpoint="r1", quiesce="no")
    at = {"r1": snap(vm)}
    assert full.level == "full" and full.disks["vda"].bytes_copied > 0
    for d in vm.disks:
        random_writes(d, rng, 5)
    res = cli("pull", vm.name, "--repo", r, "--uri", uri, "--tls-dir", str(pki.client), "--level", "inc",
              "--checkpoint", "r2", "--quiesce", "no", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["parent"] == "r1"
    at["r2"] = snap(vm)
    vm["vda"].write(11 * MiB + 5, b"differential" * 100)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))  # the first port of the range is taken on the "hypervisor"
    busy.listen()
    port = busy.getsockname()[1]
    try:
        diff = api.pull(vm.name, repo=r, uri=uri, tls_dir=str(pki.client), level="diff", checkpoint="r3",
                        nbd_port=f"{port}-{port + 20}", quiesce="no")
    finally:
        busy.close()
    at["r3"] = snap(vm)
    assert (diff.level, diff.parent) == ("differential", "r1")
    for chk, want in at.items():
        assert_restores(repo, vm.name, chk, want, workdir)
    assert api.verify(vm.name, repo=r).ok
    assert not vm.has_job() and scratch_files() == [] and leftovers() == []
    # A point taken locally continues the same chain.
    vm["vdb"].fill(0, MiB, 0x21)
    local = api.pull(vm.name, repo=r, level="inc", checkpoint="r4", quiesce="no")
    assert local.parent == "r3"
    assert_restores(repo, vm.name, "r4", snap(vm), workdir)


def test_remote_faults_are_one_line_and_leave_nothing(vm, repo, pki, sshd):
    uri = sshd.uri()
    r = str(repo)
    api.pull(vm.name, repo=r, uri=uri, tls_dir=str(pki.client), checkpoint="c1", quiesce="no")
    vm["vda"].fill(MiB, MiB, 0x31)
    before = tree(repo)

    def refused(*args: str, code: int, text: str) -> None:
        res = cli("pull", vm.name, "--repo", r, "--uri", uri, "--level", "inc", "--quiesce", "no", *args)
        assert res.returncode == code, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and text in res.stderr, res.stderr
        assert tree(repo) == before and vm.checkpoints() == ["c1"] and not vm.has_job()
        assert scratch_files() == [] and leftovers() == []

    # A client certificate of another CA: the TLS handshake is refused; job and checkpoint go.
    refused("--tls-dir", str(pki.rogue_client), code=7, text="over TLS")
    # No client certificate at all: refused before anything starts.
    refused("--tls-dir", str(repo), code=2, text="ca-cert.pem is missing")
    # An address QEMU cannot listen on (TEST-NET-1, not on this host).
    refused("--tls-dir", str(pki.client), "--nbd-address", "192.0.2.1", code=6, text="192.0.2.1")
    # Push over a remote URI: refused in one line.
    res = cli("push", vm.name, "--repo", r, "--uri", uri, "--tls-dir", str(pki.client))
    assert res.returncode == 2 and "back up a remote VM with pull" in res.stderr
    # sshd down: libvirt cannot be reached.
    sshd.stop()
    try:
        res = cli("pull", vm.name, "--repo", r, "--uri", uri, "--tls-dir", str(pki.client), "--level", "inc")
        assert res.returncode == 6, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "cannot connect to libvirt" in res.stderr
    finally:
        sshd.restart()
    uri = sshd.uri()
    assert tree(repo) == before and [p.checkpoint for p in Repository(repo).load(vm.name).points] == ["c1"]
    # And the chain goes on; plain TCP only when asked for, with a warning.
    ok = api.pull(vm.name, repo=r, uri=uri, tls_dir=str(pki.client), level="inc", quiesce="no")
    assert ok.parent == "c1"
    res = cli("pull", vm.name, "--repo", r, "--uri", uri, "--level", "inc", "--no-tls", "--quiesce", "no")
    assert res.returncode == 0, res.stderr
    assert "not encrypted (--no-tls)" in res.stderr
    # A shut-off VM behind a remote URI: its images are on the hypervisor, refused in one line.
    vm.flush()
    vm.dom.destroy()
    vm.wait_stopped()
    res = cli("pull", vm.name, "--repo", r, "--uri", uri, "--tls-dir", str(pki.client), "--level", "inc")
    assert res.returncode == 4 and "libvirt is remote" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not vm.dom.isActive()
