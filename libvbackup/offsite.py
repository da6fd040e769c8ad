"""A repository in a bucket: the layout of points as objects, their keys, reads and uploads.

::

    s3://BUCKET/PREFIX/
      libvbackup.json               the header (plain JSON): format, encryption scheme, frame size,
                                    key id; written once, before anything else
      <vm>/<checkpoint>/<disk>.qcow2   a point's image, sealed in frames (seal.py)
      <vm>/<checkpoint>/<disk>.sums    its block digests, sealed the same way
      <vm>/<checkpoint>.point          the point: its manifest record and the size and SHA-256 of
                                    each file, sealed; written last, so a point is in the bucket
                                    exactly when this object is

Points are immutable, so an object that exists with the expected size is never sent again, and
an unfinished multipart upload is resumed part by part (a part whose ETag matches the frame
sealed again is kept). Object names carry VM, checkpoint and disk names, never guest data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Callable

from . import manifest as mf, seal
from .bucket import Bucket, Location
from .errors import NotFound, RepositoryError, UsageError

HEADER = "libvbackup.json"
FORMAT = 1
POINT_SUFFIX = ".point"
THREADS = 6  # parts uploaded at once per file (each holds one sealed frame while it goes up)
READERS = 3  # frames fetched at once by the readers of one store
CACHE = 6  # frames kept by the readers of one store (8 MiB each): memory does not grow with the chain
AHEAD = 2  # frames a reader fetches ahead of the one it reads


@dataclass(frozen=True)
class FileInfo:
    size: int
    sha256: str  # of the frames' SHA-256 digests in order (frame_digest): computed in parallel


@dataclass(frozen=True)
class StoredPoint:
    point: mf.Point
    files: dict[str, FileInfo]  # name relative to the VM: "<checkpoint>/<disk>.qcow2"
    sequence: int = 0  # the order points reached the bucket in (completion times have seconds only)


def point_name(vm: str, checkpoint: str) -> str:
    return f"{vm}/{checkpoint}{POINT_SUFFIX}"


def file_name(vm: str, relpath: str) -> str:
    return f"{vm}/{relpath}"


def disk_files(pd: mf.PointDisk) -> tuple[str, str]:
    """A point's image of one disk and its digests, relative to the VM (as the manifest names
    the image; the digests beside it, as ``Repository.sums_path`` places them)."""
    stem = pd.image[: -len(".qcow2")] if pd.image.endswith(".qcow2") else pd.image
    return pd.image, stem + ".sums"


def point_files(point: mf.Point) -> list[str]:
    """The files a point is made of, relative to its VM."""
    return [f for pd in point.disks.values() for f in disk_files(pd)]


class Store:
    """A bucket location opened with a key (or knowingly without one)."""

    def __init__(self, bucket: Bucket, sealer, header: dict | None):
        self.bucket = bucket
        self.sealer = sealer
        self.header = header  # None: the location holds no repository yet
        self._cache: FrameCache | None = None

    @property
    def cache(self) -> "FrameCache":
        if self._cache is None:
            self._cache = FrameCache(CACHE, READERS)
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    @property
    def url(self) -> str:
        return self.bucket.location.url

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, endpoint: str | None = None, key_file: str | None = None,
             no_encrypt: bool = False, create: bool = False) -> "Store":
        """Check the URL, the key and the bucket, in that order, before anything is read or
        written; ``create``: a location without a header may become a repository."""
        location = Location.parse(url)
        if key_file and no_encrypt:
            raise UsageError("--key-file and --no-encrypt exclude each other")
        if not key_file and not no_encrypt:
            raise UsageError(f"{url} needs a key: objects are encrypted on this host",
                             "give --key-file FILE (or --no-encrypt to store them in the clear)")
        sealer = seal.Plain() if no_encrypt else seal.Sealer(seal.read_key_file(key_file))
        bucket = Bucket(location, endpoint)
        bucket.check()
        header = cls._read_header(bucket)
        if header is None and not create:
            raise NotFound(f"{url} holds no libvbackup repository (no {HEADER})",
                           "copy points there first with: libvbackup copy VM --to URL")
        store = cls(bucket, sealer, header)
        if header is not None:
            store._check_key(header)
        return store

    @staticmethod
    def _read_header(bucket: Bucket) -> dict | None:
        try:
            raw = bucket.get(HEADER)
        except NotFound:
            return None
        try:
            doc = json.loads(raw)
            fmt = int(doc["format"])
        except (ValueError, KeyError, TypeError) as e:
            raise RepositoryError(f"{bucket.location.url}/{HEADER} is not a libvbackup header") from e
        if fmt > FORMAT:
            raise RepositoryError(f"{bucket.location.url} was written by a newer libvbackup (format {fmt})",
                                  "upgrade libvbackup")
        if doc.get("frame") != seal.FRAME:
            raise RepositoryError(f"{bucket.location.url} uses frames of {doc.get('frame')} bytes; "
                                  f"this libvbackup reads {seal.FRAME}")
        return doc

    def _check_key(self, header: dict) -> None:
        scheme = header.get("encryption")
        if scheme == "none":
            if self.sealer.encrypted:
                raise UsageError(f"{self.url} holds unencrypted points; it cannot take encrypted ones",
                                 "use --no-encrypt with it, or another prefix")
            return
        if scheme != seal.SCHEME:
            raise RepositoryError(f"{self.url} uses encryption {scheme!r}, unknown to this libvbackup")
        if not self.sealer.encrypted:
            raise UsageError(f"{self.url} is encrypted; give its --key-file")
        if header.get("key_id") != self.sealer.key_id:
            raise UsageError(f"the key does not open {self.url} (its points were sealed with another key)",
                             "give the key file this bucket was written with")

    def ensure_header(self) -> None:
        """Write the header of a new repository (the first write to the location)."""
        if self.header is not None:
            return
        doc = {"format": FORMAT, "encryption": seal.SCHEME if self.sealer.encrypted else "none",
               "frame": seal.FRAME, "key_id": self.sealer.key_id}
        self.bucket.put(HEADER, (json.dumps(doc, indent=2) + "\n").encode())
        self.header = doc

    # -- points -------------------------------------------------------------------------------
    def names(self, vm: str | None = None) -> dict[str, int]:
        return self.bucket.list(f"{vm}/" if vm else "")

    def vms(self) -> list[str]:
        return sorted({n.split("/", 1)[0] for n in self.names() if n.endswith(POINT_SUFFIX) and "/" in n})

    def point_names(self, vm: str, names: dict[str, int] | None = None) -> list[str]:
        names = self.names(vm) if names is None else names
        return [n[len(vm) + 1:-len(POINT_SUFFIX)] for n in names
                if n.endswith(POINT_SUFFIX) and n.count("/") == 1]

    def read_point(self, vm: str, checkpoint: str) -> tuple[StoredPoint, str | None]:
        """A point object, opened and parsed; with the VM's UUID."""
        name = point_name(vm, checkpoint)
        raw = self.sealer.open(name, 0, 1, self.bucket.get(name))
        try:
            doc = json.loads(raw)
            if doc.get("vm") != vm or doc["point"]["checkpoint"] != checkpoint:
                raise ValueError("it names another point")
            files = {k: FileInfo(int(v["size"]), str(v["sha256"])) for k, v in doc["files"].items()}
            sequence = int(doc.get("sequence", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise RepositoryError(f"point object {self.url}/{name} is malformed: {e}") from e
        point = mf.point_from_dict(doc["point"], f"{self.url}/{name}")
        return StoredPoint(point, files, sequence), doc.get("uuid")

    def manifest(self, vm: str) -> tuple[mf.Manifest, dict[str, StoredPoint]]:
        """The VM's points in the bucket as a manifest (parents first), and their files."""
        stored: dict[str, StoredPoint] = {}
        uuid = None
        for c in self.point_names(vm):
            sp, uuid = self.read_point(vm, c)
            stored[c] = sp
        ordered = _parents_first(list(stored.values()))
        doc = {"format": mf.FORMAT, "vm": vm, "uuid": uuid,
               "points": [dataclasses.asdict(sp.point) for sp in ordered]}
        return mf.loads(json.dumps(doc), f"{self.url}/{vm}"), stored

    def write_point(self, vm: str, uuid: str | None, point: mf.Point, files: dict[str, FileInfo],
                    sequence: int) -> None:
        doc = {"format": FORMAT, "vm": vm, "uuid": uuid, "sequence": sequence, "point": dataclasses.asdict(point),
               "files": {k: dataclasses.asdict(v) for k, v in files.items()}}
        name = point_name(vm, point.checkpoint)
        self.bucket.put(name, self.sealer.seal(name, 0, 1, json.dumps(doc).encode()))

    # -- files --------------------------------------------------------------------------------
    def reader(self, vm: str, relpath: str, size: int) -> "RemoteFile":
        return RemoteFile(self, file_name(vm, relpath), size)

    def upload(self, name: str, path: str, size: int, on_bytes: Callable[[int], None] = lambda n: None,
               present: int | None = None) -> tuple[FileInfo, int]:
        """Send a local file as object ``name`` unless it is there already (``present``: the
        size the bucket lists for it). Returns its FileInfo and the bytes sent."""
        count = seal.frames(size)
        sealed_size = seal.sealed_size(size, self.sealer.encrypted)
        with open(path, "rb") as f:
            if present == sealed_size:
                return FileInfo(size, _digest_file(f, on_bytes)), 0
            if count == 1:
                data = f.read()
                if len(data) != size:
                    raise RepositoryError(f"{path} changed while it was copied")
                on_bytes(size)
                digest = hashlib.sha256(data).digest()
                sealed = self.sealer.seal(name, 0, 1, data, digest)
                self.bucket.put(name, sealed)
                return FileInfo(size, files_digest([digest])), len(sealed)
            return self._multipart(name, f, size, count, on_bytes)

    def _multipart(self, name, f, size, count, on_bytes) -> tuple[FileInfo, int]:
        uploads = self.bucket.uploads(name)
        for stale in uploads[:-1]:
            self.bucket.abort_upload(name, stale)
        upload = uploads[-1] if uploads else self.bucket.start_upload(name)
        have = self.bucket.parts(name, upload) if uploads else {}
        digests: list[bytes] = [b""] * count
        etags: list[str | None] = [None] * count
        sent = [0]
        lock = threading.Lock()
        slots = threading.BoundedSemaphore(THREADS + 1)  # frames in memory: bounded

        def part(i: int, holder: list) -> None:
            try:
                data = holder.pop()  # the only reference: freed once sealed
                digests[i] = hashlib.sha256(data).digest()
                sealed = self.sealer.seal(name, i, count, data, digests[i])
                n = len(data)
                del data  # only the sealed frame stays in memory while it goes up
                old = have.get(i + 1)
                if old and old[0] == len(sealed) and old[1] == hashlib.md5(sealed).hexdigest():
                    etags[i] = old[1]
                else:
                    etags[i] = self.bucket.upload_part(name, upload, i + 1, sealed)
                    with lock:
                        sent[0] += len(sealed)
                on_bytes(n)
            finally:
                slots.release()

        with concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="s3-part") as pool:
            futures = []
            for i in range(count):
                slots.acquire()
                data = f.read(seal.FRAME)
                if len(data) != min(seal.FRAME, size - i * seal.FRAME):
                    slots.release()
                    raise RepositoryError(f"{f.name} changed while it was copied")
                futures.append(pool.submit(part, i, [data]))
                del data
                for fu in [x for x in futures if x.done()]:
                    fu.result()  # the first failure stops the file
            for fu in futures:
                fu.result()
        self.bucket.complete_upload(name, upload, etags)  # type: ignore[arg-type]
        return FileInfo(size, files_digest(digests)), sent[0]


def files_digest(frame_digests: list[bytes]) -> str:
    """A file's digest: SHA-256 over its frames' SHA-256 digests (each frame hashed once, in
    the thread that seals it)."""
    return hashlib.sha256(b"".join(frame_digests)).hexdigest()


def _digest_file(f, on_bytes) -> str:
    out = []
    while True:
        block = f.read(seal.FRAME)
        if not block and out:
            return files_digest(out)
        out.append(hashlib.sha256(block).digest())
        on_bytes(len(block))
        if not block:
            return files_digest(out)


def _parents_first(points: list[StoredPoint]) -> list[StoredPoint]:
    by = {sp.point.checkpoint: sp for sp in points}
    out: list[StoredPoint] = []
    done: set[str] = set()

    def visit(sp: StoredPoint, depth: int = 0) -> None:
        c = sp.point.checkpoint
        if c in done or depth > len(by):
            return
        parent = sp.point.parent
        if parent in by:
            visit(by[parent], depth + 1)
        done.add(c)
        out.append(sp)

    for sp in sorted(points, key=lambda s: (s.point.completed, s.sequence, s.point.checkpoint)):
        visit(sp)
    return out


class FrameCache:
    """Frames of a store's objects, fetched by a few threads and the last ``budget`` of them kept,
    whichever object they belong to (a restore of a long chain reads many objects)."""

    def __init__(self, budget: int, threads: int):
        self.budget = budget
        self._lock = threading.Lock()
        self._items: "collections.OrderedDict[tuple[str, int], concurrent.futures.Future]" = collections.OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="s3-read")

    def get(self, key: tuple[str, int], fetch: Callable[[], bytes]) -> concurrent.futures.Future:
        with self._lock:
            fu = self._items.get(key)
            if fu is not None:
                self._items.move_to_end(key)
                return fu
            fu = self._items[key] = self._pool.submit(fetch)
            while len(self._items) > self.budget:
                self._items.popitem(last=False)
            return fu

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RemoteFile:
    """A file of the bucket read by ranges: each frame fetched and opened once (a changed frame
    is a ``seal.Tampered``), the next ones fetched ahead, through the store's frame cache."""

    def __init__(self, store: Store, name: str, size: int):
        self.store = store
        self.name = name
        self.size = size
        self.count = seal.frames(size)

    def fetch(self, i: int) -> bytes:
        """Frame ``i`` from the bucket, opened (not cached)."""
        enc = self.store.sealer.encrypted
        start = seal.frame_span(i, enc)
        plain_len = min(seal.FRAME, self.size - i * seal.FRAME)
        end = start + plain_len + (seal.OVERHEAD if enc else 0)
        raw = self.store.bucket.get(self.name, start, end) if end > start else b""
        if len(raw) != end - start:
            raise seal.Tampered(f"object {self.name} is truncated (frame {i} has {len(raw)} of {end - start} bytes)")
        data = self.store.sealer.open(self.name, i, self.count, raw)
        if len(data) != plain_len:
            raise seal.Tampered(f"object {self.name} frame {i} has the wrong length")
        return data

    def frame(self, i: int) -> bytes:
        cache = self.store.cache
        fu = cache.get((self.name, i), lambda: self.fetch(i))
        for j in range(i + 1, min(self.count, i + 1 + AHEAD)):  # read ahead: restores go forward
            cache.get((self.name, j), lambda j=j: self.fetch(j))
        return fu.result()

    def pread(self, length: int, offset: int) -> bytes:
        if offset + length > self.size:
            length = max(0, self.size - offset)
        out = bytearray()
        while length > 0:
            i = offset // seal.FRAME
            at = offset - i * seal.FRAME
            n = min(length, seal.FRAME - at)
            out += self.frame(i)[at:at + n]
            offset += n
            length -= n
        return bytes(out)

    def close(self) -> None:
        pass  # the store owns the cache and its threads
