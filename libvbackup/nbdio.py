"""The one source interface of the copy engine; the only module that imports libnbd (``nbd``).

A ``Source`` is one NBD export that the engine (``engine.copy``) reads: its size, its extents
(allocation, merged with what decides which ranges to copy) and asynchronous reads, over one
or more connections. Every reader of guest data goes through it:

- pull backup: libvirt's export, ``base:allocation`` + ``qemu:dirty-bitmap:…``, on a unix socket
  (``export``) or over TCP, TLS required when certificates are given (``export_tcp``);
- restore and verify: a point's chain served read-only by qemu-nbd (``image``);
- push checksums: the pushed image served by qemu-nbd with ``qemu:allocation-depth``, whose
  own layer plays the dirty bitmap (``image(own_layer=True)``).

An image is served by a qemu-nbd child of ours, for several connections at once (one
connection read 1 GiB from tmpfs in 2.0-2.6 s here, two in 1.1-1.3 s, nbdcopy in 0.6 s).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Sequence

import nbd

from . import extents
from .errors import CopyError
from .netexport import CLIENT_FILES

log = logging.getLogger(__name__)

# Block status is asked for at most this much at a time: NBD lengths are 32-bit, and a multiple of
# every block and cluster size in use (1 MiB) keeps extents aligned at the range boundaries. A
# 16 TiB thin disk takes 4096 requests (1 GiB ranges took 16384: 1.6 s more per pass).
STATUS_RANGE = (4 << 30) - (1 << 20)
# Reads from a qemu-nbd of ours (an image on the host's storage): 512 KiB x 16 per connection
# read 1 GiB from tmpfs in 0.60-0.71 s here, 1 MiB in 1.0-1.4 s, 256 KiB in 0.86-0.95 s
# (three alternating runs each); nbdcopy took 0.58-0.67 s.
IMAGE_REQUEST_SIZE = 512 << 10
AHEAD = 8  # block status requests asked ahead of the copy
# Extents remembered between the pass that totals the work (progress) and the copy: at most this
# many (a fragmented disk is asked again instead).
REMEMBER = 1 << 16
CONNECTIONS = 2  # to one export, when it offers multi-conn (measured: no gain from more)
ALLOCATION_DEPTH = "qemu:allocation-depth"

def _err(what: str, e: Exception) -> CopyError:
    return CopyError(f"{what}: {e}")


class Source:
    """One export read by the engine, over ``handles`` (several when it offers multi-conn).

    ``dirty`` names the meta context that says which ranges to copy (a dirty bitmap, or
    ``qemu:allocation-depth`` for an image's own layer); None: every range counts as dirty.
    Whoever opens a source closes it (``close``, or ``with``).
    """

    def __init__(self, handles: Sequence["nbd.NBD"], name: str, dirty: str | None = None,
                 process: "subprocess.Popen | None" = None, directory: str | None = None,
                 request_size: int | None = None):
        self.handles = list(handles)
        self.request_size = request_size  # the read size that suits this server (None: the engine's)
        self.name = name
        self.dirty = dirty
        self.size = self.handles[0].get_size()
        self._process = process  # a qemu-nbd of ours, reaped on close
        self._directory = directory
        self._remembered: dict[tuple[int, int], list[extents.Extent]] = {}
        self._remembered_count = 0
        self._pending: dict[tuple[int, int], dict] = {}  # block status asked ahead
        self._stale: list[dict] = []  # asked ahead, then not needed: still in flight

    def extents(self, start: int, end: int, remember: bool = False) -> list[extents.Extent]:
        """Merged extents of [start, end): allocation, and dirtiness when the source has it.

        ``remember``: keep the answer (within REMEMBER extents) for the next request of the
        same range, which takes it: a source does not change while it is read.
        """
        got = self._remembered.pop((start, end), None)
        if got is not None:
            self._remembered_count -= len(got)
            return got
        got = self._ask(start, end)
        if remember and self._remembered_count + len(got) <= REMEMBER:
            self._remembered[(start, end)] = got
            self._remembered_count += len(got)
        return got

    def _ask(self, start: int, end: int) -> list[extents.Extent]:
        out: list[extents.Extent] = []
        pos = start
        while pos < end:
            count = min(end - pos, STATUS_RANGE)
            replies = self._status(pos, count)
            if pos + count < self.size:
                self._ahead(pos + count)
            alloc = replies.get(nbd.CONTEXT_BASE_ALLOCATION)
            if alloc is None:
                raise CopyError(f"{self.name} sent no base:allocation status at offset {pos}")
            dirty = None
            if self.dirty:
                dirty = replies.get(self.dirty)
                if dirty is None:
                    raise CopyError(f"{self.name} sent no {self.dirty} status at offset {pos}")
                if self.dirty == ALLOCATION_DEPTH:  # depth 1: this image's own layer
                    dirty = [(s, n, extents.STATE_DIRTY if f == 1 else 0) for s, n, f in dirty]
            got = extents.merge(pos, end, alloc, dirty)
            if not got:
                raise CopyError(f"{self.name} described no extent at offset {pos}")
            out.extend(got)
            pos = got[-1].end
        return out

    def _status(self, offset: int, count: int) -> dict[str, list]:
        """The replies of one block status request: asked ahead already, or asked now."""
        h = self.handles[0]
        ahead = self._pending.pop((offset, count), None)
        for key in [k for k in self._pending if k[0] < offset]:  # the copy went another way
            self._stale.append(self._pending.pop(key))
        try:
            if ahead is not None:
                while not ahead["done"]:
                    h.poll(-1)
                if ahead["error"]:
                    raise CopyError(f"block status of {self.name} at offset {offset} failed: "
                                    f"{os.strerror(ahead['error'])}")
                return ahead["replies"]
            replies: dict[str, list] = {}

            def cb(ctx: str, at: int, entries: list, err) -> int:
                replies[ctx] = extents.from_entries(at, entries)
                return 0

            h.block_status(count, offset, cb)
            return replies
        except nbd.Error as e:
            raise _err(f"block status of {self.name} at offset {offset} failed", e) from e

    def _ahead(self, offset: int) -> None:
        """Keep AHEAD block status requests in flight beyond ``offset`` (a 16 TiB disk takes
        4096 of them: one at a time, their round trips were most of its cost)."""
        h = self.handles[0]
        self._stale = [e for e in self._stale if not e["done"]]
        for k in range(AHEAD):
            at = offset + k * STATUS_RANGE
            if at >= self.size:
                return
            key = (at, min(STATUS_RANGE, self.size - at))
            if key in self._pending:
                continue
            entry: dict = {"replies": {}, "done": False, "error": 0}

            def cb(ctx: str, pos: int, entries: list, err, entry=entry) -> int:
                entry["replies"][ctx] = extents.from_entries(pos, entries)
                return 0

            def done(err, entry=entry) -> int:
                entry["done"] = True
                entry["error"] = err.value
                return 1

            try:
                h.aio_block_status(key[1], at, cb, done)
            except nbd.Error as e:
                raise _err(f"block status of {self.name} at offset {at} failed", e) from e
            self._pending[key] = entry

    def aio_pread(self, buf: "nbd.Buffer", offset: int, cb, conn: int = 0) -> None:
        """Queue a read on connection ``conn`` (the engine picks the least busy one)."""
        h = self.handles[conn]
        try:
            h.aio_pread(buf, offset, cb)
        except nbd.Error as e:
            raise _err(f"queueing a read of {self.name} at offset {offset} failed", e) from e

    def bind(self, wake_fd: int) -> None:
        """The engine's wake-up fd (sources that complete reads in threads signal it)."""

    @staticmethod
    def buffer(view: memoryview) -> "nbd.Buffer":
        """A libnbd buffer over ``view``: reads land there without a copy."""
        return nbd.Buffer.from_buffer(view)

    def step(self, wake_fd: int | None = None, timeout_ms: int = 1000) -> None:
        """Poll every connection (and ``wake_fd``) once and let libnbd make progress; raises
        CopyError when a connection has died."""
        p = select.poll()
        by_fd = {}
        for h in self.handles:
            if h.aio_is_dead() or h.aio_is_closed():
                raise CopyError(f"NBD connection {h.get_handle_name()} is closed")
            d = h.aio_get_direction()
            ev = 0
            if d & nbd.AIO_DIRECTION_READ:
                ev |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                ev |= select.POLLOUT
            if ev:
                fd = h.aio_get_fd()
                p.register(fd, ev)
                by_fd[fd] = h
        if wake_fd is not None:
            p.register(wake_fd, select.POLLIN)
        for fd, rev in p.poll(timeout_ms):
            if fd == wake_fd:
                os.eventfd_read(fd)
                continue
            h = by_fd[fd]
            try:
                if rev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                if rev & select.POLLOUT:
                    h.aio_notify_write()
            except nbd.Error as e:  # the server went away (QEMU exited)
                raise _err(f"reading {self.name} failed", e) from e

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return self.handles[0].pread(length, offset)
        except nbd.Error as e:
            raise _err(f"reading {self.name} at offset {offset} failed", e) from e

    def flush(self) -> None:
        try:
            self.handles[0].flush()
        except nbd.Error as e:
            raise _err(f"flushing {self.name} failed", e) from e

    def close(self) -> None:
        """Disconnect every connection; a socket-activated qemu-nbd exits with its handle.

        libnbd 1.14's Python handle has no close(): the C handle is closed (and qemu-nbd
        reaped) when the last reference goes.
        """
        for h in self.handles:
            try:
                if not (h.aio_is_closed() or h.aio_is_dead()):
                    h.shutdown()
            except nbd.Error as e:
                log.debug("closing %s: %s", h.get_handle_name(), e)
        self.handles = []
        if self._process is not None or self._directory is not None:
            _stop(self._process, self._directory)
            self._process = self._directory = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handle(export: str, contexts: Sequence[str], index: int, tls_dir: str | None = None) -> "nbd.NBD":
    h = nbd.NBD()
    h.set_handle_name(f"src-{export}-{index}")
    # libnbd zeroes every read buffer before the read by default (5-6% of a full pull's CPU);
    # our buffers are reused and a failed read's buffer is never used.
    h.set_pread_initialize(False)
    h.set_export_name(export)
    for ctx in contexts:
        h.add_meta_context(ctx)
    if tls_dir is not None:
        h.set_tls(nbd.TLS_REQUIRE)  # never falls back to plain NBD
        h.set_tls_certificates(tls_dir)
    return h


def _check_contexts(h: "nbd.NBD", export: str, contexts: Sequence[str]) -> None:
    for ctx in contexts:
        if not h.can_meta_context(ctx):
            raise CopyError(f"NBD export {export!r} does not offer {ctx}")


def _connect_unix(socket: str, export: str, contexts: Sequence[str], index: int) -> "nbd.NBD":
    h = _handle(export, contexts, index)
    try:
        h.connect_unix(socket)
    except nbd.Error as e:
        raise _err(f"cannot connect to NBD export {export!r} on {socket}", e) from e
    _check_contexts(h, export, contexts)
    return h


TLS_CLIENT_FILES = CLIENT_FILES  # libnbd's names, the ones the plan checks (netexport)


def _check_tls_dir(tls_dir: str) -> None:
    if not os.path.isdir(tls_dir):
        raise CopyError(f"TLS certificate directory {tls_dir} does not exist")
    for f in TLS_CLIENT_FILES:
        path = os.path.join(tls_dir, f)
        if not os.path.isfile(path):
            raise CopyError(f"TLS certificate directory {tls_dir} has no {f}",
                            f"it needs {', '.join(TLS_CLIENT_FILES)}")
        if not os.access(path, os.R_OK):
            raise CopyError(f"cannot read {path}: permission denied")


def _reason(e: "nbd.Error") -> str:
    """libnbd's message without the name of the call that failed, on one line."""
    text = " ".join((e.string or str(e)).split())
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("nbd_") else text


def _connect_tcp(host: str, port: int, export: str, contexts: Sequence[str], index: int,
                 tls_dir: str | None, timeout: float) -> "nbd.NBD":
    """One connection, ready within ``timeout`` seconds or a CopyError: libnbd's synchronous
    connect waits forever on a server that accepts and then says nothing, so the handshake
    (TLS included) runs on the asynchronous API, polled until the deadline."""
    where = f"the NBD export {export} at {host}:{port}{' over TLS' if tls_dir is not None else ''}"
    h = _handle(export, contexts, index, tls_dir)
    deadline = time.monotonic() + timeout
    try:
        # (A host name is resolved synchronously, before the deadline applies.)
        h.aio_connect_tcp(host, str(port))
        while h.aio_is_connecting():
            left = deadline - time.monotonic()
            if left <= 0:
                raise CopyError(f"cannot connect to {where}: no answer within {timeout:g} s")
            _poll(h, max(1, min(1000, int(left * 1000))))
        if not h.aio_is_ready():
            raise CopyError(f"cannot connect to {where}: the server closed the connection")
    except nbd.Error as e:
        reason = _reason(e)
        hint = None
        if tls_dir is not None and ("TLS" in reason or "gnutls" in reason):
            # A server refusing our certificate just drops the session (GnuTLS does not even
            # send a certificate whose CA the server did not list): say where to look.
            hint = f"the server must trust the CA that signed {os.path.join(tls_dir, 'client-cert.pem')}"
        raise CopyError(f"cannot connect to {where}: {reason}", hint) from e
    _check_contexts(h, export, contexts)
    return h


def _poll(h: "nbd.NBD", timeout_ms: int) -> None:
    """Wait up to ``timeout_ms`` for the connection's socket, then let libnbd go on."""
    d = h.aio_get_direction()
    ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
    p = select.poll()
    if ev:
        p.register(h.aio_get_fd(), ev)
    for _fd, rev in p.poll(timeout_ms):
        if rev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            h.aio_notify_read()
        if rev & select.POLLOUT:
            h.aio_notify_write()


def _contexts(bitmap: str | None) -> tuple[str | None, list[str]]:
    dirty = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
    return dirty, [nbd.CONTEXT_BASE_ALLOCATION] + ([dirty] if dirty else [])


def _open_export(connect, name: str, dirty: str | None, connections: int) -> Source:
    """``connect(index)`` once, then ``connections`` times in all when the server offers
    multi-conn (QEMU does for read-only exports: every connection sees the same data)."""
    handles = [connect(0)]
    try:
        if handles[0].can_multi_conn():
            handles += [connect(i) for i in range(1, connections)]
    except BaseException:
        Source(handles, name).close()
        raise
    return Source(handles, f"export {name!r}", dirty)


def export(socket: str, name: str, bitmap: str | None = None, connections: int = CONNECTIONS) -> Source:
    """A pull-mode export on a unix socket, with ``connections`` connections when the server
    offers multi-conn (QEMU does for read-only exports: every connection sees the same data)."""
    dirty, contexts = _contexts(bitmap)
    return _open_export(lambda i: _connect_unix(socket, name, contexts, i), name, dirty, connections)


def export_tcp(host: str, port: int, name: str, bitmap: str | None = None, tls_dir: str | None = None,
               connections: int = CONNECTIONS, timeout: float = 30.0) -> Source:
    """A pull-mode export over TCP (libvirt's ``<server transport='tcp' … tls='yes'/>``), as
    ``export`` gives it on a unix socket.

    ``tls_dir``: TLS is required (no fallback to plain NBD), with libnbd's ``ca-cert.pem``,
    ``client-cert.pem`` and ``client-key.pem`` from there; the server's certificate must
    name ``host``. None: plain TCP. Each connection is ready within ``timeout`` seconds or
    fails with a CopyError naming the export, host, port and libnbd's reason.

    Over TLS the engine's usual reads suit (REQUEST_SIZE, MAX_INFLIGHT per connection): small
    synchronous requests are what stalls there (LAB.md: 11-44 ms each).
    """
    if tls_dir is not None:
        _check_tls_dir(tls_dir)
    dirty, contexts = _contexts(bitmap)
    return _open_export(lambda i: _connect_tcp(host, port, name, contexts, i, tls_dir, timeout),
                        name, dirty, connections)


def image(path: str, fmt: str = "qcow2", own_layer: bool = False, connections: int = CONNECTIONS,
          bitmap: str | None = None) -> Source:
    """An image (and its backing chain) served read-only by a qemu-nbd of our own.

    ``own_layer``: the ranges this image holds itself (not its backing files) are the dirty
    ones, from ``qemu:allocation-depth``. ``bitmap``: the dirty ones are those of this
    persistent dirty bitmap of the image (a shut-off domain's checkpoint; qemu-nbd ``-B``).
    qemu-nbd holds the image's shared read lock: QEMU cannot open it for writing (start the
    domain) while it is served. qemu-nbd is our child, listening on a socket in a
    private directory for ``connections`` clients (read-only, so every connection sees the
    same data); it exits when the last of them disconnects, so it never outlives us for long.
    """
    argv = ["qemu-nbd", "-f", fmt, "--cache=writeback", "--aio=threads", "--read-only",
            "--shared", str(connections)]
    if own_layer:
        argv.append("--allocation-depth")
    dirty = ALLOCATION_DEPTH if own_layer else None
    if bitmap is not None:
        argv += ["-B", bitmap]
        dirty = f"qemu:dirty-bitmap:{bitmap}"
    contexts = [nbd.CONTEXT_BASE_ALLOCATION] + ([dirty] if dirty else [])
    directory = tempfile.mkdtemp(prefix="lvb-nbd-")  # 0700
    sock = os.path.join(directory, "nbd.sock")
    server = None
    handles: list = []
    try:
        # Its messages go to a file (a pipe nobody reads could fill and block it).
        with open(os.path.join(directory, "stderr"), "wb") as err:
            try:
                server = subprocess.Popen(argv + ["--socket", sock, path], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=err, close_fds=True)
            except OSError as e:
                raise CopyError(f"cannot run qemu-nbd: {e.strerror}", "run scripts/setup") from e
        _wait_for_socket(server, sock, path, os.path.join(directory, "stderr"))
        deadline = time.monotonic() + SERVER_START
        for i in range(connections):
            try:
                while True:
                    try:
                        handles.append(_connect_unix(sock, "", contexts, i))
                        break
                    except CopyError as e:
                        # The socket exists from bind() on; connections are refused until listen().
                        refused = isinstance(e.__cause__, nbd.Error) and e.__cause__.errnum == errno.ECONNREFUSED
                        if not refused or server.poll() is not None or time.monotonic() > deadline:
                            raise
                        time.sleep(0.002)
            except CopyError:
                if _exited(server):  # qemu-nbd refused the image: say why, in its words
                    raise _server_error(path, os.path.join(directory, "stderr")) from None
                raise
    except BaseException:
        Source(handles, path, process=server, directory=directory).close() if handles else _stop(server, directory)
        raise
    return Source(handles, f"image {path}", dirty, process=server,
                  directory=directory, request_size=IMAGE_REQUEST_SIZE)


def _exited(server: "subprocess.Popen") -> bool:
    try:
        server.wait(0.5)
    except subprocess.TimeoutExpired:
        return False
    return True


SERVER_START = 30.0  # seconds qemu-nbd may take to open a chain and listen


def _wait_for_socket(server: "subprocess.Popen", sock: str, path: str, stderr: str) -> None:
    deadline = time.monotonic() + SERVER_START
    while not os.path.exists(sock):
        if server.poll() is not None:
            raise _server_error(path, stderr)
        if time.monotonic() > deadline:
            raise CopyError(f"qemu-nbd did not start serving {path} within {SERVER_START:.0f} s")
        time.sleep(0.002)


def _server_error(path: str, stderr: str) -> CopyError:
    with open(stderr, "rb") as f:
        err = f.read().decode(errors="replace").strip().splitlines()
    return CopyError(f"cannot serve image {path} with qemu-nbd: {err[-1] if err else 'it exited'}")


def _stop(server: "subprocess.Popen | None", directory: str | None) -> None:
    """Reap our qemu-nbd (it exits once its clients are gone; killed if it does not)."""
    if server is not None:
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()  # our own child: the Popen object proves it
            server.wait()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
