"""S3 access through plain boto3 with a configurable endpoint (AWS, MinIO, Ceph, or the local server).

The client is built once and passed in; botocore exceptions are translated here, once, into
``StorageError`` carrying the bucket, key and operation. Credentials come from boto3's standard
chain (environment, config files, instance role) and are never passed around by this code.
"""
from __future__ import annotations

import json
import logging
from typing import IO, Any, Callable, TypeVar

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from gateway.storage.base import (  # noqa: F401  (HashingReader, parse_s3_url: re-exported)
    PARTS_IN_MEMORY,
    HashingReader,
    ObjectInfo,
    S3Location,
    StorageError,
    check_s3_url,
    parse_s3_url,
    part_size_for,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def transfer_config_for(size_hint: int | None = None) -> TransferConfig:
    """Parts of part_size_for(size_hint), PARTS_IN_MEMORY in memory (caps RSS), as many uploads at once."""
    chunk = part_size_for(size_hint)
    config = TransferConfig(multipart_chunksize=chunk, multipart_threshold=chunk, max_concurrency=PARTS_IN_MEMORY)
    # Without this cap upload_fileobj of a fast non-seekable stream buffered ~730 MiB (shared notes).
    config.max_in_memory_upload_chunks = PARTS_IN_MEMORY
    return config


class S3Storage:
    """The few S3 operations the gateway and its jobs use."""

    def __init__(self, client: Any, *, job_client: Any | None = None) -> None:
        self.client = client
        # Signs the URLs handed to jobs ([s3] job_endpoint_url): a presigned URL names its host,
        # and the nodes may reach S3 by another address than the gateway does.
        self.job_client = job_client or client

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

    def presigned_get(self, location: S3Location, expires_s: int = 3600, *, for_job: bool = False) -> str:
        """A URL anyone holding it can GET for ``expires_s`` seconds (no S3 credentials needed)."""
        return self._presign("get_object", location, expires_s, for_job=for_job)

    def _presign(self, method: str, location: S3Location, expires_s: int, *, for_job: bool = True, **params: Any) -> str:
        client = self.job_client if for_job else self.client
        return str(
            self._call(
                "PRESIGN",
                location,
                lambda: client.generate_presigned_url(
                    method, Params={"Bucket": location.bucket, "Key": location.key, **params}, ExpiresIn=expires_s
                ),
            )
        )

    def presigned_put(self, location: S3Location, expires_s: int) -> str:
        """A URL that lets its holder (a job) PUT this one object, for ``expires_s`` seconds."""
        return self._presign("put_object", location, expires_s)

    def start_multipart(self, location: S3Location) -> str:
        """Begin a multipart upload; return its upload id."""
        response = self._call(
            "CREATE multipart", location, lambda: self.client.create_multipart_upload(Bucket=location.bucket, Key=location.key)
        )
        return str(response["UploadId"])

    def presigned_part(self, location: S3Location, upload_id: str, part: int, expires_s: int) -> str:
        """A URL that lets its holder PUT one part of one multipart upload of this object."""
        return self._presign("upload_part", location, expires_s, UploadId=upload_id, PartNumber=part)

    def complete_multipart(self, location: S3Location, upload_id: str, parts: list[tuple[int, str]]) -> ObjectInfo:
        """Join the uploaded parts ((number, ETag), in order) into the object; return its size and ETag."""
        self._call(
            "COMPLETE multipart",
            location,
            lambda: self.client.complete_multipart_upload(
                Bucket=location.bucket,
                Key=location.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in parts]},
            ),
        )
        return self.head(location)

    def abort_multipart(self, location: S3Location, upload_id: str) -> None:
        self._call(
            "ABORT multipart",
            location,
            lambda: self.client.abort_multipart_upload(Bucket=location.bucket, Key=location.key, UploadId=upload_id),
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
