"""--help teaches: every command ends its description with real examples of itself, and every
help shows the exit codes."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from libvbackup.errors import EXIT_CODES

COMMANDS = ["pull", "push", "list", "restore", "verify", "prune", "checkpoints", "status", "abort", "completion", "run", "map", "finalize",
            "files", "extract"]


def _help(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "libvbackup.cli.main", *args, "--help"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_examples_and_exit_codes(command):
    text = _help(command)
    examples = text[text.index("Examples:"):text.index("Arguments:" if "Arguments:" in text else "Options:")]
    lines = [line.strip() for line in examples.splitlines()[1:] if line.strip()]
    assert 2 <= len(lines) <= 4, examples
    for line in lines:  # not re-wrapped by click, each one a whole command line of this command
        assert re.search(rf"\blibvbackup {command}\b", line), line
    for code, _text in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s", text, re.M), f"exit code {code} missing from {command} --help"


def test_top_level_help_lists_commands_and_exit_codes():
    text = _help()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", text, re.M), command
    assert "Exit codes:" in text and '"error": MESSAGE' in text


def _cli(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libvbackup.cli.main", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True)


def test_output_that_cannot_be_written_is_one_line_and_a_failure():
    """The command ends with os._exit after flushing: a full disk under stdout is still an error."""
    with open("/dev/full", "w") as full:
        p = _cli("completion", "bash", stdout=full)
    assert p.returncode == 1
    assert p.stderr.startswith("libvbackup: error: ") and "No space left on device" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr


def test_a_json_error_document_that_cannot_be_written_keeps_the_error(tmp_path):
    with open("/dev/full", "w") as full:
        p = _cli("list", "nosuch", "--repo", str(tmp_path), "--json", stdout=full)
    assert p.returncode == 3
    assert p.stderr == f"libvbackup: error: repository {tmp_path} holds no backups of VM 'nosuch'\n"


def test_exit_codes_and_output_survive_the_fast_exit(tmp_path):
    p = _cli("list", "nosuch", "--repo", str(tmp_path))
    assert (p.returncode, p.stdout) == (3, "")
    assert p.stderr == f"libvbackup: error: repository {tmp_path} holds no backups of VM 'nosuch'\n"
    ok = _cli("completion", "bash")
    assert ok.returncode == 0 and ok.stderr == ""
    assert ok.stdout.endswith("complete -o default -F _libvbackup_completion libvbackup\n")  # all of it, flushed


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """`libvbackup list VM --json | head -1`: the pipe breaks while the document is written (it is
    larger than the pipe's buffer); the command ends quietly with its own code, as when the
    pipe breaks at the last flush."""
    from libvbackup import manifest

    disk = manifest.PointDisk(name="vda", image="", backing=None, size=1 << 30)
    points = []
    for i in range(3000):
        name = f"chk{i}"
        d = dataclasses.replace(disk, image=f"{name}/vda.qcow2", backing=f"chk{i - 1}/vda.qcow2" if i else None)
        points.append(manifest.Point(checkpoint=name, parent=f"chk{i - 1}" if i else None,
                                     level="incremental" if i else "full", mode="pull", started="", completed="",
                                     seconds=1.0, disks={"vda": d}))
    (tmp_path / "vm1").mkdir(mode=0o700)
    tmp_path.chmod(0o700)
    (tmp_path / "vm1" / "manifest.json").write_text(manifest.dumps(manifest.Manifest(vm="vm1", points=points)))
    p = subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", "list", "vm1", "--repo", str(tmp_path),
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "{\n"
    p.stdout.close()  # before the command has written the rest
    err = p.stderr.read()
    assert p.wait() == 0 and err == ""
    whole = _cli("list", "vm1", "--repo", str(tmp_path), "--json")
    assert whole.returncode == 0 and len(whole.stdout) > 1 << 20  # far more than a pipe holds
