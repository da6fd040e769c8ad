"""Thin layer over libvirt; the only module that imports ``libvirt``.

Every libvirt failure leaves as a libvbackup error carrying libvirt's own message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import libvirt

from .errors import LibvirtError, NotFound, StateError

log = logging.getLogger(__name__)

# libvirt prints every error to stderr unless a handler is set; ours are reported once, by the CLI.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

DEFAULT_URI = "qemu:///system"
AGENT_DEADLINE = 5  # seconds for an agent's answer to a freeze or a thaw


def default_uri() -> str:
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def _msg(e: libvirt.libvirtError) -> str:
    return (e.get_error_message() or str(e)).strip()


RECONNECT_WAIT = 30.0
_REDEFINE_VALIDATE = (libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                      | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)


class Domain:
    """A domain, looked up again by name after the connection to libvirtd was re-established.

    A restart of libvirtd leaves QEMU, its backup job and the NBD export running; only our
    connection dies. Each call that fails on a dead connection reconnects and is tried again
    once, so a backup can finish across a restart of the daemon.
    """

    def __init__(self, conn: "Connection", dom: "libvirt.virDomain"):
        self._conn = conn
        self._dom = dom
        self.name = dom.name()

    def _retry(self, fn_name: str, *args):
        try:
            return getattr(self._dom, fn_name)(*args)
        except libvirt.libvirtError:
            if not self._conn.reconnect_if_dead():
                raise
            self._dom = self._conn.lookup_raw(self.name)
            return getattr(self._dom, fn_name)(*args)

    @property
    def uri(self) -> str:
        return self._conn.uri

    @property
    def local(self) -> bool:
        """libvirtd runs on this machine (so the domain's image paths are ours to open)."""
        return self._conn.local

    def reachable(self) -> bool:
        """The connection to libvirtd is alive."""
        return self._conn.alive()

    def is_running(self) -> bool:
        try:
            return bool(self._retry("isActive"))
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot query VM {self.name!r}: {_msg(e)}") from e

    def xml(self) -> str:
        return self._call("read the domain XML", "XMLDesc", 0)

    def uuid(self) -> str:
        return self._call("read the UUID", "UUIDString")

    def checkpoint_names(self) -> list[str]:
        return [c.getName() for c in self._call("list checkpoints", "listAllCheckpoints", 0)]

    def checkpoint_xml(self, name: str) -> str:
        try:
            return self._checkpoint(name).getXMLDesc(0)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot read checkpoint {name!r}: {_msg(e)}") from e

    def delete_checkpoint(self, name: str, metadata_only: bool = False) -> None:
        """Delete one checkpoint (its bitmap's changes are merged into its parent by libvirt).

        ``metadata_only``: libvirt forgets it and leaves the disks alone (for a checkpoint whose
        bitmaps QEMU never stored or lost, which libvirt cannot otherwise delete).
        """
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
        try:
            self._checkpoint(name).delete(flags)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot delete checkpoint {name!r} of VM {self.name!r}: {_msg(e)}") from e

    def has_checkpoint(self, name: str) -> bool:
        return name in self.checkpoint_names()

    def _checkpoint(self, name: str):
        try:
            return self._retry("checkpointLookupByName", name, 0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                raise NotFound(f"VM {self.name!r} has no checkpoint {name!r}") from e
            raise LibvirtError(f"cannot look up checkpoint {name!r}: {_msg(e)}") from e

    def validate_checkpoint(self, name: str) -> str | None:
        """None if the checkpoint's bitmaps are present and consistent, else libvirt's reason.

        Redefining a checkpoint with its own XML and REDEFINE_VALIDATE makes libvirt check the
        bitmaps in the qcow2 images without changing anything.
        """
        try:
            xml = self.checkpoint_xml(name)
            self._retry("checkpointCreateXML", xml, _REDEFINE_VALIDATE)
        except NotFound:
            return f"libvirt has no checkpoint {name!r}"
        except (libvirt.libvirtError, LibvirtError) as e:
            return _msg(e) if isinstance(e, libvirt.libvirtError) else e.message
        return None

    def redefine_checkpoint(self, xml: str, validate: bool = True) -> str | None:
        """Give libvirt back a checkpoint it lost, from saved XML; None on success, else why not.

        ``validate``: libvirt checks the bitmaps in the images (REDEFINE_VALIDATE, which libvirt
        9.0 can do for a running domain only: the offline transport checks them itself)."""
        flags = _REDEFINE_VALIDATE if validate else libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        try:
            self._retry("checkpointCreateXML", xml, flags)
        except libvirt.libvirtError as e:
            return _msg(e)
        return None

    def fs_freeze(self, deadline: int = AGENT_DEADLINE) -> int:
        """Freeze every guest file system through the agent; returns how many were frozen.

        libvirt waits for an agent's answer forever by default: the domain's agent timeout is
        set to ``deadline`` seconds for the call and set back to libvirt's default afterwards
        (libvirt cannot tell what it was before: a timeout an admin set by hand is reset).
        A guest that does not answer makes this fail, never hang; it may still freeze later
        (thaw then)."""
        with self._agent_deadline(deadline):
            try:
                return int(self._dom.fsFreeze(None, 0))
            except libvirt.libvirtError as e:
                raise StateError(f"cannot freeze the file systems of VM {self.name!r}: {_msg(e)}") from e

    def fs_thaw(self, deadline: int = AGENT_DEADLINE) -> int:
        with self._agent_deadline(deadline):
            try:
                return int(self._retry("fsThaw", None, 0))
            except libvirt.libvirtError as e:
                raise StateError(f"cannot thaw the file systems of VM {self.name!r}: {_msg(e)}") from e

    @contextlib.contextmanager
    def _agent_deadline(self, seconds: int):
        try:
            self._retry("agentSetResponseTimeout", seconds, 0)
        except libvirt.libvirtError as e:
            raise StateError(f"cannot set the guest agent timeout of VM {self.name!r}: {_msg(e)}") from e
        try:
            yield
        finally:
            try:
                self._retry("agentSetResponseTimeout", libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)
            except libvirt.libvirtError as e:
                log.warning("cannot set the guest agent timeout of VM %r back: %s", self.name, _msg(e))

    def start(self) -> None:
        self._call("start the VM", "create")

    def undefine(self) -> None:
        """Stop (if running) and undefine, with the checkpoint metadata of this domain."""
        try:
            if self._dom.isActive():
                self._dom.destroy()
            self._dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                                    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot remove VM {self.name!r}: {_msg(e)}") from e

    def disk_capacity(self, target: str) -> int:
        return int(self._call(f"read the size of disk {target}", "blockInfo", target, 0)[0])

    def completed_job_stats(self) -> dict:
        """Statistics of the job that ended last: ``success``, ``errmsg``, ``disk_processed``…"""
        return self._call("read the completed job", "jobStats", libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)

    def backup_begin(self, backup_xml: str, checkpoint_xml: str | None, reuse_external: bool = False) -> None:
        # Not retried: a second begin after an unknown outcome could start a second job.
        # REUSE_EXTERNAL (push): QEMU writes into the targets we created, keeping their backing.
        flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if reuse_external else 0
        try:
            self._dom.backupBegin(backup_xml, checkpoint_xml, flags)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot start the backup job of VM {self.name!r}: {_msg(e)}") from e

    def backup_xml(self) -> str:
        return self._call("read the backup job", "backupGetXMLDesc", 0)

    def job_stats(self) -> dict:
        try:
            return self._retry("jobStats", 0)
        except libvirt.libvirtError as e:
            if not self._conn.alive():
                raise LibvirtError(f"lost the connection to libvirt: {_msg(e)}") from e
            return {}

    def has_backup_job(self) -> bool:
        stats = self.job_stats()
        return stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE and \
            stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP

    def abort_job(self, wait: float = 30.0) -> None:
        """End the backup job (the normal end of a pull job) and wait until it is gone."""
        self.request_abort()
        self.wait_job_gone(wait)

    def request_abort(self) -> None:
        """Ask libvirt to end the backup job: once this returned, libvirt ends it whatever
        becomes of this process (it removes the export and the scratch images)."""
        try:
            self._retry("abortJob")
        except libvirt.libvirtError as e:
            if self.has_backup_job():
                raise LibvirtError(f"cannot end the backup job of VM {self.name!r}: {_msg(e)}") from e

    def wait_job_gone(self, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        while self.has_backup_job():
            if time.monotonic() > deadline:
                raise LibvirtError(f"the backup job of VM {self.name!r} did not end within {wait:.0f} s")
            time.sleep(0.01)

    def metadata(self, namespace: str) -> str | None:
        """Our element in the domain's persistent <metadata> (``namespace``), None if none."""
        try:
            return self._retry("metadata", libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace,
                               libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise LibvirtError(f"cannot read the metadata of VM {self.name!r}: {_msg(e)}") from e

    def set_metadata(self, xml: str, key: str, namespace: str) -> None:
        """Replace our <metadata> element, in the definition and (running) the live domain."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if self.is_running() else 0)
        try:
            self._retry("setMetadata", libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, namespace, flags)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot write the metadata of VM {self.name!r}: {_msg(e)}") from e

    def block_pull(self, disk: str) -> None:
        """Start copying everything the disk's backing chain provides into its top image (a block
        job that ends by itself: the image then has no backing file)."""
        self._call(f"start the block pull of disk {disk}", "blockPull", disk, 0, 0)

    def block_job(self, disk: str) -> dict:
        """The disk's block job (``cur``, ``end`` bytes), {} when it has none (any more)."""
        return self._call(f"read the block job of disk {disk}", "blockJobInfo", disk, 0) or {}

    def _call(self, what: str, fn_name: str, *args):
        try:
            return self._retry(fn_name, *args)
        except libvirt.libvirtError as e:
            code = e.get_error_code()
            if code == libvirt.VIR_ERR_OPERATION_INVALID and not self._safe_active():
                raise StateError(f"VM {self.name!r} is not running; cannot {what}") from e
            raise LibvirtError(f"cannot {what} of VM {self.name!r}: {_msg(e)}") from e

    def _safe_active(self) -> bool:
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError:
            return False


class Connection:
    def __init__(self, uri: str | None = None):
        self.uri = uri or default_uri()
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot connect to libvirt at {self.uri}: {_msg(e)}") from e

    @property
    def local(self) -> bool:
        """No host in the URI (qemu:///system): libvirtd, QEMU and the images are on this machine."""
        import urllib.parse

        return not urllib.parse.urlsplit(self.uri).netloc

    def alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def reconnect_if_dead(self) -> bool:
        """Reconnect when the connection died (libvirtd restarted); True if it did."""
        if self.alive():
            return False
        log.warning("the connection to libvirt was lost; reconnecting to %s", self.uri)
        deadline = time.monotonic() + RECONNECT_WAIT
        while True:
            try:
                self._conn = libvirt.open(self.uri)
                return True
            except libvirt.libvirtError as e:
                if time.monotonic() > deadline:
                    raise LibvirtError(f"lost the connection to libvirt at {self.uri} and could not "
                                       f"reconnect within {RECONNECT_WAIT:.0f} s: {_msg(e)}") from e
                time.sleep(0.5)

    def has_domain(self, name: str) -> bool:
        try:
            self.lookup_raw(name)
            return True
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise LibvirtError(f"cannot look up VM {name!r}: {_msg(e)}") from e

    def define(self, xml: str) -> Domain:
        """A new persistent domain from ``xml`` (libvirt validates it against its schema)."""
        try:
            return Domain(self, self._conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))
        except libvirt.libvirtError as e:
            raise LibvirtError(f"libvirt refused the new domain definition: {_msg(e)}") from e

    def lookup_raw(self, name: str) -> "libvirt.virDomain":
        return self._conn.lookupByName(name)

    def domain(self, name: str) -> Domain:
        try:
            return Domain(self, self.lookup_raw(name))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"libvirt at {self.uri} has no VM named {name!r}") from e
            raise LibvirtError(f"cannot look up VM {name!r}: {_msg(e)}") from e

    def close(self) -> None:
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def domain_names(self) -> list[str]:
        """The name of every domain, running or not, persistent or transient; sorted."""
        try:
            return sorted(d.name() for d in self._conn.listAllDomains(0))
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot list the VMs of libvirt at {self.uri}: {_msg(e)}") from e
