"""slurmrestd's JSON (openapi v0.0.38 of Slurm 22.05) as ``SlurmJobInfo``, by field name.

The parsing half of the REST backend (gateway.slurm.rest does the HTTP): ``GET /slurm/<ver>/jobs``
(slurmctld's view, ``parse_slurm_jobs``) and ``GET /slurmdb/<ver>/jobs`` (the accounting
database's, ``parse_slurmdb_jobs``), whose exit codes are decoded by what each gets right (see
gateway.slurm.rest's docstring and tests/fixtures/slurmrestd/), and what a job used from the same
accounting answer with its steps (``parse_slurmdb_usage``, sacct's figures without sacct).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from gateway.slurm.accounting import SlurmUsage
from gateway.slurm.backend import SlurmJobInfo
from gateway.slurm.states import SlurmState
from gateway.slurm.times import NO_VAL, format_elapsed, format_time

log = logging.getLogger(__name__)


def decode_wait_status(raw: int | None) -> tuple[int | None, int | None]:
    """Split a raw wait status (slurmctld's ``exit_code``) into (exit code, signal).

    Same shape as sacct's ``ExitCode`` "exit:signal": 768 -> (3, 0), 9 -> (0, 9), 0 -> (0, 0).
    """
    if raw is None or not isinstance(raw, int) or raw < 0 or raw >= NO_VAL:
        return None, None
    signal = raw & 0x7F
    if signal == 0:
        return (raw >> 8) & 0xFF, 0
    if signal == 0x7F:  # stopped, not ended: no exit code yet
        return None, None
    return 0, signal


def parse_slurm_job(job: Mapping[str, Any]) -> SlurmJobInfo:
    """One job of ``GET /slurm/<ver>/jobs`` (slurmctld's view)."""
    raw_state = str(job.get("job_state") or "")
    state = SlurmState.parse(raw_state)
    exit_code = signal = None
    start = end = "Unknown"
    elapsed = ""
    if state.is_terminal:
        # Only a job that has ended has a meaningful wait status (a live one shows 0).
        exit_code, signal = decode_wait_status(job.get("exit_code"))
        start, end = format_time(job.get("start_time")), format_time(job.get("end_time"))
        if isinstance(job.get("start_time"), int) and isinstance(job.get("end_time"), int) and job["start_time"] > 0:
            elapsed = format_elapsed(max(0, job["end_time"] - job["start_time"]))
    elif state != SlurmState.PENDING:
        # A pending job's start_time is only the scheduler's estimate.
        start = format_time(job.get("start_time"))
    return SlurmJobInfo(
        job_id=str(job["job_id"]),
        state=state,
        raw_state=raw_state,
        reason=str(job.get("state_reason") or ""),
        exit_code=exit_code,
        signal=signal,
        name=str(job.get("name") or ""),
        comment=str(job.get("comment") or ""),
        start=start,
        end=end,
        elapsed=elapsed,
        # The CLI backend's names for the same two views: slurmctld's ("squeue"), accounting ("sacct").
        source="squeue",
    )


def parse_slurm_jobs(payload: Mapping[str, Any]) -> dict[str, SlurmJobInfo]:
    """Every job of a ``GET /slurm/<ver>/jobs`` answer, by id."""
    jobs = {}
    for job in payload.get("jobs") or []:
        try:
            info = parse_slurm_job(job)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping a slurmrestd job record: %s", exc)
            continue
        jobs[info.job_id] = info
    return jobs


def decode_db_exit_code(value: Any, state: SlurmState) -> tuple[int | None, int | None]:
    """slurmdbd's ``{"status", "return_code", "signal"}`` -> (exit code, signal), trusting only
    what 22.05 gets right: signals, and exit 0 for a COMPLETED job."""
    if not isinstance(value, Mapping):
        return None, None
    status = value.get("status")
    if status == "SIGNALED":
        signal = (value.get("signal") or {}).get("signal_id")
        return 0, signal if isinstance(signal, int) else None
    if status == "SUCCESS":
        # 22.05 writes SUCCESS/0 for every normal exit, whatever the code: only a COMPLETED job's
        # 0 is known to be true.
        return (0, 0) if state == SlurmState.COMPLETED else (None, None)
    if status == "ERROR" and isinstance(value.get("return_code"), int):
        return value["return_code"], 0
    return None, None


def parse_slurmdb_job(job: Mapping[str, Any]) -> SlurmJobInfo:
    """One job of ``GET /slurmdb/<ver>/jobs`` (the accounting database's view)."""
    state_block = job.get("state") or {}
    raw_state = str(state_block.get("current") or "")
    state = SlurmState.parse(raw_state)
    exit_code, signal = decode_db_exit_code(job.get("exit_code"), state)
    times = job.get("time") or {}
    comment = job.get("comment")
    if isinstance(comment, Mapping):
        comment = comment.get("job")
    return SlurmJobInfo(
        job_id=str(job["job_id"]),
        state=state,
        raw_state=raw_state,
        reason=str(state_block.get("reason") or ""),
        exit_code=exit_code,
        signal=signal,
        name=str(job.get("name") or ""),
        comment=str(comment or ""),
        start=format_time(times.get("start")),
        end=format_time(times.get("end")),
        elapsed=format_elapsed(times.get("elapsed")),
        source="sacct",
    )


def parse_slurmdb_jobs(payload: Mapping[str, Any]) -> dict[str, SlurmJobInfo]:
    """Every job of a ``GET /slurmdb/<ver>/jobs`` answer, by id.

    A requeued job has several records with one id (the query asks for duplicates); the one
    submitted last is the current one.
    """
    return _latest_records(payload, parse_slurmdb_job)


_Record = TypeVar("_Record", SlurmJobInfo, SlurmUsage)


def _latest_records(payload: Mapping[str, Any], parse: Callable[[Mapping[str, Any]], _Record]) -> dict[str, _Record]:
    """Each job's last record (by submission time) of a slurmdbd answer, parsed; broken ones skipped."""
    latest: dict[str, tuple[int, _Record]] = {}
    for job in payload.get("jobs") or []:
        try:
            record = parse(job)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping a slurmdbd job record: %s", exc)
            continue
        submitted = (job.get("time") or {}).get("submission")
        order = submitted if isinstance(submitted, int) else 0
        if record.job_id not in latest or order >= latest[record.job_id][0]:
            latest[record.job_id] = (order, record)
    return {job_id: record for job_id, (_, record) in latest.items()}


def _tres_count(entries: Any, kind: str, name: str | None = None) -> int:
    """The count of one TRES (``{"type": "mem", "name": null, "count": 2000}``) in a list; 0 if absent."""
    for entry in entries or []:
        if isinstance(entry, Mapping) and entry.get("type") == kind and (name is None or entry.get("name") == name):
            count = entry.get("count")
            return int(count) if isinstance(count, int) and 0 <= count < NO_VAL else 0
    return 0


def _cpu_seconds(block: Any) -> float:
    # {"seconds": 58, "microseconds": 1034125}: slurmdbd sums the tasks' microseconds without
    # carrying them into seconds (sacct's TotalCPU said 00:59.034 for that step).
    if not isinstance(block, Mapping):
        return 0.0
    return float(block.get("seconds") or 0) + float(block.get("microseconds") or 0) / 1e6


def parse_slurmdb_usage(payload: Mapping[str, Any]) -> dict[str, SlurmUsage]:
    """What each job of ``GET /slurmdb/<ver>/jobs`` (steps included) used, as sacct's parse_usage says it.

    Measured against sacct on the same jobs (tests/fixtures/slurmrestd/slurmdb_usage.json): AllocTRES
    is ``tres.allocated`` (mem in MB, GPUs as type gres, name gpu); CPUTimeRAW is allocated CPUs x
    ``time.elapsed``; the allocation's ``time.total`` is 0 where sacct's TotalCPU sums the steps',
    so the steps' are summed here; a step's MaxRSS is ``tres.requested.max`` mem, in bytes; NTasks
    is ``tasks.count``; TimelimitRaw is ``time.limit`` in minutes. A requeued job's last record
    (by submission time) is its current one, as in parse_slurmdb_jobs.
    """
    return _latest_records(payload, _slurmdb_usage)


def _slurmdb_usage(job: Mapping[str, Any]) -> SlurmUsage:
    raw_state = str((job.get("state") or {}).get("current") or "")
    times = job.get("time") or {}
    allocated = (job.get("tres") or {}).get("allocated") or []
    elapsed = int(times.get("elapsed") or 0)
    steps = [s for s in job.get("steps") or [] if isinstance(s, Mapping)]
    rss = [(_tres_count(((s.get("tres") or {}).get("requested") or {}).get("max"), "mem"),
            int((s.get("tasks") or {}).get("count") or 0)) for s in steps]
    limit = times.get("limit")
    return SlurmUsage(
        job_id=str(job["job_id"]),
        state=raw_state,
        complete=SlurmState.parse(raw_state).is_terminal,
        elapsed_s=elapsed,
        cpu_seconds=_tres_count(allocated, "cpu") * elapsed,
        cpu_seconds_used=round(sum(_cpu_seconds((s.get("time") or {}).get("total")) for s in steps), 3),
        gpus=_tres_count(allocated, "gres", "gpu"),
        memory_bytes=_tres_count(allocated, "mem") * 1024 * 1024,
        peak_task_rss_bytes=max((peak for peak, _ in rss), default=0),
        peak_step_rss_bytes=max((peak * max(1, tasks) for peak, tasks in rss), default=0),
        time_limit_s=int(limit) * 60 if isinstance(limit, int) and 0 <= limit < NO_VAL else 0,
        nodes=int(job.get("allocation_nodes") or 0),
        account=str(job.get("account") or ""),
    )
