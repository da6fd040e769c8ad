"""A tiny real Linux guest for the tests that need a guest agent: quiesce (fsfreeze), files
written inside a guest, a restored copy booted as a VM.

Nothing is downloaded but Debian packages: the kernel is the one ``linux-image-amd64`` depends
on (fetched with ``apt-get download``, never installed, so the host's /boot stays untouched);
the initramfs holds busybox-static, the host's own qemu-ga with its libraries, the virtio and
ext4 modules and a shell ``/init``. It boots under TCG with PVH direct kernel boot (the ELF
``vmlinux`` taken out of the bzImage: no XZ unpacking in the guest), mounts every ext4 virtio
disk at /mnt/vdX and serves the agent. Both files are built once per kernel and cached under
/var/cache/lvb-test-guest/<kernel-version>/.

``GuestAgent`` talks to the agent of any running domain (a restored copy defined under another
name too); ``GuestVM`` is a throwaway domain like ``tests.lab.LabVM`` with ext4 data disks.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import inspect
import json
import lzma
import os
import pathlib
import re
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import libvirt
import libvirt_qemu

from tests.lab import ensure_libvirtd, remove_domain

MiB = 1 << 20
CACHE_ROOT = pathlib.Path("/var/cache/lvb-test-guest")
KERNEL_META = "linux-image-amd64"
AGENT_PORT = "org.qemu.guest_agent.0"
QEMU_GA = pathlib.Path("/usr/sbin/qemu-ga")
BUSYBOX = pathlib.Path("/bin/busybox")
# In load order (modprobe --show-depends adds nothing here, but it is asked all the same). All
# are modules in Debian's kernel; nothing auto-loads crc32c_generic, which ext4's metadata_csum
# needs.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "virtio_blk", "virtio_console", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4")
# ext4's soft dependency on crc32c also names crc32c-intel, which TCG's qemu64 CPU cannot run.
SKIP_MODULES = frozenset({"crc32c-intel", "crc32c_intel"})
# The smallest that booted every time here was 104 MiB (96 MiB: the kernel panics "deadlocked on
# memory" unpacking the initramfs; 64 MiB: not a line on the console); 1.5 times that for margin.
MEMORY_MIB = 160
# One answer from the agent; a guest under TCG is slow but never this slow.
AGENT_TIMEOUT = 30
# guest-file-read/write in pieces this big (base64 in JSON through libvirt). A guest-file-write
# of 200000 bytes (267 kB of base64) came out of qemu-ga's JSON parser mangled ("QMP input member
# 'handle' is unexpected"), and a larger one left the agent unusable; 128 KiB still passed.
READ_CHUNK = 256 * 1024
WRITE_CHUNK = 64 * 1024
DEFAULT_DISKS = (64 * MiB, 32 * MiB)

# PID 1 of the guest. No udev: the agent's port link is made from sysfs by hand. Disks are
# mounted noatime so that reading a file in the guest does not write to its disk.
INIT = r"""#!/bin/sh
# PID 1 of the lvbtest guest, written by tests/guest.py. It must never exit.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/qemu-ga /tmp
for m in @MODULES@; do
  insmod "/lib/modules/$m" || echo "lvb-guest: insmod $m failed"
done

