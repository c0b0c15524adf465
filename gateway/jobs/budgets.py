"""Budgets: the CPU- and GPU-hours a user or a Slurm account may use per period, checked at submit.

A request passes if what the user (or account) has used this period, plus what its unfinished
jobs may still use, plus this request's own maximum, stays within the budget. A job's maximum is
what its allocation could cost if it ran to its time limit, with every automatic continuation its
request allows and its archive hook; a job counts at its maximum until Slurm's accounting has
costed it (gateway/jobs/usage.py), then at what it used, in the period in which it ended.

Over the budget with what is used alone: a 403 (waiting will not help). Over it only because of
jobs still running: a 429 with Retry-After (their ends may free it). Either names the budget and
what is left. Checked before the job is stored, outside the per-user lock: simultaneous
submissions of one user may each pass against the same remainder (at most one request's maximum
each), a compromise the limits' lock would fix at the cost of a store-wide lock for accounts.
"""
from __future__ import annotations

import calendar
import time
from typing import Any

from gateway.database import JobRecord, JobStore
from gateway.errors import LimitExceeded, RequestError
from gateway.jobs.scripts import ARCHIVE_CPUS
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import TERMINAL_VALUES
from gateway.slurm.times import parse_slurm_time

RETRY_AFTER_S = 300  # a running job's end frees what it holds; look again in a few minutes
KINDS = ("cpu_hours", "gpu_hours")


def period_start(period: str, now: float) -> float:
    """When the current budget period began (UTC): this month, this year, or ever."""
    moment = time.gmtime(now)
    if period == "month":
        return float(calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0)))
    if period == "year":
        return float(calendar.timegm((moment.tm_year, 1, 1, 0, 0, 0)))
    return 0.0


def maximum(spec: JobSpec, config: dict[str, Any]) -> dict[str, float]:
    """What a job may cost at most: every attempt its request allows to its time limit, and its hooks."""
    resources = spec.resources
    if resources is None:
        return {"cpu_hours": 0.0, "gpu_hours": 0.0}
    attempts = 1 + spec.auto_continue
    hours = resources.time_limit_s / 3600
    hook = ARCHIVE_CPUS * parse_slurm_time(str(config["SLURM_ARCHIVE_TIME_LIMIT"])) / 3600
    return {
        "cpu_hours": attempts * (resources.total_cpus * hours + hook),
        "gpu_hours": attempts * resources.gpus_per_node * resources.nodes * hours,
    }


def _spent(records: list[JobRecord], config: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(used by costed jobs, held by the others at their maximum)."""
    used = {kind: 0.0 for kind in KINDS}
    held = {kind: 0.0 for kind in KINDS}
    for record in records:
        if record.usage_at is not None and record.usage_cpu_hours is not None:
            used["cpu_hours"] += record.usage_cpu_hours
            used["gpu_hours"] += record.usage_gpu_hours or 0.0
        else:  # unfinished, not costed yet, or never costable: at its maximum
            for kind, value in maximum(JobSpec.from_json(record.job_json), config).items():
                held[kind] += value
    return used, held


def budget_status(store: JobStore, config: dict[str, Any], user_id: str, accounts: list[str], now: float | None = None) -> list[dict[str, Any]]:
    """Every budget that applies to this user and these accounts, with what is used, held and left."""
    now = time.time() if now is None else now
    since = period_start(str(config["BUDGETS_PERIOD"]), now)
    found = []
    for table, names, column in (("users", [user_id], "user_id"), ("accounts", accounts, "slurm_account")):
        for name in names:
            budget = config[f"BUDGETS_{table.upper()}"].get(name)
            if not budget:
                continue
            used, held = _spent(store.budget_records(column, name, since=since, terminal=TERMINAL_VALUES), config)
            for kind in KINDS:
                if kind in budget:
                    limit = float(budget[kind])
                    found.append({"scope": table[:-1], "name": name, "kind": kind, "period": config["BUDGETS_PERIOD"], "limit": limit,
                                  "used": round(used[kind], 4), "held": round(held[kind], 4),
                                  "left": round(max(0.0, limit - used[kind] - held[kind]), 4)})
    return found


def check_budgets(store: JobStore, config: dict[str, Any], record: JobRecord, spec: JobSpec, now: float | None = None) -> None:
    """Refuse a submission its user's or account's budget cannot take (see the module's docstring)."""
    now = time.time() if now is None else now
    since = period_start(str(config["BUDGETS_PERIOD"]), now)
    request = maximum(spec, config)
    for table, name, column in (("users", record.user_id, "user_id"), ("accounts", record.slurm_account, "slurm_account")):
        budget = config[f"BUDGETS_{table.upper()}"].get(name) if name else None
        if not budget:
            continue
        used, held = _spent(store.budget_records(column, name, since=since, terminal=TERMINAL_VALUES), config)
        for kind in KINDS:
            if kind not in budget:
                continue
            limit = float(budget[kind])
            key = f"[budgets.{table}.{name}] {kind} = {limit:g} per {config['BUDGETS_PERIOD']}"
            account = f"{used[kind]:.2f} used, {held[kind]:.2f} held by unfinished jobs, this request may use up to {request[kind]:.2f}"
            left = max(0.0, limit - used[kind] - held[kind])
            if used[kind] + request[kind] > limit:
                raise RequestError("budget", f"{key}: {account}; {left:.2f} left", status=403)
            if used[kind] + held[kind] + request[kind] > limit:
                raise LimitExceeded(key, f"{key}: {account}; {left:.2f} left until unfinished jobs end", RETRY_AFTER_S)
