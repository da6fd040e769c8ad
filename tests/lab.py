"""Throwaway disk-only VMs on a real libvirtd, for the tests, the demo and the benchmark.

Guest writes are made with HMP ``qemu-io`` on the disk's QOM path, so they pass through the
backup's copy-before-write filter exactly like a guest's writes. Each write is confirmed in
QEMU's log (qemu-io prints there, not to the monitor) and mirrored in a model of the disk
(a bytearray), which is what restores are compared with.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid

import libvirt
import libvirt_qemu

from tests import remote

libvirt.registerErrorHandler(lambda _c, _e: None, None)

URI = "qemu:///system"
LOG_DIR = pathlib.Path("/var/log/libvirt/qemu")
RUN_DIR = pathlib.Path("/run/libvirt/qemu")  # libvirt's runtime state: <vm>.xml, <vm>.pid


def fix_kvm_node() -> None:
    """Give /dev/kvm Debian's usual root:kvm 0660 when it is root-only (no udev here).

    libvirt 9.0 probes QEMU as root (the capabilities say "kvm") but checks KVM as the
    libvirt-qemu user; when the two disagree it throws its capabilities cache away and
    re-probes QEMU (about 40 s) on every domain define.
    """
    import grp
    import stat

    try:
        st = os.stat("/dev/kvm")
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return
    if st.st_gid == 0 and not st.st_mode & stat.S_IRWXG and os.geteuid() == 0:
        os.chown("/dev/kvm", 0, kvm_gid)
        os.chmod("/dev/kvm", 0o660)


LIBVIRTD_PID = pathlib.Path("/run/libvirtd.pid")
_LOCK = "/run/lvb-test-libvirtd.lock"  # one configurer and starter of libvirtd at a time
_configured = False  # this process saw libvirtd running with the TLS block of qemu.conf


def ensure_libvirtd(uri: str = URI, timeout: float = 30.0) -> libvirt.virConnect:
    """Connect to libvirtd, starting virtlogd and libvirtd (no systemd here) if needed.

    Before libvirtd starts, qemu.conf gets the test PKI for backup exports over TLS
    (``tests.remote``: built once, then cached); a libvirtd already running when the block
    had to be written is restarted once (its VMs keep running). Checked once per process.
    """
    global _configured
    fix_kvm_node()
    if _configured:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            pass
    import fcntl

    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The PKI first: libvirtd refuses to start with a missing backup_tls_x509_cert_dir.
        # Only for the tests (tests/conftest.py sets LVB_TEST_TLS): the demo and the benchmark
        # leave qemu.conf alone.
        changed = os.environ.get("LVB_TEST_TLS") == "1" and remote.configure_libvirt_tls(remote.pki())
        if changed and _running("libvirtd"):
            _stop_libvirtd(timeout)  # it reads qemu.conf only when it starts
        elif not changed:
            try:
                conn = libvirt.open(uri)
                _configured = True
                return conn
            except libvirt.libvirtError:
                pass
        os.makedirs("/run/libvirt", exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            if not _running(daemon):
                subprocess.run([daemon, "-d"], check=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = libvirt.open(uri)
                _configured = True
                return conn
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _running(daemon: str) -> bool:
    """A live process of that name (pgrep also lists zombies: here PID 1 leaves a stopped
    libvirtd unreaped for a while, and nothing would start the next one)."""
    pids = subprocess.run(["pgrep", "-x", daemon], capture_output=True, text=True).stdout.split()
    return any(_comm(int(pid)) == daemon for pid in pids)


def _stop_libvirtd(timeout: float) -> None:
    """SIGTERM the libvirtd of /run/libvirtd.pid and wait until it is gone (SIGKILL after
    ``timeout``); QEMU processes survive it, and the next libvirtd takes them back."""
    import signal

    try:
        pid = int(LIBVIRTD_PID.read_text())
    except (OSError, ValueError):
        found = subprocess.run(["pgrep", "-x", "-o", "libvirtd"], capture_output=True, text=True).stdout.split()
        if not found:
            return
        pid = int(found[0])
    if _comm(pid) != "libvirtd":
        return  # a stale pid file
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _comm(pid) == "libvirtd":
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def _comm(pid: int) -> str | None:
    """The process's name, None once it has exited (a zombie counts as exited: init may be
    slow to reap a daemon's corpse)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:][:1]
    return None if state == "Z" else name


class LabDisk:
    def __init__(self, vm: "LabVM", index: int, target: str, size: int, fmt: str):
        # fmt may carry qemu-img create options: "qcow2:cluster_size=4096"
        fmt, _, self.create_options = fmt.partition(":")
        self.vm, self.index, self.target, self.size, self.fmt = vm, index, target, size, fmt
        self.path = vm.workdir / f"{target}.{fmt}"
        # The model costs the disk's size in memory; the benchmark turns it off.
        self.model = bytearray(size) if vm.track else None
        self.qom = f"/machine/peripheral/virtio-disk{index}/virtio-backend"

    def write(self, offset: int, data: bytes) -> None:
        """Write arbitrary bytes at any offset (unaligned is fine)."""
        pat = self.vm.workdir / f"pattern-{uuid.uuid4().hex}.bin"
        pat.write_bytes(data)
        os.chmod(pat, 0o644)
        try:
            self.vm.qemu_io(self, f"write -s {pat} {offset} {len(data)}", offset, len(data))
        finally:
            pat.unlink()
        if self.model is not None:
            self.model[offset:offset + len(data)] = data

    def fill(self, offset: int, length: int, byte: int) -> None:
        self.vm.qemu_io(self, f"write -P {byte:#x} {offset} {length}", offset, length)
        if self.model is not None:
            self.model[offset:offset + length] = bytes([byte]) * length

    def zero(self, offset: int, length: int, unmap: bool = False) -> None:
        """Write zeroes; with ``unmap`` qcow2 may turn the range into zero clusters."""
        flags = "-z -u" if unmap else "-z"
        self.vm.qemu_io(self, f"write {flags} {offset} {length}", offset, length)
        if self.model is not None:
            self.model[offset:offset + length] = bytes(length)

    def snapshot(self) -> bytes:
        return bytes(self.model)


