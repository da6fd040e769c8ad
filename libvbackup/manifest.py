"""The repository's manifest: which backup points exist and how they chain (pure).

One manifest per VM, ``<repo>/<vm>/manifest.json``. A point is named by the checkpoint it
created and appears here only once every one of its disk images is complete. Image paths are
relative to the VM's directory; each image's qcow2 backing file is its parent's image.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .checksum import ALGORITHMS, LEGACY
from .sums import DENSE, SPARSE
from .errors import NotFound, RepositoryError

FORMAT = 3  # 2: points may name their checksum algorithm; 3: sparse sums (sums_format 2)


@dataclasses.dataclass
class PointDisk:
    name: str
    image: str  # relative to the VM directory, e.g. "chk2/vda.qcow2"
    backing: str | None  # the parent's image, relative to the VM directory; None for a full image
    size: int  # virtual size in bytes
    bytes_copied: int = 0  # data bytes read from the export
    bytes_zeroed: int = 0  # dirty bytes written as zeroes
    bitmap: bool = True  # the point's checkpoint holds a bitmap for this disk
    source_format: str | None = None
    blkhash: str | None = None  # SHA-256 covering the block digests in "<point>/<disk>.sums"
    block_size: int = 1 << 20  # the block size of those digests (older repositories: 1 MiB)
    checksum: str = LEGACY  # the algorithm of those digests (older repositories: SHA-256)
    sums_format: int = DENSE  # 1: a digest per block (older points); 2: sparse (checksum.py)
    reason: str | None = None  # why this disk is full in an incremental point, or that it grew
    identity: str | None = None  # "device:inode" of the source file it was copied from, if local
    compression: str | None = None  # zstd | zlib: the image's clusters are compressed (pull --compress)
    stored_bytes: int | None = None  # the image's file size when it was written


@dataclasses.dataclass
class Point:
    checkpoint: str
    parent: str | None
    level: str  # full, incremental, differential
    mode: str  # pull, push
    started: str  # ISO 8601, UTC
    completed: str
    seconds: float
    disks: dict[str, PointDisk]
    domain_xml: str = ""
    checkpoint_xml: str = ""
    consistency: str = "crash"  # "quiesced": guest file systems frozen when the point was taken
    frozen_seconds: float | None = None


@dataclasses.dataclass
class Manifest:
    vm: str
    uuid: str | None = None
    points: list[Point] = dataclasses.field(default_factory=list)

    def find(self, checkpoint: str) -> Point | None:
        for p in self.points:
            if p.checkpoint == checkpoint:
                return p
        return None

    def get(self, checkpoint: str) -> Point:
        p = self.find(checkpoint)
        if p is None:
            known = ", ".join(q.checkpoint for q in self.points[-5:]) or "none"
            raise NotFound(
                f"the repository holds no backup point {checkpoint!r} for VM {self.vm!r} "
                f"(newest points: {known})"
            )
        return p

    @property
    def newest(self) -> Point | None:
        return self.points[-1] if self.points else None

    def chain(self, checkpoint: str) -> list[Point]:
        """The points from the full backup up to ``checkpoint``, oldest first."""
        out = []
        seen = set()
        name: str | None = checkpoint
        while name is not None:
            if name in seen:
                raise RepositoryError(f"the manifest has a cycle through point {name!r}")
            seen.add(name)
            p = self.get(name)
            out.append(p)
            name = p.parent
        return out[::-1]


def point_record(p: Point) -> dict:
    """A point as ``dumps`` writes it (what ``point_from_dict`` reads). Its fields are plain
    values, so a shallow copy is the record: ``dataclasses.asdict`` deep-copies every one of
    them and took most of a save's time in a long chain."""
    rec = dict(vars(p))
    rec["disks"] = {name: dict(vars(d)) for name, d in p.disks.items()}
    return rec


def dumps(m: Manifest) -> str:
    """One point per line. json's C encoder writes compact JSON only: indented, the pure-Python
    one ran: 18 ms for 131 points (650 KB, a domain XML in each), this 7 ms."""
    head = json.dumps({"format": FORMAT, "vm": m.vm, "uuid": m.uuid})[:-1]
    if not m.points:
        return head + ', "points": []}\n'
    points = ",\n".join(json.dumps(point_record(p)) for p in m.points)
    return f'{head}, "points": [\n{points}\n]}}\n'


