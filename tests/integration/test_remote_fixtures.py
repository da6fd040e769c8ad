"""The remote lab (tests/remote.py): the test PKI, qemu.conf's TLS block, libvirt over a private
sshd, and NBD over TLS read with ``nbdio.export_tcp``, from qemu-nbd and from libvirt's pull export."""

from __future__ import annotations

import grp
import os
import pathlib
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import time

import pytest

from libvbackup import engine, nbdio
from libvbackup.errors import CopyError
from libvbackup.target import RawTarget
from tests import remote

from .helpers import KiB, MiB, random_writes

pytestmark = pytest.mark.integration


def _mode(path) -> tuple[int, str, str]:
    st = os.stat(path)
    import pwd

    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def test_pki_files_modes_and_trust(pki):
    assert _mode(pki.base)[0] == 0o755
    assert _mode(pki.server)[0] & 0o005 == 0o005  # QEMU (libvirt-qemu) goes in by name
    assert _mode(pki.server / "server-key.pem") == (0o640, "root", "libvirt-qemu")
    for f in ("ca-cert.pem", "server-cert.pem", "dh-params.pem"):
        assert _mode(pki.server / f)[0] == 0o644
    for d in (pki.client, pki.rogue_client, pki.base / "ca", pki.base / "rogue-ca"):
        assert _mode(d) == (0o700, "root", "root")
    for d in (pki.client, pki.rogue_client):
        assert _mode(d / "client-key.pem") == (0o600, "root", "root")
        assert (d / "ca-cert.pem").read_bytes() == pki.ca_cert.read_bytes()  # both trust the real CA
    # QEMU's user reads the server key, and nothing of the client's.
    as_qemu = ["runuser", "-u", "libvirt-qemu", "--", "head", "-c", "1"]
    assert subprocess.run(as_qemu + [str(pki.server / "server-key.pem")], capture_output=True).returncode == 0
    assert subprocess.run(as_qemu + [str(pki.client / "client-key.pem")], capture_output=True).returncode != 0

    def verifies(cert) -> bool:
        return subprocess.run(["certtool", "--verify", "--load-ca-certificate", str(pki.ca_cert),
                               "--infile", str(cert)], capture_output=True).returncode == 0

    assert verifies(pki.server / "server-cert.pem")
    assert verifies(pki.client / "client-cert.pem")
    assert not verifies(pki.rogue_client / "client-cert.pem")
    info = subprocess.run(["certtool", "-i", "--infile", str(pki.server / "server-cert.pem")],
                          capture_output=True, text=True, check=True).stdout
    assert "IPAddress: 127.0.0.1" in info and "DNSname: localhost" in info and "TLS WWW Server" in info
    # Cached: a second call builds nothing.
    t = time.monotonic()
    assert remote.pki() == pki
    assert time.monotonic() - t < 0.05


def test_pki_builds_atomically_into_a_new_base(workdir):
    base = workdir / "pki"
    got = remote.pki(base)
    assert got.server == base / "server" and (base / "server" / "server-key.pem").is_file()
    assert sorted(p.name for p in workdir.iterdir()) == ["pki"]  # no temporary directory left
    before = (base / "server" / "server-cert.pem").read_bytes()
    (base / "client" / "client-key.pem").unlink()  # incomplete: built again, whole
    remote.pki(base)
    assert (base / "client" / "client-key.pem").is_file()
    assert (base / "server" / "server-cert.pem").read_bytes() != before
    assert sorted(p.name for p in workdir.iterdir()) == ["pki"]


def test_configure_libvirt_tls_is_idempotent_and_keeps_the_rest(pki, workdir):
    conf = workdir / "qemu.conf"
    original = '# a comment\n#backup_tls_x509_cert_dir = "/etc/pki/libvirt-backup"\nuser = "libvirt-qemu"'
    conf.write_text(original)
    os.chmod(conf, 0o600)
    assert remote.configure_libvirt_tls(pki, conf) is True
    text = conf.read_text()
    assert text.startswith(original + "\n")
    assert text.count(remote.BEGIN) == 1 and f'backup_tls_x509_cert_dir = "{pki.server}"' in text
    assert "backup_tls_x509_verify = 1" in text
    assert _mode(conf)[0] == 0o600
    assert remote.configure_libvirt_tls(pki, conf) is False
    assert conf.read_text() == text
    # A block for another PKI is replaced in place, not duplicated.
    other = remote.Pki(pathlib.Path("/elsewhere"), pathlib.Path("/elsewhere/server"), pki.client, pki.rogue_client)
    assert remote.configure_libvirt_tls(other, conf) is True
    assert conf.read_text().count(remote.BEGIN) == 1 and '"/elsewhere/server"' in conf.read_text()
    assert remote.configure_libvirt_tls(pki, conf) is True and conf.read_text() == text
    # The keys set outside the block: refused rather than set twice.
    conf.write_text(original + '\nbackup_tls_x509_cert_dir = "/etc/pki/x"\n')
    with pytest.raises(RuntimeError, match="outside"):
        remote.configure_libvirt_tls(pki, conf)
    assert sorted(p.name for p in workdir.iterdir()) == ["qemu.conf"]


