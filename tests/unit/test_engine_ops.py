"""The NBD operations a copy issues (engine.copy), recorded by a real NBD server.

test_engine.py checks the bytes a copy produces; this file checks how it gets them, as
nbdcopy's tests do. nbdkit serves a crafted sparse raw file through three filters, outermost
first: ``log`` (every request as the client sent it, with its return), ``delay`` (reads take
a few milliseconds, so that requests pile up and the in-flight limit is reached) and
``extentlist`` (block status answers from a list we wrote: data, holes, allocated zeroes,
some smaller than a qcow2 cluster). From the log:

- holes and zero ranges are never read, every data byte is read exactly once (data extents
  rounded to the target's granularity: 64 KiB for qcow2, 1 for raw and Discard);
- reads never exceed ``max_request``, nor the requests in flight ``max_inflight``;
- block status goes range after range, at most ``nbdio.STATUS_RANGE`` each, never twice over
  the same bytes;
- an incremental (a fake dirty set) reads only dirty clusters, and the block hasher's re-reads
  of partly dirty blocks happen once per block (none with 64 KiB blocks);
- the copy still equals the source (qemu-img compare, or the digests).
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import time

import nbd
import pytest

from libvbackup import checksum, engine, extents, nbdio, sums, target

KiB = 1024
MiB = 1 << 20
PAGE = 4 * KiB  # the unit of the crafted layouts
UNIT = 512  # coverage is counted per sector (every offset here is a multiple)
CLUSTER = target.Qcow2Target.granularity
STATUS = 1 * MiB  # nbdio.STATUS_RANGE while these tests run: several block status requests per disk
READ_DELAY = "2ms"

DATA, HOLE, ZERO = "data", "hole", "zero"
EXTENT_TYPE = {DATA: "", HOLE: "hole,zero", ZERO: "zero"}  # nbdkit-extentlist-filter's types


@pytest.fixture(autouse=True)
def _tools(monkeypatch):
    missing = [t for t in ("nbdkit", "qemu-img") if shutil.which(t) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (apt-get install nbdkit qemu-utils; scripts/setup does)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the engine operation tests: {why}", pytrace=False)
        pytest.skip(why)
    monkeypatch.setattr(nbdio, "STATUS_RANGE", STATUS)


@pytest.fixture
def sockdir():
    """Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer."""
    d = tempfile.mkdtemp(prefix="lvb-nbdk-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- layouts: a kind per 4 KiB page ---------------------------------------------------------

@dataclasses.dataclass
class Layout:
    size: int
    pages: list[str]  # DATA, HOLE or ZERO per page (the last one may be short)

    def runs(self) -> list[tuple[int, int, str]]:
        """(start, end, kind), adjacent pages of one kind joined."""
        out: list[list] = []
        for i, kind in enumerate(self.pages):
            s, e = i * PAGE, min(self.size, (i + 1) * PAGE)
            if out and out[-1][2] == kind:
                out[-1][1] = e
            else:
                out.append([s, e, kind])
        return [tuple(r) for r in out]

    def ranges(self, *kinds: str) -> list[tuple[int, int]]:
        return [(s, e) for s, e, k in self.runs() if k in kinds]


def layout_of(size: int, pieces: list[tuple[int, int, str]], rest: str = HOLE) -> Layout:
    pages = [rest] * ((size + PAGE - 1) // PAGE)
    for start, length, kind in pieces:
        assert start % PAGE == 0 and (length % PAGE == 0 or start + length == size)
        for p in range(start // PAGE, (start + length + PAGE - 1) // PAGE):
            pages[p] = kind
    return Layout(size, pages)


def write_image(path, lay: Layout, rng: random.Random, base: bytes | None = None) -> bytes:
    """A sparse raw file with random bytes in the data pages, zeroes elsewhere (holes left
    unallocated, ZERO pages written); ``base``: the bytes of the data pages instead, where given."""
    buf = bytearray(lay.size)
    with open(path, "wb") as f:
        f.truncate(lay.size)
        for s, e, kind in lay.runs():
            if kind == DATA:
                buf[s:e] = base[s:e] if base is not None else rng.randbytes(e - s)
            if kind != HOLE:
                f.seek(s)
                f.write(buf[s:e])
    return bytes(buf)


# --- the server and its log -----------------------------------------------------------------

@dataclasses.dataclass
class Request:
    conn: int
    kind: str  # the log's action: Read, Extents, ...
    id: int
    offset: int
    count: int
    ret: int | None = None
    extents: list[tuple[int, int, str]] | None = None  # Extents replies: (offset, length, type)

    @property
    def end(self) -> int:
        return self.offset + self.count


_LINE = re.compile(r" connection=(\d+) (\.\.\.)?(\w+) id=(\d+) (.*)$")


class Log:
    """nbdkit-log-filter's file: ``connection=N Read id=I offset=0x.. count=0x.. ...`` when a
    request arrives, ``connection=N ...Read id=I return=0`` when it is answered."""

    def __init__(self, text: str):
        self.requests: list[Request] = []
        self.events: list[tuple[int, bool, Request]] = []  # (connection, entering, request), in order
        open_: dict[tuple[int, int], Request] = {}
        for line in text.splitlines():
            m = _LINE.search(line)
            if not m:
                continue
            conn, leave, kind, rid, rest = int(m[1]), bool(m[2]), m[3], int(m[4]), m[5]
            if not leave:
                fields = dict(re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", rest))
                r = Request(conn, kind, rid, int(fields.get("offset", "0"), 0), int(fields.get("count", "0"), 0))
                open_[(conn, rid)] = r
                self.requests.append(r)
                self.events.append((conn, True, r))
                continue
            r = open_.pop((conn, rid))
            r.ret = int(re.search(r"return=(-?\d+)", rest)[1])
            em = re.search(r"extents=\((.*)\)", rest)
            if em:
                t = shlex.split(em[1])
                r.extents = [(int(t[i], 16), int(t[i + 1], 16), t[i + 2]) for i in range(0, len(t), 3)]
            self.events.append((conn, False, r))
        assert not open_, f"requests never answered: {list(open_.values())}"

    def of(self, kind: str) -> list[Request]:
        return [r for r in self.requests if r.kind == kind]

    def reads(self) -> list[Request]:
        return self.of("Read")

    def peak_inflight(self, kind: str = "Read") -> dict[int, int]:
        """The most requests of ``kind`` in flight at once, per connection (as the server saw
        them: never more than the client had)."""
        now: dict[int, int] = {}
        peak: dict[int, int] = {}
        for conn, entering, r in self.events:
            if r.kind != kind:
                continue
            now[conn] = now.get(conn, 0) + (1 if entering else -1)
            peak[conn] = max(peak.get(conn, 0), now[conn])
        return peak


class Server:
    """nbdkit serving ``image`` read-only on a unix socket, block status from ``lay``."""

    def __init__(self, sockdir, name: str, image, lay: Layout, delay: str | None = READ_DELAY):
        self.sock = os.path.join(sockdir, f"{name}.sock")
        self.logfile = os.path.join(sockdir, f"{name}.log")
        extent_list = os.path.join(sockdir, f"{name}.extents")
        with open(extent_list, "w") as f:
            for s, e, kind in lay.runs():
                f.write(f"{s} {e - s} {EXTENT_TYPE[kind]}\n")
        argv = ["nbdkit", "-f", "-r", "--exit-with-parent", "-U", self.sock, "--threads=64", "--filter=log"]
        if delay:
            argv.append("--filter=delay")
        argv += ["--filter=extentlist", "file", f"file={image}", f"logfile={self.logfile}",
                 f"extentlist={extent_list}"]
        if delay:
            argv.append(f"rdelay={delay}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit failed: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nbdkit did not create its socket in 10 s")
            time.sleep(0.01)

    def handle(self, index: int = 0) -> "nbd.NBD":
        h = nbd.NBD()
        h.set_handle_name(f"test-{index}")
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(self.sock)
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        return h

    def stop(self) -> Log:
        """Stop the server (the log is complete once it has exited) and read its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        with open(self.logfile) as f:
            return Log(f.read())


