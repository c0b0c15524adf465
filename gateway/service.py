"""The job service: validate a request, render its scripts, submit, and track it.

Views stay thin: they hand a loaded request to ``JobService`` and map its domain exceptions
(``RequestError``, ``JobNotFound``, ``SchedulerError``) to the one JSON error shape.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import RequestError
from gateway.resources import plan_resources
from gateway.relion.catalogue import validate_options
from gateway.relion.flags import FlagError, NormalisedFlags, normalise_flags
from gateway.scripts.render import ARCHIVE_TEMPLATE, MAIN_TEMPLATE, ScriptRenderer
from gateway.slurm.backend import SchedulerBackend, SchedulerError, SlurmJobInfo
from gateway.slurm.states import TERMINAL_STATES, JobState, SlurmState, gateway_state
from gateway.storage.s3 import parse_s3_url
from gateway.store import JobNotFound, JobRecord, JobStore

log = logging.getLogger(__name__)

MODES = ("2d", "3d", "autorefine")
# Placeholder shown in a dry-run archive script, where the main job has no Slurm id yet.
DRY_RUN_MAIN_ID = "MAIN_JOB_ID"


@dataclass
class PreparedJob:
    """A validated, rendered job that has not been submitted."""

    job_id: str
    job: dict[str, Any]
    main_script: str
    archive_context: dict[str, Any]
    flags: NormalisedFlags
    warnings: list[str] = field(default_factory=list)


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class JobService:
    """Everything the API does with jobs, independent of HTTP."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        store: JobStore,
        scheduler: SchedulerBackend,
        renderer: ScriptRenderer,
    ) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.renderer = renderer

    # -- validation and rendering -------------------------------------------------------------

    def _check_bucket(self, field_name: str, url: str) -> None:
        try:
            location = parse_s3_url(url)
        except ValueError as exc:
            raise RequestError(field_name, str(exc)) from exc
        allowed = self.config["S3_ALLOWED_BUCKETS"]
        if allowed and location.bucket not in allowed:
            raise RequestError(field_name, f"bucket {location.bucket!r} is not one of the allowed buckets {allowed}")
        if field_name == "dataset_s3_url" and not location.key.endswith((".tar.gz", ".tgz")):
            raise RequestError(field_name, "must name a .tar.gz (or .tgz) object")

    def _mode_flags(self, mode: str, flags: NormalisedFlags, num_mpi: int) -> NormalisedFlags:
        options = dict(flags.options)
        if mode == "2d" and "ref" in options:
            raise RequestError("flags.ref", "mode 2d (2D classification) takes no --ref")
        if mode in ("3d", "autorefine") and "ref" not in options:
            raise RequestError("flags.ref", f"mode {mode} needs --ref (a reference map in the dataset)")
        if mode == "autorefine":
            # RELION's gold-standard refinement: the gateway adds the two switches it needs.
            options.setdefault("auto_refine", True)
            options.setdefault("split_random_halves", True)
            if num_mpi < 3 or num_mpi % 2 == 0:
                raise RequestError(
                    "num_mpi",
                    "autorefine needs an odd number of MPI ranks, at least 3 (1 leader + 2 equal halves); "
                    f"got {num_mpi}",
                )
        elif "auto_refine" in options:
            raise RequestError("flags.auto_refine", f"--auto_refine belongs to mode autorefine, not {mode}")
        return NormalisedFlags(options)

    def _partition_has_gpus(self, partition: str | None) -> bool:
        chosen = partition or self.config["SLURM_PARTITION"]
        limits = self.config["SLURM_PARTITIONS"].get(chosen, {})
        return int(limits.get("gpus", 0)) > 0

    def prepare(self, request: dict[str, Any]) -> PreparedJob:
        """Validate and render a request without submitting it."""
        mode = request["mode"]
        num_mpi = int(request["num_mpi"])
        self._check_bucket("dataset_s3_url", request["dataset_s3_url"])
        self._check_bucket("output_s3_prefix", request["output_s3_prefix"])
        try:
            flags = normalise_flags(request.get("flags") or {})
        except FlagError as exc:
            raise RequestError(f"flags.{exc.key}", exc.message) from exc
        flags = self._mode_flags(mode, flags, num_mpi)
        try:
            warnings = validate_options(
                flags.options,
                mode=mode,
                relion_version=str(self.config["RELION_VERSION"]),
                gpu_allowed=self._partition_has_gpus(request.get("partition")),
            )
        except FlagError as exc:
            raise RequestError(f"flags.{exc.key}", exc.message) from exc
        threads = flags.options.get("j", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise RequestError("flags.j", "--j (threads per rank) must be a whole number >= 1")

        job_id = f"job_{mode}_{request['workspace_id']}_{secrets.token_hex(4)}"
        user = request["user_id"]
        log_dir = Path(self.config["PATHS_LOG_ROOT"]) / user / job_id
        workspace_dir = Path(self.config["PATHS_WORKSPACE_ROOT"]) / user / job_id
        output_url = parse_s3_url(request["output_s3_prefix"]).child(job_id).url + "/"
        mpi = num_mpi > 1
        # relion_refine_mpi refuses to run with one rank; the sequential program does the same work.
        relion_binary = self.config["RELION_REFINE_MPI"] if mpi else self.config["RELION_REFINE"]
        relion_args = flags.argv()
        normalised_request = {**request, "flags": flags.options}
        digest = request_hash(normalised_request)
        plan = plan_resources(
            self.config,
            mode=mode,
            num_mpi=num_mpi,
            threads=threads,
            partition=request.get("partition"),
            time_limit=request.get("time_limit"),
        )
        resources = plan.as_dict()
        job = {
            "job_id": job_id,
            "user_id": user,
            "workspace_id": request["workspace_id"],
            "mode": mode,
            "request": normalised_request,
            "request_sha256": digest,
            "resources": resources,
            "relion_command": [relion_binary, *relion_args],
            "dataset_s3_url": request["dataset_s3_url"],
            "output_url": output_url,
            "log_dir": str(log_dir),
            "workspace_dir": str(workspace_dir),
            "output_prefix": flags.output_prefix,
            "output_dir": flags.output_dir,
            "accepted_at": time.time(),
        }
        common = {
            "job_id": job_id,
            "user_id": user,
            "workspace_id": request["workspace_id"],
            "mode": mode,
            "request_hash": digest,
            "gateway_version": __version__,
            "comment": f"relion-gateway:{job_id}",
            "log_dir": str(log_dir),
            "partition": plan.partition,
            "account": self.config["SLURM_ACCOUNT"],
            "qos": self.config["SLURM_QOS"],
            "extra_directives": list(self.config["SLURM_EXTRA_DIRECTIVES"]),
            "setup_lines": list(self.config["RELION_SETUP_LINES"]),
            "python": self.config["JOB_PYTHON"],
            "s3_endpoint_url": self.config["S3_ENDPOINT_URL"],
            "mem_per_cpu_mb": plan.mem_per_cpu_mb,
        }
        main_context = {
            **common,
            "job_name": job_id,
            "ntasks": num_mpi,
            "cpus_per_task": threads,
            "time_limit": plan.time_limit,
            "workspace_dir": str(workspace_dir),
            "environment": sorted(self.config["RELION_ENVIRONMENT"].items()),
            "dataset_s3_url": request["dataset_s3_url"],
            "quota_bytes": int(self.config["JOB_STAGE_IN_QUOTA_BYTES"]),
            "max_members": int(self.config["JOB_STAGE_IN_MAX_MEMBERS"]),
            "output_dir": flags.output_dir,
            "mpi": mpi,
            "launcher": self.config["RELION_LAUNCHER"],
            "relion_binary": relion_binary,
            "relion_args": relion_args,
        }
        archive_context = {
            **common,
            "archive_job_name": f"{job_id}.archive",
            "archive_cpus": 2,
            "archive_time_limit": self.config["SLURM_ARCHIVE_TIME_LIMIT"],
            "compressor": self.config["JOB_ARCHIVE_COMPRESSOR"],
        }
        main_script = self.renderer.render(MAIN_TEMPLATE, main_context)
        return PreparedJob(job_id, job, main_script, archive_context, flags, warnings)

    def render_archive(self, prepared: PreparedJob, main_slurm_id: str) -> str:
        return self.renderer.render(ARCHIVE_TEMPLATE, {**prepared.archive_context, "main_slurm_id": main_slurm_id})

    # -- submission ---------------------------------------------------------------------------

    def submit(self, request: dict[str, Any]) -> JobRecord:
        """Validate, store, then submit the main job and its afterany archive hook."""
        prepared = self.prepare(request)
        job = prepared.job
        now = time.time()
        record = JobRecord(
            job_id=prepared.job_id,
            user_id=job["user_id"],
            workspace_id=job["workspace_id"],
            mode=job["mode"],
            state=JobState.QUEUED.value,
            request_json=json.dumps(job["request"], sort_keys=True),
            job_json=json.dumps(job, sort_keys=True),
            output_url=job["output_url"],
            accepted_at=job["accepted_at"],
            updated_at=now,
            main_script=prepared.main_script,
        )
        # The record exists before Slurm hears of the job, so an accepted job is never lost.
        self.store.insert(record)
        log_dir = Path(job["log_dir"])
        try:
            # Slurm does not create the --output directory; a missing one makes the job fail silently.
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
            main_id = self.scheduler.submit(prepared.main_script)
        except (SchedulerError, OSError) as exc:
            message = exc.message if isinstance(exc, SchedulerError) else str(exc)
            self.store.update(record.job_id, state=JobState.SUBMIT_FAILED.value, message=message, ended_at=time.time())
            log.error("submit of %s failed: %s", record.job_id, message)
            return self.store.get(record.job_id)
        archive_script = self.render_archive(prepared, main_id)
        try:
            archive_id = self.scheduler.submit(archive_script)
        except SchedulerError as exc:
            # Without its hook the job's output would never be archived: do not let it run.
            self.scheduler.cancel(main_id)
            self.store.update(
                record.job_id,
                state=JobState.SUBMIT_FAILED.value,
                main_slurm_id=main_id,
                archive_script=archive_script,
                message=f"archive job refused, main job {main_id} cancelled: {exc.message}",
                ended_at=time.time(),
            )
            return self.store.get(record.job_id)
        job["main_slurm_id"], job["archive_slurm_id"] = main_id, archive_id
        (log_dir / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
        self.store.update(
            record.job_id,
            main_slurm_id=main_id,
            archive_slurm_id=archive_id,
            archive_script=archive_script,
            submitted_at=time.time(),
            slurm_state="PENDING",
            job_json=json.dumps(job, sort_keys=True),
        )
        log.info("submitted %s as Slurm jobs %s (main) and %s (archive)", record.job_id, main_id, archive_id)
        return self.store.get(record.job_id)

    # -- tracking -----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        max_age = float(self.config["SLURM_STATUS_MAX_AGE"])
        if record.state not in {s.value for s in TERMINAL_STATES} and (
            record.checked_at is None or time.time() - record.checked_at > max_age
        ):
            self.refresh([record])
            record = self.store.get(job_id)
        return record

    def refresh(self, records: list[JobRecord]) -> None:
        """Update live records from one batched Slurm status query."""
        live = [r for r in records if r.main_slurm_id and r.state not in {s.value for s in TERMINAL_STATES}]
        if not live:
            return
        ids = [i for r in live for i in (r.main_slurm_id, r.archive_slurm_id) if i]
        infos = self.scheduler.status(ids)
        for record in live:
            self._apply(record, infos.get(record.main_slurm_id or ""), infos.get(record.archive_slurm_id or ""))

    def _apply(self, record: JobRecord, main: SlurmJobInfo | None, archive: SlurmJobInfo | None) -> None:
        log_dir = Path(record.job["log_dir"])
        phase = _last_phase(log_dir)
        state = gateway_state(
            main.state if main else None,
            archive.state if archive else None,
            archive.exit_code if archive else None,
            phase,
        )
        changes: dict[str, Any] = {
            "state": state.value,
            "slurm_state": main.describe() if main else "",
            "checked_at": time.time(),
        }
        if main and main.exit_code is not None:
            changes["exit_code"] = main.exit_code
        if state.is_terminal:
            changes["ended_at"] = time.time()
            metadata_path = log_dir / "metadata.json"
            if metadata_path.exists():
                changes["metadata_json"] = metadata_path.read_text()
            changes["message"] = _final_message(state, log_dir, main, archive)
        elif state == JobState.UNKNOWN:
            log.warning("job %s: Slurm state %r is not in the state table", record.job_id, main.raw_state if main else None)
        self.store.update(record.job_id, **changes)

    def cancel(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record.state in {s.value for s in TERMINAL_STATES}:
            raise RequestError("job_id", f"job {job_id} has already ended ({record.state})", status=409)
        if record.main_slurm_id:
            # Only the main job: its afterany hook still runs and archives whatever was produced.
            self.scheduler.cancel(record.main_slurm_id)
        self.store.update(job_id, checked_at=None, message="cancel requested")
        return self.get(job_id)


def _last_phase(log_dir: Path) -> str | None:
    try:
        lines = (log_dir / "phases").read_text().split()
    except OSError:
        return None
    return lines[-2] if len(lines) >= 2 else None


def _last_error_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    # RELION prints "ERROR: " on one line and the message on the next (shared notes).
    for index, line in enumerate(lines):
        if line.startswith("ERROR") and index + 1 < len(lines):
            return f"{line} {lines[index + 1]}".strip()
    for line in reversed(lines):
        if "failed" in line or "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else ""


def _final_message(state: JobState, log_dir: Path, main: SlurmJobInfo | None, archive: SlurmJobInfo | None) -> str:
    if state == JobState.SUCCEEDED:
        return "RELION finished; output archived"
    if state == JobState.ARCHIVE_FAILED:
        detail = _last_error_line(log_dir / f"archive-{archive.job_id}.err") if archive else ""
        return f"archive job failed, workspace kept: {detail}".strip()
    if state == JobState.LOST:
        return "Slurm no longer knows this job and it left no result"
    detail = _last_error_line(log_dir / f"main-{main.job_id}.err") if main else ""
    slurm = main.describe() if main else ""
    return f"{state.value}: Slurm {slurm}" + (f", exit code {main.exit_code}" if main and main.exit_code is not None else "") + (
        f": {detail}" if detail else ""
    )
