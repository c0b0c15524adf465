"""S3 access through plain boto3 with a configurable endpoint (AWS, MinIO, Ceph, or the local server).

The client is built once and passed in; botocore exceptions are translated here, once, into
``StorageError`` carrying the bucket, key and operation. Credentials come from boto3's standard
chain (environment, config files, instance role) and are never passed around by this code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import IO, Any, Callable, TypeVar

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

log = logging.getLogger(__name__)

_S3_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<key>.*))?")
T = TypeVar("T")


class StorageError(Exception):
    """An S3 operation failed; the message names the operation, bucket and key."""

    def __init__(self, operation: str, bucket: str, key: str, detail: str, code: str = "") -> None:
        super().__init__(f"S3 {operation} s3://{bucket}/{key} failed: {detail}")
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.code = code


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


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    connect_timeout: float = 60.0,
    read_timeout: float = 60.0,
    attempts: int = 5,
) -> Any:
    """Build a boto3 S3 client; s3v4 signing so presigned URLs work on every server we target."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or None,
        config=Config(
            signature_version="s3v4",
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        ),
    )


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


def transfer_config_for(size_hint: int | None = None) -> TransferConfig:
    """64 MiB parts (8 MiB floor) keep under S3's 10,000-part limit up to ~640 GB; 4 in memory caps RSS."""
    chunk = 64 * 1024**2
    if size_hint and size_hint / 9000 > chunk:
        chunk = int(size_hint / 9000) + 1
    config = TransferConfig(multipart_chunksize=chunk, multipart_threshold=chunk, max_concurrency=4)
    # Without this cap upload_fileobj of a fast non-seekable stream buffered ~730 MiB (shared notes).
    config.max_in_memory_upload_chunks = 4
    return config


class S3Storage:
    """The few S3 operations the gateway and its jobs use."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _call(self, operation: str, location: S3Location, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            raise StorageError(operation, location.bucket, location.key, f"{code} {error.get('Message', '')}".strip(), code) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StorageError(operation, location.bucket, location.key, str(exc)) from exc

    def head(self, location: S3Location) -> ObjectInfo:
        response = self._call("HEAD", location, lambda: self.client.head_object(Bucket=location.bucket, Key=location.key))
        return ObjectInfo(int(response["ContentLength"]), str(response.get("ETag", "")).strip('"'))

    def open_stream(self, location: S3Location) -> tuple[IO[bytes], ObjectInfo]:
        response = self._call("GET", location, lambda: self.client.get_object(Bucket=location.bucket, Key=location.key))
        info = ObjectInfo(int(response["ContentLength"]), str(response.get("ETag", "")).strip('"'))
        return response["Body"], info

    def upload_stream(self, stream: IO[bytes], location: S3Location, *, size_hint: int | None = None) -> None:
        config = transfer_config_for(size_hint)
        self._call(
            "PUT", location, lambda: self.client.upload_fileobj(stream, location.bucket, location.key, Config=config)
        )

    def upload_file(self, path: str, location: S3Location) -> None:
        self._call("PUT", location, lambda: self.client.upload_file(path, location.bucket, location.key))

    def put_bytes(self, data: bytes, location: S3Location, content_type: str = "application/octet-stream") -> None:
        self._call(
            "PUT",
            location,
            lambda: self.client.put_object(Bucket=location.bucket, Key=location.key, Body=data, ContentType=content_type),
        )

    def put_json(self, document: Any, location: S3Location) -> None:
        self.put_bytes(json.dumps(document, indent=2, sort_keys=True).encode(), location, "application/json")

    def presigned_get(self, location: S3Location, expires_s: int = 3600) -> str:
        """A URL anyone holding it can GET for ``expires_s`` seconds (no S3 credentials needed)."""
        return str(
            self._call(
                "PRESIGN",
                location,
                lambda: self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": location.bucket, "Key": location.key}, ExpiresIn=expires_s
                ),
            )
        )

    def get_bytes(self, location: S3Location) -> bytes:
        response = self._call("GET", location, lambda: self.client.get_object(Bucket=location.bucket, Key=location.key))
        return bytes(response["Body"].read())

    def ensure_bucket(self, bucket: str) -> None:
        location = S3Location(bucket, "")
        try:
            self._call("HEAD bucket", location, lambda: self.client.head_bucket(Bucket=bucket))
        except StorageError:
            self._call("CREATE bucket", location, lambda: self.client.create_bucket(Bucket=bucket))