# The agent's port: /dev/virtio-ports/NAME -> /dev/vportNpM, as udev would link it.
n=0
until ls /sys/class/virtio-ports/*/name >/dev/null 2>&1 || [ $n -ge 200 ]; do sleep 0.05; n=$((n+1)); done
mkdir -p /dev/virtio-ports
for f in /sys/class/virtio-ports/*/name; do
  [ -e "$f" ] || continue
  p=${f%/name}; p=${p##*/}
  [ -e "/dev/$p" ] || mknod "/dev/$p" c $(tr : ' ' < "/sys/class/virtio-ports/$p/dev")
  ln -sf "../$p" "/dev/virtio-ports/$(cat "$f")"
done

# Every virtio disk (or partition of one) that holds ext4, read-write at /mnt/NAME.
for b in /sys/block/vd* /sys/block/vd*/vd*; do
  [ -e "$b/dev" ] || continue
  d=${b##*/}
  n=0
  until [ -b "/dev/$d" ] || [ $n -ge 100 ]; do sleep 0.05; n=$((n+1)); done
  mkdir -p "/mnt/$d"
  if mount -t ext4 -o rw,noatime "/dev/$d" "/mnt/$d" 2>/dev/null; then
    echo "lvb-guest: /dev/$d on /mnt/$d"
  else
    rmdir "/mnt/$d"
  fi
done

echo "lvb-guest: starting qemu-ga"
while :; do
  qemu-ga -m virtio-serial -p /dev/virtio-ports/@PORT@ -t /run/qemu-ga -f /run/qemu-ga.pid
  echo "lvb-guest: qemu-ga exited with $?, restarting"
  sleep 1
done
"""

# qemu-ga's guest-shutdown (and so libvirt's shutdown through the agent) runs /sbin/shutdown.
# There is no init daemon to ask: sync, unmount the data disks and power off (or reboot) here.
SHUTDOWN = r"""#!/bin/sh
sync
for m in $(awk '$2 ~ /^\/mnt\// {print $2}' /proc/mounts); do umount "$m" || mount -o remount,ro "$m"; done
sync
case " $* " in *" -r "*) reboot -f ;; *) poweroff -f ;; esac
"""


# ---------------------------------------------------------------------------------------------
# Kernel and initramfs, built once per kernel version

def boot_files() -> tuple[pathlib.Path, pathlib.Path]:
    """The guest's ``(vmlinux, initrd)``, built on first use and cached per kernel version.

    A build happens in a temporary directory beside the cache and is renamed into place, under
    a lock: a killed build leaves no half cache, and concurrent callers build it once.
    """
    try:
        return _boot_files(_kernel_package())
    except _StaleLists:
        # The package lists name a kernel the archive no longer has: a newer one replaced it.
        _apt_update()
        return _boot_files(_kernel_package())


class _StaleLists(RuntimeError):
    pass


def _boot_files(kernel_pkg: str) -> tuple[pathlib.Path, pathlib.Path]:
    kv = kernel_pkg.removeprefix("linux-image-")
    final = CACHE_ROOT / kv
    want = _fingerprint(kv)
    if _cached(final, want):
        return final / "vmlinux", final / "initrd"
    CACHE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(CACHE_ROOT, 0o755)
    with _lock():
        if not _cached(final, want):
            for stale in CACHE_ROOT.glob(".build-*"):  # killed builds: nobody else holds the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".build-{kv}-", dir=CACHE_ROOT))
            try:
                _build(kernel_pkg, kv, tmp, want)
                _replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for other in CACHE_ROOT.iterdir():  # older kernels' caches
                if other.name != kv and not other.name.startswith("."):
                    shutil.rmtree(other, ignore_errors=True)
    return final / "vmlinux", final / "initrd"


def _kernel_package() -> str:
    """The versioned kernel package (``linux-image-6.1.0-NN-amd64``) the metapackage wants."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True).stdout
        found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
        if found:
            return found[0]
        if attempt == 0:
            _apt_update()  # a fresh machine has no package lists yet
    raise RuntimeError(f"apt-cache depends {KERNEL_META} names no kernel package: {out!r}")


