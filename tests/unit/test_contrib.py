"""contrib/libvbackup.service and .timer: systemd accepts them without a word, and says so
when they are broken.

``systemd-analyze verify`` works offline (no systemd as PID 1 needed), but exits 0 on unknown
keys and bad values, which it only prints: the check is an exit 0 *and* no output. It also
requires ExecStart's program to exist, so the units are checked as copies whose ExecStart is
this checkout's ``.venv/bin/libvbackup``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

CONTRIB = REPO_ROOT / "contrib"
INSTALLED = "/usr/local/bin/libvbackup"
COMMAND = pathlib.Path(sys.executable).parent / "libvbackup"


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: systemd-analyze is missing (apt-get install systemd)", pytrace=False)
        pytest.skip("systemd-analyze is missing (apt-get install systemd)")
    return found


def _units(tmp_path: pathlib.Path, edit=lambda name, text: text) -> list[str]:
    out = []
    for name in ("libvbackup.service", "libvbackup.timer", "libvbackup-serve.service"):
        text = (CONTRIB / name).read_text().replace(f"ExecStart={INSTALLED} ", f"ExecStart={COMMAND} ")
        (tmp_path / name).write_text(edit(name, text))
        out.append(str(tmp_path / name))
    return out


def _verify(units: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([_analyze(), "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=60)


def _settings(name: str) -> dict[str, str]:
    out = {}
    for line in (CONTRIB / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_the_units_verify_without_a_word(tmp_path):
    assert COMMAND.is_file()
    r = _verify(_units(tmp_path))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize("unit,old,new", [
    ("libvbackup.service", "Type=oneshot", "Type=oneshoot"),
    ("libvbackup.service", "IOSchedulingClass=idle", "IOSchedulingClas=idle"),
    ("libvbackup.service", f"ExecStart={COMMAND} ", "ExecStart=/nonexistent/libvbackup "),
    ("libvbackup.timer", "OnCalendar=daily", "OnCalendar=dayly"),
    ("libvbackup.timer", "Persistent=true", "Persistent=maybe"),
    ("libvbackup-serve.service", "RuntimeDirectoryMode=0700", "RuntimeDirectoryMode=rwx"),
    ("libvbackup-serve.service", "Restart=always", "Restart=sometimes"),
])
def test_a_broken_unit_fails_the_check(tmp_path, unit, old, new):
    def edit(name, text):
        if name != unit:
            return text
        assert old in text
        return text.replace(old, new)

    r = _verify(_units(tmp_path, edit))
    assert r.returncode != 0 or r.stdout or r.stderr


def test_the_units_run_libvbackup_run_nightly_and_gently():
    service, timer = _settings("libvbackup.service"), _settings("libvbackup.timer")
    assert service["Type"] == "oneshot"
    assert service["ExecStart"] == f"{INSTALLED} run"
    assert service["Nice"] == "10" and service["IOSchedulingClass"] == "idle"
    assert "libvirtd.service" in service["After"].split() and "libvirtd.service" in service["Wants"].split()
    assert service["KillMode"] == "mixed"  # SIGTERM to libvbackup alone: it cleans up its helpers
    assert "PrivateTmp" not in service  # QEMU must reach the scratch files in /var/tmp
    assert timer["OnCalendar"] == "daily" and timer["Persistent"] == "true" and timer["RandomizedDelaySec"]
    assert timer["WantedBy"] == "timers.target"
    # ExecStart's command line is one the program takes.
    r = subprocess.run([str(COMMAND), *service["ExecStart"].split()[1:], "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage: libvbackup run" in r.stdout


def test_the_server_unit_serves_on_the_default_socket_privately():
    serve = _settings("libvbackup-serve.service")
    assert serve["Type"] == "simple" and serve["ExecStart"] == f"{INSTALLED} serve"
    # The directory of the default socket (resident.ROOT_SOCKET), as private as serve requires.
    assert serve["RuntimeDirectory"] == "libvbackup" and serve["RuntimeDirectoryMode"] == "0700"
    assert serve["KillMode"] == "mixed" and serve["Restart"] == "always"
    assert "PrivateTmp" not in serve
    from libvbackup.cli import resident

    assert resident.ROOT_SOCKET == "/run/libvbackup/server.sock"
    r = subprocess.run([str(COMMAND), *serve["ExecStart"].split()[1:], "--help"], capture_output=True, text=True,
                       env={**os.environ, resident.ENV: "off"})
    assert r.returncode == 0 and "Usage: libvbackup serve" in r.stdout
