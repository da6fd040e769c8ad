"""``libvbackup run``: back up every VM the policies of a configuration name, a few at once.

::

    list the domains of each libvirt the policies use        (virt.Connection.domain_names)
    choose: a domain takes the first policy that names it    (``choose``, pure)
    ``jobs`` worker threads; for each VM, in its own thread:
        backup     the policy's mode, level, quiesce, repository, scratch directory, disks
        prune      by the policy's retention, when it has one and the backup succeeded
    one report     each VM's result or error and exit code, in the order chosen

One VM's failure never stops the others: every error, a bug's too, is caught in its thread and
recorded. The threads share one process, so:

- ``signals.umask`` is reference-counted: a backup that ends does not give the umask back
  while another one still creates files.
- Backups start one at a time (look, plan, lock, begin the job: ``on_job_started`` ends the
  turn) and copy at once; prunes take the same turn: each looks at and plans against a
  repository and a libvirt no other thread of the run is changing at that moment.
- SIGINT and SIGTERM reach the main thread only (``signals.raising`` does nothing in a worker).
  The runner relays them: no VM starts after one, and each running backup or prune has
  ``Interrupted`` raised in its thread (``PyThreadState_SetAsyncExc``), so that it aborts its
  job and cleans up as ``libvbackup pull`` does on a signal; the report says which VMs were not
  backed up, and the run exits 128 + the signal's number.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import logging
import signal
import threading
import time
from typing import Callable, Iterator, Mapping, Sequence

from . import config as cfgmod
from .backup import backup
from .errors import Error, Interrupted, NotFound, UsageError
from .prune import prune
from .repo import default_repo
from .results import BackupResult, PruneResult, RunReport, VmRun
from .virt import Connection, default_uri

log = logging.getLogger(__name__)

SOME_FAILED = 10  # the exit code of a run in which some of several VMs failed
INTERNAL = 70  # a bug, as the command line reports it


@dataclasses.dataclass(frozen=True)
class Chosen:
    vm: str
    uri: str
    policy: cfgmod.Policy


def uri_of(policy: cfgmod.Policy) -> str:
    return policy.settings.uri or default_uri()


def choose(config: cfgmod.Config, listed: Mapping[str, Sequence[str]],
           vms: Sequence[str] | None = None) -> tuple[list[Chosen], list[str]]:
    """The VMs to back up, and warnings (pure).

    ``listed``: the domain names of each libvirt URI the policies use. A domain is covered by
    the first policy, in the order of the file, whose URI is its libvirt's and whose ``match``
    names it. ``vms``: only these; each must be named by some policy (else a UsageError), and
    one that no libvirt lists is still tried with its first policy, whose backup reports it.
    """
    chosen = []
    for uri, names in listed.items():
        for name in names:
            policy = next((p for p in config.policies if uri_of(p) == uri and p.matches(name)), None)
            if policy is not None:
                chosen.append(Chosen(name, uri, policy))
    if vms is None:
        warnings = [f"{p.label} covers no VM (none matches, or an earlier policy takes them)"
                    for p in config.policies if not any(c.policy is p for c in chosen)]
        return chosen, warnings
    wanted = list(dict.fromkeys(vms))
    for vm in wanted:
        if config.policy_for(vm) is None:
            raise UsageError(f"no [[policy]] of {config.path} names VM {vm!r}",
                             "add a [[policy]] whose match names it, or back it up with: libvbackup pull " + vm)
    out = []
    for vm in wanted:
        hits = [c for c in chosen if c.vm == vm]
        if not hits:
            policy = config.policy_for(vm)
            hits = [Chosen(vm, uri_of(policy), policy)]
        out += hits
    return out, []


def exit_code(runs: Sequence[VmRun], signum: int | None = None) -> int:
    """0 when every VM succeeded; the VM's own code when only one ran; else SOME_FAILED.
    A run stopped by signal N: 128 + N."""
    if signum is not None:
        return 128 + signum
    failed = [r for r in runs if not r.ok]
    if not failed:
        return 0
    return failed[0].exit_code if len(runs) == 1 else SOME_FAILED


def run_policies(config: cfgmod.Config, *, vms: Sequence[str] | None = None, jobs: int | None = None,
                 dry_run: bool = False, on_event: Callable[[VmRun], None] | None = None) -> RunReport:
    """Back up (``dry_run``: plan) every VM the policies name, or those of ``vms``, ``jobs`` at
    a time (default: ``[defaults] jobs``), each pruned by its policy's retention afterwards.

    ``on_event`` is called with each VM's ``VmRun`` as soon as it is done, from a worker thread,
    one call at a time. Errors of a VM are in its ``VmRun``; this raises only when there is
    nothing to run (no policy, no VM, a VM no policy names: UsageError/NotFound) or libvirt
    cannot list its domains.
    """
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UsageError(f"--jobs {jobs!r}: give a whole number, 1 or more")
    jobs = config.defaults.jobs if jobs is None else jobs
    if not config.policies:
        where = config.path or cfgmod.DEFAULT_PATH
        raise UsageError(f"{where}: no [[policy]], so nothing to back up" if config.path
                         else f"no configuration file {where}: libvbackup run backs up the VMs its [[policy]] tables name",
                         "see libvbackup run --help for the format")
    listed = {}
    for uri in dict.fromkeys(uri_of(p) for p in config.policies):
        with Connection(uri) as conn:
            listed[uri] = conn.domain_names()
    chosen, warnings = choose(config, listed, vms)
    if not chosen:
        raise NotFound(f"no VM of libvirt at {', '.join(listed)} matches a [[policy]] of {config.path}",
                       "virsh list --all shows the domains' names")
    for w in warnings:
        log.warning("%s", w)
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    state = _Run(on_event)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="run") as pool, \
            state.relaying_signals():
        futures = [pool.submit(state.one, c, dry_run) for c in chosen]
        pending = set(futures)
        while pending:
            # Not one blocking wait: a signal that the kernel hands to a worker thread runs its
            # Python handler only when the main thread runs Python code again.
            _, pending = concurrent.futures.wait(pending, timeout=0.2)
        runs = tuple(f.result() for f in futures)
    return RunReport(
        config=config.path, started=started.isoformat(timespec="seconds"), seconds=round(time.monotonic() - t0, 3),
        jobs=jobs, dry_run=dry_run, ok=all(r.ok for r in runs) and state.signum is None,
        exit_code=exit_code(runs, state.signum), vms=runs, warnings=tuple(warnings))


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in another thread at its next bytecode; None: forget one not raised yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                              ctypes.py_object(exc) if exc is not None else None)


def _describe(e: BaseException) -> tuple[str, int]:
    if isinstance(e, Error):
        return str(e), e.exit_code
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""), 1
    return f"internal error: {type(e).__name__}: {e} (run with --debug for details)", INTERNAL


class _Run:
    """What the worker threads of one run share: the start turn, and the signal relay."""

    def __init__(self, on_event: Callable[[VmRun], None] | None):
        self._on_event = on_event
        self._emit = threading.Lock()
        self._turn = threading.Lock()  # one backup start or one prune at a time (module doc)
        self._lock = threading.RLock()  # the signal handler takes it in the main thread
        self._active: set[int] = set()  # worker threads inside a backup or prune
        self._sent: set[int] = set()  # those Interrupted was raised in
        self.signum: int | None = None

    # -- signals ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def relaying_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # embedded in another program's thread: signals stay the program's
            return
        old = {s: signal.signal(s, self._relay) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _relay(self, signum: int, _frame) -> None:
        with self._lock:
            if self.signum is None:
                self.signum = signum
                log.warning("%s: stopping the running backups (they clean up); no other VM starts",
                            signal.Signals(signum).name)
            exc = _interrupt(self.signum)
            for tid in self._active - self._sent:
                _async_raise(tid, exc)
                self._sent.add(tid)

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        tid = threading.get_ident()
        with self._lock:
            if self.signum is not None:
                raise _NotStarted(self.signum)
            self._active.add(tid)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(tid)
                if tid in self._sent:
                    self._sent.discard(tid)
                    _async_raise(tid, None)  # not delivered yet: the operation is over anyway

    @contextlib.contextmanager
    def _turn_taken(self) -> Iterator[Callable[[], None]]:
        """Wait for the turn (interruptibly); the callable yielded gives it back early."""
        while not self._turn.acquire(timeout=0.2):
            pass
        held = [True]

        def give_back() -> None:
            if held[0]:
                held[0] = False
                self._turn.release()

        try:
            yield give_back
        finally:
            give_back()

    # -- one VM ----------------------------------------------------------------------------
    def one(self, c: Chosen, dry_run: bool) -> VmRun:
        s, keep = c.policy.settings, c.policy.keep
        repo = s.repo or default_repo()
        t0 = time.monotonic()
        result: BackupResult | None = None
        pruned: PruneResult | None = None
        copied = None
        step = "retention"
        error, code = None, 0
        try:
            with self._interruptible():
                log.info("%s VM %s (%s)", "planning" if dry_run else "backing up", c.vm, c.policy.label)
                with self._turn_taken() as give_back:
                    result = backup(c.vm, mode=s.mode, repo=repo, uri=c.uri, level=s.level, quiesce=s.quiesce,
                                    scratch_dir=s.scratch_dir, disks=s.disks, exclude=s.exclude, dry_run=dry_run,
                                    on_job_started=give_back, compress=s.compress)
                if keep is not None and not dry_run:
                    with self._turn_taken():
                        pruned = prune(c.vm, repo=repo, keep=keep, uri=c.uri)
                if s.copy_to and not dry_run:
                    step = "off-site copy"
                    from .s3repo import copy as copy_offsite

                    copied = copy_offsite([c.vm], repo=repo, to=s.copy_to, key_file=s.key_file,
                                          endpoint=s.s3_endpoint)
        except _NotStarted as e:
            error, code = f"not backed up: the run was interrupted ({signal.Signals(e.signum).name}) " \
                          "before this VM's turn", e.exit_code
        except BaseException as e:  # noqa: BLE001 - one VM's failure is its report, never the run's
            log.debug("VM %s failed", c.vm, exc_info=True)
            error, code = _describe(e)
            if result is not None and not dry_run:
                again = "prune" if step == "retention" else "copy"
                why = (f"was interrupted ({signal.Signals(code - 128).name}; the next {again} finishes it)"
                       if isinstance(e, Interrupted) else f"failed: {error}")
                error = f"backed up as {result.checkpoint}, but the {step} {why}"
        run = _vm_run(c, repo, result, pruned, error, code, time.monotonic() - t0, dry_run, copied)
        if self._on_event is not None:
            with self._emit:
                try:
                    self._on_event(run)
                except Exception:  # noqa: BLE001 - a report that cannot be shown must not stop backups
                    log.warning("reporting VM %s failed", c.vm, exc_info=True)
        return run


class _NotStarted(Interrupted):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int) -> type[Interrupted]:
    """An exception class that PyThreadState_SetAsyncExc can raise (it calls it without arguments)."""

    class RunInterrupted(Interrupted):
        def __init__(self):
            super().__init__(signum)

    return RunInterrupted


def _vm_run(c: Chosen, repo: str, result: BackupResult | None, pruned: PruneResult | None, error: str | None,
            code: int, seconds: float, dry_run: bool, copied=None) -> VmRun:
    keep = c.policy.keep
    return VmRun(
        vm=c.vm, policy=c.policy.label, schedule=c.policy.schedule, uri=c.uri, repo=repo,
        mode=c.policy.settings.mode, requested_level=c.policy.settings.level,
        retention=str(keep) if keep is not None else None, ok=error is None, exit_code=code, error=error,
        seconds=round(seconds, 3),
        checkpoint=result.checkpoint if result else None, parent=result.parent if result else None,
        level=result.level if result else None, fallback_reason=result.fallback_reason if result else None,
        bytes_copied=sum(d.bytes_copied for d in result.disks.values()) if result else 0,
        kept=pruned.keep if pruned else (), pruned=pruned.remove if pruned else (),
        warnings=tuple(pruned.warnings) if pruned else (), dry_run=dry_run,
        copy_to=c.policy.settings.copy_to,
        copied=tuple(p.checkpoint for p in copied.points if p.state == "copied") if copied else (),
        bytes_sent=copied.bytes_sent if copied else 0)
