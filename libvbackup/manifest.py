"""The repository's manifest: which backup points exist and how they chain (pure).

One manifest per VM, ``<repo>/<vm>/manifest.json``. A point is named by the checkpoint it
created and appears here only once every one of its disk images is complete. Image paths are
relative to the VM's directory; each image's qcow2 backing file is its parent's image.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .errors import NotFound, RepositoryError

FORMAT = 1


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


def dumps(m: Manifest) -> str:
    doc = {"format": FORMAT, "vm": m.vm, "uuid": m.uuid,
           "points": [dataclasses.asdict(p) for p in m.points]}
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def _req(d: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in d or not isinstance(d[key], kind):
        raise RepositoryError(f"manifest {where}: field {key!r} is missing or malformed")
    return d[key]


def loads(text: str, where: str = "manifest.json") -> Manifest:
    """Parse a manifest; anything malformed is a RepositoryError naming the problem."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise RepositoryError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RepositoryError(f"{where} is not a JSON object")
    fmt = doc.get("format")
    if not isinstance(fmt, int):
        raise RepositoryError(f"{where} has no format version")
    if fmt > FORMAT:
        raise RepositoryError(
            f"{where} was written by a newer libvbackup (format {fmt}, this one reads {FORMAT})",
            "upgrade libvbackup",
        )
    vm = _req(doc, "vm", str, where)
    points = []
    names = set()
    for i, raw in enumerate(_req(doc, "points", list, where)):
        at = f"{where} point {i}"
        if not isinstance(raw, dict):
            raise RepositoryError(f"{at} is not an object")
        disks = {}
        for dname, dd in _req(raw, "disks", dict, at).items():
            if not isinstance(dd, dict):
                raise RepositoryError(f"{at} disk {dname!r} is not an object")
            try:
                disks[dname] = PointDisk(**{k: dd[k] for k in dd if k in PointDisk.__dataclass_fields__})
            except TypeError as e:
                raise RepositoryError(f"{at} disk {dname!r} is incomplete: {e}") from e
            for key in ("image", "size"):
                _req(dd, key, (str,) if key == "image" else (int,), f"{at} disk {dname!r}")
        fields = {k: raw[k] for k in raw if k in Point.__dataclass_fields__ and k != "disks"}
        try:
            p = Point(disks=disks, **fields)
        except TypeError as e:
            raise RepositoryError(f"{at} is incomplete: {e}") from e
        _req(raw, "checkpoint", str, at)
        if p.checkpoint in names:
            raise RepositoryError(f"{where} lists point {p.checkpoint!r} twice")
        if p.parent is not None and p.parent not in names:
            raise RepositoryError(f"{at} ({p.checkpoint}) names parent {p.parent!r}, which precedes it nowhere")
        names.add(p.checkpoint)
        points.append(p)
    uuid = doc.get("uuid")
    return Manifest(vm=vm, uuid=uuid if isinstance(uuid, str) else None, points=points)
