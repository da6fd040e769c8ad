"""The typer-free parser of pull and push command lines (libvbackup.cli.fastpath) gives the
typer command's keyword arguments, or leaves the command line to typer."""

from __future__ import annotations

import pprint
import subprocess
import sys

import pytest

from libvbackup.cli import backup_run, fastpath
from libvbackup.cli.app import _command

KINDS = {"StringParamType": "value", "IntParamType": "int"}  # click's types, by class


def derive(command) -> dict:
    """SPEC, read off the click command that typer builds."""
    spec: dict = {"argument": None, "params": {}, "options": {}}
    for p in command.params:
        assert p.envvar is None and not p.secondary_opts and not getattr(p, "count", False), p.name
        if p.param_type_name == "argument":
            assert p.nargs == -1 and spec["argument"] is None
            spec["argument"] = p.name
            continue
        kind = "flag" if p.is_flag else "multi" if p.multiple else KINDS[type(p.type).__name__]
        assert p.nargs == 1 or kind == "flag"
        spec["params"][p.name] = (kind, p.default)
        for opt in p.opts:
            spec["options"][opt] = p.name
    return spec


@pytest.mark.parametrize("mode", fastpath.COMMANDS)
def test_spec_is_the_typer_commands(mode):
    derived = derive(_command(mode))
    assert derived == fastpath.SPEC, "fastpath.SPEC is stale; derived now:\n" + pprint.pformat(derived)


def typer_kwargs(mode: str, argv: list[str], monkeypatch) -> dict:
    """What the typer command passes to dispatch for this command line."""
    seen: list = []
    monkeypatch.setattr(backup_run, "dispatch", lambda m, **kw: seen.append((m, kw)))
    from libvbackup.cli import pull as pull_cmd

    monkeypatch.setattr(pull_cmd, "dispatch", backup_run.dispatch)
    _command(mode).main(argv, prog_name="libvbackup", standalone_mode=False)
    assert len(seen) == 1 and seen[0][0] == mode
    return seen[0][1]


TAKEN = [
    ["vm1"],
    ["vm1", "--repo", "/b"],
    ["--repo=/b", "vm1", "-i", "chk3", "--checkpoint", "chk4"],
    ["vm1", "-r", "/b", "-d", "vda", "--disk", "vdb", "--disk=vdc", "-x", "vdd"],
    ["vm1", "vm2", "--jobs", "3", "--all", "--json", "--dry-run"],
    ["vm1", "--level", "auto", "--quiesce", "no", "--progress", "plain", "--compress", "--no-tls"],
    ["vm1", "--scratch-dir", "/s", "--scratch-limit", "10G", "-c", "qemu+ssh://h/system", "--nbd-address",
     "10.0.0.1", "--nbd-port", "10809-10810", "--tls-dir", "/pki"],
    ["vm1", "--repo", "/a", "--repo", "/b"],  # the last one counts, as in click
    ["vm1", "--checkpoint=", "--jobs=0"],
    ["vm1", "--incremental", "a=b"],
]


@pytest.mark.parametrize("mode", fastpath.COMMANDS)
@pytest.mark.parametrize("argv", TAKEN, ids=" ".join)
def test_what_it_takes_it_reads_as_typer_does(mode, argv, monkeypatch):
    parsed = fastpath.parse([mode, *argv])
    assert parsed is not None
    assert parsed == (mode, typer_kwargs(mode, argv, monkeypatch))


LEFT = [
    [],  # no VM: typer says what is missing
    ["--help"], ["-h"], ["vm1", "--help"],
    ["vm1", "--no-such-option"], ["vm1", "-z"],
    ["vm1", "-ichk3"],  # attached short value
    ["vm1", "--repo"],  # a value missing
    ["vm1", "--repo", "--json"],  # an option where a value should be
    ["vm1", "--jobs", "two"], ["vm1", "--jobs", "-1"], ["vm1", "--jobs", "²"],
    ["vm1", "--json=yes"],  # a value to a flag
    ["vm1", "--", "vm2"],
    ["-", "vm1"],
]


@pytest.mark.parametrize("argv", LEFT, ids=" ".join)
def test_the_rest_goes_to_typer(argv):
    assert fastpath.parse(["pull", *argv]) is None


@pytest.mark.parametrize("argv", [["list", "vm1"], ["--debug", "pull", "vm1"], ["-v", "pull", "vm1"], ["run"], []])
def test_other_commands_and_global_options_go_to_typer(argv):
    assert fastpath.parse(argv) is None


def test_a_pull_command_line_imports_no_typer(tmp_path):
    """The point of it: the command runs (here to a one-line error, the VM does not exist) without
    importing typer; --help of the same command still comes from typer."""
    (tmp_path / "r").mkdir(mode=0o700)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "libvbackup.cli.main", "pull", "lvb-no-such-vm",
                        "--repo", str(tmp_path / "r"), "--uri", "test:///default"], capture_output=True, text=True)
    lines = p.stderr.splitlines()
    errors = [line for line in lines if not line.startswith("import time:")]
    assert p.returncode == 3, p
    assert errors == ["libvbackup: error: libvirt at test:///default has no VM named 'lvb-no-such-vm'"], p
    assert not [line for line in lines if "typer" in line]
    h = subprocess.run([sys.executable, "-m", "libvbackup.cli.main", "pull", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "Usage: libvbackup pull [OPTIONS] [VM...]" in h.stdout
