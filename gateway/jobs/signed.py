"""Signed requests from jobs: their check (token, role, time, lifetime, replay), events and S3 access.

A job holds no credential but its own token (gateway/callbacks.py). With it the main job reports
progress and gets a presigned GET of its dataset; the archive hook reports metadata and gets
presigned PUTs under the job's recorded output prefix. Nothing a job sends can name another job's
objects: every location comes from the record the gateway wrote at submit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

from gateway.callbacks import (
    MAX_CLOCK_SKEW_S,
    MAX_EVENT_AGE_S,
    ROLE_ARCHIVE,
    ROLE_EVENTS,
    ROLE_MAIN,
    ROLE_STORAGE,
    TOKEN_GRACE_S,
    signing_role,
)
from gateway.errors import RequestError
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import TERMINAL_VALUES
from gateway.storage.base import S3Location, StorageError, check_s3_url, parse_s3_url
from gateway.storage.s3 import S3Storage
from gateway.database import JobRecord, JobStore

log = logging.getLogger(__name__)


class EventRefused(Exception):
    """A job's signed request failed its signature, role, freshness, lifetime or replay check."""


# How long a presigned URL handed to a job stays valid. A GET or PUT that has started carries on
# past it; a job asks again for anything it starts later (the archive asks for parts as it goes).
PRESIGNED_URL_S = 3600
MAX_PARTS_PER_REQUEST = 100
# What S3 servers answer a HEAD or GET of a missing object with.
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _part_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10000


def job_output_location(record: JobRecord, key: Any) -> S3Location:
    """``key`` under the job's own output prefix as recorded at submit; refused if it would leave it."""
    if not isinstance(key, str) or not key:
        raise RequestError("key", "must name an object under the job's output prefix")
    prefix = parse_s3_url(record.output_url)
    try:
        bucket, full_key = check_s3_url(prefix.child(key).url)
    except ValueError as exc:
        raise RequestError("key", str(exc)) from exc
    if bucket != prefix.bucket or not full_key.startswith(prefix.key.rstrip("/") + "/"):
        raise RequestError("key", f"{key!r} is outside the job's output prefix {record.output_url}")
    return S3Location(bucket, full_key)


