"""Where a pull export listens when it is not on this host: address, ports, TLS (pure but for
checking that the client's certificate files exist).

A remote libvirt (``qemu+ssh://host/system``, ``qemu+tls://…``) runs QEMU on another host, so
its NBD server cannot be a unix socket here: it listens on TCP at ``--nbd-address`` (default:
the URI's host) on the first free port of ``--nbd-port`` (a port or a range ``LOW-HIGH``), and
TLS is required unless ``--no-tls``: libvirt's ``backup_tls_x509_cert_dir`` on the hypervisor
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, the key readable by QEMU's user), and
on this host ``--tls-dir`` with ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import urllib.parse

from .errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_PORTS = "10809-10909"
DEFAULT_TLS_DIR = "/etc/pki/qemu"  # QEMU's own default x509 directory, same file names
CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


@dataclasses.dataclass(frozen=True)
class NetExport:
    address: str
    ports: tuple[int, ...]
    tls_dir: str | None  # None: plain TCP (--no-tls)

    @property
    def tls(self) -> bool:
        return self.tls_dir is not None


def ports(spec: str) -> tuple[int, ...]:
    low, sep, high = spec.partition("-")
    try:
        lo = int(low)
        hi = int(high) if sep else lo
    except ValueError:
        raise UsageError(f"--nbd-port {spec!r}: give a port or a range LOW-HIGH") from None
    if not 1 <= lo <= hi <= 65535:
        raise UsageError(f"--nbd-port {spec!r}: ports are 1-65535, LOW <= HIGH")
    return tuple(range(lo, hi + 1))


def plan(uri: str, local: bool, address: str | None = None, port_spec: str | None = None,
         tls_dir: str | None = None, tls: bool = True) -> NetExport | None:
    """None: the export stays on a unix socket (libvirt on this host, no --nbd-address)."""
    if local and address is None:
        if port_spec or tls_dir or not tls:
            raise UsageError("--nbd-port, --tls-dir and --no-tls need a remote --uri or --nbd-address")
        return None
    if address is None:
        address = urllib.parse.urlsplit(uri).hostname
        if not address:
            raise UsageError(f"cannot tell the hypervisor's address from {uri!r}; give --nbd-address")
    if not tls:
        if tls_dir:
            raise UsageError("--tls-dir and --no-tls contradict each other")
        log.warning("the NBD export of the backup is not encrypted (--no-tls): guest data crosses the "
                    "network in the clear")
        return NetExport(address, ports(port_spec or DEFAULT_PORTS), None)
    directory = os.path.abspath(tls_dir or DEFAULT_TLS_DIR)
    for name in CLIENT_FILES:
        if not os.path.isfile(os.path.join(directory, name)):
            raise UsageError(f"TLS client certificate file {os.path.join(directory, name)} is missing",
                             "give --tls-dir with ca-cert.pem, client-cert.pem and client-key.pem "
                             "(see README: certificates), or --no-tls on a trusted network")
    return NetExport(address, ports(port_spec or DEFAULT_PORTS), directory)