def _req(d: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in d or not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
        raise RepositoryError(f"manifest {where}: field {key!r} is missing or malformed")
    return d[key]


def _opt(d: dict, key: str, kind: type | tuple, where: str, default: Any) -> Any:
    if key not in d:
        return default
    value = d[key]
    if value is None and default is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RepositoryError(f"manifest {where}: field {key!r} is malformed")
    return value


def _disk(name: str, dd: Any, at: str) -> PointDisk:
    where = f"{at} disk {name!r}"
    if not isinstance(dd, dict):
        raise RepositoryError(f"manifest {where} is not an object")
    return PointDisk(
        name=name,
        image=_req(dd, "image", str, where),
        backing=_opt(dd, "backing", str, where, None),
        size=_req(dd, "size", int, where),
        bytes_copied=_opt(dd, "bytes_copied", int, where, 0),
        bytes_zeroed=_opt(dd, "bytes_zeroed", int, where, 0),
        bitmap=_opt(dd, "bitmap", bool, where, True),
        source_format=_opt(dd, "source_format", str, where, None),
        blkhash=_opt(dd, "blkhash", str, where, None),
        block_size=_block_size(_opt(dd, "block_size", int, where, 1 << 20), where),
        checksum=_checksum(_opt(dd, "checksum", str, where, LEGACY), where),
        sums_format=_sums_format(_opt(dd, "sums_format", int, where, DENSE), where),
        reason=_opt(dd, "reason", str, where, None),
        identity=_opt(dd, "identity", str, where, None),
        compression=_opt(dd, "compression", str, where, None),
        stored_bytes=_opt(dd, "stored_bytes", int, where, None),
    )


def _block_size(n: int, where: str) -> int:
    if n < 512 or n % 512:
        raise RepositoryError(f"manifest {where}: field 'block_size' is malformed")
    return n


def _sums_format(n: int, where: str) -> int:
    if n not in (DENSE, SPARSE):
        raise RepositoryError(f"manifest {where}: unknown sums_format {n}", "upgrade libvbackup")
    return n


def _checksum(name: str, where: str) -> str:
    if name not in ALGORITHMS:
        raise RepositoryError(f"manifest {where}: unknown checksum algorithm {name!r}", "upgrade libvbackup")
    return name


def _point(raw: Any, at: str) -> Point:
    if not isinstance(raw, dict):
        raise RepositoryError(f"manifest {at} is not an object")
    disks = {name: _disk(name, dd, at) for name, dd in _req(raw, "disks", dict, at).items()}
    return Point(
        checkpoint=_req(raw, "checkpoint", str, at),
        parent=_opt(raw, "parent", str, at, None),
        level=_req(raw, "level", str, at),
        mode=_opt(raw, "mode", str, at, "pull"),
        started=_opt(raw, "started", str, at, ""),
        completed=_opt(raw, "completed", str, at, ""),
        seconds=_opt(raw, "seconds", (int, float), at, 0.0),
        disks=disks,
        domain_xml=_opt(raw, "domain_xml", str, at, ""),
        checkpoint_xml=_opt(raw, "checkpoint_xml", str, at, ""),
        consistency=_opt(raw, "consistency", str, at, "crash"),
        frozen_seconds=_opt(raw, "frozen_seconds", (int, float), at, None),
    )


def loads(text: str, where: str = "manifest.json") -> Manifest:
    """Parse a manifest; anything malformed is a RepositoryError naming the problem."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RepositoryError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RepositoryError(f"{where} is not a JSON object")
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise RepositoryError(f"{where} has no format version")
    if fmt > FORMAT:
        raise RepositoryError(
            f"{where} was written by a newer libvbackup (format {fmt}, this one reads {FORMAT})",
            "upgrade libvbackup",
        )
    vm = _req(doc, "vm", str, where)
    points = []
    names: set[str] = set()
    for i, raw in enumerate(_req(doc, "points", list, where)):
        p = _point(raw, f"{where} point {i}")
        if p.checkpoint in names:
            raise RepositoryError(f"{where} lists point {p.checkpoint!r} twice")
        if p.parent is not None and p.parent not in names:
            raise RepositoryError(f"{where} point {p.checkpoint!r} names parent {p.parent!r}, which precedes it nowhere")
        names.add(p.checkpoint)
        points.append(p)
    uuid = doc.get("uuid")
    return Manifest(vm=vm, uuid=uuid if isinstance(uuid, str) else None, points=points)


def point_from_dict(raw: Any, where: str) -> Point:
    """One point's record, as ``dumps`` writes it (its parent is not checked here)."""
    return _point(raw, where)