@pytest.fixture
def servers(sockdir):
    made: list[Server] = []

    def start(*args, **kw) -> Server:
        s = Server(sockdir, f"s{len(made)}", *args, **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


# --- ranges ---------------------------------------------------------------------------------

def coverage(size: int, ranges) -> list[int]:
    """How many of ``ranges`` ((start, end) pairs) cover each sector."""
    cov = [0] * ((size + UNIT - 1) // UNIT)
    for s, e in ranges:
        assert s % UNIT == 0 and (e % UNIT == 0 or e == size), (s, e)
        for i in range(s // UNIT, (e + UNIT - 1) // UNIT):
            cov[i] += 1
    return cov


def union(size: int, ranges) -> list[int]:
    """1 for each sector some of ``ranges`` cover, else 0."""
    return [min(1, c) for c in coverage(size, ranges)]


def spans(cov: list[int], pred) -> list[tuple[int, int]]:
    """The byte ranges whose sector counts satisfy ``pred`` (for assertion messages)."""
    out: list[list[int]] = []
    for i, c in enumerate(cov):
        if pred(c):
            if out and out[-1][1] == i * UNIT:
                out[-1][1] = (i + 1) * UNIT
            else:
                out.append([i * UNIT, (i + 1) * UNIT])
    return [tuple(r) for r in out]


def widen(ranges, granularity: int, size: int) -> list[tuple[int, int]]:
    """Ranges rounded out to whole clusters of ``granularity`` (the disk's last one may be short)."""
    return [(s - s % granularity, min(size, -(-e // granularity) * granularity)) for s, e in ranges]


def overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def true_sums(data: bytes, block: int) -> bytes:
    """Dense digests of ``data``, one per block, computed directly."""
    digest = checksum.algorithm(checksum.DEFAULT).digest
    return b"".join(digest(data[off:off + block]) for off in range(0, len(data), block))


def records(dense: bytes, size: int, block: int):
    return sums.Layout(size, block, checksum.DEFAULT, sums.DENSE).records(io.BytesIO(dense))


def sums_of(hasher) -> bytes:
    hasher.done()
    return hasher.dense()


def compare(a, fmt_a: str, b, fmt_b: str) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"the copy differs from the source: {r.stdout}{r.stderr}"


# --- assertions common to every copy --------------------------------------------------------

def check_requests(log: Log, size: int, max_request: int, max_inflight: int, rereads=()) -> None:
    reads = log.reads()
    assert reads, "nothing was read"
    assert all(r.ret == 0 for r in log.requests), [r for r in log.requests if r.ret != 0]
    for r in reads:
        assert 0 < r.count and r.end <= size, r
        # Copies are at most max_request bytes and cut on its grid; re-reads are one
        # observer block each (the engine's buffers are max(max_request, block) bytes).
        if (r.offset, r.end) in rereads:
            continue
        assert r.count <= max_request, f"a read of {r.count:#x} bytes exceeds max_request {max_request:#x}: {r}"
        assert r.offset // max_request == (r.end - 1) // max_request, f"a read crosses the max_request grid: {r}"
    for conn, peak in log.peak_inflight().items():
        assert peak <= max_inflight, f"connection {conn}: {peak} reads in flight, max_inflight is {max_inflight}"
    check_block_status(log.of("Extents"), size)


def check_block_status(status: list[Request], size: int) -> None:
    """Range after range from offset 0, each at most STATUS_RANGE, each asked for where the
    previous reply stopped describing: the disk is described exactly once. (Requests are asked
    ahead, up to nbdio.AHEAD of them in flight, so the server may see them in another order.)"""
    assert status, "no block status was asked for"
    assert len({r.conn for r in status}) == 1, "block status comes from the first connection"
    assert len({r.offset for r in status}) == len(status), "a range was asked for twice"
    pos = 0
    for r in sorted(status, key=lambda r: r.offset):
        assert r.count <= nbdio.STATUS_RANGE, f"block status over {r.count:#x} bytes: {r}"
        assert r.offset == pos, (f"block status asked at {r.offset:#x}, the previous replies described "
                                 f"[0, {pos:#x}): {r}")
        assert r.extents and r.extents[0][0] == r.offset, r
        pos = min(r.end, r.extents[-1][0] + r.extents[-1][1])
    assert pos == size, f"block status described [0, {pos:#x}) of {size:#x} bytes"


def reported(log: Log) -> list[tuple[int, int, str]]:
    """The extents the server reported, clipped to the requests: (start, end, DATA|HOLE|ZERO)."""
    out = []
    for r in sorted(log.of("Extents"), key=lambda r: r.offset):  # asked ahead: in any order
        for off, length, typ in r.extents:
            s, e = max(off, r.offset), min(off + length, r.end)
            if s < e:
                out.append((s, e, HOLE if "hole" in typ else ZERO if "zero" in typ else DATA))
    return out


# --- full copies ----------------------------------------------------------------------------

SIZE = 6 * MiB + 36 * KiB + 512  # a short last cluster, and a last page of 512 bytes


def full_layout(size: int, rng: random.Random) -> Layout:
    pieces = [
        (0, 64 * KiB, DATA),
        # [64K, 192K): a hole of two whole clusters, never read by any target
        (192 * KiB, 4 * KiB, DATA),  # 4 KiB of data in a cluster that is otherwise a hole
        (256 * KiB, 896 * KiB, DATA),  # across the block status boundary at 1 MiB
        (1152 * KiB, 256 * KiB, ZERO),  # allocated zeroes, whole clusters
        (1408 * KiB, 16 * KiB, DATA),
        (1424 * KiB, 4 * KiB, ZERO),  # zeroes inside a data cluster
        (1428 * KiB, 4 * KiB, HOLE),  # and a hole beside them
        (1432 * KiB, 1656 * KiB, DATA),
        (3 * MiB + 8 * KiB, 4 * KiB, ZERO),
        (3 * MiB + 12 * KiB, 56 * KiB, DATA),  # ends in the middle of the next cluster ...
        (3 * MiB + 132 * KiB, 4 * KiB, DATA),  # ... which shares a cluster with this
        (4 * MiB - 4 * KiB, 8 * KiB, DATA),  # across the status boundary at 4 MiB, in two clusters
    ]
    # Random pages over [4.5M, 6M), then data to the end of the disk.
    for p in range(4 * MiB + 512 * KiB, 6 * MiB, PAGE):
        pieces.append((p, PAGE, rng.choice([DATA, DATA, HOLE, ZERO])))
    pieces.append((size - 20 * KiB - 512, 20 * KiB + 512, DATA))
    return layout_of(size, pieces)


@pytest.mark.parametrize("kind", ["qcow2", "raw", "discard"])
def test_full_copy_reads_each_data_byte_once_and_no_zeroes(tmp_path, servers, kind):
    max_request, max_inflight = 64 * KiB, 4
    rng = random.Random(kind)
    lay = full_layout(SIZE, rng)
    raw = tmp_path / "src.raw"
    data = write_image(raw, lay, rng)
    srv = servers(raw, lay)
    src = nbdio.export(srv.sock, "", connections=1)
    out = tmp_path / f"out.{kind}"
    dst = engine.Discard(SIZE) if kind == "discard" else target.open_target(str(out), SIZE, kind)
    hasher = checksum.BlockHasher(SIZE)
    try:
        stats = engine.copy(src, dst, observer=hasher, max_request=max_request, max_inflight=max_inflight,
                            writers=2)
    finally:
        dst.close()
        src.close()
    log = srv.stop()

    check_requests(log, SIZE, max_request, max_inflight)
    assert max(log.peak_inflight().values()) == max_inflight, "the reads were not pipelined"
    assert reported(log) == _split_at(lay.runs(), STATUS), \
        "the server did not report the crafted extents"

    granularity = dst.granularity
    assert granularity == (CLUSTER if kind == "qcow2" else 1)
    want = union(SIZE, widen(lay.ranges(DATA), granularity, SIZE))
    got = coverage(SIZE, [(r.offset, r.end) for r in log.reads()])
    assert spans(got, lambda c: c > 1) == [], "bytes read more than once"
    assert [i for i, (g, w) in enumerate(zip(got, want)) if g and not w] == [], \
        f"read outside the data clusters: {spans([g and not w for g, w in zip(got, want)], bool)}"
    assert got == want, f"data never read: {spans([w and not g for g, w in zip(got, want)], bool)}"
    if granularity == 1:
        for r in log.reads():
            bad = [z for z in lay.ranges(HOLE, ZERO) if overlaps(z, (r.offset, r.end))]
            assert not bad, f"{r} reads zero ranges {bad}"
    else:  # a qcow2 cluster that is all holes and zeroes is never read
        zero_clusters = [(c, min(SIZE, c + CLUSTER)) for c in range(0, SIZE, CLUSTER)
                         if not any(overlaps((c, c + CLUSTER), d) for d in lay.ranges(DATA))]
        assert zero_clusters
        for r in log.reads():
            assert not [z for z in zero_clusters if overlaps(z, (r.offset, r.end))], r
    assert stats.bytes_copied == sum(r.count for r in log.reads())
    assert stats.bytes_zeroed == 0  # a new image reads as zeroes: nothing to do for them

    assert sums_of(hasher) == true_sums(data, checksum.BLOCK)
    assert hasher.reread == []
    if kind != "discard":
        compare(raw, "raw", out, kind)


def _split_at(runs, every: int) -> list[tuple[int, int, str]]:
    """``runs`` cut where block status requests end (multiples of ``every``)."""
    out = []
    for s, e, k in runs:
        while s < e:
            n = min(e, (s // every + 1) * every)
            out.append((s, n, k))
            s = n
    return out


@pytest.mark.parametrize("remember", [True, False])
def test_block_status_is_asked_once_per_range_while_reading(tmp_path, servers, monkeypatch, remember):
    """planned_bytes (a pass of block status only) describes the disk once, range after range.
    The copy then takes the extents remembered from that pass and asks nothing again; when
    they were too many to remember (nbdio.REMEMBER), it asks for each range once more, lazily,
    after reads began."""
    if not remember:
        monkeypatch.setattr(nbdio, "REMEMBER", 0)
        monkeypatch.setattr(nbdio, "AHEAD", 1)  # so that laziness can be seen on a small disk
    rng = random.Random(3)
    lay = full_layout(SIZE, rng)
    raw = tmp_path / "src.raw"
    write_image(raw, lay, rng)
    srv = servers(raw, lay)
    src = nbdio.export(srv.sock, "", connections=1)
    dst = engine.Discard(SIZE)
    try:
        planned = engine.planned_bytes(src, dst)
        with open(srv.logfile) as f:  # the log so far: block status is synchronous
            n_planning = len(Log(f.read()).of("Extents"))
        engine.copy(src, dst, max_request=256 * KiB, max_inflight=2)
    finally:
        src.close()
    log = srv.stop()
    assert planned == sum(e - s for s, e in lay.ranges(DATA))
    status = log.of("Extents")
    assert n_planning == -(-SIZE // STATUS)
    check_block_status(status[:n_planning], SIZE)
    if remember:
        assert len(status) == n_planning
        assert sum(r.count for r in log.reads()) == planned
        return
    assert len(status) == 2 * n_planning
    check_block_status(status[n_planning:], SIZE)
    first_read = log.requests.index(log.reads()[0])
    assert log.requests.index(status[n_planning]) < first_read
    assert any(log.requests.index(r) > first_read for r in status[n_planning:]), \
        "the copy asked for every range's status before reading anything"


# --- incremental copies ---------------------------------------------------------------------

INC_SIZE = 4 * MiB + 36 * KiB + 512
# (start, length, what the range now holds): sub-cluster pieces, whole clusters, a whole
# 256 KiB block, ranges across block and status boundaries, zeroed ranges, the short tail.
DIRTY = [
    (100 * KiB, 8 * KiB, DATA),  # inside one cluster
    (256 * KiB, 256 * KiB, DATA),  # exactly one 256 KiB block
    (640 * KiB, 64 * KiB, ZERO),  # one whole cluster, now zeroes: a zero write, not a read
    (704 * KiB, 4 * KiB, HOLE),  # zeroes beside clean bytes in a cluster: read whole
    (960 * KiB, 200 * KiB, DATA),  # across a block and the status boundary
    (1536 * KiB, 64 * KiB, DATA),
    (1600 * KiB, 64 * KiB, HOLE),
    (2 * MiB + 4 * KiB, 4 * KiB, DATA),
    (3 * MiB, 512 * KiB, DATA),  # two whole blocks
    (3 * MiB + 600 * KiB, 8 * KiB, ZERO),  # zero beside clean data in a cluster: read
    (INC_SIZE - 4 * KiB - 512, 4 * KiB + 512, DATA),
]


def incremental_images(tmp_path, rng):
    """old.raw (the disk at the parent point) and new.raw (the disk now): equal outside DIRTY."""
    old_lay = layout_of(INC_SIZE, [], rest=DATA)
    for p in range(5, len(old_lay.pages), 16):  # the parent has holes too
        old_lay.pages[p] = HOLE
    old = write_image(tmp_path / "old.raw", old_lay, rng)
    new_lay = Layout(INC_SIZE, list(old_lay.pages))
    base = bytearray(old)
    for s, n, kind in DIRTY:
        for p in range(s // PAGE, (s + n + PAGE - 1) // PAGE):
            new_lay.pages[p] = kind
        base[s:s + n] = rng.randbytes(n)  # what the data pages among them now hold
    new = write_image(tmp_path / "new.raw", new_lay, rng, base=bytes(base))
    return old, new, new_lay


class WithDirty(nbdio.Source):
    """The export's dirty bitmap played by a fixed set of ranges."""

    dirty_ranges: list[tuple[int, int]] = []

    def extents(self, start, end, remember=False):
        out = []
        for e in super().extents(start, end):
            cuts = sorted({e.start, e.end, *(p for s, t in self.dirty_ranges for p in (s, t) if e.start < p < e.end)})
            for a, b in zip(cuts, cuts[1:]):
                is_dirty = any(s <= a < t for s, t in self.dirty_ranges)
                out.append(extents.Extent(a, b - a, e.zero, is_dirty))
        return out


def expected_clusters(lay: Layout, dirty: list[tuple[int, int]]) -> dict[str, list[tuple[int, int]]]:
    """The operations an incremental into an overlay makes, per 64 KiB cluster: a cluster with
    no dirty byte is left alone; one whose dirty bytes are all zeroes and that has no clean
    byte is zeroed; any other is read whole (its clean bytes are read from the export too)."""
    ops: dict[str, list] = {"copy": [], "zero": []}
    for c in range(0, lay.size, CLUSTER):
        ce = min(lay.size, c + CLUSTER)
        kinds = set()
        for p in range(c // PAGE, (ce + PAGE - 1) // PAGE):
            ps, pe = p * PAGE, min(lay.size, (p + 1) * PAGE)
            if not any(overlaps((ps, pe), d) for d in dirty):
                kinds.add(None)
            else:
                kinds.add("copy" if lay.pages[p] == DATA else "zero")
        if kinds == {"zero"}:
            ops["zero"].append((c, ce))
        elif kinds != {None}:
            ops["copy"].append((c, ce))
    return ops


@pytest.mark.parametrize("max_request,block,observe", [
    (64 * KiB, 256 * KiB, True),
    (MiB, 256 * KiB, True),
    (MiB, checksum.BLOCK, True),
    (256 * KiB, 0, False),
])
def test_incremental_reads_dirty_clusters_and_rereads_partly_dirty_blocks_once(
        tmp_path, servers, max_request, block, observe):
    max_inflight = 4
    rng = random.Random(max_request + block)
    old, new, lay = incremental_images(tmp_path, rng)
    dirty = [(s, s + n) for s, n, _ in DIRTY]
    srv = servers(tmp_path / "new.raw", lay)
    plain = nbdio.export(srv.sock, "", connections=1)
    src = WithDirty(plain.handles, plain.name)
    src.dirty_ranges = dirty
    top = tmp_path / "top.qcow2"
    dst = target.Qcow2Target(str(top), INC_SIZE, backing="old.raw", backing_format="raw")
    hasher = None
    if observe:
        hasher = checksum.BlockHasher(INC_SIZE, parent=records(true_sums(old, block), len(old), block), block=block)
    try:
        stats = engine.copy(src, dst, observer=hasher, max_request=max_request, max_inflight=max_inflight)
    finally:
        dst.close()
        src.close()
    log = srv.stop()

    want = expected_clusters(lay, dirty)
    assert want["zero"] and want["copy"]
    rereads: list[tuple[int, int]] = []
    if observe:
        # A block some operation touched but did not cover holds clean bytes: re-read whole.
        touched = coverage(INC_SIZE, want["copy"] + want["zero"])
        for b in range(0, INC_SIZE, block):
            part = touched[b // UNIT:-(-min(INC_SIZE, b + block) // UNIT)]
            if any(part) and not all(part):
                rereads.append((b, min(INC_SIZE, b + block)))
        assert bool(rereads) == (block != CLUSTER)  # whole clusters make whole 64 KiB blocks
        assert sorted(hasher.reread) == [s // block for s, _ in rereads]
    check_requests(log, INC_SIZE, max_request, max_inflight, rereads)

    reads = [(r.offset, r.end) for r in log.reads()]
    got = coverage(INC_SIZE, reads)
    expect = [a + b for a, b in zip(coverage(INC_SIZE, want["copy"]), coverage(INC_SIZE, rereads))]
    assert got == expect, (
        f"read but not expected: {spans([g > e for g, e in zip(got, expect)], bool)}; "
        f"expected but not read as often: {spans([g < e for g, e in zip(got, expect)], bool)}")
    dirty_clusters = union(INC_SIZE, widen(dirty, CLUSTER, INC_SIZE))
    for s, e in rereads:  # each partly dirty block is re-read in one request of the whole block
        assert reads.count((s, e)) == 1, f"block [{s:#x}, {e:#x}) was not re-read in one request"
    copies = list(reads)
    for rr in rereads:
        copies.remove(rr)
    stray = [r for r in copies if not all(dirty_clusters[r[0] // UNIT:-(-r[1] // UNIT)])]
    assert stray == [], f"reads outside the dirty clusters: {stray}"
    for z in want["zero"]:  # (a re-read of its block reads it: the block is hashed whole)
        assert not [r for r in copies if overlaps(r, z)], f"a zeroed cluster {z} was read"
    assert stats.bytes_zeroed == sum(e - s for s, e in want["zero"])
    assert stats.bytes_copied == sum(e - s for s, e in want["copy"])

    compare(tmp_path / "new.raw", "raw", top, "qcow2")
    subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
    if observe:
        assert sums_of(hasher) == true_sums(new, block)


# --- several connections --------------------------------------------------------------------

def test_two_connections_share_the_reads(tmp_path, servers):
    """Multi-conn: reads go to the least busy connection, so two equal servers share them
    (each takes a good part: how evenly depends on how the machine schedules the two server
    processes), each byte once; block status only on the first; at most max_inflight per
    connection in all."""
    max_request, max_inflight = 64 * KiB, 3
    rng = random.Random(7)
    lay = full_layout(SIZE, rng)
    raw = tmp_path / "src.raw"
    write_image(raw, lay, rng)
    srv = servers(raw, lay)
    src = nbdio.export(srv.sock, "", connections=2)
    assert len(src.handles) == 2
    out = tmp_path / "out.raw"
    dst = target.RawTarget(str(out), SIZE)
    try:
        engine.copy(src, dst, max_request=max_request, max_inflight=max_inflight)
    finally:
        dst.close()
        src.close()
    log = srv.stop()
    reads = log.reads()
    by_conn = {c: [r for r in reads if r.conn == c] for c in {r.conn for r in reads}}
    assert len(by_conn) == 2 and min(len(by_conn[1]), len(by_conn[2])) >= len(reads) // 4
    assert all(r.conn == 1 for r in log.of("Extents"))
    assert coverage(SIZE, [(r.offset, r.end) for r in reads]) == coverage(SIZE, lay.ranges(DATA))
    # In all, at most max_inflight per connection (each one alone: see the next test).
    now = peak = 0
    for _conn, entering, r in log.events:
        if r.kind == "Read":
            now += 1 if entering else -1
            peak = max(peak, now)
    assert peak <= 2 * max_inflight
    check_block_status(log.of("Extents"), SIZE)
    compare(raw, "raw", out, "raw")


def test_each_connection_keeps_to_max_inflight_when_one_is_slow(tmp_path, servers):
    max_request, max_inflight = 64 * KiB, 3
    rng = random.Random(8)
    lay = full_layout(SIZE, rng)
    raw = tmp_path / "src.raw"
    write_image(raw, lay, rng)
    fast = servers(raw, lay, delay=None)
    slow = servers(raw, lay, delay="20ms")
    src = nbdio.Source([fast.handle(0), slow.handle(1)], "fast+slow")
    dst = engine.Discard(SIZE)
    try:
        engine.copy(src, dst, max_request=max_request, max_inflight=max_inflight)
    finally:
        src.close()
    fast_log, slow_log = fast.stop(), slow.stop()
    assert coverage(SIZE, [(r.offset, r.end) for r in fast_log.reads() + slow_log.reads()]) == \
        coverage(SIZE, lay.ranges(DATA))
    assert max(fast_log.peak_inflight().values()) <= max_inflight
    assert max(slow_log.peak_inflight().values()) <= max_inflight
