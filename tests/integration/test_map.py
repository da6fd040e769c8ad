"""map: a point's disk served read-only over NBD (its backing chain with it) until SIGINT or
SIGTERM, on a private unix socket or on TCP; libnbd and nbdinfo read what the guest had."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys

import jsonschema
import nbd
import pytest

from libvbackup import api, schemas

from .helpers import MiB, cli, random_writes, snap

pytestmark = pytest.mark.integration


def start_map(*args: str) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", "map", *args, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.rstrip() == "}":
            break
    if not lines:
        p.kill()
        raise AssertionError(p.communicate()[1])
    return p, json.loads("".join(lines))


def read_all(uri: str, size: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        assert h.get_size() == size and h.is_read_only()
        out = bytearray()
        for off in range(0, size, 4 * MiB):
            out += h.pread(min(4 * MiB, size - off), off)
        return bytes(out)
    finally:
        h.shutdown()


def qemu_nbd_serving(image: str) -> bool:
    out = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    return any(image in line for line in out.splitlines())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_map_serves_a_point_until_interrupted(make_vm, repo, sig):
    vm = make_vm((8 * MiB, "qcow2"), (4 * MiB, "qcow2"))
    rng = random.Random(61)
    for d in vm.disks:
        random_writes(d, rng, 6)
    api.pull(vm.name, repo=str(repo), checkpoint="m1", quiesce="no")
    at_m1 = snap(vm)
    vm["vda"].fill(MiB, 2 * MiB, 0x7e)
    api.pull(vm.name, repo=str(repo), checkpoint="m2", level="inc", quiesce="no")
    # An incremental point: its image and the full one below it are served together.
    p, doc = start_map(vm.name, "--repo", str(repo), "--checkpoint", "m1", "--disk", "vda")
    try:
        jsonschema.Draft202012Validator(schemas.load("map")).validate(doc)
        assert doc["format_version"] == 1 and doc["checkpoint"] == "m1" and doc["uri"].startswith("nbd+unix:///vda")
        sock = doc["uri"].split("socket=")[1]
        assert oct(os.stat(os.path.dirname(sock)).st_mode & 0o777) == "0o700"
        assert read_all(doc["uri"], doc["size"]) == at_m1["vda"]
        info = subprocess.run(["nbdinfo", "--json", doc["uri"]], capture_output=True, text=True, check=True)
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 8 * MiB
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert not os.path.exists(os.path.dirname(sock)) and not qemu_nbd_serving(doc["image"])

    p, doc = start_map(vm.name, "--repo", str(repo), "--checkpoint", "m2", "--disk", "vda")
    try:
        want = snap(vm)["vda"]
        assert read_all(doc["uri"], doc["size"]) == want
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)


def test_map_on_tcp_and_its_refusals(make_vm, repo):
    vm = make_vm((4 * MiB, "qcow2"), (4 * MiB, "raw"))
    vm["vdb"].write(MiB + 1, b"on the raw disk")
    api.pull(vm.name, repo=str(repo), checkpoint="t1", quiesce="no")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p, doc = start_map(vm.name, "--repo", str(repo), "--disk", "vdb", "--port", str(port))
    try:
        assert doc["uri"] == f"nbd://127.0.0.1:{port}/vdb"
        assert read_all(doc["uri"], doc["size"]) == snap(vm)["vdb"]
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    assert p.returncode == 0
    for args, code, text in (
        (["--disk", "vda", "--port", str(port), "--address", "0.0.0.0"], 2, "leaves this host: give --tls-dir"),
        ([], 2, "choose one with --disk"),
        (["--disk", "vdz"], 3, "holds no disk 'vdz'"),
        (["--disk", "vda", "--checkpoint", "nope"], 3, "no backup point 'nope'"),
    ):
        res = cli("map", vm.name, "--repo", str(repo), *args)
        assert res.returncode == code and text in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
