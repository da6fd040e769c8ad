"""What the commands print: text lines, JSON documents, sizes, the run report.

Free of typer, like everything the pull and push commands need once their arguments are
parsed (``fastpath``): importing typer cost a pull's command line about 60 ms of CPU here
(README, "Third session").
"""

from __future__ import annotations

import json
import signal
import sys
from typing import List, Optional

from ..errors import UsageError
from ..repo import default_repo
from ..results import FORMAT_VERSION, RunReport, VmRun


def echo(message: str = "", err: bool = False, nl: bool = True) -> None:
    """One line on stdout (stderr with ``err``), flushed, so that the two streams keep their
    order on a terminal (as click.echo does)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(message + "\n" if nl else message)
    stream.flush()


def progress_mode(progress: str, json_out: bool) -> str:
    """--progress auto: a bar when stderr is a terminal and the output is not JSON."""
    if progress not in ("auto", "bar", "plain", "json", "none"):
        raise UsageError(f"--progress {progress!r}: use auto, bar, plain, json or none")
    if progress == "auto":
        return "bar" if sys.stderr.isatty() and not json_out else "none"
    return progress


def repo_path(repo: Optional[str]) -> str:
    return repo or default_repo()


def emit_json(obj: dict) -> None:
    """One JSON document on stdout: ``format_version`` first (libvbackup/schemas/)."""
    json.dump({"format_version": FORMAT_VERSION, **obj}, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if f < 1024 or unit == "TiB":
            return f"{int(f)} B" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def as_list(values: Optional[List[str]]) -> list[str]:
    return list(values or [])


def render_report(report: RunReport, json_out: bool) -> None:
    """The report as JSON or as a total (the lines came with ``on_vm``), and the exit code."""
    if json_out:
        emit_json(report.to_dict())
    else:
        _total(report)
    if report.exit_code:
        # The report is the document on stdout (an error document would be a second one): the
        # one-line error goes to stderr, as for every command.
        sys.stderr.write(f"libvbackup: error: {_failure(report)}\n")
        sys.stdout.flush()
        raise SystemExit(report.exit_code)


def vm_line(r: VmRun) -> None:
    """One VM, as soon as it is done (``run`` and ``pull VM VM…``)."""
    if not r.ok:
        what = "cannot back up" if r.dry_run else "FAILED"
        echo(f"{what} {r.vm} ({r.policy}): exit {r.exit_code}: {r.error}")
        return
    since = f" since {r.parent}" if r.parent else ""
    keep = f"retention {r.retention}" if r.retention else "no retention"
    if r.dry_run:
        auto = f" ({r.fallback_reason})" if r.fallback_reason else ""
        echo(f"would back up {r.vm} with {r.policy}: {r.mode}, level {r.requested_level} -> {r.level}"
             f"{since}{auto}, new checkpoint {r.checkpoint}; {keep}; repo {r.repo}"
             + (f"; schedule {r.schedule}" if r.schedule else ""))
        return
    pruned = f", pruned {len(r.pruned)} ({keep})" if r.retention else ""
    offsite = (f", {len(r.copied)} point(s) copied to {r.copy_to} ({human(r.bytes_sent)} sent)"
               if r.copy_to else "")
    echo(f"ok {r.vm}: {r.level} {r.mode} backup {r.checkpoint}{since}, {human(r.bytes_copied)} copied "
         f"in {r.seconds:.1f} s{pruned}{offsite}")
    if r.fallback_reason:
        echo(f"  note: {r.fallback_reason}")
    for w in r.warnings:
        echo(f"  warning: {w}")


def _total(report: RunReport) -> None:
    failed = sum(1 for r in report.vms if not r.ok)
    what = "planned" if report.dry_run else "backed up"
    echo(f"total: {len(report.vms)} VM(s), {len(report.vms) - failed} {what}, {failed} failed "
         f"in {report.seconds:.1f} s ({report.jobs} at once, config {report.config})")


def _failure(report: RunReport) -> str:
    failed = [r for r in report.vms if not r.ok]
    if report.exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        name = signal.Signals(report.exit_code - 128).name
        return f"interrupted by {name}: {len(failed)} of {len(report.vms)} VM(s) not backed up"
    if len(report.vms) == 1:
        return f"{failed[0].vm}: {failed[0].error}"
    return f"{len(failed)} of {len(report.vms)} VMs failed: " + ", ".join(
        f"{r.vm} (exit {r.exit_code})" for r in failed)
