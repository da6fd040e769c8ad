"""Entry point: the one place errors become exit codes, and the way to the command.

A pull or push command line that ``fastpath`` understands runs without typer (a pull's
imports 227 -> 164 ms here, README "Third session"); every other one, help and errors about the command
line included, goes to the typer app in ``app``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

from . import resident  # the only import before a command is handed to a server

TYPE_CHECKING = False  # typing itself costs every command 4 ms
if TYPE_CHECKING:
    from typing import Callable

PROG = "libvbackup"
COMPLETE_VAR = "_LIBVBACKUP_COMPLETE"  # set by the shell's completion script

_debug = False


def set_up(debug: bool = False, verbose: bool = False) -> None:
    """The global options: logging to stderr, and tracebacks of errors with --debug."""
    import logging

    global _debug
    _debug = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="libvbackup: %(levelname)s: %(message)s")


def _fail(message: str, code: int, json_out: bool, hint: str | None = None, kind: str = "Error") -> None:
    if _debug:
        import traceback

        traceback.print_exc()
    if json_out:  # the caller parses stdout: the error is a document there too
        import json

        from ..results import FORMAT_VERSION

        with contextlib.suppress(OSError):  # stdout itself may be what failed (a full disk)
            sys.stdout.write(json.dumps({"format_version": FORMAT_VERSION, "error": message, "code": code,
                                         "hint": hint, "type": kind}, indent=2) + "\n")
            sys.stdout.flush()
    text = f"{message} ({hint})" if hint else message
    sys.stderr.write(f"libvbackup: error: {text}\n")
    sys.exit(code)


def errors_to_exit_codes(fn: Callable) -> Callable:
    """The one place where exceptions become a one-line message (a JSON document too, under
    --json) and an exit code."""

    from ..errors import Error

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_out = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except Error as e:
            _fail(e.message, e.exit_code, json_out, e.hint, type(e).__name__)
        except KeyboardInterrupt:
            _fail("interrupted", 130, json_out, kind="Interrupted")
        except OSError as e:
            if isinstance(e, BrokenPipeError) and _reader_gone():
                return None  # (| head): the reader's choice, as at the last flush (_exit)
            where = f": {e.filename}" if e.filename else ""
            _fail(f"{e.strerror or e}{where}", 1, json_out, kind="OSError")
        except Exception as e:  # a bug: one line; --debug shows where
            _fail(f"internal error: {type(e).__name__}: {e}", 70, json_out, "run with --debug for details",
                  "InternalError")

    return wrapper


def _reader_gone() -> bool:
    """stdout is a pipe whose reader has gone: a pipe tells it as POLLERR. (A broken pipe of
    another kind, to a child process or a socket, stays an error.)"""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


def main() -> None:
    """The ``libvbackup`` command. It ends with ``os._exit`` once its output is flushed: by then
    every file it wrote is closed and synced, every job, child process and thread of its own
    is over, and the interpreter's teardown (freeing some 200 modules) would cost 15-20 ms, a
    tenth of an empty incremental. Programs use ``libvbackup.api``, which never exits.

    With $LIBVBACKUP_SERVER set (opt-in) and a ``libvbackup serve`` answering there, the command
    runs in a worker of that server (``resident``)."""
    code = resident.forward(sys.argv)
    if code is not None:
        os._exit(code)
    for name in ("stdin", "stdout", "stderr"):  # started with it closed: what it says is lost
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "r" if name == "stdin" else "w"))
    try:
        if os.environ.get(COMPLETE_VAR):  # the shell asks for completions
            from .completion_cmd import enable

            enable()
        else:
            from . import fastpath

            parsed = fastpath.parse(sys.argv[1:])
            if parsed is not None:
                from .backup_run import dispatch

                set_up()
                errors_to_exit_codes(dispatch)(parsed[0], **parsed[1])
                raise SystemExit(0)
        from .app import app

        app(prog_name=PROG)
        code = 0
    except SystemExit as e:
        code = e.code
    _exit(code)


def _exit(code) -> None:
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message")
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # a reader that stopped early (| head): its choice, not an error
            pass
        except OSError as e:  # the output is lost (a full disk): that is a failure
            with contextlib.suppress(OSError):
                os.write(2, f"libvbackup: error: cannot write the output: {e.strerror or e}\n".encode())
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    main()
