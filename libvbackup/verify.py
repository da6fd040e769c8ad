"""Verify a repository: every chain complete, every byte equal to what was backed up.

For each point (or one), and each of its disks: every image of the chain must exist and
point at the expected backing file; the stored block digests must match the manifest; and
the chain, read again by the copy engine from qemu-nbd (into nothing, the block hasher
watching), must give the same digests block by block.
"""

from __future__ import annotations

import logging

from . import checksum, engine, nbdio, qemuimg
from .errors import Error, NotFound
from .manifest import Manifest, Point
from .repo import Repository
from .results import VerifiedDisk, VerifiedPoint, VerifyResult

log = logging.getLogger(__name__)

MAX_REPORTED = 10


def _chain_images(m: Manifest, point: Point, disk: str) -> list[tuple[str, str | None]]:
    """(image, expected backing) from the point's image down to its full image."""
    out = []
    pd = point.disks[disk]
    image, backing = pd.image, pd.backing
    seen = set()
    while True:
        out.append((image, backing))
        if backing is None or backing in seen:
            return out
        seen.add(backing)
        parent = next((p.disks[disk] for p in m.points if disk in p.disks and p.disks[disk].image == backing),
                      None)
        if parent is None:
            out.append((backing, "?"))
            return out
        image, backing = parent.image, parent.backing


def verify_disk(repository: Repository, m: Manifest, point: Point, disk: str) -> VerifiedDisk:
    problems: list[str] = []
    bad: list[int] = []
    vm = m.vm
    for image, backing in _chain_images(m, point, disk):
        path = repository.image(vm, image)
        if backing == "?":
            problems.append(f"image {image} belongs to no point of the manifest")
            continue
        if not path.is_file():
            problems.append(f"image {path} is missing")
            continue
        try:
            info = qemuimg.info(str(path))
        except Error as e:
            problems.append(f"image {path} cannot be read: {e}")
            continue
        want = f"../{backing}" if backing else None
        if info.get("backing-filename") != want:
            problems.append(f"image {path} has backing file {info.get('backing-filename')!r}, expected {want!r}")
    pd = point.disks[disk]
    sums_path = repository.sums_path(vm, pd.image)
    try:
        expected = sums_path.read_bytes()
    except OSError as e:
        problems.append(f"checksums {sums_path} cannot be read: {e.strerror}")
        expected = None
    if expected is not None and checksum.digest_of(expected) != pd.blkhash:
        problems.append(f"checksums {sums_path} do not match the manifest")
        expected = None
    if not problems and expected is not None:
        try:
            with nbdio.image(str(repository.image(vm, pd.image))) as src:
                if src.size != pd.size:
                    problems.append(f"image size {src.size} differs from the recorded {pd.size}")
                else:
                    hasher = checksum.BlockHasher(pd.size, block=pd.block_size, algorithm_name=pd.checksum)
                    engine.copy(src, engine.Discard(pd.size), observer=hasher)
        except Error as e:
            problems.append(f"reading the chain failed: {e}")
        if not problems:
            bad = hasher.algorithm.compare(expected, bytes(hasher.sums), pd.block_size)
            if bad:
                shown = ", ".join(str(o) for o in bad[:MAX_REPORTED])
                problems.append(f"{len(bad)} block(s) of {pd.block_size} bytes differ from the backup, "
                                f"at offsets {shown}{' …' if len(bad) > MAX_REPORTED else ''}")
    return VerifiedDisk(not problems, tuple(problems), len(bad), pd.blkhash)


def verify(vm: str, *, repo: str, checkpoint: str | None = None) -> VerifyResult:
    repository = Repository(repo)
    repository.check_readable()
    m = repository.load(vm)
    if not m.points:
        raise NotFound(f"repository {repository.root} holds no backups of VM {vm!r}")
    points = [m.get(checkpoint)] if checkpoint else m.points
    out = []
    for p in points:
        disks = {}
        for name in p.disks:
            log.info("verifying %s/%s", p.checkpoint, name)
            disks[name] = verify_disk(repository, m, p, name)
        out.append(VerifiedPoint(p.checkpoint, all(d.ok for d in disks.values()), disks))
    return VerifyResult(vm, str(repository.root), all(p.ok for p in out), tuple(out))
