"""S3-compatible object storage: the only module that imports boto3.

Endpoint and credentials come the way boto3 finds them (the environment, ``~/.aws/credentials``,
``AWS_PROFILE``), plus ``endpoint`` (``--s3-endpoint``, else ``$AWS_ENDPOINT_URL``, which boto3
1.26 does not read itself). HTTPS endpoints are verified (boto3's default; ``$AWS_CA_BUNDLE``
names a private CA). Every failure becomes a RepositoryError naming the bucket and the cause, in
one line: the bucket is a repository.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import NotFound, RepositoryError, UsageError

SCHEME = "s3://"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_url(text: str | None) -> bool:
    return bool(text) and str(text).startswith(SCHEME)


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    @classmethod
    def parse(cls, url: str) -> "Location":
        if not is_url(url):
            raise UsageError(f"{url!r} is not an s3://BUCKET/PREFIX URL")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket):
            raise UsageError(f"{url!r}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
        if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise UsageError(f"{url!r}: the prefix must be plain names separated by /")
        return cls(bucket, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


class Bucket:
    """Objects under one location; names are relative to its prefix."""

    def __init__(self, location: Location, endpoint: str | None = None, connections: int = 16):
        try:
            import boto3
            import botocore.config
        except ImportError as e:
            raise RepositoryError("boto3 is not installed", "run scripts/setup (python3-boto3)") from e
        self.location = location
        self.endpoint = _endpoint(endpoint)
        config = botocore.config.Config(
            connect_timeout=10, read_timeout=60, max_pool_connections=connections,
            retries={"max_attempts": 3, "mode": "standard"})
        try:
            session = boto3.session.Session()
            self._s3 = session.client("s3", endpoint_url=self.endpoint, config=config,
                                      region_name=session.region_name or "us-east-1")
        except Exception as e:  # noqa: BLE001 - botocore's configuration errors, a bad profile
            raise RepositoryError(f"cannot configure S3 for {location.url}: {e}") from e

    # -- errors -----------------------------------------------------------------------------
    def _error(self, e: Exception, what: str) -> Exception:
        import botocore.exceptions as bx

        where = self.location.url + (f" at {self.endpoint}" if self.endpoint else "")
        if isinstance(e, bx.NoCredentialsError):
            return RepositoryError(f"no S3 credentials for {where}",
                                   "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials")
        if isinstance(e, bx.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (what == "bucket" and status == 404):
                return NotFound(f"bucket {self.location.bucket!r} does not exist at {self.endpoint or 'AWS'}",
                                "create it first")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
                return RepositoryError(f"S3 refused the credentials for {where} ({code or status})",
                                       "check the access key and secret, or the profile")
            if code in ("NoSuchKey", "404") or status == 404:
                return NotFound(f"object {what} is missing from {where}")
            return RepositoryError(f"S3 failed on {what} in {where}: {code or status}: "
                                   f"{e.response.get('Error', {}).get('Message', '')}".rstrip(": "))
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                          bx.ConnectTimeoutError)):
            return RepositoryError(f"cannot reach S3 for {where}: {e}")
        if isinstance(e, bx.SSLError):
            return RepositoryError(f"TLS to the S3 endpoint of {where} failed: {e}",
                                   "name the endpoint's CA with AWS_CA_BUNDLE")
        if isinstance(e, bx.BotoCoreError):
            return RepositoryError(f"S3 failed on {what} in {where}: {e}")
        return e

    def _call(self, what: str, fn, **kw):
        try:
            return fn(Bucket=self.location.bucket, **kw)
        except Exception as e:  # noqa: BLE001 - translated, or re-raised unchanged
            raise self._error(e, what) from e

    # -- objects ----------------------------------------------------------------------------
    def check(self) -> None:
        """The bucket exists and the credentials open it."""
        self._call("bucket", self._s3.head_bucket)

    def get(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or ``[start, end)`` of them."""
        kw = {"Key": self.location.key(name)}
        if start is not None:
            kw["Range"] = f"bytes={start}-{end - 1}"
        body = self._call(name, self._s3.get_object, **kw)["Body"]
        try:
            return body.read()
        except Exception as e:  # noqa: BLE001
            raise self._error(e, name) from e
        finally:
            body.close()

    def head(self, name: str) -> int | None:
        """The object's size, None when there is none."""
        try:
            return self._call(name, self._s3.head_object, Key=self.location.key(name))["ContentLength"]
        except NotFound:
            return None

    def put(self, name: str, data: bytes) -> None:
        self._call(name, self._s3.put_object, Key=self.location.key(name), Body=data)

    def list(self, prefix: str = "") -> dict[str, int]:
        """{name: size} of the objects whose names start with ``prefix``."""
        out: dict[str, int] = {}
        token = None
        full = self.location.key(prefix) if prefix else (self.location.prefix + "/" if self.location.prefix else "")
        cut = len(self.location.prefix) + 1 if self.location.prefix else 0
        while True:
            kw = {"Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("listing", self._s3.list_objects_v2, **kw)
            for o in page.get("Contents", []):
                out[o["Key"][cut:]] = o["Size"]
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def delete(self, names: list[str]) -> None:
        for i in range(0, len(names), 1000):
            batch = [{"Key": self.location.key(n)} for n in names[i:i + 1000]]
            reply = self._call("deletion", self._s3.delete_objects, Delete={"Objects": batch, "Quiet": True})
            if reply.get("Errors"):
                e = reply["Errors"][0]
                raise RepositoryError(f"S3 did not delete {e.get('Key')} from {self.location.url}: "
                                      f"{e.get('Code')} {e.get('Message', '')}".rstrip())

    # -- multipart uploads ------------------------------------------------------------------
    def uploads(self, name: str) -> list[str]:
        """Ids of the unfinished multipart uploads of object ``name``, oldest first."""
        key = self.location.key(name)
        page = self._call("uploads", self._s3.list_multipart_uploads, Prefix=key)
        ups = [u for u in page.get("Uploads", []) if u["Key"] == key]
        return [u["UploadId"] for u in sorted(ups, key=lambda u: u["Initiated"])]

    def parts(self, name: str, upload: str) -> dict[int, tuple[int, str]]:
        """{part number: (size, ETag without quotes)} of an unfinished upload."""
        out: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            page = self._call(name, self._s3.list_parts, Key=self.location.key(name), UploadId=upload,
                              PartNumberMarker=marker)
            for p in page.get("Parts", []):
                out[p["PartNumber"]] = (p["Size"], p["ETag"].strip('"'))
            if not page.get("IsTruncated"):
                return out
            marker = page.get("NextPartNumberMarker", 0)

    def start_upload(self, name: str) -> str:
        return self._call(name, self._s3.create_multipart_upload, Key=self.location.key(name))["UploadId"]

    def upload_part(self, name: str, upload: str, number: int, data: bytes) -> str:
        reply = self._call(name, self._s3.upload_part, Key=self.location.key(name), UploadId=upload,
                           PartNumber=number, Body=data)
        return reply["ETag"].strip('"')

    def complete_upload(self, name: str, upload: str, etags: list[str]) -> None:
        parts = [{"PartNumber": i + 1, "ETag": f'"{t}"'} for i, t in enumerate(etags)]
        self._call(name, self._s3.complete_multipart_upload, Key=self.location.key(name), UploadId=upload,
                   MultipartUpload={"Parts": parts})

    def abort_upload(self, name: str, upload: str) -> None:
        try:
            self._call(name, self._s3.abort_multipart_upload, Key=self.location.key(name), UploadId=upload)
        except NotFound:
            pass
