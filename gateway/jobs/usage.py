"""What a job cost, from Slurm's accounting, and the usage report facility managers read.

After a job has ended the poller asks ``sacct`` once per cycle for every ended job it has not
costed yet (never a Slurm call per read): every attempt's main job and archive hook count. The
figures go to the job's record (columns a report sums in SQL) and into its metadata.json, in the
store and in S3 beside the output. A job whose accounting does not complete within GIVE_UP_S is
recorded as not costed, with why.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from gateway.database import JobRecord, JobStore
from gateway.jobs.context import JobContext
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import TERMINAL_VALUES
from gateway.jobs.webhooks import iso8601
from gateway.slurm.accounting import SlurmUsage
from gateway.slurm.backend import SchedulerError
from gateway.storage.s3 import StorageError, parse_s3_url

log = logging.getLogger(__name__)

GIVE_UP_S = 3600.0  # slurmdbd normally has a job's end within seconds; an hour covers an outage
BATCH = 100  # ended jobs costed per poll cycle (one sacct for all of them)
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0


@dataclass(frozen=True)
class JobUsage:
    """A gateway job's whole cost: every attempt's main job and archive hook."""

    cpu_hours: float  # allocated: CPUs x elapsed, what a facility charges
    cpu_hours_used: float  # the CPU time the processes used
    gpu_hours: float
    elapsed_s: int  # the main jobs' run time
    cpu_efficiency: float | None  # used / allocated CPU time
    memory_efficiency: float | None  # peak (the largest step's tasks at their peak) / requested
    time_efficiency: float | None  # the main jobs' elapsed / their time limits
    peak_task_rss_bytes: int
    memory_requested_bytes: int
    account: str  # the Slurm account charged (empty: the user's default)
    slurm_jobs: list[str]
    collected_at: str  # ISO 8601

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def slurm_ids(record: JobRecord) -> tuple[list[str], list[str]]:
    """(main ids, archive ids) of every attempt: earlier ones from the spec, the current from the record."""
    spec = JobSpec.from_json(record.job_json)
    mains = [a.main_slurm_id for a in spec.attempts[:-1] if a.main_slurm_id] + ([record.main_slurm_id] if record.main_slurm_id else [])
    archives = [a.archive_slurm_id for a in spec.attempts[:-1] if a.archive_slurm_id] + ([record.archive_slurm_id] if record.archive_slurm_id else [])
    return list(dict.fromkeys(mains)), list(dict.fromkeys(archives))


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def job_usage(record: JobRecord, found: dict[str, SlurmUsage], now: float) -> JobUsage | None:
    """The job's usage, or None while accounting has not every one of its Slurm jobs ended."""
    mains, archives = slurm_ids(record)
    if not mains or any(i not in found or not found[i].complete for i in mains + archives):
        return None
    rows = [found[i] for i in mains + archives]
    main_rows = [found[i] for i in mains]
    allocated = sum(u.cpu_seconds for u in rows)
    used = sum(u.cpu_seconds_used for u in rows)
    requested = max((u.memory_bytes for u in main_rows), default=0)
    return JobUsage(
        cpu_hours=round(allocated / 3600, 6),
        cpu_hours_used=round(used / 3600, 6),
        gpu_hours=round(sum(u.gpu_seconds for u in rows) / 3600, 6),
        elapsed_s=sum(u.elapsed_s for u in main_rows),
        cpu_efficiency=_ratio(used, allocated),
        memory_efficiency=_ratio(max((u.peak_step_rss_bytes for u in main_rows), default=0), requested),
        time_efficiency=_ratio(sum(u.elapsed_s for u in main_rows), sum(u.time_limit_s for u in main_rows)),
        peak_task_rss_bytes=max((u.peak_task_rss_bytes for u in rows), default=0),
        memory_requested_bytes=requested,
        account=main_rows[-1].account,
        slurm_jobs=mains + archives,
        collected_at=iso8601(now),
    )