def test_libvirtd_runs_with_the_tls_block(lab, pki):
    text = remote.QEMU_CONF.read_text()
    assert text.count(remote.BEGIN) == 1
    assert remote.tls_block(pki) in text
    assert remote.configure_libvirt_tls(pki) is False  # nothing left to do once a session started


def _virsh(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60)


def test_libvirt_over_qemu_ssh(lab, sshd, make_vm):
    home_ssh = os.path.exists("/root/.ssh")
    vm = make_vm((1 * MiB, "qcow2"))
    r = _virsh(sshd.uri(), "list", "--all")
    assert r.returncode == 0, r.stderr
    assert vm.name in r.stdout
    import libvirt

    conn = libvirt.open(sshd.uri())
    try:
        assert conn.getURI().startswith(f"qemu+ssh://root@127.0.0.1:{sshd.port}/system")
        assert vm.name in [d.name() for d in conn.listAllDomains()]
        assert conn.lookupByName(vm.name).isActive()
    finally:
        conn.close()
    assert os.path.exists("/root/.ssh") == home_ssh  # the wrapper keeps ssh out of root's home
    assert "Accepted publickey for root" in sshd.log.read_text()


def test_qemu_ssh_really_goes_through_sshd(lab):
    with remote.Sshd() as server:
        assert _virsh(server.uri(), "version").returncode == 0
        server.proc.terminate()
        server.proc.wait()
        r = _virsh(server.uri(), "version")  # same wrapper and key, no sshd any more
        assert r.returncode != 0 and "Connection refused" in r.stderr
    assert not server.dir.exists()


def test_qemu_ssh_refuses_another_key(lab, sshd, workdir):
    key = workdir / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    r = _virsh(sshd.uri().replace(str(sshd.key), str(key)), "version")
    assert r.returncode != 0 and "Permission denied (publickey)" in r.stderr


