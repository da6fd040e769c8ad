"""A remote libvirt and NBD over TLS, on loopback, for the tests.

- ``pki()``: a test CA and certificates (``certtool``), built once under /var/lib/lvb-test-pki:
  ``server/`` for QEMU (qemu.conf ``backup_tls_x509_cert_dir``, or qemu-nbd), ``client/`` for
  libnbd (``set_tls_certificates``), ``rogue-client/`` whose client certificate another CA
  signed (servers must refuse it; it trusts the real CA, so the refusal is the server's).
- ``configure_libvirt_tls()``: the qemu.conf block that points libvirt's backup exports at
  ``server/`` (``tests.lab.ensure_libvirtd`` applies it before libvirtd starts).
- ``Sshd``: a private sshd on 127.0.0.1 that only knows a key of its own, and the
  ``qemu+ssh://`` URI that reaches libvirtd through it (nothing is written to /root/.ssh).
- ``tls_qemu_nbd()``: an image served read-only over TCP with TLS, for clients without libvirt.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

PKI_BASE = pathlib.Path("/var/lib/lvb-test-pki")
QEMU_CONF = pathlib.Path("/etc/libvirt/qemu.conf")
QEMU_GROUP = "libvirt-qemu"  # QEMU runs as libvirt-qemu and reads the server key (LAB.md)
DAYS = 3650
# ECDSA P-256: instant, where each RSA 3072 key took 0.07-0.4 s (five keys: about 2 s).
_KEY_TYPE = ("--key-type", "ecdsa")


@dataclasses.dataclass(frozen=True)
class Pki:
    base: pathlib.Path
    server: pathlib.Path  # ca-cert.pem, server-cert.pem, server-key.pem (0640 root:libvirt-qemu), dh-params.pem
    client: pathlib.Path  # ca-cert.pem, client-cert.pem, client-key.pem (0600)
    rogue_client: pathlib.Path  # the same names; the client certificate is another CA's

    @property
    def ca_cert(self) -> pathlib.Path:
        return self.base / "ca" / "ca-cert.pem"


_CA = """cn = "libvbackup test CA{suffix}"
ca
cert_signing_key
expiration_days = {days}
"""
_SERVER = """organization = "libvbackup tests"
cn = "127.0.0.1"
dns_name = "localhost"
ip_address = "127.0.0.1"
tls_www_server
encryption_key
signing_key
expiration_days = {days}
"""
_CLIENT = """organization = "libvbackup tests"
cn = "libvbackup test client{suffix}"
tls_www_client
encryption_key
signing_key
expiration_days = {days}
"""
_FILES = ("ca/ca-cert.pem", "server/ca-cert.pem", "server/server-cert.pem", "server/server-key.pem",
          "server/dh-params.pem",
          "client/ca-cert.pem", "client/client-cert.pem", "client/client-key.pem",
          "rogue-client/ca-cert.pem", "rogue-client/client-cert.pem", "rogue-client/client-key.pem")


def pki(base: str | os.PathLike = PKI_BASE) -> Pki:
    """The test PKI under ``base``, built on first use (about 0.3 s) and cached.

    Built in a temporary directory beside ``base`` and renamed into place, so a directory
    at ``base`` is always complete (a concurrent builder that loses the race drops its copy).
    """
    base = pathlib.Path(base)
    got = Pki(base, base / "server", base / "client", base / "rogue-client")
    if all((base / f).is_file() for f in _FILES):
        return got
    if shutil.which("certtool") is None:
        raise RuntimeError("certtool not found (package gnutls-bin): run scripts/setup")
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{base.name}-", dir=base.parent))
    try:
        _build(tmp)
        if base.exists():  # incomplete or of an older layout: replace it
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{base.name}-old-", dir=base.parent))
            try:
                os.rename(base, old / "pki")
            except FileNotFoundError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, base)
        except OSError:  # another builder won: its PKI is as good as ours
            if not all((base / f).is_file() for f in _FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return got


def _certtool(*args: str, cwd: pathlib.Path) -> None:
    r = subprocess.run(["certtool", "--no-text", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"certtool {' '.join(args)}: {r.stderr.strip()}")


def _ca(d: pathlib.Path, suffix: str = "") -> None:
    d.mkdir(mode=0o700)
    (d / "ca.info").write_text(_CA.format(suffix=suffix, days=DAYS))
    _certtool("--generate-privkey", *_KEY_TYPE, "--outfile", "ca-key.pem", cwd=d)
    _certtool("--generate-self-signed", "--load-privkey", "ca-key.pem", "--template", "ca.info",
              "--outfile", "ca-cert.pem", cwd=d)


def _signed(d: pathlib.Path, ca: pathlib.Path, role: str, template: str) -> None:
    """``d/<role>-key.pem`` and ``d/<role>-cert.pem``, signed by the CA in ``ca``."""
    (d / f"{role}.info").write_text(template)
    _certtool("--generate-privkey", *_KEY_TYPE, "--outfile", f"{role}-key.pem", cwd=d)
    _certtool("--generate-certificate", "--load-privkey", f"{role}-key.pem",
              "--load-ca-certificate", str(ca / "ca-cert.pem"), "--load-ca-privkey", str(ca / "ca-key.pem"),
              "--template", f"{role}.info", "--outfile", f"{role}-cert.pem", cwd=d)
    (d / f"{role}.info").unlink()


def _build(tmp: pathlib.Path) -> None:
    os.chmod(tmp, 0o755)  # QEMU (libvirt-qemu) goes through it to server/
    ca, rogue_ca = tmp / "ca", tmp / "rogue-ca"
    _ca(ca)
    _ca(rogue_ca, " (rogue)")
    server = tmp / "server"
    server.mkdir(mode=0o755)
    _signed(server, ca, "server", _SERVER.format(days=DAYS))
    shutil.copyfile(ca / "ca-cert.pem", server / "ca-cert.pem")
    os.chmod(server / "ca-cert.pem", 0o644)
    os.chmod(server / "server-cert.pem", 0o644)
    # 0600 root fails at backupBegin: "Cannot load certificate … Error while reading file".
    os.chown(server / "server-key.pem", 0, grp.getgrnam(QEMU_GROUP).gr_gid)
    os.chmod(server / "server-key.pem", 0o640)
    # Without dh-params.pem QEMU generates 2048-bit DH parameters each time it loads the
    # credentials (tls-creds-x509: every qemu-nbd, every backupBegin): 0.04-1.5 s here, against
    # 0.01 s with the RFC 7919 group certtool prints.
    _certtool("--get-dh-params", "--sec-param", "medium", "--outfile", "dh-params.pem", cwd=server)
    os.chmod(server / "dh-params.pem", 0o644)
    for name, signer, suffix in (("client", ca, ""), ("rogue-client", rogue_ca, " (rogue)")):
        d = tmp / name
        d.mkdir(mode=0o700)
        _signed(d, signer, "client", _CLIENT.format(suffix=suffix, days=DAYS))
        # Both trust the real CA: the rogue one's certificate is refused by the server, not
        # the server's by the client.
        shutil.copyfile(ca / "ca-cert.pem", d / "ca-cert.pem")
        os.chmod(d / "client-key.pem", 0o600)


BEGIN = "# BEGIN libvbackup tests: TLS for backup exports (tests/remote.py; remove with the block)"
END = "# END libvbackup tests"
_KEYS = ("backup_tls_x509_cert_dir", "backup_tls_x509_verify")


def tls_block(p: Pki) -> str:
    return (f'{BEGIN}\nbackup_tls_x509_cert_dir = "{p.server}"\nbackup_tls_x509_verify = 1\n{END}\n')


def configure_libvirt_tls(p: Pki, path: str | os.PathLike = QEMU_CONF) -> bool:
    """Make qemu.conf hold our block (and nothing else setting those keys); True when the
    file changed (libvirtd reads it only when it starts). The rest of the file is kept as it
    is; the file is replaced atomically, owner and mode kept."""
    path = pathlib.Path(path)
    text = path.read_text()
    block = tls_block(p)
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN), None)
    if start is not None:
        end = next((i for i in range(start, len(lines)) if lines[i].rstrip("\n") == END), None)
        if end is None:
            raise RuntimeError(f"{path}: {BEGIN!r} without {END!r}; fix the file by hand")
        outside = lines[:start] + lines[end + 1:]
    else:
        outside = lines
    for line in outside:
        key = line.split("=", 1)[0].strip()
        if key in _KEYS:
            raise RuntimeError(f"{path} sets {key} outside the libvbackup tests' block: {line.strip()!r}")
    if start is not None:
        if "".join(lines[start:end + 1]) == block:
            return False
        new = "".join(lines[:start]) + block + "".join(lines[end + 1:])
    else:
        new = text + ("" if text.endswith("\n") or not text else "\n") + "\n" + block
    st = path.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(proc: subprocess.Popen, port: int, what: str, log: pathlib.Path, timeout: float = 10.0,
               banner: bytes = b"") -> None:
    """Until ``port`` accepts connections (and sends ``banner``), or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if not banner or s.recv(len(banner)) == banner:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} does not answer on 127.0.0.1:{port}: {_tail(log)}")
        time.sleep(0.01)


