"""s3:// URLs (bucket.Location, pure) and the bucket layout's names (offsite)."""

from __future__ import annotations

import pytest

from libvbackup import offsite
from libvbackup.bucket import Location, is_url
from libvbackup.errors import UsageError
from libvbackup.manifest import PointDisk


def test_locations_parse_and_name_their_objects():
    loc = Location.parse("s3://backups/site1/")
    assert (loc.bucket, loc.prefix, loc.url) == ("backups", "site1", "s3://backups/site1")
    assert loc.key("vm1/c1.point") == "site1/vm1/c1.point"
    bare = Location.parse("s3://my.bucket-2")
    assert (bare.prefix, bare.key("libvbackup.json"), bare.url) == ("", "libvbackup.json", "s3://my.bucket-2")
    assert is_url("s3://b1/x") and not is_url("/backups") and not is_url(None)
    for bad, words in (("/backups", "not an s3://"), ("s3://B/x", "not a valid bucket"), ("s3://ab", "not a valid"),
                       ("s3://bucket/a//b", "plain names"), ("s3://bucket/a/../b", "plain names")):
        with pytest.raises(UsageError, match=words):
            Location.parse(bad)


def test_a_point_is_its_images_and_their_digests():
    pd = PointDisk(name="vda", image="c2/vda.qcow2", backing="c1/vda.qcow2", size=1 << 20)
    assert offsite.disk_files(pd) == ("c2/vda.qcow2", "c2/vda.sums")
    assert offsite.point_name("vm1", "c2") == "vm1/c2.point"
    assert offsite.file_name("vm1", "c2/vda.qcow2") == "vm1/c2/vda.qcow2"
    assert offsite.files_digest([b"\0" * 32]) != offsite.files_digest([b"\0" * 32, b"\0" * 32])
