"""libvbackup serve: a command handed to the resident server runs in a worker forked from it and
does exactly what it does in its own process: the same backups, byte for byte, the same output,
errors and exit codes, the same clean-up when interrupted; a command that dies takes its worker
with it, and the server refuses what is not its own."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from libvbackup.cli import resident

from .helpers import MiB, assert_restores, cli, leftovers, random_writes, snap, stalling_child, tree, wait_copying
from .test_bad_input import CASES

pytestmark = pytest.mark.integration

SERVE = """
import sys
from libvbackup.cli import resident_server
resident_server.serve(sys.argv[1], lambda text: print(text, file=sys.stderr, flush=True))
"""


class Server:
    """A real server, started as `libvbackup serve` is (its log in a file); ``stall``: every
    worker's copy stalls after its first request (helpers.stalling_child), to be interrupted."""

    def __init__(self, stall: bool = False) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="lvbtest-serve-", dir="/var/tmp"))
        self.sock = self.dir / "s.sock"
        self.log_path = self.dir / "log"
        code = stalling_child(SERVE) if stall else SERVE
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.sock)], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while "listening on" not in self.log():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        self.env = {**os.environ, resident.ENV: str(self.sock)}

    def log(self) -> str:
        return self.log_path.read_text()

    def workers(self) -> list[int]:
        return [int(line.rsplit(" ", 1)[1]) for line in self.log().splitlines() if " -> worker " in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(lab):
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def stalling(lab):
    s = Server(stall=True)
    yield s
    s.stop()


def served(server, *args: str, **kw) -> subprocess.CompletedProcess:
    """The command through the server; the server's log must show that a worker ran it."""
    before = len(server.workers())
    kw.setdefault("env", server.env)
    res = cli(*args, **kw)
    assert len(server.workers()) == before + 1, server.log()
    return res


def alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_backups_through_the_server_restore_what_the_guest_wrote(server, make_vm, repo, workdir):
    vm = make_vm((24 * MiB, "qcow2"), (8 * MiB + 4096, "raw"))
    rng = random.Random(7)
    for d in vm.disks:
        random_writes(d, rng)
    at_full = snap(vm)
    res = served(server, "pull", vm.name, "--repo", str(repo), "--checkpoint", "s1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["checkpoint"] == "s1"
    vm["vda"].zero(MiB, 3 * MiB + 512)  # zero writes (not unmapped), unaligned
    vm["vdb"].zero(0, 2 * MiB, unmap=True)
    for d in vm.disks:
        random_writes(d, rng, n=6)
    at_inc = snap(vm)
    res = served(server, "pull", vm.name, "--repo", str(repo), "--checkpoint", "s2", "--incremental", "s1",
                 "--progress", "none")
    assert res.returncode == 0, res.stderr
    assert "incremental pull backup s2" in res.stdout
    # Nothing changed: the empty incremental, through the server too.
    res = served(server, "pull", vm.name, "--repo", str(repo), "--checkpoint", "s3", "--incremental", "s2")
    assert res.returncode == 0 and "0 B copied" in res.stdout, res.stderr
    assert_restores(repo, vm.name, "s1", at_full, workdir)
    assert_restores(repo, vm.name, "s2", at_inc, workdir)
    assert_restores(repo, vm.name, "s3", at_inc, workdir, fmt="qcow2")
    assert vm.checkpoints() == ["s1", "s2", "s3"] and not vm.has_job() and leftovers() == []
    # What a command prints is what it prints in its own process.
    for args in (["list", vm.name, "--repo", str(repo), "--json"], ["list", vm.name, "--repo", str(repo)],
                 ["--version"], ["pull", "--help"], ["no-such-command"]):
        here, there = cli(*args), served(server, *args)
        assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr), args


def test_bad_input_through_the_server_is_answered_as_here_and_changes_nothing(server, lab):
    base = pathlib.Path(tempfile.mkdtemp(prefix="lvbtest-servebad-", dir="/var/tmp"))
    vm = lab.LabVM([(8 * MiB, "qcow2"), (4 * MiB, "raw")]).start()
    try:
        repo = base / "repo"
        repo.mkdir(mode=0o700)
        vm["vda"].fill(0, MiB, 0x77)
        assert cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "c1").returncode == 0
        (base / "nonempty").mkdir()
        (base / "nonempty" / "keep.txt").write_text("x")
        fmt = {"vm": vm.name, "repo": repo, "base": base, "nonempty": base / "nonempty"}
        for _id, argv, code, word in CASES:
            args = [a.format(**fmt) for a in argv]
            before = (tree(repo), vm.checkpoints(), vm.has_job(), leftovers(), sorted(os.listdir(base)))
            there = served(server, *args)
            here = cli(*args)
            assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr), _id
            assert there.returncode == code and word in there.stderr and "Traceback" not in there.stderr, _id
            assert (tree(repo), vm.checkpoints(), vm.has_job(), leftovers(), sorted(os.listdir(base))) == before, _id
    finally:
        vm.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_the_worker_has_the_commands_directory_environment_and_streams(server, make_vm, workdir):
    vm = make_vm((4 * MiB, "qcow2"))
    vm["vda"].fill(0, MiB + 3, 0x42)
    (workdir / "rel").mkdir(mode=0o700)
    # A relative --repo: the worker works in the command's directory.
    res = subprocess.run([sys.executable, "-m", "libvbackup.cli.main", "pull", vm.name, "--repo", "rel",
                          "--checkpoint", "w1"], cwd=workdir, env=server.env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (workdir / "rel" / vm.name / "w1").is_dir()
    # The default repository comes from the command's environment, not the server's.
    res = served(server, "list", vm.name, "--json", env={**server.env, "LIBVBACKUP_REPO": str(workdir / "rel")})
    assert res.returncode == 0 and [p["checkpoint"] for p in json.loads(res.stdout)["points"]] == ["w1"], res.stderr
    here = cli("list", vm.name, "--repo", str(workdir / "rel"), "--json")
    assert json.loads(here.stdout) == json.loads(res.stdout)
    # A closed stdout stays closed in the worker: the command fails as it does in its own process.
    def closed_stdout(env):
        return subprocess.run([sys.executable, "-m", "libvbackup.cli.main", "list", vm.name, "--repo",
                               str(workdir / "rel")], env=env, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.close(1))
    before = len(server.workers())
    there, here = closed_stdout(server.env), closed_stdout({**os.environ, resident.ENV: "off"})
    assert len(server.workers()) == before + 1
    assert (there.returncode, there.stderr) == (here.returncode, here.stderr)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_reach_the_worker_and_it_cleans_up(stalling, make_vm, repo, sig, code):
    vm = make_vm((16 * MiB, "qcow2"))
    vm["vda"].fill(0, 4 * MiB, 0x51)
    p = subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", "pull", vm.name, "--repo", str(repo),
                          "--checkpoint", "x1", "--progress", "none"], env=stalling.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_copying(p)  # the worker writes COPYING on the command's own stdout
    assert vm.has_job() and vm.checkpoints() == ["x1"]
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    assert not vm.has_job() and vm.checkpoints() == [] and leftovers() == []
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == [".lock"]
    assert f"exit {code}" in stalling.log()


