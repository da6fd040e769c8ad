"""The resident server's request: what the command sends is what the worker gets, byte for byte;
anything else is refused. And where a command looks for a server."""

from __future__ import annotations

import os

import pytest

from libvbackup.cli import resident


def _body(data: bytes) -> bytes:
    assert data.startswith(resident.MAGIC)
    head = len(resident.MAGIC) + 10
    assert int(data[len(resident.MAGIC):head]) == len(data) - head
    return data[head:]


def test_request_round_trip_keeps_arguments_and_environment_exactly():
    argv = ["/usr/bin/libvbackup", "pull", "vm 1", "", "--repo=/a=b", "ümlaut", os.fsdecode(b"raw\xff\xfe")]
    env = {"PATH": "/usr/bin", "EMPTY": "", "EQ": "a=b=c", "NL": "two\nlines",
           os.fsdecode(b"K\xe9"): os.fsdecode(b"v\x80")}
    data = resident.encode_request(argv, env, 0o027, 10, [0, 2])
    got = resident.decode_request(_body(data))
    assert got == {"package": resident.PACKAGE, "umask": 0o027, "nice": 10, "streams": [0, 2], "argv": argv,
                   "env": env}
    assert os.fsencode(got["argv"][-1]) == b"raw\xff\xfe"


def test_no_streams_and_no_environment():
    got = resident.decode_request(_body(resident.encode_request(["libvbackup"], {}, 0, -5, [])))
    assert got["streams"] == [] and got["env"] == {} and got["argv"] == ["libvbackup"] and got["nice"] == -5


@pytest.mark.parametrize("body", [
    b"", b"\0", b"pkg\x00022\x000\x000,1,2\x001",  # cut short: no final NUL
    b"pkg\x00022\x000\x000,1,2\x003\x00libvbackup\x00",  # argc larger than the arguments
    b"pkg\x00022\x000\x000,1,2\x001\x00libvbackup\x00NOEQUALS\x00",  # an environment entry without =
    b"pkg\x00022\x000\x003\x001\x00libvbackup\x00",  # a stream that is not 0, 1 or 2
    b"pkg\x00022\x000\x001,1\x001\x00libvbackup\x00",  # the same stream twice
    b"pkg\x00zz\x000\x001\x001\x00libvbackup\x00",  # a umask that is no octal number
])
def test_malformed_requests_are_refused(body):
    with pytest.raises(ValueError):
        resident.decode_request(body)


def test_asking_a_server_is_opt_in(monkeypatch):
    assert resident.socket_path({}) is None
    for off in ("", "off", "OFF", "0", "no", "none", "  "):
        assert resident.socket_path({resident.ENV: off}) is None
    assert resident.socket_path({resident.ENV: "/some/where.sock"}) == "/some/where.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert resident.socket_path({resident.ENV: "on"}) == resident.ROOT_SOCKET
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert resident.socket_path({resident.ENV: "yes", "XDG_RUNTIME_DIR": "/run/user/1000"}) == \
        "/run/user/1000/libvbackup/server.sock"
    assert resident.socket_path({resident.ENV: "1"}) is None  # no runtime directory: no default


def test_serve_itself_and_workers_are_never_forwarded(monkeypatch):
    monkeypatch.setenv(resident.ENV, "/nonexistent/dir/s.sock")
    assert resident.forward(["libvbackup", "--debug", "serve", "--socket", "x"]) is None
    assert resident._command_name(["libvbackup", "-v", "pull", "serve"]) == "pull"
    # Long-lived or lasting: where they are typed.
    for argv in (["libvbackup", "map", "vm1", "--disk", "vda"],
                 ["libvbackup", "--debug", "restore", "vm1", "--instant"], ["libvbackup", "serve"]):
        assert resident.runs_here(argv) and resident.forward(argv) is None
    for argv in (["libvbackup", "restore", "vm1", "--output", "d"], ["libvbackup", "pull", "map"]):
        assert not resident.runs_here(argv)
    # No server listens there: the command runs in its own process.
    assert resident.forward(["libvbackup", "list"]) is None
