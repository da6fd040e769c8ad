"""Off-site copies to a real S3 server (SeaweedFS on loopback): copy, then list, restore, verify
and prune from the bucket alone, byte-exact against the model of what the guest wrote."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from libvbackup.backup import pull

from .helpers import MiB, cli, first_difference, random_writes, read_image, snap, tree

pytestmark = pytest.mark.integration

MARKER = b"LVB-OFFSITE-MARKER-7f3a9c"


@pytest.fixture
def keyfile(workdir):
    path = workdir / "offsite.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    return str(path)


def _s3_cli(s3server, *args, endpoint=None):
    return cli(*args, "--s3-endpoint", endpoint or s3server.endpoint, env=s3server.env())


def _one_line_error(r, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def _restore_from(s3server, url, key, vm, checkpoint, out, expected):
    r = _s3_cli(s3server, "restore", vm, "--repo", url, "--key-file", key, "--checkpoint", checkpoint,
                "--output", str(out), "--format", "raw", "--json")
    assert r.returncode == 0, r.stderr
    for disk, data in expected.items():
        got = read_image(out / f"{disk}.raw", "raw")
        assert got == data, f"{checkpoint}/{disk}: {first_difference(got, data)}"
    shutil.rmtree(out)


def test_copy_restore_verify_prune_from_the_bucket_alone(make_vm, repo, workdir, s3server, keyfile):
    rng = random.Random(20261202)
    vm = make_vm((20 * MiB, "qcow2"), (6 * MiB, "qcow2"))
    models = {}
    for d in vm.disks:
        random_writes(d, rng)
    vm["vda"].write(3 * MiB + 17, MARKER * 40)  # a string the guest wrote, never in an object
    vm["vda"].write(19 * MiB, MARKER)
    vm["vda"].fill(8 * MiB, 2 * MiB, 0x5A)
    pull(vm.name, repo=str(repo), checkpoint="full1")
    models["full1"] = snap(vm)
    for d in vm.disks:
        random_writes(d, rng, n=6)
    vm["vdb"].write(1 * MiB + 3, MARKER)
    vm["vda"].zero(8 * MiB, 1 * MiB)
    pull(vm.name, repo=str(repo), checkpoint="inc1", incremental="full1")
    models["inc1"] = snap(vm)
    for d in vm.disks:
        random_writes(d, rng, n=6)
    pull(vm.name, repo=str(repo), checkpoint="inc2", incremental="inc1")
    models["inc2"] = snap(vm)
    for d in vm.disks:
        random_writes(d, rng, n=6)
    pull(vm.name, repo=str(repo), checkpoint="diff1", incremental="full1")
    models["diff1"] = snap(vm)

    bucket = s3server.bucket("lvb-copy")
    url = f"s3://{bucket}/site1"
    before = tree(repo)
    dry = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile,
                  "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert [p["state"] for p in json.loads(dry.stdout)["points"]] == ["would copy"] * 4
    assert s3server.objects(bucket) == {}  # a dry run sends nothing

    r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(p["checkpoint"], p["state"]) for p in doc["points"]] == [
        ("full1", "copied"), ("inc1", "copied"), ("inc2", "copied"), ("diff1", "copied")]
    assert doc["bytes_sent"] > 0
    assert tree(repo) == before  # the local repository is only read

    objects = s3server.objects(bucket)
    names = sorted(objects)
    assert f"site1/{vm.name}/full1.point" in names and f"site1/{vm.name}/diff1/vda.qcow2" in names
    for name, body in objects.items():
        assert MARKER not in body, f"the guest's marker is readable in {name}"
        assert b"QFI\xfb" not in body[:4], f"{name} is a plain qcow2 image"

    again = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile, "--json")
    assert again.returncode == 0, again.stderr
    assert {p["state"] for p in json.loads(again.stdout)["points"]} == {"present"}
    assert json.loads(again.stdout)["bytes_sent"] == 0

    # A wrong key: one line, nothing read or written.
    wrong = workdir / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    err = _one_line_error(_s3_cli(s3server, "list", vm.name, "--repo", url, "--key-file", str(wrong)), 2)
    assert "key does not open" in err
    err = _one_line_error(_s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url,
                                  "--key-file", str(wrong)), 2)
    assert s3server.objects(bucket) == objects
    err = _one_line_error(_s3_cli(s3server, "list", vm.name, "--repo", url), 2)
    assert "needs a key" in err

    # The local repository is gone: every point from the bucket alone.
    shutil.rmtree(repo)
    listed = _s3_cli(s3server, "list", vm.name, "--repo", url, "--key-file", keyfile, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["checkpoint"] for p in json.loads(listed.stdout)["points"]] == ["full1", "inc1", "inc2", "diff1"]
    for c, model in models.items():
        _restore_from(s3server, url, keyfile, vm.name, c, workdir / f"from-s3-{c}", model)
    ok = _s3_cli(s3server, "verify", vm.name, "--repo", url, "--key-file", keyfile, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # One flipped byte in one object is found, and named.
    key = f"site1/{vm.name}/inc1/vdb.qcow2"
    body = bytearray(objects[key])
    body[len(body) // 2] ^= 0x01
    s3server.client().put_object(Bucket=bucket, Key=key, Body=bytes(body))
    bad = _s3_cli(s3server, "verify", vm.name, "--repo", url, "--key-file", keyfile, "--json")
    assert bad.returncode == 9, bad.stdout + bad.stderr
    result = json.JSONDecoder().raw_decode(bad.stdout)[0]  # the result, then the error document
    # inc2 reads the damaged image as its base: it fails too, naming the layer below.
    assert {p["checkpoint"]: p["ok"] for p in result["points"]} == {"full1": True, "inc1": False, "inc2": False,
                                                                    "diff1": True}
    assert any("inc1/vdb.qcow2" in problem for problem in result["points"][1]["disks"]["vdb"]["problems"])
    # ... and a restore of that point fails in one line instead of writing what it changed.
    out = workdir / "tampered"
    err = _one_line_error(_s3_cli(s3server, "restore", vm.name, "--repo", url, "--key-file", keyfile,
                                  "--checkpoint", "inc1", "--output", str(out)), 9)
    assert "inc1/vdb.qcow2" in err
    assert not out.exists() or not any(out.iterdir())
    s3server.client().put_object(Bucket=bucket, Key=key, Body=objects[key])

    # The bucket's own retention: diff1 is kept, and full1 with it (its base); inc1 and inc2 go.
    pr = _s3_cli(s3server, "prune", vm.name, "--repo", url, "--key-file", keyfile, "--keep-last", "1", "--json")
    assert pr.returncode == 0, pr.stderr
    doc = json.loads(pr.stdout)
    assert (doc["keep"], doc["remove"]) == (["full1", "diff1"], ["inc1", "inc2"])
    assert doc["reasons"]["full1"] == "needed by diff1"
    assert not [n for n in s3server.objects(bucket) if "/inc1" in n or "/inc2" in n]
    _restore_from(s3server, url, keyfile, vm.name, "diff1", workdir / "after-prune", models["diff1"])


def test_copy_cut_mid_upload_resumes_and_sends_only_what_is_missing(make_vm, repo, workdir, s3server, keyfile):
    from tests.s3 import Proxy

    rng = random.Random(7)
    vm = make_vm((64 * MiB, "qcow2"),)
    vm["vda"].write(0, rng.randbytes(56 * MiB))  # a full image of 7 frames: a multipart upload
    pull(vm.name, repo=str(repo), checkpoint="full1")
    models = {"full1": snap(vm)}
    random_writes(vm["vda"], rng)
    pull(vm.name, repo=str(repo), checkpoint="inc1", incremental="full1")
    models["inc1"] = snap(vm)
    before = tree(repo)

    bucket = s3server.bucket("lvb-resume")
    url = f"s3://{bucket}/p"
    proxy = Proxy(s3server.port)
    try:
        proxy.cut_after = 44 * MiB  # S3 goes away in the middle of the full image
        r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile,
                    endpoint=proxy.endpoint)
        err = _one_line_error(r, 5)
        assert "S3" in err
        assert tree(repo) == before
        c = s3server.client()
        listed = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not [k for k in listed if k.endswith(".point")], "a half point is visible"
        # What the server holds already: complete objects and the parts of the unfinished upload.
        held = sum(o["Size"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", []))
        for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            held += sum(p["Size"] for p in c.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])["Parts"])
        assert held > 8 * MiB, (listed, r.stderr)  # some parts made it

        proxy.restore()
        proxy.sent = 0
        r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile, "--json",
                    endpoint=proxy.endpoint)
        assert r.returncode == 0, r.stderr
        total = sum(o["Size"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", []))
        missing = total - held
        # The server received what was missing, plus HTTP requests: not what it had already.
        assert missing <= proxy.sent < missing + 2 * MiB, (missing, proxy.sent, held, total)
        assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        proxy.close()
    shutil.rmtree(repo)
    for cname, model in models.items():
        _restore_from(s3server, url, keyfile, vm.name, cname, workdir / f"resumed-{cname}", model)


def test_bucket_faults_are_one_line_and_touch_nothing(make_vm, repo, workdir, s3server, keyfile):
    vm = make_vm((4 * MiB, "qcow2"),)
    vm["vda"].write(5, b"x" * 1000)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    before = tree(repo)
    base = ("copy", vm.name, "--repo", str(repo), "--key-file", keyfile)
    err = _one_line_error(_s3_cli(s3server, *base, "--to", "s3://lvb-no-such-bucket/x"), 3)
    assert "does not exist" in err
    env = s3server.env(AWS_SECRET_ACCESS_KEY="wrong-secret")
    bucket = s3server.bucket("lvb-faults")
    r = cli(*base, "--to", f"s3://{bucket}/x", "--s3-endpoint", s3server.endpoint, env=env)
    assert "credentials" in _one_line_error(r, 5)
    r = cli(*base, "--to", f"s3://{bucket}/x", "--s3-endpoint", "http://127.0.0.1:9", env=s3server.env())
    assert "cannot reach S3" in _one_line_error(r, 5)
    loose = workdir / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--key-file", str(loose), "--to", f"s3://{bucket}/x")
    assert "readable by others" in _one_line_error(r, 2)
    r = _s3_cli(s3server, "list", vm.name, "--repo", f"s3://{bucket}/x", "--key-file", keyfile)
    assert "holds no libvbackup repository" in _one_line_error(r, 3)
    assert tree(repo) == before
    assert s3server.objects(bucket) == {}
    # Unencrypted on request: plain qcow2 objects, restorable, and their digests checked.
    r = _s3_cli(s3server, "copy", "--all", "--repo", str(repo), "--no-encrypt", "--to", f"s3://{bucket}/plain",
                "--json")
    assert r.returncode == 0, r.stderr
    assert [(p["vm"], p["checkpoint"], p["state"]) for p in json.loads(r.stdout)["points"]] == [
        (vm.name, "c1", "copied")]
    assert s3server.objects(bucket)[f"plain/{vm.name}/c1/vda.qcow2"][:4] == b"QFI\xfb"
    r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--key-file", keyfile, "--to", f"s3://{bucket}/plain")
    assert "unencrypted" in _one_line_error(r, 2)
    out = workdir / "plain"
    r = _s3_cli(s3server, "restore", vm.name, "--repo", f"s3://{bucket}/plain", "--no-encrypt", "--output", str(out),
                "--format", "raw")
    assert r.returncode == 0, r.stderr
    assert read_image(out / "vda.raw", "raw") == snap(vm)["vda"]


def test_compressed_points_restore_and_verify_from_the_bucket(make_vm, repo, workdir, s3server, keyfile):
    """Compressed clusters (pull --compress) are inflated by the bucket's reader itself."""
    rng = random.Random(11)
    vm = make_vm((12 * MiB, "qcow2"),)
    text = b"".join(b"checkpoint %d qcow2 cluster guest\n" % rng.randrange(10**6) for _ in range(60000))[:3 * MiB]
    vm["vda"].write(1 * MiB + 100, text)
    vm["vda"].write(6 * MiB, rng.randbytes(MiB))
    pull(vm.name, repo=str(repo), checkpoint="z1", compress=True)
    models = {"z1": snap(vm)}
    vm["vda"].write(2 * MiB + 5, text[:200000])
    vm["vda"].zero(7 * MiB, 64 * 1024)
    pull(vm.name, repo=str(repo), checkpoint="z2", incremental="z1", compress=True)
    models["z2"] = snap(vm)
    bucket = s3server.bucket("lvb-compressed")
    url = f"s3://{bucket}/z"
    r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile)
    assert r.returncode == 0, r.stderr
    stored = s3server.objects(bucket)[f"z/{vm.name}/z1/vda.qcow2"]
    assert len(stored) < 3 * MiB  # the compressed image went up, not an inflated one
    shutil.rmtree(repo)
    for c, model in models.items():
        _restore_from(s3server, url, keyfile, vm.name, c, workdir / f"z-{c}", model)
    ok = _s3_cli(s3server, "verify", vm.name, "--repo", url, "--key-file", keyfile)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_copy_killed_mid_upload_resumes_and_run_copies_after_each_backup(make_vm, repo, workdir, s3server, keyfile):
    import signal
    import subprocess
    import sys
    import time

    from tests.s3 import Proxy

    rng = random.Random(99)
    vm = make_vm((48 * MiB, "qcow2"),)
    vm["vda"].write(0, rng.randbytes(40 * MiB))
    pull(vm.name, repo=str(repo), checkpoint="k1")
    model = snap(vm)
    bucket = s3server.bucket("lvb-killed")
    url = f"s3://{bucket}/k"
    proxy = Proxy(s3server.port)
    try:
        p = subprocess.Popen([sys.executable, "-m", "libvbackup.cli.main", "copy", vm.name, "--repo", str(repo),
                              "--to", url, "--key-file", keyfile, "--s3-endpoint", proxy.endpoint],
                             env=s3server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proxy.sent < 24 * MiB and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGKILL)  # no clean-up at all
        p.communicate()
        # What the kernel still had to send for the dead process reaches the server: wait for quiet.
        last = -1
        while proxy.sent != last:
            last = proxy.sent
            time.sleep(1.5)
        c = s3server.client()
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert not [k for k in keys if k.endswith(".point")]
        ups = c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        held = sum(p["Size"] for u in ups for p in c.list_parts(Bucket=bucket, Key=u["Key"],
                                                                 UploadId=u["UploadId"])["Parts"])
        held += sum(o["Size"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", []))
        assert held >= 8 * MiB  # complete parts survived the kill
        proxy.sent = 0
        r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile, "--json",
                    endpoint=proxy.endpoint)
        assert r.returncode == 0, r.stderr
        total = sum(o["Size"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", []))
        assert total - held <= proxy.sent < total - held + 2 * MiB, (total, held, proxy.sent)
    finally:
        proxy.close()

    # `run` copies each VM's new points after its backup, as its policy says.
    config = workdir / "lvb.toml"
    config.write_text(f'[defaults]\nrepo = "{repo}"\ncopy_to = "{url}"\nkey_file = "{keyfile}"\n'
                      f's3_endpoint = "{s3server.endpoint}"\n[[policy]]\nmatch = "{vm.name}"\nlevel = "inc"\n')
    vm["vda"].write(5 * MiB + 1, b"after the kill")
    r = cli("run", "--config", str(config), vm.name, "--json", env=s3server.env())
    assert r.returncode == 0, r.stdout + r.stderr
    run = json.loads(r.stdout)["vms"][0]
    assert run["copy_to"] == url and run["copied"] == [run["checkpoint"]] and run["bytes_sent"] > 0
    shutil.rmtree(repo)
    _restore_from(s3server, url, keyfile, vm.name, "k1", workdir / "k1", model)
    _restore_from(s3server, url, keyfile, vm.name, run["checkpoint"], workdir / "k2", snap(vm))


def test_a_truncated_object_is_one_line_and_the_next_copy_repairs_it(make_vm, repo, workdir, s3server, keyfile):
    rng = random.Random(5)
    vm = make_vm((16 * MiB, "qcow2"),)
    vm["vda"].write(MiB + 3, rng.randbytes(10 * MiB))  # an image of two frames
    pull(vm.name, repo=str(repo), checkpoint="t1")
    bucket = s3server.bucket("lvb-truncated")
    url = f"s3://{bucket}/t"
    assert _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile).returncode == 0
    c = s3server.client()
    key = f"t/{vm.name}/t1/vda.qcow2"
    body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    c.put_object(Bucket=bucket, Key=key, Body=body[:len(body) - 1000])
    out = workdir / "truncated"
    err = _one_line_error(_s3_cli(s3server, "restore", vm.name, "--repo", url, "--key-file", keyfile,
                                  "--output", str(out)), 9)
    assert "t1/vda.qcow2" in err and "truncated" in err
    assert not out.exists() or not any(out.iterdir())
    bad = _s3_cli(s3server, "verify", vm.name, "--repo", url, "--key-file", keyfile)
    assert bad.returncode == 9 and "t1/vda.qcow2" in bad.stdout, bad.stdout + bad.stderr
    r = _s3_cli(s3server, "copy", vm.name, "--repo", str(repo), "--to", url, "--key-file", keyfile, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [p["state"] for p in doc["points"]] == ["copied"]
    assert len(body) <= doc["bytes_sent"] < len(body) + 64 * 1024  # the image again, not its checksums
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == body  # sealing is deterministic
    ok = _s3_cli(s3server, "verify", vm.name, "--repo", url, "--key-file", keyfile)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _restore_from(s3server, url, keyfile, vm.name, "t1", workdir / "repaired", snap(vm))
