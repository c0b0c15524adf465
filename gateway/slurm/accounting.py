"""What Slurm's accounting says a job used: one ``sacct`` for many jobs, read by field name.

Per Slurm job: the allocation's row (elapsed, CPU time allocated = AllocCPUS x Elapsed, CPU time
used = the steps' TotalCPU, the TRES allocated: memory, GPUs) and its steps' rows (MaxRSS, the
largest task's peak, and NTasks). Measured on Slurm 22.05: the allocation's TotalCPU is the sum
of its steps'; MaxRSS is only on steps; AllocTRES names GPUs as ``gres/gpu=<n>``; a job that
never ran has no steps and CPUTimeRAW 0. slurmdbd hears of a job's end asynchronously, so a job
that has just ended may still read RUNNING here for a moment (``complete`` is false then).

Used by the cli and pyslurm backends (pyslurm's accounting API differs by version; the Slurm client
is on every host that has pyslurm). The rest backend reads the same figures from slurmdbd through
slurmrestd (gateway.slurm.rest_json.parse_slurmdb_usage), so it needs no Slurm client.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.process import CommandError, Runner, run_command
from gateway.slurm.backend import FIELD_SEPARATOR as DELIMITER, SchedulerError
from gateway.slurm.states import SlurmState

log = logging.getLogger(__name__)

USAGE_FIELDS: dict[str, str] = {
    "job_id": "JobID",
    "state": "State",
    "elapsed": "ElapsedRaw",
    "cpu_time": "CPUTimeRAW",
    "total_cpu": "TotalCPU",
    "max_rss": "MaxRSS",
    "ntasks": "NTasks",
    "tres": "AllocTRES",
    "time_limit": "TimelimitRaw",
    "nodes": "NNodes",
    "account": "Account",
}
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE = re.compile(r"^([0-9.]+)([KMGTP]?)$")
_CPU_TIME = re.compile(r"^(?:(?:(\d+)-)?(\d+):)?(\d+):(\d+(?:\.\d+)?)$")


def parse_size(text: str) -> int:
    """sacct's sizes (``45136K``, ``2000M``, ``1.5G``, ``0``) in bytes; 0 for none."""
    match = _SIZE.match(text.strip())
    if not match:
        return 0
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_cpu_time(text: str) -> float:
    """TotalCPU (``[[DD-]HH:]MM:SS[.mmm]``) in seconds; 0 for none."""
    match = _CPU_TIME.match(text.strip())
    if not match:
        return 0.0
    days, hours, minutes, seconds = match.groups()
    return ((int(days or 0) * 24 + int(hours or 0)) * 60 + int(minutes)) * 60 + float(seconds)


def parse_tres(text: str) -> dict[str, str]:
    """``billing=2,cpu=2,mem=2000M,node=1,gres/gpu=2`` as a mapping."""
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


@dataclass(frozen=True)
class SlurmUsage:
    """What one Slurm job used, from its allocation row and its steps."""

    job_id: str
    state: str
    complete: bool  # the allocation has ended in accounting (else: look again later)
    elapsed_s: int
    cpu_seconds: int  # allocated: AllocCPUS x Elapsed
    cpu_seconds_used: float  # TotalCPU of its steps
    gpus: int
    memory_bytes: int  # allocated (AllocTRES mem, the whole job)
    peak_task_rss_bytes: int  # the largest task's MaxRSS over the steps
    peak_step_rss_bytes: int  # max over steps of MaxRSS x NTasks: an upper bound of the step's use
    time_limit_s: int
    nodes: int
    account: str

    @property
    def gpu_seconds(self) -> int:
        return self.gpus * self.elapsed_s


def parse_usage(stdout: str) -> dict[str, SlurmUsage]:
    """Parse ``sacct -n -P`` output of USAGE_FIELDS (steps included) into one record per job."""
    names = list(USAGE_FIELDS)
    jobs: dict[str, dict[str, str]] = {}
    steps: dict[str, list[dict[str, str]]] = {}
    for line in stdout.splitlines():
        values = line.split(DELIMITER)
        if len(values) != len(names):
            continue
        row = dict(zip(names, values))
        job_id, _, step = row["job_id"].partition(".")
        if step:
            steps.setdefault(job_id, []).append(row)
        else:
            jobs[job_id] = row  # a requeued job's last record is its current one
    found = {}
    for job_id, row in jobs.items():
        tres = parse_tres(row["tres"])
        its_steps = steps.get(job_id, [])
        found[job_id] = SlurmUsage(
            job_id=job_id,
            state=row["state"],
            complete=SlurmState.parse(row["state"]).is_terminal,
            elapsed_s=_int(row["elapsed"]),
            cpu_seconds=_int(row["cpu_time"]),
            cpu_seconds_used=parse_cpu_time(row["total_cpu"]),
            gpus=_int(tres.get("gres/gpu", "0")),
            memory_bytes=parse_size(tres.get("mem", "0")),
            peak_task_rss_bytes=max((parse_size(s["max_rss"]) for s in its_steps), default=0),
            peak_step_rss_bytes=max((parse_size(s["max_rss"]) * max(1, _int(s["ntasks"])) for s in its_steps), default=0),
            time_limit_s=_int(row["time_limit"]) * 60,
            nodes=_int(row["nodes"]),
            account=row["account"],
        )
    return found


class SacctAccounting:
    """The one accounting query: ``sacct`` for every given job in one call."""

    def __init__(self, runner: Runner = run_command, timeout: float = 30.0) -> None:
        self._run = runner
        self._timeout = timeout

    def usage(self, job_ids: Iterable[str]) -> dict[str, SlurmUsage]:
        ids = sorted({str(i) for i in job_ids if i}, key=lambda i: int(i) if i.isdigit() else 0)
        if not ids:
            return {}
        argv = ["sacct", "--noheader", "--parsable2", f"--delimiter={DELIMITER}", "--allusers",
                f"--jobs={','.join(ids)}", f"--format={','.join(USAGE_FIELDS.values())}"]
        try:
            return parse_usage(str(self._run(argv, timeout=self._timeout)))
        except CommandError as exc:
            raise SchedulerError(f"sacct failed: {exc.reason}: {exc.stderr.strip()[:300]}", argv=exc.argv) from exc