class LabVM:
    """A persistent domain with only disks; ``destroy()`` removes it and everything it made."""

    def __init__(self, disks: list[tuple[int, str]], name: str | None = None,
                 conn: libvirt.virConnect | None = None, base: str = "/var/tmp", track: bool = True):
        self.conn = conn or ensure_libvirtd()
        self.track = track
        self.name = name or f"lvbtest-{uuid.uuid4().hex[:8]}"
        # QEMU (user libvirt-qemu) must reach the images and pattern files.
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base))
        os.chmod(self.workdir, 0o755)
        self.disks = [LabDisk(self, i, f"vd{chr(ord('a') + i)}", size, fmt)
                      for i, (size, fmt) in enumerate(disks)]
        self.dom: libvirt.virDomain | None = None
        self._log = LOG_DIR / f"{self.name}.log"
        self._log_pos = 0

    def domain_xml(self, extra_devices: str = "") -> str:
        devs = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{d.fmt}'/>"
            f"<source file='{d.path}'/><target dev='{d.target}' bus='virtio'/></disk>"
            for d in self.disks
        )
        return (f"<domain type='qemu'><name>{self.name}</name><memory unit='MiB'>64</memory>"
                f"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
                # ACPI: the PCI bus takes hot-plugged disks only with it.
                f"<features><acpi/></features><devices>{devs}{extra_devices}</devices></domain>")

    def create_images(self) -> None:
        for d in self.disks:
            opts = ["-o", d.create_options] if d.create_options else []
            subprocess.run(["qemu-img", "create", "-q", "-f", d.fmt, *opts, str(d.path), str(d.size)], check=True)

    def start(self, extra_devices: str = "", images_ready: bool = False) -> "LabVM":
        if not images_ready:
            self.create_images()
        self.dom = self.conn.defineXML(self.domain_xml(extra_devices))
        self._log_pos = self._log.stat().st_size if self._log.exists() else 0
        self.dom.create()
        return self

    def __getitem__(self, target: str) -> LabDisk:
        return next(d for d in self.disks if d.target == target)

    def hmp(self, cmd: str) -> str:
        return libvirt_qemu.qemuMonitorCommand(self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def qemu_io(self, disk: LabDisk, cmd: str, offset: int, length: int) -> None:
        out = self.hmp(f'qemu-io -d {disk.qom} "{cmd}"')
        if out.strip():
            raise RuntimeError(f"qemu-io {cmd!r} on {disk.target}: {out.strip()}")
        expect = f"wrote {length}/{length} bytes at offset {offset}"
        deadline = time.monotonic() + 10
        while True:
            text = self._log.read_text(errors="replace")[self._log_pos:]
            at = text.find(expect)
            if at >= 0:
                self._log_pos += at + len(expect)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu-io {cmd!r} on {disk.target} was not confirmed: {text[-300:]!r}")
            time.sleep(0.02)

    def flush(self) -> None:
        """What a guest's fsync does: every write so far is on the images (survives QEMU killed)."""
        for d in self.disks:
            out = self.hmp(f'qemu-io -d {d.qom} "flush"')
            if out.strip():
                raise RuntimeError(f"qemu-io flush on {d.target}: {out.strip()}")

    def qemu_pid(self) -> int:
        return int((RUN_DIR / f"{self.name}.pid").read_text())

    def wait_stopped(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.dom.isActive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not stop within {timeout} s")
            time.sleep(0.05)

    def hotplug(self, target: str, size: int, fmt: str = "qcow2") -> LabDisk:
        """A new disk image attached to the running domain (and to its definition)."""
        index = ord(target[-1]) - ord("a")
        disk = LabDisk(self, index, target, size, fmt)
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(disk.path), str(size)], check=True)
        self.dom.attachDeviceFlags(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{disk.path}'/>"
            f"<target dev='{target}' bus='virtio'/></disk>",
            libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        self.disks.append(disk)
        return disk

    def resize(self, target: str, size: int) -> None:
        """Grow a disk of the running domain (virsh blockresize); the model grows with zeroes."""
        disk = self[target]
        self.dom.blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        disk.size = size
        if disk.model is not None:
            disk.model.extend(bytes(size - len(disk.model)))

    def redefine(self, edit) -> None:
        """Change the definition of the shut-off domain: ``edit(xml) -> xml``; then start it."""
        assert not self.dom.isActive()
        xml = edit(self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        self.dom = self.conn.defineXML(xml)

    def boot(self) -> None:
        """Start the (defined) domain again, e.g. after it was destroyed or changed."""
        self._log_pos = self._log.stat().st_size if self._log.exists() else 0
        self.dom.create()

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.dom.listAllCheckpoints(0))

    def has_job(self) -> bool:
        return self.dom.jobStats(0).get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE

    def destroy(self) -> None:
        # A fresh connection each try: a test (or another run) may have restarted libvirtd.
        for attempt in range(5):
            try:
                conn = ensure_libvirtd()
                try:
                    remove_domain(conn, self.name)
                finally:
                    conn.close()
                break
            except libvirt.libvirtError:
                if attempt == 4:
                    raise  # a domain left defined must fail the test, not hide
                time.sleep(1)
        shutil.rmtree(self.workdir, ignore_errors=True)


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Stop and undefine a domain (with its checkpoint metadata), if it exists; a libvirtError
    if it is still defined afterwards (libvirtd restarted under the connection, say)."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
