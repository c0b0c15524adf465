"""Fakes at the seams: a scheduler that records submissions, a runner with recorded Slurm output."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.process import CommandError
from gateway.slurm.accounting import SlurmUsage
from gateway.slurm.backend import SchedulerError, SlurmJobInfo
from gateway.slurm.states import SlurmState
from gateway.storage.base import ObjectInfo
from gateway.storage.s3 import S3Location, StorageError


@dataclass
class FakeScheduler:
    """Stands in for Slurm in API tests; tests set states with ``set_state``."""

    submitted: list[str] = field(default_factory=list)
    environments: list[dict[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    status_calls: list[list[str]] = field(default_factory=list)
    jobs: dict[str, SlurmJobInfo] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    fail_submit_at: int | None = None  # 0-based index of the submission that fails
    transient_failures: int = 0  # this many submissions fail with a transient error first
    next_id: int = 1000
    usages: dict[str, SlurmUsage] = field(default_factory=dict)
    usage_calls: list[list[str]] = field(default_factory=list)

    def submit(self, script: str, *, environment: Mapping[str, str] | None = None) -> str:
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise SchedulerError("sbatch failed (timed out after 30 s)", transient=True)
        if self.fail_submit_at is not None and len(self.submitted) == self.fail_submit_at:
            self.submitted.append(script)
            raise SchedulerError("sbatch failed (exit code 1): sbatch: error: Batch job submission failed: Invalid partition name specified")
        self.submitted.append(script)
        self.environments.append(dict(environment or {}))
        self.next_id += 1
        job_id = str(self.next_id)
        match = re.search(r"^#SBATCH --job-name=(\S+)", script, re.MULTILINE)
        self.names[job_id] = match.group(1) if match else ""
        self.jobs[job_id] = SlurmJobInfo(job_id, SlurmState.PENDING, "PENDING", reason="None", name=self.names[job_id], source="squeue")
        return job_id

    def set_state(
        self, job_id: str, raw: str, exit_code: int | None = None, reason: str = "None", name: str | None = None, glitch: bool = False
    ) -> None:
        """Set what status() reports; a new ``name`` means the id now belongs to another job,
        unless ``glitch`` (one odd answer: find_by_name still lists the id under its old name)."""
        if name is not None and not glitch:
            self.names[job_id] = name
        self.jobs[job_id] = SlurmJobInfo(
            job_id,
            SlurmState.parse(raw),
            raw,
            reason=reason,
            exit_code=exit_code,
            name=self.names.get(job_id, "") if name is None else name,
            source="sacct" if exit_code is not None else "squeue",
        )

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def status(self, job_ids: Iterable[str]) -> dict[str, SlurmJobInfo]:
        ids = list(job_ids)
        self.status_calls.append(ids)
        return {i: self.jobs[i] for i in ids if i in self.jobs}

    def release(self, job_id: str) -> None:
        self.released.append(job_id)
        if job_id in self.jobs:
            self.set_state(job_id, "PENDING", reason="Priority")

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        if job_id in self.jobs:
            self.set_state(job_id, "CANCELLED by 0", exit_code=0)

    def find_by_name(self, name: str, *, since: float) -> list[str]:
        return [i for i, known in self.names.items() if known == name]

    def test_only(self, script: str) -> str:
        return "sbatch: Job 1003 to start at 2026-01-01T00:00:00 using 3 processors on nodes vm in partition debug"

    def ping(self) -> bool:
        return True

    def usage(self, job_ids: Iterable[str]) -> dict[str, SlurmUsage]:
        """What ``set_usage`` recorded for these ids (accounting knows nothing else)."""
        ids = list(job_ids)
        self.usage_calls.append(ids)
        return {i: self.usages[i] for i in ids if i in self.usages}

    def set_usage(self, job_id: str, *, cpus: int = 2, elapsed: int = 60, used: float | None = None, gpus: int = 0,
                  memory_mb: int = 2000, peak_mb: int = 500, ntasks: int = 2, limit_s: int = 3600, account: str = "",
                  complete: bool = True) -> None:
        self.usages[job_id] = SlurmUsage(
            job_id=job_id, state="COMPLETED" if complete else "RUNNING", complete=complete, elapsed_s=elapsed, cpu_seconds=cpus * elapsed,
            cpu_seconds_used=cpus * elapsed * 0.5 if used is None else used, gpus=gpus, memory_bytes=memory_mb * 2**20,
            peak_task_rss_bytes=peak_mb * 2**20, peak_step_rss_bytes=peak_mb * 2**20 * ntasks, time_limit_s=limit_s, nodes=1, account=account)


@dataclass
class RecordedRunner:
    """A Runner that answers argv prefixes with recorded stdout (or a CommandError)."""

    answers: dict[str, str | CommandError] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    inputs: list[str | None] = field(default_factory=list)

    def __call__(
        self, argv: Sequence[str], *, timeout: float, input: str | None = None, env: Mapping[str, str] | None = None, merge_stderr: bool = False
    ) -> str:
        self.calls.append(list(argv))
        self.inputs.append(input)
        answer = self.answers.get(argv[0])
        if answer is None:
            raise CommandError(argv, 127, "", f"{argv[0]}: no recorded answer")
        if isinstance(answer, CommandError):
            raise answer
        return answer


@dataclass
class FakeStorage:
    """Objects in a dict; what the gateway process itself asks of S3 (reading metadata.json)."""

    objects: dict[str, bytes] = field(default_factory=dict)
    # HEAD answers: any other object exists (1000 bytes) unless named here with S3's error code.
    head_errors: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def head(self, location: S3Location) -> ObjectInfo:
        if location.url in self.head_errors:
            code = self.head_errors[location.url]
            raise StorageError("HEAD", location.bucket, location.key, code, code)
        size = len(self.objects[location.url]) if location.url in self.objects else self.sizes.get(location.url, 1000)
        return ObjectInfo(size, "etag")

    def put_json(self, document: object, location: S3Location) -> None:
        import json

        self.objects[location.url] = json.dumps(document).encode()

    def get_bytes(self, location: S3Location) -> bytes:
        if location.url not in self.objects:
            raise StorageError("GET", location.bucket, location.key, "NoSuchKey", "NoSuchKey")
        return self.objects[location.url]
