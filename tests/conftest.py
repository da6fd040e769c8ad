"""Fixtures shared by the test suites.

Integration tests need root, libvirtd and QEMU. In CI (CI=true) a missing piece is a failure,
never a skip; elsewhere those tests are skipped with the reason.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# tests.lab.ensure_libvirtd gives libvirtd the test PKI for backup exports over TLS (qemu.conf).
os.environ["LVB_TEST_TLS"] = "1"
# libguestfs (files, extract): KVM is visible to root here but QEMU aborts on it ("failed to set
# MSR 0x10a"); its direct backend with TCG works. The test environment's, not the tool's defaults.
os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def _need_lab():
    problem = None
    if os.geteuid() != 0:
        problem = "integration tests run as root (libvirtd, QEMU)"
    else:
        try:
            from tests.lab import ensure_libvirtd

            ensure_libvirtd().close()
        except Exception as e:  # noqa: BLE001 - reported below
            problem = f"cannot reach or start libvirtd: {e}"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the integration tests: {problem}", pytrace=False)
        pytest.skip(problem)


@pytest.fixture(scope="session")
def lab():
    _need_lab()
    from tests import lab as lab_mod

    return lab_mod


def _lab_problem(problem: str):
    """Fail under CI, skip elsewhere: how every missing piece of the lab is reported."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the integration tests: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def guest_boot_files():
    """The tiny guest's (vmlinux, initrd), built from Debian packages on first use and cached
    under /var/cache/lvb-test-guest (about 9 s cold, under 1 s once cached)."""
    if os.geteuid() != 0:
        _lab_problem("the test guest is built as root (apt-get download, /var/cache)")
    try:
        from tests.guest import boot_files

        return boot_files()
    except Exception as e:  # noqa: BLE001 - reported below
        _lab_problem(f"cannot build the test guest's kernel and initramfs: {e}")


@pytest.fixture(scope="session")
def guest(guest_boot_files):
    """One running tiny Linux guest for the session, its agent answering; removed at the end.

    Shared: a test that freezes its file systems thaws them (in a finally) before it returns.
    """
    _need_lab()
    from tests.guest import GuestVM

    vm = GuestVM(boot=guest_boot_files)
    try:
        vm.start()
        vm.wait_agent()
    except BaseException:
        vm.destroy()
        raise
    yield vm
    vm.destroy()


@pytest.fixture
def grepo(guest, repo):
    """A repository for the shared guest; the guest is thawed before and after, and the
    checkpoints the test made are deleted afterwards (leaves first)."""
    import libvirt

    guest.thaw()
    yield repo
    guest.thaw()
    for _ in range(50):
        leaves = guest.dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)
        if not leaves:
            break
        for c in leaves:
            c.delete(0)


@pytest.fixture(scope="session")
def pki():
    """The test PKI (tests.remote.Pki): CA, server/, client/, rogue-client/; built once and
    cached under /var/lib/lvb-test-pki (ensure_libvirtd points qemu.conf at its server/)."""
    if os.geteuid() != 0:
        _lab_problem("the test PKI is built as root (/var/lib, a key for libvirt-qemu)")
    try:
        from tests.remote import pki as build

        return build()
    except Exception as e:  # noqa: BLE001 - reported below
        _lab_problem(f"cannot build the test PKI: {e}")


@pytest.fixture(scope="session")
def sshd():
    """A private sshd on 127.0.0.1 for the session (tests.remote.Sshd): ``sshd.uri()`` is a
    qemu+ssh:// URI of this machine's libvirtd; stopped at the end."""
    if os.geteuid() != 0:
        _lab_problem("the test sshd runs as root (it logs root in with its own key)")
    try:
        from tests.remote import Sshd

        server = Sshd()
    except Exception as e:  # noqa: BLE001 - reported below
        _lab_problem(f"cannot start the test sshd: {e}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3server():
    """A real S3 server on loopback for the session (tests.s3.SeaweedFS, about 4 s to start):
    ``s3server.endpoint``, ``.bucket(name)``, ``.env()`` for a libvbackup process."""
    try:
        from tests.s3 import SeaweedFS

        server = SeaweedFS().start()
    except Exception as e:  # noqa: BLE001 - reported below
        _lab_problem(f"cannot start the S3 server: {e}")
    yield server
    server.stop()


@pytest.fixture
def workdir():
    """A scratch directory under /var/tmp (pytest's tmp_path is not reachable by QEMU)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="lvbtest-work-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def repo(workdir):
    r = workdir / "repo"
    r.mkdir(mode=0o700)
    return r


@pytest.fixture
def make_vm(lab):
    """make_vm((size, fmt), ...) starts a throwaway VM, removed with everything it made."""
    made = []

    def make(*disks):
        vm = lab.LabVM(list(disks)).start()
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.destroy()
