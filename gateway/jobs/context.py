"""What every part of the job lifecycle shares: the configuration and the clients of the systems it drives.

One instance is built by ``gateway.jobs.service.build_service`` and handed to the preparer, the
submitter and the tracker, so a client swapped on the service (tests do) is the one all of them use.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.audit import Actor, Auditor
from gateway.auth import Forbidden
from gateway.callbacks import ROLE_MAIN, TOKEN_ENV, job_token
from gateway.database import JobNotFound, JobRecord, JobStore
from gateway.errors import RequestError
from gateway.errors import LimitExceeded
from gateway.sbatch.render import ScriptRenderer
from gateway.slurm.backend import SchedulerBackend
from gateway.storage.s3 import S3Storage


@dataclass
class JobContext:
    config: dict[str, Any]
    store: JobStore
    scheduler: SchedulerBackend
    renderer: ScriptRenderer
    storage: S3Storage | None = None
    callback_secret: bytes = b""
    auditor: Auditor = field(default_factory=Auditor)

    def job_environment(self, job_id: str, role: str = ROLE_MAIN) -> dict[str, str]:
        """What one Slurm job of ``job_id`` gets besides the variables its script exports: its token."""
        return {TOKEN_ENV: job_token(self.callback_secret, job_id, role)} if self.callback_secret else {}

    def audited(self, action: str, principal: Actor | None, job_id: str, act: Callable[[], JobRecord], slurm_field: str) -> JobRecord:
        """Run an action on one job and audit its outcome (ok with the Slurm id it touched, refused, error)."""
        try:
            record = act()
        except Exception as exc:
            self.auditor.record(action, audit_outcome(exc), actor=principal, job_id=job_id, reason=audit_reason(exc))
            raise
        self.auditor.record(action, "ok", actor=principal, job_id=job_id, **{slurm_field: getattr(record, slurm_field)})
        return record


def audit_outcome(exc: Exception) -> str:
    """An audit outcome: refused (the caller's fault, a 4xx) or error (ours or Slurm's)."""
    if isinstance(exc, (RequestError, JobNotFound, LimitExceeded, Forbidden)):
        return "refused"
    return "error"


def audit_reason(exc: Exception) -> str:
    if isinstance(exc, RequestError):
        return f"{exc.field}: {exc.message}"
    if isinstance(exc, JobNotFound):
        return "no such job (or not the caller's)"
    return str(getattr(exc, "message", "") or exc or type(exc).__name__)[:500]
