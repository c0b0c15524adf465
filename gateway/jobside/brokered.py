"""S3 for a job that holds no S3 credentials: presigned URLs from its gateway, asked with its own token.

A job is code that processes a user's untrusted data, so it gets exactly the S3 access it needs:
the main job a presigned GET of its own dataset, the archive hook presigned PUTs (single objects
and multipart parts) under its own ``<output_s3_prefix>/<job_id>/``. Each request is signed with the
job's token (gateway/callbacks.py); the gateway checks the role and the key and signs only those
URLs. The S3 bytes go straight between the job and S3, never through the gateway.

``BrokeredStorage`` offers the operations of ``gateway.storage.base.JobStorage``, so stage-in and
the archive hook work on it unchanged. Failures are ``StorageError`` (the archive's retries and
``archive_failed`` handle them as they did for boto3's).
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import IO, Any

import socket
from urllib.parse import urlsplit

import requests

from gateway.callbacks import SIGNATURE_HEADER, sign, signed_body
from gateway.storage.base import PARTS_IN_MEMORY, ObjectInfo, S3Location, StorageError, parse_s3_url, part_size_for

log = logging.getLogger(__name__)

# Part URLs asked for in one request: one round trip to the gateway per this many parts.
PART_URL_BATCH = 16
# Seconds to connect and between bytes, for the gateway and for S3.
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 300.0
# A first TCP connect to the gateway: a healthy one answers in milliseconds.
PREFLIGHT_TIMEOUT_S = 10.0


class GatewayLink:
    """Signed requests from one job (its token, its role) to its gateway's storage endpoint.

    Connection errors, 429 and 5xx are retried with backoff (the gateway restarting, S3 behind it
    briefly down); a 4xx is the gateway's refusal and is raised at once with its message.
    """

    def __init__(
        self,
        url: str,
        job_id: str,
        token: str,
        *,
        session: requests.Session | None = None,
        attempts: int = 5,
        first_delay: float = 2.0,
    ) -> None:
        if not url or not token:
            raise StorageError("connect", "", "", "the job has no gateway URL or token: it cannot reach S3")
        self.url = f"{url.rstrip('/')}/jobs/{job_id}/storage"
        self.job_id = job_id
        self.token = token
        self.session = session or requests.Session()
        self.attempts = attempts
        self.first_delay = first_delay

    def preflight(self, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
        """Fail at once, naming the address, when this node cannot reach the gateway at all.

        On a cluster the job runs on a compute node that reaches services only through real
        addresses: a loopback or unresolvable callback URL would otherwise cost every retry of the
        first request before the job said anything.
        """
        parts = urlsplit(self.url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as exc:
            raise StorageError(
                "connect", "", "",
                f"this node ({socket.gethostname()}) cannot reach the gateway at {host}:{port} ({self.url}): {exc}",
            ) from exc

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            body = signed_body(self.job_id, {"type": "storage", "op": op, **fields})  # a fresh body each time
            try:
                response = self.session.post(
                    self.url,
                    data=body,
                    headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.token, body)},
                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                )
            except requests.RequestException as exc:
                problem = f"cannot reach the gateway at {self.url}: {exc}"
            else:
                if response.status_code == 200:
                    return dict(response.json())
                problem = f"the gateway at {self.url} answered {response.status_code}: {_message(response)}"
                if response.status_code < 500 and response.status_code != 429:
                    raise StorageError(op, "", str(fields.get("key", "")), problem, str(response.status_code))
            if attempt == self.attempts:
                raise StorageError(op, "", str(fields.get("key", "")), problem)
            log.warning("%s (attempt %d/%d), retrying in %.0f s", problem, attempt, self.attempts, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", ""))[:500]
    except ValueError:
        return response.text[:500]


class BrokeredStorage:
    """JobStorage through presigned URLs: the dataset (main job), the output prefix (archive hook)."""

    def __init__(self, link: GatewayLink, output_url: str = "", *, session: requests.Session | None = None) -> None:
        self.link = link
        self.output_url = output_url
        self.session = session or requests.Session()

    def _key(self, location: S3Location) -> str:
        """The key relative to the job's output prefix (the gateway re-checks it)."""
        prefix = self.output_url.rstrip("/") + "/"
        if not location.url.startswith(prefix):
            raise StorageError("PUT", location.bucket, location.key, f"outside this job's output prefix {self.output_url}")
        return location.url[len(prefix):]

    # -- reading --------------------------------------------------------------------------------

    def open_stream(self, location: S3Location) -> tuple[IO[bytes], ObjectInfo]:
        """Stream the job's dataset (the only object a main job may read)."""
        answer = self.link.call("dataset")
        if answer.get("dataset_s3_url") != location.url:
            raise StorageError("GET", location.bucket, location.key, f"the gateway serves {answer.get('dataset_s3_url')} as this job's dataset")
        return self._get(answer, location)

    def dataset_info(self, location: S3Location) -> ObjectInfo:
        """The dataset's size and ETag, without reading it: the dataset cache's key."""
        answer = self.link.call("dataset")
        if answer.get("dataset_s3_url") != location.url:
            raise StorageError("HEAD", location.bucket, location.key, f"the gateway serves {answer.get('dataset_s3_url')} as this job's dataset")
        return ObjectInfo(int(answer["size"]), str(answer.get("etag", "")))

    def open_output_archive(self) -> tuple[IO[bytes], ObjectInfo]:
        """Stream this job's archived output.tar.gz: a continuation restoring the earlier attempt's files.

        The gateway serves it only to the main job of a continued attempt, and only its own.
        """
        answer = self.link.call("restore")
        return self._get(answer, parse_s3_url(str(answer.get("s3_url", ""))))

    def open_parent_output(self) -> tuple[IO[bytes], ObjectInfo]:
        """Stream a chained job's parent's output.tar.gz (the gateway serves the recorded parent's only)."""
        answer = self.link.call("parent_output")
        return self._get(answer, parse_s3_url(str(answer.get("s3_url", ""))))

    def _get(self, answer: dict[str, Any], location: S3Location) -> tuple[IO[bytes], ObjectInfo]:
        try:
            response = requests.get(answer["url"], stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except requests.RequestException as exc:
            raise StorageError("GET", location.bucket, location.key, f"cannot reach S3: {exc}") from exc
        if response.status_code != 200:
            detail = response.text[:300]
            response.close()
            raise StorageError("GET", location.bucket, location.key, f"S3 answered {response.status_code}: {detail}", str(response.status_code))
        # The raw stream: the bytes as stored (a .tar.gz), never decoded by requests.
        return response.raw, ObjectInfo(int(answer["size"]), str(answer.get("etag", "")))

    def head(self, location: S3Location) -> ObjectInfo:
        answer = self.link.call("head", key=self._key(location))
        if not answer.get("exists"):
            raise StorageError("HEAD", location.bucket, location.key, "404 Not Found", "404")
        return ObjectInfo(int(answer["size"]), str(answer.get("etag", "")))

    # -- writing --------------------------------------------------------------------------------

    def _put(self, url: str, data: bytes, location: S3Location, content_type: str | None = None) -> str:
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            response = requests.put(url, data=data, headers=headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except requests.RequestException as exc:
            raise StorageError("PUT", location.bucket, location.key, f"cannot reach S3: {exc}") from exc
        if response.status_code != 200:
            raise StorageError("PUT", location.bucket, location.key, f"S3 answered {response.status_code}: {response.text[:300]}", str(response.status_code))
        return str(response.headers.get("ETag", ""))

    def put_bytes(self, data: bytes, location: S3Location, content_type: str = "application/octet-stream") -> None:
        url = self.link.call("put", key=self._key(location))["url"]
        self._put(url, data, location, content_type)

    def put_json(self, document: Any, location: S3Location) -> None:
        self.put_bytes(json.dumps(document, indent=2, sort_keys=True).encode(), location, "application/json")

    def upload_file(self, path: str, location: S3Location) -> None:
        with open(path, "rb") as handle:
            self.upload_stream(handle, location)

    def upload_stream(self, stream: IO[bytes], location: S3Location, *, size_hint: int | None = None) -> None:
        """Upload a stream of unknown length: one PUT if it fits a part, else a multipart upload.

        At most PARTS_IN_MEMORY parts are held at once (one being read, the rest in flight), as the
        boto3 path capped it, so the hook's memory does not grow with the output.
        """
        part_size = part_size_for(size_hint)
        chunk = _read_full(stream, part_size)
        if len(chunk) < part_size:
            self.put_bytes(chunk, location)
            return
        key = self._key(location)
        upload_id = str(self.link.call("multipart_start", key=key)["upload_id"])
        urls: dict[int, str] = {}
        etags: dict[int, str] = {}
        try:
            with ThreadPoolExecutor(max_workers=PARTS_IN_MEMORY - 1, thread_name_prefix="part-upload") as pool:
                pending: set[Future[tuple[int, str]]] = set()
                number = 1
                while chunk:
                    while len(pending) >= PARTS_IN_MEMORY - 1:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        etags.update(f.result() for f in done)
                    if number not in urls:
                        batch = list(range(number, min(number + PART_URL_BATCH, 10001)))
                        answer = self.link.call("multipart_parts", key=key, upload_id=upload_id, parts=batch)
                        urls.update({int(n): str(u) for n, u in answer["urls"].items()})
                    pending.add(pool.submit(self._put_part, urls.pop(number), chunk, number, location))
                    number += 1
                    chunk = _read_full(stream, part_size)
                for future in pending:
                    etags.update([future.result()])
            self.link.call("multipart_complete", key=key, upload_id=upload_id, parts=[[n, etags[n]] for n in sorted(etags)])
        except BaseException:
            try:
                self.link.call("multipart_abort", key=key, upload_id=upload_id)
            except StorageError as exc:
                log.warning("could not abort multipart upload of %s: %s", location.url, exc)
            raise

    def _put_part(self, url: str, data: bytes, number: int, location: S3Location) -> tuple[int, str]:
        return number, self._put(url, data, location)


def _read_full(stream: IO[bytes], size: int) -> bytes:
    """Read ``size`` bytes unless the stream ends first (a pipe returns less per read)."""
    parts: list[bytes] = []
    wanted = size
    while wanted > 0:
        piece = stream.read(wanted)
        if not piece:
            break
        parts.append(piece)
        wanted -= len(piece)
    return b"".join(parts)