def test_a_killed_command_takes_its_worker_with_it(stalling, make_vm, repo, workdir):
    vm = make_vm((16 * MiB, "qcow2"), (4 * MiB, "raw"))
    vm["vda"].fill(0, 4 * MiB, 0x61)
    assert cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "k1").returncode == 0
    vm["vda"].fill(2 * MiB, 3 * MiB + 5, 0x62)
    vm["vdb"].fill(4096, 777, 0x63)
    p = subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", "pull", vm.name, "--repo", str(repo),
                          "--checkpoint", "k2", "--incremental", "k1", "--progress", "none"], env=stalling.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_copying(p)
    worker = stalling.workers()[-1]
    assert alive(worker)
    p.kill()
    p.wait(timeout=30)
    deadline = time.monotonic() + 30
    while f"worker {worker}: killed by signal 9" not in stalling.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker), stalling.log()
    assert f"worker {worker}: its command went away: SIGKILL\nworker {worker}: killed by signal 9" in stalling.log()
    # As after a command killed in its own process: the next run (here, in its own process)
    # recovers the dead one and the chain goes on.
    at_k3 = snap(vm)
    res = cli("pull", vm.name, "--repo", str(repo), "--checkpoint", "k3", "--incremental", "k1")
    assert res.returncode == 0, res.stderr
    assert vm.checkpoints() == ["k1", "k3"] and leftovers() == []
    assert_restores(repo, vm.name, "k3", at_k3, workdir)


