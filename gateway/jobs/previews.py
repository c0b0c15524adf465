"""A job's preview images (issue 15): the listing and the PNGs, read for the API.

While a job runs, its job side writes PNGs and ``index.json`` to ``<log_dir>/previews/``; the
archive hook copies them to ``<output_url>previews/<name>`` and lists them in metadata.json's
``previews``. The listing comes from the log dir's index while it exists, else from the stored
metadata; an image from the log dir while its file is there, else from S3.

Everything here was written by the job, which runs as the job's own account and owns its log
directory: so nothing is trusted that a job could aim elsewhere. Names must match ``NAME`` and be
listed; files are opened below the (gateway-owned) log root one component at a time without
following symlinks, must be regular files and small; the bytes must be a PNG whose sha256 is the
listed one; S3 is read at the location the gateway recorded at submit (``output_url``), never at
a URL from metadata.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.database import JobNotFound, JobRecord
from gateway.jobfiles import read_job_file
from gateway.jobs.spec import JobSpec
from gateway.storage.base import StorageError, parse_s3_url

log = logging.getLogger(__name__)

PREVIEWS_DIR = "previews"
INDEX_FILE = "index.json"
INDEX_SCHEMA_VERSION = 1
# it<iteration, at least 3 digits>-<kind>.png, ASCII only: no path separators, no dots but the suffix.
NAME = re.compile(r"it[0-9]{3,6}-(?:classes|map-class[0-9]{1,4}|fsc|map|history)\.png", re.ASCII)
NAME_RULE = "must be it<NNN>-<kind>.png, kind one of classes, map-class<K>, fsc, map, history"
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_INDEX_BYTES = 4 * 1024 * 1024
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_ENTRIES = 10_000
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
FIELDS = ("name", "iteration", "kind", "width", "height", "bytes", "sha256")


def valid_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Preview:
    """One listed preview, as the API shows it (the archived entry's url is never passed on)."""

    name: str
    iteration: int
    kind: str
    width: int
    height: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_entry(cls, entry: Any) -> Preview | None:
        """The entry if every field is as the contract says (and the name matches its iteration and kind)."""
        if not isinstance(entry, dict):
            return None
        name, kind, digest = entry.get("name"), entry.get("kind"), entry.get("sha256")
        numbers = [entry.get(f) for f in ("iteration", "width", "height", "bytes")]
        if not (isinstance(name, str) and valid_name(name) and isinstance(kind, str) and isinstance(digest, str)):
            return None
        if not all(type(n) is int and n >= 0 for n in numbers) or not _SHA256.fullmatch(digest):
            return None
        iteration, width, height, size = numbers
        if name != f"it{iteration:03d}-{kind}.png" or size > MAX_IMAGE_BYTES:
            return None
        return cls(name, iteration, kind, width, height, size, digest)


@dataclass(frozen=True)
class Listing:
    previews: list[Preview]
    updated_at: str | None = None  # the running job's index says when it last wrote it

    @property
    def latest_iteration(self) -> int | None:
        return max((p.iteration for p in self.previews), default=None)

    def find(self, name: str) -> Preview | None:
        return next((p for p in self.previews if p.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "previews": [p.as_dict() for p in self.previews],
            "latest_iteration": self.latest_iteration,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class PreviewImage:
    """A listed preview whose bytes are read only when asked (a 304 reads nothing)."""

    preview: Preview
    read: Callable[[], bytes]

    @property
    def etag(self) -> str:
        return self.preview.sha256


def _order(preview: Preview) -> tuple[int, int, int]:
    """By iteration; within one as the job side lists them: classes, map-class1..K, map, fsc, history."""
    kind = preview.kind
    if kind.startswith("map-class"):
        return preview.iteration, 1, int(kind[len("map-class"):])
    return preview.iteration, {"classes": 0, "map": 2, "fsc": 3, "history": 4}.get(kind, 5), 0


def _entries(raw: Any) -> list[Preview]:
    if not isinstance(raw, list):
        return []
    found: dict[str, Preview] = {}
    for entry in raw[:MAX_ENTRIES]:
        preview = Preview.from_entry(entry)
        if preview is None:
            log.debug("ignoring a preview entry that breaks the contract: %.200r", entry)
        elif preview.name not in found:
            found[preview.name] = preview
    return sorted(found.values(), key=_order)


class PreviewReader:
    """Reads a record's previews from its log dir and, once archived, from S3."""

    def __init__(self, log_root: str, storage: Any | None) -> None:
        self.log_root = Path(log_root) if log_root else None
        self.storage = storage

    # -- the log dir, opened without following a job's symlinks ---------------------------------

    def _read_local(self, record: JobRecord, name: str, limit: int) -> bytes | None:
        """``<log_dir>/previews/<name>``'s bytes, or None if it is not there as a regular file of at most ``limit`` bytes."""
        log_dir = JobSpec.from_json(record.job_json).log_dir
        if not log_dir:
            return None
        # The job's account owns its log dir: read it as a job file (gateway/jobfiles.py).
        return read_job_file(self.log_root, Path(log_dir) / PREVIEWS_DIR / name, limit)

    # -- the listing ------------------------------------------------------------------------------

    def listing(self, record: JobRecord) -> Listing:
        text = self._read_local(record, INDEX_FILE, MAX_INDEX_BYTES)
        if text is not None:
            try:
                index = json.loads(text)
                version = index.get("schema_version") if isinstance(index, dict) else None
                if version != INDEX_SCHEMA_VERSION:
                    raise ValueError(f"not an index of schema_version {INDEX_SCHEMA_VERSION} (schema_version {version!r})")
                updated = index.get("updated_at")
                return Listing(_entries(index.get("previews")), updated if isinstance(updated, str) else None)
            except (ValueError, RecursionError) as exc:
                log.warning("job %s: unreadable %s/%s (%s); using the archived list", record.job_id, PREVIEWS_DIR, INDEX_FILE, exc)
        metadata = record.metadata
        return Listing(_entries(metadata.get("previews") if isinstance(metadata, dict) else None))

    # -- one image ----------------------------------------------------------------------------------

    def image(self, record: JobRecord, name: str) -> PreviewImage:
        """A listed preview, or JobNotFound naming what is wrong."""
        if not valid_name(name):
            raise JobNotFound(f"{record.job_id} has no preview {name!r} (a preview name {NAME_RULE})")
        preview = self.listing(record).find(name)
        if preview is None:
            raise JobNotFound(f"{record.job_id} has no preview {name!r} (state {record.state})")
        return PreviewImage(preview, lambda: self._image_bytes(record, preview))

    def _image_bytes(self, record: JobRecord, preview: Preview) -> bytes:
        """The log dir's copy while it is there, else the archived one; either must be the listed PNG."""
        for source, read in (("the log dir", self._read_local), ("S3", self._read_s3)):
            body = read(record, preview.name, MAX_IMAGE_BYTES)
            if body is None:
                continue
            if body.startswith(PNG_SIGNATURE) and hashlib.sha256(body).hexdigest() == preview.sha256:
                return body
            log.warning("job %s: preview %s in %s is not the listed PNG (signature or sha256 differs); not served", record.job_id, preview.name, source)
        raise JobNotFound(f"{record.job_id}'s preview {preview.name!r} is listed but not available (state {record.state})")

    def _read_s3(self, record: JobRecord, name: str, limit: int) -> bytes | None:
        if self.storage is None or not record.output_url:
            return None
        # Where the gateway said the output goes at submit, never a URL the job reported.
        location = parse_s3_url(record.output_url).child(f"{PREVIEWS_DIR}/{name}")
        try:
            stream, info = self.storage.open_stream(location)
        except StorageError as exc:
            if exc.code in MISSING_CODES:
                return None
            raise  # S3 not answering: the one 503
        try:
            data = bytes(stream.read(limit + 1)) if info.size <= limit else b""
            if info.size > limit or len(data) > limit:
                log.warning("job %s: %s is over the preview limit of %d bytes; not served", record.job_id, location.url, limit)
                return None
            return data
        finally:
            stream.close()
