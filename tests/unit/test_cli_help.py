"""--help teaches: every command ends its description with real examples of itself, and every
help shows the exit codes."""

from __future__ import annotations

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