def _tail(log: pathlib.Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(lines[-3:]) or "no message"


def _stop_process(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child: the Popen object proves it
        proc.wait()


class Sshd:
    """A private sshd on 127.0.0.1 (a free port), its host key, config and the one key it
    accepts (root's, ed25519) in a temporary directory; ``uri()`` reaches libvirtd through it."""

    def __init__(self):
        # Not under /tmp or /var/tmp: sshd's StrictModes refuses an authorized_keys file below a
        # world-writable directory, sticky or not.
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="lvb-test-sshd-", dir="/run"))
        self.proc: subprocess.Popen | None = None
        self.port = 0
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise RuntimeError("sshd not found (package openssh-server): run scripts/setup")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation directory
        d = self.dir
        self.key = d / "id_ed25519"
        host_key = d / "host_ed25519"
        for k in (self.key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", k.name, "-f", str(k)],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True)
        shutil.copyfile(f"{self.key}.pub", d / "authorized_keys")
        self.known_hosts = d / "known_hosts"
        self.wrapper = d / "ssh"
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f'exec ssh -F none -o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=accept-new '
            f'-o IdentitiesOnly=yes -o BatchMode=yes "$@"\n')
        os.chmod(self.wrapper, 0o755)
        self.log = d / "sshd.log"
        host_pub = (d / "host_ed25519.pub").read_text().split()
        for attempt in range(5):
            self.port = free_port()
            # Known from the start: the first connection checks the key instead of accepting it.
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
            config = d / "sshd_config"
            config.write_text(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {d}/sshd.pid\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nUsePAM no\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nAllowTcpForwarding no\n"
                "X11Forwarding no\nPrintMotd no\nLogLevel VERBOSE\n")
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log, close_fds=True)
            try:
                _wait_port(self.proc, self.port, "sshd", self.log, banner=b"SSH-")
                return
            except RuntimeError:
                if self.proc.poll() is None or attempt == 4:  # not a lost race for the port
                    raise
                self.proc = None

    def uri(self, path: str = "/system") -> str:
        return (f"qemu+ssh://root@127.0.0.1:{self.port}{path}"
                f"?keyfile={self.key}&command={self.wrapper}")

    def stop(self) -> None:
        _stop_process(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        """A new sshd (new port, new keys: ``uri()`` changes) after ``stop``."""
        self.stop()
        self.__init__()

    def __enter__(self) -> "Sshd":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def tls_qemu_nbd(image: str | os.PathLike, p: Pki, name: str = "vda", fmt: str = "qcow2",
                 shared: int = 8) -> tuple[int, subprocess.Popen]:
    """qemu-nbd serving ``image`` read-only on 127.0.0.1 with TLS (client certificates of the
    test CA required), as export ``name``, for ``shared`` clients at once; persistent (``-t``)
    until the caller terminates it. Its messages go to ``<image>.qemu-nbd.log``."""
    log = pathlib.Path(f"{image}.qemu-nbd.log")
    for attempt in range(5):
        port = free_port()
        argv = ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={p.server},verify-peer=on",
                "--tls-creds", "tls0", "-t", "--read-only", "--shared", str(shared), "-f", fmt,
                "-x", name, "-b", "127.0.0.1", "-p", str(port), "--cache=writeback", "--aio=threads", str(image)]
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, close_fds=True)
        try:
            _wait_port(proc, port, "qemu-nbd", log)
            return port, proc
        except BaseException:
            lost_race = proc.poll() is not None and "ddress already in use" in _tail(log)
            _stop_process(proc)
            if not lost_race or attempt == 4:
                raise
    raise AssertionError("unreachable")
