"""``map``: one disk of a backup point served read-only over NBD, for as long as it is wanted.

The point's image is served with its backing chain (the repository's images name their
backing files) by a qemu-nbd of our own, read-only: nothing can change the repository through
it. By default on a unix socket in a private directory (0700, root's: whoever may read the
repository may read the export); with ``port``, on TCP at ``address`` (default 127.0.0.1), and
TLS required for any other address (the server certificate in ``tls_dir``: ca-cert.pem,
server-cert.pem, server-key.pem). qemu-nbd is our child: ``Mapping.close`` (or leaving the
``with``) stops it and removes the socket directory.
"""

from __future__ import annotations

import os
import shutil
import socket as socketlib
import subprocess
import tempfile
import time

from .errors import ToolError, UsageError
from .repo import Repository
from .restore import select_disk
from .outcomes import MapResult

LOOPBACK = ("127.0.0.1", "::1", "localhost")
START = 30.0


class Mapping:
    def __init__(self, result: MapResult, proc: subprocess.Popen, directory: str | None):
        self.result, self._proc, self._dir = result, proc, directory

    @property
    def uri(self) -> str:
        return self.result.uri

    def exited(self) -> int | None:
        """qemu-nbd's exit status if it ended (it should not while the mapping is open)."""
        return self._proc.poll()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()  # our own child: the Popen proves it
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_point(vm: str, *, repo: str, checkpoint: str | None = None, disk: str | None = None,
              port: int | None = None, address: str | None = None, tls_dir: str | None = None) -> Mapping:
    repository = Repository(repo)
    m, point, disk, image = select_disk(repository, vm, checkpoint, disk)
    if port is None and (address or tls_dir):
        raise UsageError("--address and --tls-dir need --port (the default is a private unix socket)")
    argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "-f", "qcow2", "-x", disk]
    directory = None
    if port is None:
        directory = tempfile.mkdtemp(prefix="lvb-map-")  # 0700
        sock = os.path.join(directory, "nbd.sock")
        argv += ["--socket", sock]
        uri = f"nbd+unix:///{disk}?socket={sock}"
    else:
        if not 1 <= port <= 65535:
            raise UsageError(f"--port {port}: give a port 1-65535")
        address = address or "127.0.0.1"
        if address not in LOOPBACK and not tls_dir:
            raise UsageError(f"an export on {address} leaves this host: give --tls-dir (server certificate) "
                             "or serve on 127.0.0.1")
        argv += ["--bind", address, "--port", str(port)]
        if tls_dir:
            for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
                if not os.path.isfile(os.path.join(tls_dir, name)):
                    raise UsageError(f"TLS server certificate file {os.path.join(tls_dir, name)} is missing")
            argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={os.path.abspath(tls_dir)},"
                     "verify-peer=on", "--tls-creds", "tls0"]
        host = f"[{address}]" if ":" in address else address
        uri = f"{'nbds' if tls_dir else 'nbd'}://{host}:{port}/{disk}"
    log_path = os.path.join(directory or tempfile.gettempdir(), f"lvb-map-{os.getpid()}.log")
    with open(log_path, "wb") as err:
        try:
            proc = subprocess.Popen(argv + [image], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, close_fds=True)
        except OSError as e:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            raise ToolError(f"cannot run qemu-nbd: {e.strerror}", "run scripts/setup") from e
    mapping = Mapping(MapResult(vm, point.checkpoint, disk, image, uri, point.disks[disk].size), proc, directory)
    try:
        _wait_ready(proc, sock if port is None else (address, port), log_path)
    except BaseException:
        mapping.close()
        raise
    finally:
        if port is not None:  # (qemu-nbd keeps writing to it; nobody else needs the name)
            try:
                os.unlink(log_path)
            except OSError:
                pass
    return mapping


def _wait_ready(proc: subprocess.Popen, where, log_path: str) -> None:
    deadline = time.monotonic() + START
    while True:
        if proc.poll() is not None:
            with open(log_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            raise ToolError(f"qemu-nbd cannot serve the point: {lines[-1] if lines else 'it exited'}")
        try:  # (the socket file exists from bind(); connections succeed from listen())
            if isinstance(where, str):
                with socketlib.socket(socketlib.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(where)
            else:
                socketlib.create_connection(where, timeout=1).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ToolError(f"qemu-nbd did not start serving within {START:.0f} s")
        time.sleep(0.02)

