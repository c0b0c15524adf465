"""A job record as the API shows it: what JobSchema and JobSummarySchema read from one record."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flask import url_for

from gateway.api.schemas import utc
from gateway.jobs.continuation import attempts_view
from gateway.jobs.states import JobState


@dataclass(frozen=True)
class PortalJob:
    """A JobRecord as JobSchema reads it: the schema takes every field it shares with the record
    from the record itself (``status`` is its ``state``); only what the record does not hold as a
    field (the request's values, Slurm's ids, the next poll, the seed's base64 copy) is named here."""

    record: Any
    next_poll_s: float | None = None
    children: list[str] | None = None
    webhook: dict[str, Any] | None = None

    @property
    def wait(self) -> dict[str, Any] | None:
        record = self.record
        if record.state != JobState.QUEUED.value:
            return None
        return {"pending_reason": record.pending_reason, "estimated_start": utc(record.estimated_start_at),
                "estimate_source": record.estimate_source, "estimated": True}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.record, name)

    @property
    def status(self) -> str:
        return str(self.record.state)

    @property
    def num_mpi(self) -> Any:
        return self.record.request.get("num_mpi")

    @property
    def partition(self) -> Any:
        return self.record.request.get("partition")

    @property
    def gpus(self) -> Any:
        return self.record.request.get("gpus")

    @property
    def time_limit(self) -> Any:
        return self.record.request.get("time_limit")

    @property
    def flags(self) -> Any:
        return self.record.request.get("flags", {})

    @property
    def input_job_id(self) -> Any:
        return self.record.request.get("input_job_id")

    @property
    def select_classes(self) -> Any:
        return self.record.request.get("select_classes")

    @property
    def ref_class(self) -> Any:
        return self.record.request.get("ref_class")

    @property
    def auto_continue(self) -> int:
        return int(self.record.request.get("auto_continue") or 0)

    @property
    def attempts(self) -> list[dict[str, Any]]:
        return attempts_view(self.record)

    @property
    def slurm(self) -> dict[str, Any]:
        record = self.record
        return {"main_job_id": record.main_slurm_id, "archive_job_id": record.archive_slurm_id, "state": record.slurm_state, "exit_code": record.exit_code}

    @property
    def times(self) -> dict[str, datetime | None]:
        record = self.record
        moments = ("accepted_at", "submitted_at", "started_at", "ended_at", "updated_at")
        return {name: utc(getattr(record, name)) for name in moments}

    @property
    def links(self) -> dict[str, str]:
        """Paths of the job's resources (a request context's url_for, as the Location header)."""
        job_id = self.record.job_id
        views = {"self": "jobs.JobById", "metadata": "jobs.JobMetadata", "previews": "previews.JobPreviews", "logs": "jobs.JobLogs", "output": "jobs.JobOutput"}
        return {name: url_for(view, job_id=job_id) for name, view in views.items()}

    @property
    def metadata_b64(self) -> str | None:
        metadata = self.record.metadata
        return base64.b64encode(json.dumps(metadata, sort_keys=True).encode()).decode() if metadata else None