def output_archive_location(record: JobRecord) -> S3Location:
    """Where the hook uploads the output, as the gateway recorded it at submit."""
    return parse_s3_url(record.output_url).child("output.tar.gz")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def verify_job_request(store: JobStore, secret: bytes, job_id: str, body: bytes, signature: str) -> tuple[JobRecord, str, dict[str, Any]]:
    """Check a job's signed request; return its record, the signing role and the parsed body.

    Refused (EventRefused): no signature of this job's tokens, another job's id, a time more
    than MAX_EVENT_AGE_S old or MAX_CLOCK_SKEW_S ahead, a job that ended more than
    TOKEN_GRACE_S ago, or a body taken before (a replay).
    """
    # The signature first: without it, nobody learns even whether the job exists.
    role = signing_role(secret, job_id, body, signature) if secret else None
    if role is None:
        raise EventRefused("bad or missing signature")
    record = store.get(job_id)
    try:
        event = json.loads(body, parse_constant=_refuse_constant)
        if not isinstance(event, dict):
            raise TypeError("the body is not a JSON object")
        sent_at = float(event["sent_at"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # A job holds a valid token and may still send anything: deep nesting, huge numbers.
        raise RequestError("event", f"not a valid event: {type(exc).__name__}: {str(exc)[:200]}") from exc
    now = time.time()
    if not math.isfinite(sent_at):
        raise EventRefused("event has no valid time")
    if event.get("job_id") != job_id or now - sent_at > MAX_EVENT_AGE_S:
        raise EventRefused("event is for another job or too old")
    if sent_at > now + MAX_CLOCK_SKEW_S:
        raise EventRefused(f"event is dated {sent_at - now:.0f} s in the future (more than {MAX_CLOCK_SKEW_S:g} s of clock skew)")
    ended_at = record.ended_at if record.ended_at is not None else record.updated_at
    if record.state in TERMINAL_VALUES and now - ended_at > TOKEN_GRACE_S:
        raise EventRefused(f"job {job_id} ended {now - ended_at:.0f} s ago; its tokens work for {TOKEN_GRACE_S:g} s after the end")
    digest = hashlib.sha256(body).hexdigest()
    if not store.first_sighting(job_id, digest, now, forget_before=now - MAX_EVENT_AGE_S - MAX_CLOCK_SKEW_S):
        raise EventRefused("this signed body was already taken (a replay)")
    return record, role, event

def apply_event(store: JobStore, record: JobRecord, role: str, event: dict[str, Any]) -> None:
    """Store a verified event: progress from the main job, metadata from the hook."""
    job_id = record.job_id
    kind, data = event.get("type"), event.get("data")
    if kind not in ("progress", "metadata") or not isinstance(data, dict):
        raise RequestError("event.type", f"unknown event type {kind!r} (progress, metadata)")
    if kind not in ROLE_EVENTS[role]:
        raise EventRefused(f"the {role} job's token may not send {kind} events")
    if kind == "progress":
        store.update(job_id, progress_json=json.dumps(data, sort_keys=True))
    else:
        # What the job cost is the gateway's to say (from Slurm's accounting, gateway/jobs/usage.py):
        # a job cannot report its own, and one already costed keeps it.
        data.pop("usage", None)
        if record.usage is not None:
            data["usage"] = record.usage
        store.update(job_id, metadata_json=json.dumps(data, sort_keys=True))
    log.info("job %s: %s event", job_id, kind)


def storage_answer(storage: S3Storage | None, record: JobRecord, role: str, event: dict[str, Any]) -> dict[str, Any]:
    """Answer a verified storage request: presigned URLs for the job's own dataset and output prefix only."""
    op = event.get("op")
    if event.get("type") != "storage" or op not in ROLE_STORAGE[ROLE_MAIN] | ROLE_STORAGE[ROLE_ARCHIVE]:
        raise RequestError("op", f"unknown storage operation {op!r}")
    if op not in ROLE_STORAGE[role]:
        raise EventRefused(f"the {role} job's token may not {op}")
    if storage is None:
        raise StorageError(str(op), "", "", "the gateway has no S3 storage configured")
    if op == "dataset":
        location = parse_s3_url(JobSpec.from_json(record.job_json).dataset_s3_url)
        try:
            info = storage.head(location)
        except StorageError as exc:
            if exc.code in NOT_FOUND_CODES:  # the job's fault, not S3's: no retry helps
                raise RequestError("dataset_s3_url", f"{location.url} does not exist (NoSuchKey)") from exc
            raise
        url = storage.presigned_get(location, PRESIGNED_URL_S, for_job=True)
        return {"url": url, "dataset_s3_url": location.url, "size": info.size, "etag": info.etag}
    if op in ("restore", "parent_output"):
        spec = JobSpec.from_json(record.job_json)
        if op == "restore":
            # Only a continuation needs the earlier attempt's output back, and only its own job's.
            if spec.attempt.number < 2:
                raise EventRefused("only a continued attempt may restore the job's archived output")
            location = output_archive_location(record)
        else:
            # The parent the gateway checked at submit (the same user's), recorded in the spec.
            if spec.chain is None:
                raise EventRefused("only a chained job may read its parent's output")
            location = parse_s3_url(spec.chain.output_url)
        try:
            info = storage.head(location)
        except StorageError as exc:
            if exc.code in NOT_FOUND_CODES:
                raise RequestError(op, f"{location.url} does not exist: that attempt archived no output") from exc
            raise
        return {"url": storage.presigned_get(location, PRESIGNED_URL_S, for_job=True), "s3_url": location.url, "size": info.size, "etag": info.etag}
    location = job_output_location(record, event.get("key"))
    if op == "head":
        try:
            info = storage.head(location)
        except StorageError as exc:
            if exc.code in NOT_FOUND_CODES:
                return {"exists": False}
            raise
        return {"exists": True, "size": info.size, "etag": info.etag}
    if op == "put":
        return {"url": storage.presigned_put(location, PRESIGNED_URL_S)}
    if op == "multipart_start":
        return {"upload_id": storage.start_multipart(location)}
    upload_id = event.get("upload_id")
    if not isinstance(upload_id, str) or not upload_id or len(upload_id) > 1024:
        raise RequestError("upload_id", "must be the id multipart_start returned")
    if op == "multipart_parts":
        parts = event.get("parts")
        if not isinstance(parts, list) or not 0 < len(parts) <= MAX_PARTS_PER_REQUEST or not all(_part_number(p) for p in parts):
            raise RequestError("parts", f"must be 1-{MAX_PARTS_PER_REQUEST} part numbers between 1 and 10000")
        return {"urls": {str(n): storage.presigned_part(location, upload_id, n, PRESIGNED_URL_S) for n in parts}}
    if op == "multipart_complete":
        parts = event.get("parts")
        if not isinstance(parts, list) or not parts or not all(
            isinstance(p, list) and len(p) == 2 and _part_number(p[0]) and isinstance(p[1], str) for p in parts
        ):
            raise RequestError("parts", "must be a list of [part number, ETag] pairs")
        info = storage.complete_multipart(location, upload_id, [(int(n), etag) for n, etag in parts])
        return {"size": info.size, "etag": info.etag}
    storage.abort_multipart(location, upload_id)
    return {}