@pytest.fixture(scope="module")
def tls_image(pki):
    """(port, image, raw bytes) of a qcow2 image with data, fills and holes served by
    ``tls_qemu_nbd``; the bytes are ``qemu-img convert -O raw`` of it."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="lvbtest-tls-", dir="/var/tmp"))
    rng = random.Random(20261202)
    raw = d / "src.raw"
    size = 24 * MiB + 7 * 512  # not a multiple of the cluster: the tail is read too
    with open(raw, "wb") as f:
        f.truncate(size)
        for _ in range(40):
            length = rng.randint(1, 700 * KiB)
            offset = rng.randrange(0, size - length)
            f.seek(offset)
            f.write(rng.randbytes(length) if rng.random() < 0.7 else bytes([rng.randrange(1, 256)]) * length)
        f.seek(size - 100)
        f.write(rng.randbytes(100))
    image = d / "vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    back = d / "back.raw"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image), str(back)], check=True)
    port, server = remote.tls_qemu_nbd(image, pki)
    yield port, image, back.read_bytes()
    server.terminate()
    server.wait()
    shutil.rmtree(d, ignore_errors=True)


def _copy_all(src: nbdio.Source, path: pathlib.Path) -> bytes:
    target = RawTarget(str(path), src.size)
    try:
        engine.copy(src, target)
    finally:
        target.close()
    return path.read_bytes()


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_export_tcp_over_tls_reads_every_byte(tls_image, pki, workdir):
    port, _image, expected = tls_image
    with nbdio.export_tcp("127.0.0.1", port, "vda", tls_dir=str(pki.client)) as src:
        assert src.size == len(expected)
        assert len(src.handles) == nbdio.CONNECTIONS  # qemu-nbd offers multi-conn read-only
        assert all(h.get_tls_negotiated() for h in src.handles)
        assert any(e.zero for e in src.extents(0, src.size))  # holes are not read
        got = _copy_all(src, workdir / "out.raw")
    assert got == expected


def test_export_tcp_refuses_and_fails_in_one_line(tls_image, pki, workdir):
    port, _image, _expected = tls_image
    where = f"the NBD export vda at 127.0.0.1:{port} over TLS"
    # A client certificate from another CA: the server drops the session.
    with pytest.raises(CopyError) as e:
        nbdio.export_tcp("127.0.0.1", port, "vda", tls_dir=str(pki.rogue_client))
    assert _one_line(e).startswith(f"cannot connect to {where}: ")
    # No client key: said before any connection.
    partial = workdir / "partial"
    partial.mkdir(mode=0o700)
    for f in ("ca-cert.pem", "client-cert.pem"):
        shutil.copy(pki.client / f, partial / f)
    with pytest.raises(CopyError) as e:
        nbdio.export_tcp("127.0.0.1", port, "vda", tls_dir=str(partial))
    assert "client-key.pem" in _one_line(e) and str(partial) in str(e.value)
    # Plain NBD to a server that requires TLS.
    with pytest.raises(CopyError) as e:
        nbdio.export_tcp("127.0.0.1", port, "vda")
    assert f"127.0.0.1:{port}" in _one_line(e) and "requires TLS" in str(e.value)
    # A name the server does not export.
    with pytest.raises(CopyError) as e:
        nbdio.export_tcp("127.0.0.1", port, "vdz", tls_dir=str(pki.client))
    assert "vdz" in _one_line(e)


def test_export_tcp_fails_fast_without_a_server(pki):
    port = remote.free_port()  # nothing listens there
    t = time.monotonic()
    with pytest.raises(CopyError) as e:
        nbdio.export_tcp("127.0.0.1", port, "vda", tls_dir=str(pki.client))
    assert time.monotonic() - t < 2
    assert f"127.0.0.1:{port}" in _one_line(e) and "refused" in str(e.value)
    # A server that accepts and says nothing: the deadline, not a hang.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        t = time.monotonic()
        with pytest.raises(CopyError) as e:
            nbdio.export_tcp("127.0.0.1", mute.getsockname()[1], "vda", tls_dir=str(pki.client), timeout=0.5)
        assert 0.5 <= time.monotonic() - t < 3
        assert "no answer within 0.5 s" in _one_line(e)


def test_libvirt_pull_export_over_tls(lab, pki, make_vm, workdir):
    """libvirtd has backup_tls_x509_cert_dir: a pull export with tls='yes' is served with the
    test PKI's server certificate and read with the client's."""
    import libvirt

    vm = make_vm((8 * MiB + 3 * 64 * KiB, "qcow2"))
    random_writes(vm["vda"], random.Random(7))
    scratch_dir = tempfile.mkdtemp(prefix="lvbtest-scratch-", dir="/var/tmp")
    os.chmod(scratch_dir, 0o1777)  # QEMU (libvirt-qemu) creates the scratch file
    port = remote.free_port()
    xml = (f"<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='{port}' tls='yes'/>"
           f"<disks><disk name='vda' backup='yes' type='file'><scratch file='{scratch_dir}/vda.scratch'/>"
           "</disk></disks></domainbackup>")
    try:
        vm.dom.backupBegin(xml, None, 0)
        try:
            assert "tls='yes'" in vm.dom.backupGetXMLDesc(0).replace('"', "'")
            with nbdio.export_tcp("127.0.0.1", port, "vda", tls_dir=str(pki.client)) as src:
                assert all(h.get_tls_negotiated() for h in src.handles)
                got = _copy_all(src, workdir / "vda.raw")
            assert got == vm["vda"].snapshot()
            with pytest.raises(CopyError, match="requires TLS"):
                nbdio.export_tcp("127.0.0.1", port, "vda")
            with pytest.raises(CopyError):  # backup_tls_x509_verify = 1: client certificates checked
                nbdio.export_tcp("127.0.0.1", port, "vda", tls_dir=str(pki.rogue_client))
        finally:
            vm.dom.abortJob()
        deadline = time.monotonic() + 10
        while vm.has_job():
            assert time.monotonic() < deadline, "the backup job did not end"
            time.sleep(0.05)
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirt refused the TLS pull export (is qemu.conf's block in effect?): {e}")
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