def _apt_update() -> None:
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _package_version(pkg: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        raise RuntimeError(f"{pkg} is not installed (scripts/setup installs it)")
    return r.stdout


def _fingerprint(kv: str) -> str:
    """What the cached files were made from on the host side; a change rebuilds them."""
    recipe = {
        "kernel": kv,
        "qemu-guest-agent": _package_version("qemu-guest-agent"),
        "busybox-static": _package_version("busybox-static"),
        "modules": MODULES,
        "init": INIT,
        "shutdown": SHUTDOWN,
        "skip": sorted(SKIP_MODULES),
        # How the files are made, so that changing this module rebuilds them too.
        "code": [inspect.getsource(f) for f in (_build, extract_vmlinux, _stage_initramfs,
                                                 _copy_with_libraries, _module_order)],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _cached(d: pathlib.Path, want: str) -> bool:
    stamp = d / "complete"
    return (stamp.is_file() and stamp.read_text().strip() == want
            and (d / "vmlinux").is_file() and (d / "initrd").is_file())


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    with open(CACHE_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _replace_dir(new: pathlib.Path, final: pathlib.Path) -> None:
    """Rename ``new`` to ``final``, moving a previous ``final`` out of the way first."""
    if final.exists():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".build-old-{final.name}-", dir=final.parent))
        os.rename(final, old / "d")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(new, final)


def _build(kernel_pkg: str, kv: str, out: pathlib.Path, fingerprint: str) -> None:
    work = out / "work"
    work.mkdir()
    deb = _download(kernel_pkg, work)
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    deb.unlink()
    subprocess.run(["depmod", "-b", str(root), kv], check=True)  # the package ships no modules.dep
    (out / "vmlinux").write_bytes(extract_vmlinux((root / "boot" / f"vmlinuz-{kv}").read_bytes()))
    stage = work / "initrd"
    _stage_initramfs(stage, root, kv)
    with open(out / "initrd", "wb") as f:
        # Uncompressed: the kernel unpacks it faster than it inflates gzip under TCG.
        names = subprocess.run(["find", "."], cwd=stage, check=True, capture_output=True).stdout
        names = b"\n".join(sorted(names.split())) + b"\n"
        subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=stage, input=names,
                       stdout=f, check=True)
    shutil.rmtree(work)
    (out / "complete").write_text(fingerprint + "\n")
    for p in out.iterdir():
        os.chmod(p, 0o644)
    os.chmod(out, 0o755)  # libvirt-qemu must reach both files


