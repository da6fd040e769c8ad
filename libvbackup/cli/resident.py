"""The command's side of a resident libvbackup: hand the command to ``libvbackup serve``.

The work of an empty incremental pull costs 18 ms of CPU here; starting Python and importing
libvirt-python, lxml, libnbd and libvbackup costs some 150 ms more, on every command (README,
"Fourth session"). ``libvbackup serve`` (``resident_server``) pays that once: it imports
everything, listens on a UNIX socket and, for each command, forks a worker that runs it.

When $LIBVBACKUP_SERVER names a socket (``socket_path``; opt-in), the ``libvbackup`` command
asks there first, before it imports anything else. If a server answers, the command sends its
command line, environment, umask, nice value, working directory and standard streams (the
descriptors themselves, so a terminal stays a terminal) and waits for the worker's exit
status, which becomes its own; if none answers, or the server declines, the command runs
itself, as it always did. The worker is the command: it holds the locks, writes the output,
gets the signals the command gets (SIGINT, SIGTERM, SIGHUP, SIGQUIT are passed on), and is
killed (SIGKILL) when the command goes away without a word, so a run never outlives the
command that asked for it. A worker also dies with its server (PR_SET_PDEATHSIG).

Only a peer with the server's own user id is served (the kernel's SO_PEERCRED, and a socket
of mode 0600 in a directory of mode 0700). A server whose files changed on disk (an upgrade)
declines every command from then on and ends once its workers are done.
"""

from __future__ import annotations

import os

# The client imports the C modules under socket and signal: those two, with the enum and
# selectors modules they import, cost each command 10 ms (README, "Fourth session").
import _signal
import _socket

ENV = "LIBVBACKUP_SERVER"  # unset or "off": commands run in their own process
OFF = ("", "0", "off", "no", "none")
ON = ("1", "on", "yes")  # the default socket
ROOT_SOCKET = "/run/libvbackup/server.sock"
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
MAGIC = b"libvbackup-1\0"  # a request: MAGIC, its length (10 digits), NUL-separated fields
_MAX_REQUEST = 1 << 24

# The package the client runs: a server of another installation declines.
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_in_worker = False  # set in a worker: its command runs here, never forwarded again


def default_socket(environ=None) -> str | None:
    """/run/libvbackup/server.sock for root, $XDG_RUNTIME_DIR/libvbackup/server.sock for other
    users (None without it)."""
    environ = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return ROOT_SOCKET
    runtime = environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "libvbackup", "server.sock") if runtime else None


def socket_path(environ=None) -> str | None:
    """The server a command asks, from $LIBVBACKUP_SERVER: a socket's path, or "on" for the
    default socket; None (unset, "off"): commands run in their own process. Asking is opt-in:
    a worker runs in the server's cgroup and with its I/O priority, and a unit or a script that
    sets those for its command (contrib/libvbackup.service does) keeps them."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value.lower() in ON:
        return default_socket(environ)
    return value


def _command_name(argv: list[str]) -> str | None:
    """The command of a command line (the global options are flags)."""
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def runs_here(argv: list[str]) -> bool:
    """Commands never handed to a server: ``serve`` itself; ``map``, which serves until Ctrl-C;
    ``restore --instant``, whose NBD servers outlive it (in the server's cgroup, systemd would
    kill them with the server)."""
    name = _command_name(argv)
    return name in ("serve", "map") or (name == "restore" and "--instant" in argv[2:])


# ---------------------------------------------------------------------------------------------
# The client: the libvbackup command, before it imports anything of its own.

class _Declined(Exception):
    pass


def forward(argv: list[str]) -> int | None:
    """Run the command line in the server, if one answers: its exit status (a worker killed by a
    signal kills this process by the same signal). None: no server, or it declined; run here."""
    if _in_worker or runs_here(argv):
        return None
    path = socket_path()
    if not path:
        return None
    streams = _open_streams()  # before any descriptor of ours could take a closed one's number
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        try:
            conn.connect(path)
        except OSError:  # none listens there (or not for us): the command runs in this process
            return None
        _send_request(conn, argv, streams)
        return _wait(conn, path)
    except _Declined:
        return None
    finally:
        conn.close()


def encode_request(argv: list[str], environ, umask: int, nice: int, streams: list[int]) -> bytes:
    """MAGIC, the body's length, then the body: package, umask, nice value, streams, argc, argv,
    env entries, each ending in NUL (arguments and environment as the bytes the kernel gave this
    process)."""
    fields = [os.fsencode(PACKAGE), b"%o" % umask, b"%d" % nice, b",".join(b"%d" % fd for fd in streams),
              b"%d" % len(argv)]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    body = b"\0".join(fields) + b"\0"
    return MAGIC + b"%010d" % len(body) + body


def decode_request(body: bytes) -> dict:
    """The fields of a request's body; ValueError when it is not one."""
    fields = body.split(b"\0")
    if len(fields) < 6 or fields[-1] != b"":
        raise ValueError("malformed request")
    fields.pop()
    package, umask, nice, streams, argc = fields[:5]
    n = int(argc)
    argv, env = fields[5:5 + n], fields[5 + n:]
    if len(argv) != n or any(b"=" not in e for e in env):
        raise ValueError("malformed request")
    fds = [int(x) for x in streams.split(b",")] if streams else []
    if not set(fds) <= {0, 1, 2} or len(set(fds)) != len(fds):
        raise ValueError("malformed request")
    return {"package": os.fsdecode(package), "umask": int(umask, 8) & 0o777, "nice": int(nice), "streams": fds,
            "argv": [os.fsdecode(a) for a in argv],
            "env": dict(os.fsdecode(e).split("=", 1) for e in env)}


def _open_streams() -> list[int]:
    """Which of 0, 1, 2 are open: a closed standard stream stays closed in the worker."""
    streams = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        streams.append(fd)
    return streams


def _send_request(conn, argv: list[str], streams: list[int]) -> None:
    import array

    mask = os.umask(0o077)
    os.umask(mask)
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        data = encode_request(argv, os.environ, mask, os.getpriority(os.PRIO_PROCESS, 0), streams)
        rights = array.array("i", streams + [cwd]).tobytes()
        sent = conn.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        if sent < len(data):
            conn.sendall(data[sent:])
    except OSError:  # the server went away as we spoke: run here
        raise _Declined() from None
    finally:
        os.close(cwd)


def _wait(conn, path: str) -> int:
    """Pass signals on until the server tells how the worker ended."""
    started = False

    def pass_on(signum, _frame):
        try:
            conn.sendall(b"signal %d\n" % signum)
        except OSError:
            pass

    for s in FORWARDED:
        _signal.signal(s, pass_on)
    buf = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            if not started:  # declined without a word (it was ending): run here
                raise _Declined()
            os.write(2, f"libvbackup: error: the libvbackup server on {path} ended before the command did\n"
                     .encode())
            return 1
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, _, arg = line.decode("ascii", "replace").partition(" ")
            if word == "started":
                started = True
            elif word == "declined":
                raise _Declined()
            elif word == "exit":
                return int(arg)
            elif word == "signal":
                signum = int(arg)
                _signal.signal(signum, _signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return 128 + signum  # a signal whose default is not to end the process