def test_stopping_the_server_stops_its_commands_cleanly(stalling, make_vm, repo):
    vm = make_vm((16 * MiB, "qcow2"))
    vm["vda"].fill(0, 4 * MiB, 0x71)
    p = subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", "pull", vm.name, "--repo", str(repo),
                          "--checkpoint", "t1", "--progress", "none"], env=stalling.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_copying(p)
    stalling.proc.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "interrupted" in err, err
    assert stalling.proc.wait(timeout=60) == 0
    assert not stalling.sock.exists()  # the socket went; the lock file stays, free
    assert not vm.has_job() and vm.checkpoints() == [] and leftovers() == []
    # With no server there, commands run in their own process.
    res = cli("list", vm.name, "--repo", str(repo), env=stalling.env)
    assert res.returncode == 0 and "no backup points" in res.stdout, res.stderr


def test_a_second_server_and_unsafe_sockets_are_refused(server, workdir):
    res = cli("serve", "--socket", str(server.sock))
    assert res.returncode == 4 and "already listens on" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert server.sock.is_socket() and server.proc.poll() is None
    private = workdir / "private"
    private.mkdir(mode=0o700)
    (private / "file").write_text("keep")
    res = cli("serve", "--socket", str(private / "file"))
    assert res.returncode == 4 and "is not a socket" in res.stderr, res.stderr
    assert (private / "file").read_text() == "keep"
    public = workdir / "public"
    public.mkdir()
    os.chmod(public, 0o777)
    res = cli("serve", "--socket", str(public / "s.sock"))
    assert res.returncode == 4 and "not private" in res.stderr, res.stderr
    assert os.listdir(public) == []
    assert oct(server.sock.stat().st_mode & 0o777) == "0o600"
    assert oct(server.dir.stat().st_mode & 0o777) == "0o700"


def test_a_peer_of_another_user_is_declined(server):
    mode = server.dir.stat().st_mode
    os.chmod(server.dir, 0o711)
    os.chmod(server.sock, 0o666)
    try:
        # It is declined as soon as it connects, before it says anything.
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                 "print(s.recv(100))\n")
        res = subprocess.run(["/usr/bin/python3", "-c", probe, str(server.sock)], user=65534,
                             capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() == "b'declined\\n'", res.stderr
        assert "uid 65534 is not the server's (0): refused" in server.log()
    finally:
        os.chmod(server.sock, 0o600)
        os.chmod(server.dir, mode & 0o7777)


def test_a_server_whose_files_changed_sends_commands_home_and_ends(lab):
    s = Server()
    module = pathlib.Path(resident.__file__).with_name("serve_cmd.py")
    st = module.stat()
    try:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        res = cli("--version", env=s.env)
        assert res.returncode == 0 and res.stdout.startswith("libvbackup "), res.stderr
        assert "files changed on disk" in s.log() and " -> worker " not in s.log()
        assert s.proc.wait(timeout=30) == 0
        assert not s.sock.exists()
    finally:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))  # its .pyc is valid again
        s.stop()


def test_a_command_handed_over_imports_nothing_heavy(server):
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "libvbackup.cli.main", "--version"],
                         env=server.env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("libvbackup "), res.stderr
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "libvbackup.cli.resident" in imported
    assert not imported & {"logging", "socket", "signal", "json", "typing", "libvirt", "lxml", "nbd", "typer",
                           "libvbackup.errors", "libvbackup.cli.fastpath"}, sorted(imported)