def _download(pkg: str, into: pathlib.Path) -> pathlib.Path:
    """``apt-get download`` into ``into`` (as root: the _apt user cannot write there)."""
    r = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
                       cwd=into, capture_output=True, text=True)
    debs = list(into.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or len(debs) != 1:
        raise _StaleLists(f"apt-get download {pkg} failed: {r.stderr.strip()}")
    return debs[0]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is XZ (Debian's); PVH boots it directly.

    The payload is followed by the decompressor's own data, which the decompressor leaves over.
    """
    magic = b"\xfd7zXZ\x00"
    at = bzimage.find(magic)
    while at >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        at = bzimage.find(magic, at + 1)
    raise RuntimeError("no XZ-compressed ELF kernel in the bzImage")


def _stage_initramfs(stage: pathlib.Path, root: pathlib.Path, kv: str) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "mnt",
              "etc", "lib/modules", "root"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "var").mkdir()
    os.symlink("../run", stage / "var" / "run")  # qemu-ga's default state dir
    os.chmod(stage / "tmp", 0o1777)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    os.mknod(stage / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))

    shutil.copy2(BUSYBOX, stage / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        link = stage / applet
        if not link.exists() and link.name not in ("busybox", "linuxrc"):
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(stage / "bin" / "busybox", link.parent), link)

    if not QEMU_GA.exists():
        raise RuntimeError(f"{QEMU_GA} is missing (scripts/setup installs qemu-guest-agent)")
    _copy_with_libraries(QEMU_GA, stage)

    order = _module_order(root, kv)
    for rel in order:
        dst = stage / "lib" / "modules" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / "lib" / "modules" / kv / rel, dst)

    (stage / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc" / "group").write_text("root:x:0:\n")
    init = INIT.replace("@MODULES@", " ".join(order)).replace("@PORT@", AGENT_PORT)
    _write_script(stage / "init", init)
    (stage / "sbin" / "shutdown").unlink(missing_ok=True)
    _write_script(stage / "sbin" / "shutdown", SHUTDOWN)


def _write_script(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o755)


def _copy_with_libraries(binary: pathlib.Path, stage: pathlib.Path) -> None:
    """The binary, the shared libraries ``ldd`` names and the dynamic loader, at their paths."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    paths = [binary]
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)  # the loader has no =>
        if m:
            paths.append(pathlib.Path(m.group(1)))
    for p in paths:
        dst = stage / p.relative_to("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p.resolve(), dst)


def _module_order(root: pathlib.Path, kv: str) -> list[str]:
    """MODULES and what they depend on, in load order, as paths under lib/modules/KV."""
    base = root / "lib" / "modules" / kv
    order: list[str] = []
    for name in MODULES:
        out = subprocess.run(["modprobe", "-d", str(root), "-S", kv, "--show-depends", name],
                             check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            if not line.startswith("insmod "):
                continue  # "builtin NAME": nothing to load
            rel = str(pathlib.Path(line.split()[1]).relative_to(base))
            stem = pathlib.Path(rel).name.removesuffix(".ko")
            if rel not in order and stem not in SKIP_MODULES:
                order.append(rel)
    return order


# ---------------------------------------------------------------------------------------------
# Data disks

def make_ext4_qcow2(path: pathlib.Path | str, size: int, files: Mapping[str, bytes] | None = None,
                    label: str = "") -> pathlib.Path:
    """A qcow2 image holding one ext4 file system (no partition table) with ``files`` in it.

    ``files`` maps paths relative to the file system's root to their contents. The inode tables
    and the journal are written here, not lazily by the guest's kernel: a booted guest then
    writes to its disks only what a test makes it write.
    """
    path = pathlib.Path(path)
    with tempfile.TemporaryDirectory(prefix=".ext4-", dir=path.parent) as tmp:
        stage, raw = pathlib.Path(tmp) / "root", pathlib.Path(tmp) / "fs.raw"
        stage.mkdir()
        for rel, data in (files or {}).items():
            dst = stage / rel.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
        with open(raw, "wb") as f:
            f.truncate(size)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", label or path.stem,
                            "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                            "-d", str(stage), str(raw)], capture_output=True, text=True)
        if r.returncode != 0:  # e.g. the files do not fit
            raise RuntimeError(f"mkfs.ext4 for {path.name} failed: {(r.stderr or r.stdout).strip()}")
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                       check=True)
    os.chmod(path, 0o644)
    return path


# ---------------------------------------------------------------------------------------------
# The guest agent of any running domain

def console_log_of(dom: libvirt.virDomain) -> pathlib.Path | None:
    """The file the domain's serial console is written to, if it has one."""
    try:
        tree = ET.fromstring(dom.XMLDesc(0))
    except libvirt.libvirtError:
        return None
    src = tree.find("./devices/serial[@type='file']/source")
    return pathlib.Path(src.get("path")) if src is not None and src.get("path") else None


def console_tail(dom: libvirt.virDomain, chars: int = 3000) -> str:
    log = console_log_of(dom)
    try:
        return log.read_text(errors="replace")[-chars:] if log else "(no console log)"
    except OSError as e:
        return f"(console log unreadable: {e})"


def wait_agent_of(dom: libvirt.virDomain, timeout: float = 60.0) -> float:
    """Wait until the domain's guest agent answers guest-ping; return the seconds it took.

    Before qemu-ga opens its port libvirt answers at once that the agent is not connected, so
    polling costs nothing. On timeout (or if the domain stops) the error carries the tail of
    the serial console, where the guest's kernel and /init say what went wrong.
    """
    start = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
            return time.monotonic() - start
        except libvirt.libvirtError as e:
            last = e
        try:
            active = dom.isActive()
        except libvirt.libvirtError:
            active = False
        panicked = "Kernel panic" in console_tail(dom)  # the domain stays up, hung
        if not active or panicked or time.monotonic() - start > timeout:
            why = ("stopped" if not active else "panicked" if panicked
                   else f"did not answer within {timeout:g} s")
            raise TimeoutError(f"guest agent of {dom.name()} {why} (last: {last}); console:\n"
                               f"{console_tail(dom)}")
        time.sleep(0.1)


def _agent_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    # Python keywords cannot hold the agent's hyphens: capture_output= is "capture-output".
    return {k.replace("_", "-"): v for k, v in arguments.items()}


class GuestAgent:
    """The guest agent of a running domain: commands, processes and files inside the guest.

    While the guest's file systems are frozen qemu-ga refuses all but a few commands
    (guest-ping, guest-fsfreeze-*): ``exec``, ``write_file`` and ``read_file`` raise then.
    """

    def __init__(self, dom: libvirt.virDomain | None):
        self.dom = dom

    def agent(self, cmd: str, **arguments: Any) -> Any:
        """Run one agent command and return its "return" (a dict for most, a str for some).

        Keywords take underscores for the agent's hyphens. An agent error raises libvirtError.
        """
        msg = {"execute": cmd}
        if arguments:
            msg["arguments"] = _agent_arguments(arguments)
        reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(msg), AGENT_TIMEOUT, 0)
        return json.loads(reply)["return"]

    def wait_agent(self, timeout: float = 60.0) -> float:
        return wait_agent_of(self.dom, timeout)

    def exec(self, argv: Sequence[str], timeout: float = 30.0,
             input: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest (PATH is searched); ``(exit code, stdout, stderr)``.

        A process killed by a signal gives minus the signal's number as its exit code.
        """
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture_output": True}
        if input is not None:
            args["input_data"] = base64.b64encode(input).decode()
        pid = self.agent("guest-exec", **args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent("guest-exec-status", pid=pid)
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{list(argv)} still running in the guest after {timeout:g} s")
            time.sleep(0.02)
        if st.get("out-truncated") or st.get("err-truncated"):
            raise RuntimeError(f"{list(argv)}: the agent truncated its output")
        code = st["exitcode"] if "exitcode" in st else -st.get("signal", 0)
        return (code, base64.b64decode(st.get("out-data", "")), base64.b64decode(st.get("err-data", "")))

    def check(self, argv: Sequence[str], timeout: float = 30.0) -> bytes:
        """``exec`` that raises unless the process exits 0; returns its stdout."""
        code, out, err = self.exec(argv, timeout)
        if code != 0:
            raise RuntimeError(f"{list(argv)} in the guest exited {code}: {err.decode(errors='replace')}")
        return out

    def write_file(self, path: str, data: bytes) -> None:
        """Write a file in the guest (its directory must exist) and sync, so that it is on the
        virtual disk: qemu-ga's guest-file-flush is only fflush."""
        handle = self.agent("guest-file-open", path=path, mode="wb")
        try:
            for at in range(0, len(data), WRITE_CHUNK):
                piece = data[at:at + WRITE_CHUNK]
                wrote = self.agent("guest-file-write", handle=handle,
                                   buf_b64=base64.b64encode(piece).decode())
                if wrote["count"] != len(piece):
                    raise RuntimeError(f"short write to {path} in the guest: {wrote}")
            self.agent("guest-file-flush", handle=handle)
        finally:
            self.agent("guest-file-close", handle=handle)
        self.check(["sync"])

    def read_file(self, path: str) -> bytes:
        handle = self.agent("guest-file-open", path=path, mode="rb")
        chunks = []
        try:
            while True:
                got = self.agent("guest-file-read", handle=handle, count=READ_CHUNK)
                chunks.append(base64.b64decode(got["buf-b64"]))
                if got["eof"] or got["count"] == 0:
                    break
        finally:
            self.agent("guest-file-close", handle=handle)
        return b"".join(chunks)

    def fsfreeze_status(self) -> str:
        """"thawed" or "frozen", as qemu-ga knows it."""
        return self.agent("guest-fsfreeze-status")

    def thaw(self) -> int | None:
        """Thaw the guest's file systems, best effort; the number thawed, or None on error."""
        try:
            return self.agent("guest-fsfreeze-thaw")
        except libvirt.libvirtError:
            return None


# ---------------------------------------------------------------------------------------------
# A throwaway domain that boots the guest

class GuestDisk:
    def __init__(self, vm: "GuestVM", index: int, size: int, files: Mapping[str, bytes]):
        self.index, self.size, self.files = index, size, dict(files)
        self.target = f"vd{chr(ord('a') + index)}"
        self.path = vm.workdir / f"{self.target}.qcow2"
        self.mount = f"/mnt/{self.target}"  # where the guest's /init mounts it (PCI order)


class GuestVM(GuestAgent):
    """A persistent domain booting the tiny guest with ext4 data disks; ``destroy()`` removes
    it and everything it made.

    ``disks`` are sizes, or ``(size, files)`` to pre-populate one (see ``make_ext4_qcow2``).
    """

    def __init__(self, disks: Sequence[int | tuple[int, Mapping[str, bytes]]] = DEFAULT_DISKS,
                 name: str | None = None, conn: libvirt.virConnect | None = None,
                 memory_mib: int = MEMORY_MIB, base: str = "/var/tmp",
                 boot: tuple[pathlib.Path, pathlib.Path] | None = None):
        super().__init__(None)
        self.conn = conn or ensure_libvirtd()
        self.name = name or f"lvbtest-guest-{uuid.uuid4().hex[:8]}"
        self.memory_mib = memory_mib
        self.kernel, self.initrd = boot or boot_files()
        # QEMU (user libvirt-qemu) must reach the images.
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base))
        os.chmod(self.workdir, 0o755)
        self.console = self.workdir / "console.log"
        self.disks = [GuestDisk(self, i, *(d if isinstance(d, tuple) else (d, {})))
                      for i, d in enumerate(disks)]

    def __getitem__(self, target: str) -> GuestDisk:
        return next(d for d in self.disks if d.target == target)

    def domain_xml(self) -> str:
        devs = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{d.path}'/><target dev='{d.target}' bus='virtio'/></disk>"
            for d in self.disks
        )
        return (f"<domain type='qemu'><name>{self.name}</name>"
                f"<memory unit='MiB'>{self.memory_mib}</memory><vcpu>1</vcpu>"
                f"<os><type arch='x86_64' machine='pc'>hvm</type>"
                f"<kernel>{self.kernel}</kernel><initrd>{self.initrd}</initrd>"
                f"<cmdline>console=ttyS0 quiet</cmdline></os>"
                # ACPI: power-off from the guest, and the PCI bus takes hot-plugged disks.
                f"<features><acpi/></features><devices>{devs}"
                f"<serial type='file'><source path='{self.console}'/><target port='0'/></serial>"
                f"<channel type='unix'><target type='virtio' name='{AGENT_PORT}'/></channel>"
                f"<controller type='usb' model='none'/><memballoon model='none'/>"
                f"</devices></domain>")

    def create_images(self) -> None:
        for d in self.disks:
            make_ext4_qcow2(d.path, d.size, d.files, label=d.target)

    def start(self, images_ready: bool = False) -> "GuestVM":
        """Define and start the domain (``wait_agent`` then waits for the guest to be up)."""
        if not images_ready:
            self.create_images()
        self.dom = self.conn.defineXML(self.domain_xml())
        self.dom.create()
        return self

    def boot(self) -> None:
        """Start the defined domain again, e.g. after ``shutdown``."""
        self.dom.create()

    def shutdown(self, timeout: float = 60.0) -> None:
        """A clean power-off through the agent (sync, data disks unmounted); the domain stays
        defined and its images stay, consistent, for the test to look at."""
        self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        deadline = time.monotonic() + timeout
        while self.dom.isActive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not power off within {timeout:g} s; console:\n"
                                   f"{console_tail(self.dom)}")
            time.sleep(0.1)

    def destroy(self) -> None:
        # A fresh connection: a test may have restarted libvirtd under the old one.
        conn = ensure_libvirtd()
        try:
            remove_domain(conn, self.name)
        finally:
            conn.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
