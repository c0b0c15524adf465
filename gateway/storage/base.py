"""What S3 access looks like to its users, without boto3: locations, object facts, the one error.

The job side imports only this module and gateway/jobside/brokered.py (presigned URLs), so a
compute node's job holds no S3 credentials and loads no boto3; the gateway's S3Storage
(gateway/storage/s3.py) implements the same ``JobStorage`` operations with its credentials.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import IO, Any, Protocol

from gateway.textrules import text_problem

# S3 bucket names as S3 defines them (3-63 of a-z, 0-9, '.', '-'): the one pattern, for parsing and
# for checking; check_s3_url adds what the pattern cannot say (no IP addresses, no '..').
_BUCKET_PATTERN = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_BUCKET = re.compile(_BUCKET_PATTERN)
_S3_URL = re.compile(rf"s3://(?P<bucket>{_BUCKET_PATTERN})(?:/(?P<key>.*))?")
_IP_LIKE = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
MAX_S3_KEY_BYTES = 1024


class StorageError(Exception):
    """An S3 operation failed; the message names the operation, bucket and key."""

    def __init__(self, operation: str, bucket: str, key: str, detail: str, code: str = "") -> None:
        super().__init__(f"S3 {operation} s3://{bucket}/{key} failed: {detail}")
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.code = code


def check_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key``, refusing what S3, a proxy or a path normaliser could read otherwise.

    Keys may hold spaces, quotes and shell characters (scripts quote every value), but not what
    gateway/textrules.py refuses (control and Unicode format characters, line separators: a key is
    shown to admins and in scripts), '%' (percent-encoding), '\\', or empty, '.' or '..' segments:
    an HTTP layer that normalises ``/bucket/../other/x`` would reach another bucket.
    """
    if not url.startswith("s3://"):
        raise ValueError("must be an s3://bucket/key URL (no other scheme)")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"bucket {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.' or '-')")
    if ".." in bucket or ".-" in bucket or "-." in bucket or _IP_LIKE.fullmatch(bucket):
        raise ValueError(f"bucket {bucket!r} is not a valid S3 bucket name (no '..', no IP address)")
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        raise ValueError(f"bucket {bucket!r} uses a prefix or suffix S3 reserves")
    problem = text_problem(key)
    if problem is not None:
        raise ValueError(f"the key must not contain {problem}")
    if "%" in key or "\\" in key:
        raise ValueError("the key must not contain '%' (percent-encoding) or '\\'; S3 keys are given as they are")
    if len(key.encode()) > MAX_S3_KEY_BYTES:
        raise ValueError(f"the key is longer than {MAX_S3_KEY_BYTES} bytes")
    segments = key.rstrip("/").split("/") if key else []
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError("the key must not contain empty, '.' or '..' segments")
    return bucket, key


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> "S3Location":
        prefix = self.key.rstrip("/")
        return S3Location(self.bucket, f"{prefix}/{name}" if prefix else name)


def parse_s3_url(url: str) -> S3Location:
    """Parse ``s3://bucket/key``; raise ValueError saying what is wrong."""
    match = _S3_URL.fullmatch(url)
    if not match:
        raise ValueError("must be an s3://bucket/key URL with a valid bucket name")
    return S3Location(match.group("bucket"), match.group("key") or "")


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str


class HashingReader:
    """Wrap a readable stream, counting bytes and computing sha256 as data passes through."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self.sha256.update(chunk)
        self.bytes += len(chunk)
        return chunk


# S3 allows at most 10,000 parts: 64 MiB parts reach ~640 GB, and larger streams get larger parts.
PART_SIZE = 64 * 1024**2
MAX_PARTS = 9000  # under S3's 10,000, so a size hint that is a little short still fits
# Parts held in memory at once while uploading a stream (a fast producer must not fill the RAM).
PARTS_IN_MEMORY = 4


def part_size_for(size_hint: int | None) -> int:
    """The multipart part size for a stream of about ``size_hint`` bytes."""
    if size_hint and size_hint / MAX_PARTS > PART_SIZE:
        return int(size_hint / MAX_PARTS) + 1
    return PART_SIZE


class JobStorage(Protocol):
    """The S3 operations the job side (stage-in, archive hook) uses."""

    def head(self, location: S3Location) -> ObjectInfo: ...

    def open_stream(self, location: S3Location) -> tuple[IO[bytes], ObjectInfo]: ...

    def upload_stream(self, stream: IO[bytes], location: S3Location, *, size_hint: int | None = None) -> None: ...

    def upload_file(self, path: str, location: S3Location) -> None: ...

    def put_json(self, document: Any, location: S3Location) -> None: ...
