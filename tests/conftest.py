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
