"""Stage-in: stream the dataset tarball from S3 into the job's workspace."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from gateway.jobside.extract import extract_stream
from gateway.storage.s3 import HashingReader, S3Storage, parse_s3_url

log = logging.getLogger(__name__)


def stage_in(storage: S3Storage, url: str, dest: Path, *, quota_bytes: int, max_members: int) -> dict[str, Any]:
    """Download and extract ``url`` into ``dest``; return what was staged (sizes, checksums, timing)."""
    location = parse_s3_url(url)
    started = time.time()
    body, info = storage.open_stream(location)
    if info.size > quota_bytes:
        # The compressed size alone is over the quota: refuse before reading a byte.
        raise ValueError(f"{url} is {info.size} bytes, over the stage-in quota of {quota_bytes} bytes")
    hashing = HashingReader(body)
    try:
        counts = extract_stream(hashing, dest, quota_bytes=quota_bytes, max_members=max_members)
        # tarfile stops at the end-of-archive marker; read the rest so the checksum covers the object.
        while hashing.read(1024 * 1024):
            pass
    finally:
        body.close()
    record = {
        "url": url,
        "bytes": hashing.bytes,
        "etag": info.etag,
        "sha256": hashing.sha256.hexdigest(),
        "extracted_bytes": counts.total_bytes,
        "members": counts.members,
        "seconds": round(time.time() - started, 3),
    }
    log.info("staged %s: %d bytes, %d members, %.1f s", url, hashing.bytes, counts.members, record["seconds"])
    return record


def write_record(record: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
