"""``libvbackup serve``: the resident server that ``resident``'s client hands commands to.

It takes a lock that says it is live (a flock that dies with it), imports everything a command
may need, listens, and forks a worker per command: the worker (``resident_worker``) takes the
command's standard streams, working directory, umask, environment and arguments and runs
``main.main``. The server
stays single-threaded (a fork from a threaded process could inherit a held lock): one loop
watches the socket, each command's connection (signals to pass on; its end kills the worker)
and each worker's pidfd (its end: the status goes back to the command). Signals reach a worker
through its pidfd, never through a pid that might have been reused.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from . import resident_worker
from .resident import _MAX_REQUEST, FORWARDED, MAGIC, PACKAGE, decode_request


def _preload() -> None:
    """Everything a command may import, imported once (modules that import optional libraries
    such as boto3 or guestfs when first used are loaded; those libraries are not)."""
    import importlib
    import pkgutil

    import ctypes  # noqa: F401  (PR_SET_PDEATHSIG in each worker)

    import libvbackup

    from . import app

    for info in pkgutil.iter_modules(libvbackup.__path__, "libvbackup."):
        importlib.import_module(info.name)
    for module, _fn in app.COMMANDS.values():
        importlib.import_module(f"{__package__}.{module}")
    from .. import xmlgen
    from . import backup_run, output  # noqa: F401

    for template in sorted(os.listdir(xmlgen.TEMPLATES)):
        xmlgen._template(template)  # parsed once; a worker copies what it fills


def _own_files() -> dict[str, int]:
    """mtime of every loaded file of the package and of its XML templates."""
    out = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(PACKAGE + os.sep):
            out[path] = _mtime(path)
    from .. import xmlgen

    for name in os.listdir(xmlgen.TEMPLATES):
        out[os.path.join(xmlgen.TEMPLATES, name)] = _mtime(os.path.join(xmlgen.TEMPLATES, name))
    return out


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _check_path(path: str) -> None:
    """The socket's directory is ours and private (made, mode 0700, if missing), and nothing but
    a socket is at the path: checked before anything is created."""
    import stat

    from ..errors import StateError

    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise StateError(f"{path} exists and is not a socket", hint="give --socket another path")
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StateError(f"directory {directory} of the server's socket is not private "
                         f"(owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o})",
                         hint=f"use a directory of your own that only you can write (chmod 700 {directory})")


class Server:
    """A socket, the lock that says it is live, and the workers running commands."""

    def __init__(self, path: str, log=None) -> None:
        self.path = os.path.abspath(path)
        self.log = log or (lambda text: None)
        self.listener: socket.socket | None = None
        self.lock_fd = -1
        self.workers: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
        self.retiring = False
        self.files: dict[str, int] = {}

    # -- life -----------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the lock that says a server is live here (it dies with this process). A server
        already there: StateError, nothing touched."""
        import fcntl

        from .. import lock
        from ..errors import StateError

        _check_path(self.path)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = lock.holder(self.path + ".lock")
            who = f" (pid {pid})" if pid and pid > 0 else ""
            raise StateError(f"a libvbackup server{who} already listens on {self.path}",
                             hint="stop it first, or give this one another --socket") from None
        self.lock_fd = fd

    def listen(self) -> None:
        """The socket, mode 0600. Under the lock, a socket file left behind is a dead server's
        (anything else there is refused, never removed)."""
        _check_path(self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(64)
        self.listener = listener
        self.files = _own_files()

    def close(self) -> None:
        """Stop listening: the socket file goes while the lock is held; the lock goes with the
        last worker."""
        if self.listener is not None:
            if self.lock_fd >= 0:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            self.listener.close()
            self.listener = None
        if self.lock_fd >= 0 and not self.workers:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (then the workers get SIGTERM, and are waited for) or until
        the package's files change and the last worker has ended."""
        import selectors

        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        stop = []

        def on_stop(signum, _frame):
            stop.append(signum)

        olds = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ, ("wake", None))
        sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self._sel, self._private = sel, (wake_r, wake_w)
        try:
            while True:
                if stop and not self.retiring:
                    self.log(f"signal {stop[0]}: no new commands; SIGTERM to {len(self.workers)} running")
                    self._retire()
                    for pidfd in list(self.workers):
                        self._signal(pidfd, signal.SIGTERM)
                if self.retiring and not self.workers:
                    return
                for key, _ in sel.select():
                    kind, pidfd = key.data
                    try:
                        if kind == "wake":
                            try:
                                wake_r.recv(512)
                            except BlockingIOError:
                                pass
                        elif kind == "accept":
                            self._accept()
                        elif kind == "conn":
                            self._from_client(pidfd)
                        elif kind == "exit":
                            self._reap(pidfd)
                    except Exception as e:  # noqa: BLE001 - one command's trouble never ends the server
                        self.log(f"internal error ({kind}): {type(e).__name__}: {e}")
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in olds.items():
                signal.signal(s, h)
            sel.close()
            wake_r.close()
            wake_w.close()
            self.close()

    def _retire(self) -> None:
        self.retiring = True
        if self.listener is not None:
            self._sel.unregister(self.listener)
            self.close()

    # -- commands -------------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            if uid != os.geteuid():
                self.log(f"pid {pid}: uid {uid} is not the server's ({os.geteuid()}): refused")
                _send(conn, b"declined\n")
                conn.close()
                return
            conn.settimeout(10)
            request, fds = _read_request(conn)
        except (OSError, ValueError) as e:
            self.log(f"a request that cannot be read: {e}")
            conn.close()
            return
        try:
            reason = self._decline(request)
            if reason:
                self.log(f"pid {pid}: declined ({reason})")
                _send(conn, b"declined\n")
                conn.close()
                return
            conn.settimeout(None)
            self._start(conn, request, fds, pid)
        finally:
            for fd in fds:
                os.close(fd)

    def _decline(self, request: dict) -> str | None:
        if request.get("package") != PACKAGE:
            return f"another installation ({request.get('package')})"
        if _own_files() != self.files:
            self.log("libvbackup's files changed on disk: no new commands; ending after the running ones")
            self._retire()
            return "the server's files changed"
        if self.retiring:
            return "ending"
        return None

    def _start(self, conn: socket.socket, request: dict, fds: list[int], client: int) -> None:
        import selectors

        server = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:  # nothing started: the command runs in its own process
            self.log(f"pid {client}: declined (fork: {e.strerror})")
            _send(conn, b"declined\n")
            conn.close()
            return
        if pid == 0:  # the worker
            try:
                self._close_for_worker(conn)
                resident_worker.become(request, fds, server)
            except BaseException:  # noqa: B036  (as Python ends on an uncaught exception)
                import traceback

                traceback.print_exc()
            finally:
                os._exit(1)  # not reached when the command ran: it ends in os._exit
        pidfd = os.pidfd_open(pid)
        self.workers[pidfd] = (pid, conn)
        _send(conn, b"started\n")  # a command gone already: its end is read below, and kills the worker
        self._sel.register(pidfd, selectors.EVENT_READ, ("exit", pidfd))
        self._sel.register(conn, selectors.EVENT_READ, ("conn", pidfd))
        self.log(f"pid {client}: {' '.join(request['argv'][1:])} -> worker {pid}")

    def _close_for_worker(self, conn: socket.socket) -> None:
        """In a new worker: nothing of the server's stays open (the socket, the lock, the other
        commands' connections and pidfds, this command's connection: the server keeps it)."""
        signal.set_wakeup_fd(-1)
        for pidfd, (_pid, other) in self.workers.items():
            os.close(pidfd)
            other.close()
        for sock in self._private:
            sock.close()
        self._sel.close()
        if self.listener is not None:
            self.listener.close()
        os.close(self.lock_fd)
        conn.close()

    def _from_client(self, pidfd: int) -> None:
        """A signal to pass on, or the command gone: its worker is killed."""
        pid, conn = self.workers[pidfd]
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.log(f"worker {pid}: its command went away: SIGKILL")
            self._sel.unregister(conn)
            self._signal(pidfd, signal.SIGKILL)
            return
        for line in data.split(b"\n"):
            word, _, arg = line.decode("ascii", "replace").partition(" ")
            if word == "signal" and arg.isdigit() and int(arg) in FORWARDED:
                self._signal(pidfd, int(arg))

    def _signal(self, pidfd: int, signum: int) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)  # the worker itself, even if it has exited
        except ProcessLookupError:
            pass

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.workers.pop(pidfd)
        self._sel.unregister(pidfd)
        try:
            self._sel.unregister(conn)
        except KeyError:
            pass
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        if os.WIFSIGNALED(status):
            reply, text = b"signal %d\n" % os.WTERMSIG(status), f"killed by signal {os.WTERMSIG(status)}"
        else:
            code = os.waitstatus_to_exitcode(status)
            reply, text = b"exit %d\n" % code, f"exit {code}"
        self.log(f"worker {pid}: {text}")
        _send(conn, reply)
        conn.close()
        if self.retiring:
            self.close()  # the lock goes with the last worker