class UsageCollector:
    """Cost the jobs that have ended: one sacct per poll cycle for all of them."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx  # the scheduler's usage() is the one accounting query (a fake in unit tests)
        self._warned = False
        self._retry: dict[str, tuple[float, int]] = {}  # job id -> (when to ask again, times asked)

    def collect(self, now: float | None = None) -> int:
        """Cost what can be costed now; the number of jobs costed (or given up on)."""
        now = time.time() if now is None else now
        pending = self.ctx.store.needing_usage(TERMINAL_VALUES, since=now - 2 * GIVE_UP_S, limit=BATCH)
        # A job accounting has not completed yet is asked again later and later (5 s, 10 s, ... 5 min),
        # not every cycle: a poller at 1 s would otherwise run sacct every second for an hour for a
        # job whose Slurm ids accounting never shows (lost ones).
        pending = [r for r in pending if r.main_slurm_id and self._retry.get(r.job_id, (0.0, 0))[0] <= now]
        if not pending:
            return 0
        try:
            found = self.ctx.scheduler.usage([i for r in pending for ids in slurm_ids(r) for i in ids])
        except SchedulerError as exc:
            # Said once as a WARNING (sacct missing, or slurmdbd down, would otherwise
            # repeat it every cycle), then at INFO; the jobs are costed when it answers again.
            log.log(logging.INFO if self._warned else logging.WARNING, "usage not collected this cycle: %s", exc.message)
            self._warned = True
            return 0
        self._warned = False
        done = 0
        for record in pending:
            usage = job_usage(record, found, now)
            if usage is not None:
                self._store(record, usage.to_dict(), usage.cpu_hours, usage.gpu_hours, now)
                done += 1
            elif (record.ended_at or now) < now - GIVE_UP_S:
                why = {"unavailable": "Slurm's accounting never showed every Slurm job of this job as ended"}
                self._store(record, why, None, None, now)
                done += 1
            else:
                tries = self._retry.get(record.job_id, (0.0, 0))[1] + 1
                self._retry[record.job_id] = (now + min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (tries - 1)), tries)
                continue
            self._retry.pop(record.job_id, None)
        return done

    def _store(self, record: JobRecord, usage: dict[str, Any], cpu: float | None, gpu: float | None, now: float) -> None:
        changes: dict[str, Any] = {"usage_json": json.dumps(usage, sort_keys=True), "usage_cpu_hours": cpu, "usage_gpu_hours": gpu, "usage_at": now}
        metadata = record.metadata
        if metadata is not None:
            metadata["usage"] = usage
            changes["metadata_json"] = json.dumps(metadata, sort_keys=True)
            self._upload(record, metadata)
        self.ctx.store.update(record.job_id, **changes)

    def _upload(self, record: JobRecord, metadata: dict[str, Any]) -> None:
        # metadata.json in S3 is the result a user keeps: it gets the cost too. Best effort: the
        # store has it either way, and a failed upload is logged, never retried forever.
        if self.ctx.storage is None:
            return
        try:
            self.ctx.storage.put_json(metadata, parse_s3_url(record.output_url).child("metadata.json"))
        except StorageError as exc:
            log.warning("job %s: usage not written to metadata.json in S3: %s", record.job_id, exc)


GROUPS = ("user", "account", "mode", "year", "month", "day")
_PERIOD_FORMATS = {"year": "%Y", "month": "%Y-%m", "day": "%Y-%m-%d"}


def _key(record: JobRecord, group_by: list[str]) -> tuple[str, ...]:
    values = {"user": record.user_id, "account": record.slurm_account or "", "mode": record.mode}
    moment = time.gmtime(record.ended_at or 0)
    return tuple(values[g] if g in values else time.strftime(_PERIOD_FORMATS[g], moment) for g in group_by)


def usage_report(records: list[JobRecord], group_by: list[str]) -> list[dict[str, Any]]:
    """The ended jobs' cost summed per group (user, account, mode, period), in group order."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for record in records:
        key = _key(record, group_by)
        row = rows.setdefault(key, {**dict(zip(group_by, key)), "jobs": 0, "costed_jobs": 0, "cpu_hours": 0.0, "cpu_hours_used": 0.0,
                                    "gpu_hours": 0.0, "elapsed_hours": 0.0})
        row["jobs"] += 1
        usage = record.usage or {}
        if "cpu_hours" not in usage:
            continue  # ended but not costed (yet, or ever: the row's jobs - costed_jobs say how many)
        row["costed_jobs"] += 1
        row["cpu_hours"] += usage["cpu_hours"]
        row["cpu_hours_used"] += usage["cpu_hours_used"]
        row["gpu_hours"] += usage["gpu_hours"]
        row["elapsed_hours"] += usage["elapsed_s"] / 3600
    for row in rows.values():
        row["cpu_efficiency"] = round(row["cpu_hours_used"] / row["cpu_hours"], 4) if row["cpu_hours"] else None
        for name in ("cpu_hours", "cpu_hours_used", "gpu_hours", "elapsed_hours"):
            row[name] = round(row[name], 4)
    return [rows[key] for key in sorted(rows)]


NOTHING = {"jobs": 0, "costed_jobs": 0, "cpu_hours": 0.0, "cpu_hours_used": 0.0, "gpu_hours": 0.0, "elapsed_hours": 0.0, "cpu_efficiency": None}


def usage_summary(
    store: JobStore, config: dict[str, Any], *, since: float, until: float, user_id: str | None, account: str | None, group_by: list[str]
) -> dict[str, Any]:
    """The usage report's rows, total and budgets (``user_id`` None: an admin's whole view)."""
    from gateway.jobs.budgets import budget_status
    from gateway.jobs.rules import user_accounts

    records = store.ended_between(since, until, user_id=user_id, account=account)
    total = usage_report(records, [])
    if user_id is None:  # every budget configured
        users, accounts = sorted(config["BUDGETS_USERS"]), sorted(config["BUDGETS_ACCOUNTS"])
    else:  # the user's own, and those of the accounts the user may charge
        users, accounts = [user_id], user_accounts(config, user_id)
    if account:
        accounts = [a for a in accounts if a == account]
    budgets = [b for u in users for b in budget_status(store, config, u, [])] + budget_status(store, config, "", accounts)
    return {"rows": usage_report(records, group_by), "total": total[0] if total else dict(NOTHING), "budgets": budgets}