def _send(conn: socket.socket, data: bytes) -> None:
    """To a command that may have gone: then its end is seen where the connection is read."""
    try:
        conn.sendall(data)
    except OSError:
        pass


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request and the descriptors that came with it (its streams, then its working
    directory); ValueError, every descriptor closed, when it is not a request."""
    import array

    fds = array.array("i")
    head = len(MAGIC) + 10
    data, ancdata, _flags, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    fds = list(fds)
    try:
        if not data.startswith(MAGIC) or len(data) < head or not data[len(MAGIC):head].isdigit():
            raise ValueError("not a libvbackup request")
        size = int(data[len(MAGIC):head])
        if size > _MAX_REQUEST:
            raise ValueError(f"a request of {size} bytes")
        body = bytearray(data[head:])
        while len(body) < size:
            chunk = conn.recv(min(size - len(body), 1 << 16))
            if not chunk:
                raise ValueError("a request cut short")
            body += chunk
        request = decode_request(bytes(body[:size]))
        if len(fds) != len(request["streams"]) + 1:
            raise ValueError("descriptors missing")
        return request, fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


def serve(path: str, log) -> None:
    """``libvbackup serve``: everything imported, then commands served until SIGTERM."""
    for fd in (0, 1, 2):  # descriptors received from clients are never 0-2
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    server = Server(path, log)
    server.lock()
    try:
        _preload()
        import threading

        if threading.active_count() != 1:  # a fork would inherit locks that other threads hold
            from ..errors import StateError

            raise StateError(f"{threading.active_count()} threads after loading libvbackup: cannot fork workers")
        import gc

        gc.collect()
        gc.freeze()  # what is loaded stays out of the workers' collections: they copy fewer pages
        server.listen()
        log(f"listening on {server.path} (pid {os.getpid()})")
        server.run()
    finally:
        server.close()
