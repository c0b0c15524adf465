"""The job service: validate a request, render its scripts, submit, and track it.

Views stay thin: they hand a loaded request to ``JobService`` and map its domain exceptions
(``RequestError``, ``JobNotFound``, ``SchedulerError``) to the one JSON error shape.
"""
from __future__ import annotations

import grp
import hashlib
import json
import logging
import math
import pwd
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.audit import Actor, Auditor
from gateway.auth import Forbidden, authorize_user
from gateway.errors import RequestError
from gateway.jobdirs import job_account, make_job_dirs, write_job_file
from gateway.ratelimit import LimitExceeded, insert_within_limits
from gateway.resources import plan_resources
from gateway.relion.catalogue import CATALOGUE, validate_options
from gateway.relion.flags import FlagError, NormalisedFlags, normalise_flags
from gateway.relion.logs import error_line
from gateway.sbatch.render import ARCHIVE_TEMPLATE, MAIN_TEMPLATE, ScriptRenderer
from gateway.slurm.backend import SchedulerBackend, SchedulerError, SlurmJobInfo
from gateway.slurm.memory import memory_kill_line
from gateway.jobs.states import TERMINAL_VALUES, JobState, gateway_state
from gateway.callbacks import ROLE_ARCHIVE, ROLE_MAIN, TOKEN_ENV, job_token
from gateway.jobs.signed import apply_event, output_archive_location, storage_answer, verify_job_request
from gateway.storage.boundaries import check_data_boundaries
from gateway.storage.s3 import S3Storage, StorageError, check_s3_url, parse_s3_url
from gateway.textrules import text_problem
from gateway.store import DuplicateIdempotencyKey, JobNotFound, JobRecord, JobStore

log = logging.getLogger(__name__)

# Margin on top of one sbatch attempt (a find-by-name query and an sbatch, each bounded by
# [slurm] command_timeout) before another process may take over a submission. The holder renews
# its claim before every attempt, so a long retry loop never loses it, while a crashed gateway's
# claims lapse within one attempt's worth of time and the poller finishes those submissions.
SUBMIT_CLAIM_MARGIN_SECONDS = 10.0
# Placeholder shown in a dry-run archive script, where the main job has no Slurm id yet.
DRY_RUN_MAIN_ID = "MAIN_JOB_ID"
# Every number a request passes to RELION, whatever the option's own bounds.
MAX_NUMBER = 1e9
# A file name (one path component) no common file system takes beyond this (NAME_MAX).
MAX_NAME_BYTES = 255
# A main job Slurm still lists as running this long after its script stamped "finished" is
# reported as suspect (see _apply).
FINISHED_BUT_RUNNING_S = 120.0


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
        storage: S3Storage | None = None,
        callback_secret: bytes = b"",
        auditor: Auditor | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.renderer = renderer
        self.storage = storage
        self.callback_secret = callback_secret
        self.auditor = auditor or Auditor()

    @property
    def callback_url(self) -> str:
        """Where jobs send signed events: [server] public_url, else host and port."""
        if self.config["SERVER_PUBLIC_URL"]:
            return str(self.config["SERVER_PUBLIC_URL"]).rstrip("/") + self.config["SERVER_BASE_PATH"]
        host = self.config["SERVER_HOST"]
        host = socket.gethostname() if host in ("0.0.0.0", "::") else host
        return f"http://{host}:{self.config['SERVER_PORT']}{self.config['SERVER_BASE_PATH']}"

    # -- validation and rendering -------------------------------------------------------------

    def _check_bucket(self, field_name: str, url: str) -> None:
        try:
            check_s3_url(url)
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

    def prepare(self, request: dict[str, Any], *, principal: Actor | None = None) -> PreparedJob:
        """Validate and render a request without submitting it.

        A ``principal`` that is not an admin is held to the per-user S3 boundaries ([s3]
        dataset_prefixes, output_prefixes); admins and offline rendering are not.
        """
        mode = request["mode"]
        num_mpi = int(request["num_mpi"])
        self._check_bucket("dataset_s3_url", request["dataset_s3_url"])
        self._check_bucket("output_s3_prefix", request["output_s3_prefix"])
        if principal is not None and not principal.admin:
            check_data_boundaries(self.config, request["user_id"], request["dataset_s3_url"], request["output_s3_prefix"])
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
        _check_values(flags)
        threads = flags.options.get("j", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise RequestError("flags.j", "--j (threads per rank) must be a whole number >= 1")
        max_cores = int(self.config["LIMITS_MAX_CORES_PER_JOB"])
        if max_cores > 0 and num_mpi * threads > max_cores:
            raise RequestError(
                "num_mpi",
                f"{num_mpi} ranks x {threads} threads = {num_mpi * threads} cores; "
                f"the limit ([limits] max_cores_per_job) is {max_cores}",
            )

        job_id = f"job_{mode}_{request['workspace_id']}_{secrets.token_hex(4)}"
        user = request["user_id"]
        account = job_account(self.config, user)
        log_dir = _inside(Path(self.config["PATHS_LOG_ROOT"]), user, job_id)
        workspace_dir = _inside(Path(self.config["PATHS_WORKSPACE_ROOT"]), user, job_id)
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
            "run_as": account,
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
            "mem_per_cpu_mb": plan.mem_per_cpu_mb,
            "callback_url": self.callback_url,
            "run_as": account or "",
            "run_as_group": grp.getgrgid(pwd.getpwnam(account).pw_gid).gr_name if account else "",
            # sbatch --export: never ALL, so nothing of the gateway's environment but these reaches a job.
            "export": sorted({*self.config["JOB_EXPORT"], TOKEN_ENV}),
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
            "input_star": flags.options["i"],
            "output_prefix": flags.output_prefix,
            "iterations": flags.options.get("iter") if mode != "autorefine" else None,
            "required_inputs": [
                str(value) for key, value in flags.options.items() if key not in ("i", "o") and CATALOGUE[key].kind == "path"
            ],
            "mpi": mpi,
            "launcher": self.config["RELION_LAUNCHER"],
            "relion_binary": relion_binary,
            "relion_args": relion_args,
        }
        archive_context = {
            **common,
            "archive_job_name": f"{job_id}.archive",
            "after_main": True,
            "archive_cpus": 2,
            # Not RELION's estimate: a job given little memory per CPU must still get its hook run.
            "archive_memory_mb": int(self.config["SLURM_ARCHIVE_MEMORY_MB"]),
            "archive_time_limit": self.config["SLURM_ARCHIVE_TIME_LIMIT"],
            "compressor": self.config["JOB_ARCHIVE_COMPRESSOR"],
        }
        main_script = self.renderer.render(MAIN_TEMPLATE, main_context)
        return PreparedJob(job_id, job, main_script, archive_context, flags, warnings)

    def job_environment(self, job_id: str, role: str = ROLE_MAIN) -> dict[str, str]:
        """What one Slurm job of ``job_id`` gets besides the variables its script exports: its token."""
        return {TOKEN_ENV: job_token(self.callback_secret, job_id, role)} if self.callback_secret else {}

    def render_archive(self, prepared: PreparedJob, main_slurm_id: str) -> str:
        return self.archive_script(prepared.archive_context, main_slurm_id)

    def archive_script(self, archive_context: dict[str, Any], main_slurm_id: str | None, *, after_main: bool = True) -> str:
        """The hook's script. Records stored by an older gateway lack newer context keys: default them."""
        defaults = {
            "archive_memory_mb": int(self.config["SLURM_ARCHIVE_MEMORY_MB"]),
            "export": sorted({*self.config["JOB_EXPORT"], TOKEN_ENV}),
            "run_as": "",
            "run_as_group": "",
            "callback_url": self.callback_url,
        }
        context = {**defaults, **archive_context, "main_slurm_id": main_slurm_id}
        if not after_main:
            context["after_main"] = False
        return self.renderer.render(ARCHIVE_TEMPLATE, context)

    # -- submission ---------------------------------------------------------------------------

    def submit(
        self,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        principal: Actor | None = None,
        enforce_limits: bool = False,
    ) -> JobRecord:
        """Validate, store, then submit the main job and its afterany archive hook.

        With an ``idempotency_key`` the same key from the same user always names one job: a retry
        (say, after a lost HTTP reply or a gateway crash) gets that job back, finishing its
        submission if it was cut short, and never a second one. A ``principal`` that is not an
        admin may submit only as itself; ``enforce_limits`` applies the per-user [limits] (the
        API does; a replayed key never counts). Every outcome is audited.
        """
        details = {"user_id": request.get("user_id"), "mode": request.get("mode"), "idempotency_key": idempotency_key}
        try:
            record = self._submit(request, idempotency_key, principal, enforce_limits)
        except Exception as exc:
            self.auditor.record("job.submit", _outcome(exc), actor=principal, **details, reason=_reason(exc))
            raise
        self.auditor.record("job.submit", "ok", actor=principal, job_id=record.job_id, state=record.state, **details)
        return record

    def _submit(
        self, request: dict[str, Any], idempotency_key: str | None, principal: Actor | None, enforce_limits: bool
    ) -> JobRecord:
        if principal is not None:
            authorize_user(principal, request["user_id"])
        digest = request_hash(request)
        if idempotency_key is not None:
            existing = self.store.find_by_idempotency_key(request["user_id"], idempotency_key)
            if existing is not None:
                return self._replay(existing, digest)
        prepared = self.prepare(request, principal=principal)
        job = prepared.job
        job["archive_context"] = prepared.archive_context
        now = time.time()
        record = JobRecord(
            job_id=prepared.job_id,
            user_id=job["user_id"],
            workspace_id=job["workspace_id"],
            mode=job["mode"],
            state=JobState.QUEUED.value,
            request_json=json.dumps(job["request"], sort_keys=True),
            request_sha256=digest,
            idempotency_key=idempotency_key,
            job_json=json.dumps(job, sort_keys=True),
            output_url=job["output_url"],
            accepted_at=job["accepted_at"],
            updated_at=now,
            main_script=prepared.main_script,
            submit_claim_until=now + self.submit_claim_seconds,
        )
        # The record exists before Slurm hears of the job, so an accepted job is never lost.
        try:
            if enforce_limits:  # count and insert as one step per user: a burst cannot overshoot
                insert_within_limits(self.store, self.config, record)
            else:
                self.store.insert(record)
        except DuplicateIdempotencyKey:
            existing = self.store.find_by_idempotency_key(request["user_id"], idempotency_key or "")
            assert existing is not None
            return self._replay(existing, digest)
        return self._submit_record(record)

    @property
    def submit_claim_seconds(self) -> float:
        """How long one sbatch attempt may take: a find-by-name query and an sbatch, plus a margin."""
        return 2 * float(self.config["SLURM_COMMAND_TIMEOUT"]) + SUBMIT_CLAIM_MARGIN_SECONDS

    def _replay(self, existing: JobRecord, digest: str) -> JobRecord:
        if existing.request_sha256 and existing.request_sha256 != digest:
            raise RequestError(
                "Idempotency-Key", f"this key was used for job {existing.job_id} with a different request", status=422
            )
        return self.resume(existing)

    def resume(self, record: JobRecord) -> JobRecord:
        """Finish a submission that was cut short (gateway killed between store and sbatch)."""
        if record.state != JobState.QUEUED.value or (record.main_slurm_id and record.archive_slurm_id):
            return record
        if not self.store.claim_submission(record.job_id, self.submit_claim_seconds):
            return record  # another request or process is submitting it right now
        return self._submit_record(self.store.get(record.job_id), resuming=True)

    def _sbatch(self, script: str, job_name: str, since: float, resuming: bool, job_id: str) -> str:
        """sbatch with bounded retries on transient errors, never submitting one job twice."""
        attempts = int(self.config["SLURM_SUBMIT_ATTEMPTS"])
        delay = float(self.config["SLURM_SUBMIT_RETRY_DELAY"])
        for attempt in range(1, attempts + 1):
            # Renew the claim: no other process may take this submission over while we try.
            self.store.extend_claim(job_id, self.submit_claim_seconds)
            # The name carries the gateway id: if an earlier sbatch got through but its reply was
            # lost (timeout, crash), adopt that job instead of queueing a twin.
            found = self.scheduler.find_by_name(job_name, since=since) if resuming or attempt > 1 else []
            if found:
                log.info("adopting Slurm job %s already submitted as %s", found[-1], job_name)
                return found[-1]
            try:
                role = ROLE_ARCHIVE if job_name.endswith(".archive") else ROLE_MAIN
                return self.scheduler.submit(script, environment=self.job_environment(job_id, role))
            except SchedulerError as exc:
                if not exc.transient or attempt == attempts:
                    raise
                log.warning("sbatch of %s failed (attempt %d/%d), retrying in %.1f s: %s", job_name, attempt, attempts, delay, exc.message)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _submit_record(self, record: JobRecord, resuming: bool = False) -> JobRecord:
        job = record.job
        log_dir = Path(job["log_dir"])
        since = job["accepted_at"]
        account = job.get("run_as")
        try:
            # Slurm does not create the --output directory; a missing one makes the job fail silently.
            # Both directories belong to the job's account, and to nobody else.
            make_job_dirs(Path(self.config["PATHS_LOG_ROOT"]), record.user_id, log_dir, account)
            make_job_dirs(Path(self.config["PATHS_WORKSPACE_ROOT"]), record.user_id, Path(job["workspace_dir"]), account)
            write_job_file(log_dir / "job.json", json.dumps(job, indent=2, sort_keys=True) + "\n", account)
            main_id = record.main_slurm_id or self._sbatch(record.main_script, record.job_id, since, resuming, record.job_id)
        except (SchedulerError, OSError) as exc:
            message = exc.message if isinstance(exc, SchedulerError) else str(exc)
            self.store.update(record.job_id, state=JobState.SUBMIT_FAILED.value, message=message, ended_at=time.time())
            log.error("submit of %s failed: %s", record.job_id, message)
            return self.store.get(record.job_id)
        self.store.update(record.job_id, main_slurm_id=main_id)
        archive_script = self.archive_script(job["archive_context"], main_id)
        try:
            archive_id = self._sbatch(archive_script, f"{record.job_id}.archive", since, resuming, record.job_id)
        except SchedulerError as exc:
            # Without its hook the job's output would never be archived: do not let it run.
            self.scheduler.cancel(main_id)
            self.store.update(
                record.job_id,
                state=JobState.SUBMIT_FAILED.value,
                archive_script=archive_script,
                message=f"archive job refused, main job {main_id} cancelled: {exc.message}",
                ended_at=time.time(),
            )
            return self.store.get(record.job_id)
        job["main_slurm_id"], job["archive_slurm_id"] = main_id, archive_id
        write_job_file(log_dir / "job.json", json.dumps(job, indent=2, sort_keys=True) + "\n", account)
        self.store.update(
            record.job_id,
            archive_slurm_id=archive_id,
            archive_script=archive_script,
            submitted_at=time.time(),
            slurm_state="PENDING",
            job_json=json.dumps(job, sort_keys=True),
            submit_claim_until=None,
        )
        log.info("submitted %s as Slurm jobs %s (main) and %s (archive)", record.job_id, main_id, archive_id)
        return self.store.get(record.job_id)

    # -- tracking -----------------------------------------------------------------------------

    def get(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """Read a job from the store; this never calls Slurm (the poller keeps records fresh).

        With a ``principal`` that is not an admin, another user's job does not exist (JobNotFound),
        so its id cannot even be confirmed.
        """
        record = self.store.get(job_id)
        if principal is not None and not principal.admin and record.user_id != principal.user:
            raise JobNotFound(job_id)
        return record

    def poll(self) -> int:
        """One poll cycle: resume cut-short submissions, then one batched status query for the rest.

        Returns the number of live jobs looked at.
        """
        live = self.store.live(TERMINAL_VALUES)
        now = time.time()
        for record in live:
            # A submission whose claim has lapsed was cut short (its gateway died): finish it.
            if not record.archive_slurm_id and (record.submit_claim_until or 0) < now:
                self.resume(record)
        self.refresh([r for r in live if r.main_slurm_id and r.archive_slurm_id])
        return len(live)

    def refresh(self, records: list[JobRecord]) -> None:
        """Update live records from one batched Slurm status query (one squeue, at most one sacct)."""
        live = [r for r in records if r.main_slurm_id and r.state not in TERMINAL_VALUES]
        if not live:
            return
        ids = [i for r in live for i in (r.main_slurm_id, r.archive_slurm_id) if i]
        infos = self.scheduler.status(ids)
        for record in live:
            self._apply(record, infos.get(record.main_slurm_id or ""), infos.get(record.archive_slurm_id or ""))

    def _apply(self, record: JobRecord, main: SlurmJobInfo | None, archive: SlurmJobInfo | None) -> None:
        log_dir = Path(record.job["log_dir"])
        strangers = []
        # A Slurm id is not a durable identity: slurmctld killed right after a submit loses the
        # job and hands its id to the next submission. Never adopt a job with another name.
        expected = {"main": record.job_id, "archive": f"{record.job_id}.archive"}
        infos = {"main": main, "archive": archive}
        for role, info in infos.items():
            if info is None or not info.name or info.name == expected[role]:
                continue
            # Before calling the job lost, ask Slurm by name: one odd answer must not end a job.
            ours = self.scheduler.find_by_name(expected[role], since=record.accepted_at)
            if info.job_id in ours:
                log.warning(
                    "job %s: Slurm reported %s job %s as %r (%s) but lists it under our name; ignoring this answer",
                    record.job_id, role, info.job_id, info.name, info.source,
                )
                return
            strangers.append(f"{role} job {info.job_id} now belongs to {info.name!r}")
            infos[role] = None
        main, archive = infos["main"], infos["archive"]
        if archive is None and main is not None:
            # Slurm lost (or gave away) the hook but still runs our main job: without a new hook
            # the output would never be archived and a finished RELION run would read as lost.
            self._replace_lost_archive(record, main, " ".join(strangers))
            return
        phases = Phases.read(log_dir)  # once per job and cycle
        state = gateway_state(
            main.state if main else None,
            archive.state if archive else None,
            archive.exit_code if archive else None,
            phases.last,
        )
        memory_kill = ""
        if main is not None and state in (JobState.FAILED, JobState.CANCELLED):
            # Without cgroups Slurm ends a memory-killed job FAILED; only its stderr tells.
            memory_kill = memory_kill_line(log_dir / f"main-{main.job_id}.err")
            if memory_kill:
                state = JobState.OUT_OF_MEMORY
        now = time.time()
        changes: dict[str, Any] = {"state": state.value, "checked_at": now}
        if main is not None:
            changes["slurm_state"] = main.describe()
            if main.exit_code is not None:
                changes["exit_code"] = main.exit_code
        if record.started_at is None and state in (JobState.STAGING, JobState.RUNNING, JobState.ARCHIVING):
            changes["started_at"] = now
        progress = _read_json(log_dir / "progress.json")
        if progress is not None and record.progress_json is None or (progress and progress != record.progress):
            changes["progress_json"] = json.dumps(progress, sort_keys=True)
        if state == JobState.QUEUED and record.state in (JobState.STAGING.value, JobState.RUNNING.value):
            # Slurm requeued a job that had started (node failure, preemption, scontrol requeue):
            # RELION will start again from the beginning. Say so rather than silently go back.
            changes["message"] = f"Slurm requeued the main job after it had started ({main.describe() if main else 'PENDING'}); RELION will run again from the start"
            log.warning("job %s: %s", record.job_id, changes["message"])
        # Only the latest run counts: a requeued job re-running after a "finished" is not suspect.
        finished_at = phases.last_time("finished") if phases.last == "finished" else None
        if state == JobState.RUNNING and main is not None and finished_at and now - finished_at > FINISHED_BUT_RUNNING_S:
            # Seen after slurmctld was killed just as the job ended: it recovered the job as RUNNING
            # and only learns it is gone when the node next re-registers (minutes). Do not guess an
            # outcome; tell the portal and the admin what is odd.
            changes["message"] = (
                f"the job script finished {now - finished_at:.0f} s ago but Slurm still lists main job {main.job_id} as "
                f"{main.raw_state}: slurmctld may have lost its completion (it re-checks when the node re-registers)"
            )
        if state.is_terminal:
            changes["ended_at"] = now
            if record.metadata_json is None:
                # Normally the hook's signed callback delivered it; else the log dir, else S3.
                metadata = self._find_metadata(record, log_dir)
                if metadata is not None:
                    changes["metadata_json"] = metadata
            changes["message"] = _final_message(state, log_dir, main, archive, memory_kill, record, phases.count("staging"))
            if strangers:
                changes["message"] = "Slurm lost this job (" + "; ".join(strangers) + ")"
        elif state == JobState.UNKNOWN:
            log.warning("job %s: Slurm state %r is not in the state table", record.job_id, main.raw_state if main else None)
        if state.value != record.state:
            log.info("job %s: %s -> %s (%s)", record.job_id, record.state, state.value, changes.get("slurm_state", ""))
        self.store.update(record.job_id, **changes)

    def _replace_lost_archive(self, record: JobRecord, main: SlurmJobInfo, why: str) -> None:
        name = f"{record.job_id}.archive"
        try:
            found = [i for i in self.scheduler.find_by_name(name, since=record.accepted_at) if i != record.archive_slurm_id]
            if found:
                archive_id, how = found[-1], "found under its name"
                script = record.archive_script
            else:
                # Depend on the main job only while it runs: once it has ended there is nothing to
                # wait for (and kill_invalid_depend would cancel a hook that depends on a purged id).
                script = self.archive_script(record.job["archive_context"], record.main_slurm_id, after_main=not main.state.is_terminal)
                archive_id, how = self.scheduler.submit(script, environment=self.job_environment(record.job_id, ROLE_ARCHIVE)), "resubmitted"
        except SchedulerError as exc:
            log.warning("job %s: Slurm lost archive job %s and it could not be replaced yet: %s", record.job_id, record.archive_slurm_id, exc.message)
            return
        message = f"Slurm lost archive job {record.archive_slurm_id}" + (f" ({why})" if why else "") + f"; {how} as job {archive_id}"
        log.warning("job %s: %s", record.job_id, message)
        self.store.update(record.job_id, archive_slurm_id=archive_id, archive_script=script, message=message, checked_at=time.time())

    def _find_metadata(self, record: JobRecord, log_dir: Path) -> str | None:
        path = log_dir / "metadata.json"
        if path.exists():
            return path.read_text()
        if self.storage is None:
            return None
        try:
            return self.storage.get_bytes(parse_s3_url(record.output_url).child("metadata.json")).decode()
        except StorageError as exc:
            log.info("job %s: no metadata.json in S3 (%s)", record.job_id, exc)
            return None

    def read_log(self, job_id: str, stream: str, tail: int | None, *, principal: Actor | None = None) -> str:
        """The text of one of the job's Slurm log files (the log dir outlives the workspace)."""
        record = self.get(job_id, principal=principal)
        slurm_id = record.archive_slurm_id if stream.startswith("archive") else record.main_slurm_id
        kind = "archive" if stream.startswith("archive") else "main"
        suffix = "err" if stream.endswith("err") else "out"
        path = Path(record.job["log_dir"]) / f"{kind}-{slurm_id}.{suffix}"
        if not slurm_id or not path.exists():
            raise JobNotFound(f"{job_id} has no {stream} log yet (state {record.state})")
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        return "".join(lines[-tail:] if tail else lines)

    def output_link(self, job_id: str, *, principal: Actor | None = None, expires_s: int = 3600) -> dict[str, Any]:
        """A presigned URL for the job's archived output."""
        record = self.get(job_id, principal=principal)
        output = (record.metadata or {}).get("output")
        if not output or self.storage is None:
            raise JobNotFound(f"{job_id} has no archived output (state {record.state})")
        # The URL comes from the location recorded at submit, never from what a job reported: a
        # job's metadata event could name any object, and the link would hand it to the owner.
        url = self.storage.presigned_get(output_archive_location(record), expires_s)
        return {"url": url, "expires_in": expires_s, "bytes": output.get("bytes"), "sha256": output.get("sha256")}

    def record_event(self, job_id: str, body: bytes, signature: str) -> None:
        """Take a signed event from a job (progress while it runs, metadata from its hook)."""
        record, role, event = verify_job_request(self.store, self.callback_secret, job_id, body, signature)
        apply_event(self.store, record, role, event)

    def storage_request(self, job_id: str, body: bytes, signature: str) -> dict[str, Any]:
        """Serve a job's signed S3 request: presigned URLs for its own dataset and its own output prefix only."""
        record, role, event = verify_job_request(self.store, self.callback_secret, job_id, body, signature)
        return storage_answer(self.storage, record, role, event)

    def retry_archive(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """Submit the completion hook again for a job whose archive failed (its workspace was kept)."""
        return self._audited("job.archive_retry", principal, job_id, lambda: self._retry_archive(job_id, principal), "archive_slurm_id")

    def _audited(self, action: str, principal: Actor | None, job_id: str, act: Callable[[], JobRecord], slurm_field: str) -> JobRecord:
        """Run an action on one job and audit its outcome (ok with the Slurm id it touched, refused, error)."""
        try:
            record = act()
        except Exception as exc:
            self.auditor.record(action, _outcome(exc), actor=principal, job_id=job_id, reason=_reason(exc))
            raise
        self.auditor.record(action, "ok", actor=principal, job_id=job_id, **{slurm_field: getattr(record, slurm_field)})
        return record

    def _retry_archive(self, job_id: str, principal: Actor | None) -> JobRecord:
        record = self.get(job_id, principal=principal)
        if record.state != JobState.ARCHIVE_FAILED.value:
            raise RequestError("job_id", f"job {job_id} is {record.state}; only archive_failed jobs can be archived again", status=409)
        job = record.job
        # No dependency this time: the main job has long ended (and may have left Slurm's memory).
        script = self.archive_script(job["archive_context"], record.main_slurm_id, after_main=False)
        archive_id = self.scheduler.submit(script, environment=self.job_environment(job_id, ROLE_ARCHIVE))
        self.store.update(
            job_id,
            state=JobState.ARCHIVING.value,
            archive_slurm_id=archive_id,
            archive_script=script,
            ended_at=None,
            message=f"archive retry submitted as Slurm job {archive_id}",
        )
        log.info("job %s: archive retried as Slurm job %s", job_id, archive_id)
        return self.store.get(job_id)

    def cancel(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """Cancel the main job; its afterany hook still runs and archives what was produced."""
        return self._audited("job.cancel", principal, job_id, lambda: self._cancel(job_id, principal), "main_slurm_id")

    def _cancel(self, job_id: str, principal: Actor | None) -> JobRecord:
        record = self.get(job_id, principal=principal)
        if record.state in TERMINAL_VALUES:
            raise RequestError("job_id", f"job {job_id} has already ended ({record.state})", status=409)
        if record.main_slurm_id:
            # scancel of a job that has just ended is a no-op, so repeating a cancel is harmless.
            self.scheduler.cancel(record.main_slurm_id)
        self.store.update(job_id, message="cancel requested")
        return self.store.get(job_id)


def build_service(
    config: dict[str, Any],
    *,
    scheduler: SchedulerBackend | None = None,
    store: JobStore | None = None,
    storage: S3Storage | None = None,
    auditor: Auditor | None = None,
    offline: bool = False,
) -> JobService:
    """The job service from configuration: the one way the app factory and the CLI commands build it.

    It starts nothing (the poller is the app's). ``offline`` is a dry run (``relion-gateway
    render``): an in-memory store, no S3 client and no callback key, so nothing is written anywhere.
    """
    from gateway.callbacks import load_or_create_secret
    from gateway.sbatch.render import ScriptRenderer
    from gateway.slurm.factory import make_scheduler
    from gateway.storage.s3 import make_s3_client
    from gateway.store import make_engine

    if offline:
        return JobService(
            config=config,
            store=store or JobStore(make_engine("sqlite://")),
            scheduler=scheduler or make_scheduler(config),
            renderer=ScriptRenderer(config["PATHS_TEMPLATE_DIR"] or None),
            storage=None,
            auditor=auditor,
        )
    return JobService(
        config=config,
        store=store or JobStore(make_engine(config["STORE_DATABASE_URL"])),
        scheduler=scheduler or make_scheduler(config),
        renderer=ScriptRenderer(config["PATHS_TEMPLATE_DIR"] or None),
        storage=storage if storage is not None else S3Storage(make_s3_client(config["S3_ENDPOINT_URL"], config["S3_REGION"])),
        callback_secret=load_or_create_secret(config["SERVER_CALLBACK_SECRET"], config["PATHS_STATE_DIR"]),
        auditor=auditor,
    )


def next_poll_seconds(record: JobRecord, config: dict[str, Any]) -> float | None:
    """When a client should look again: how often the poller refreshes a job in this state."""
    if record.state in TERMINAL_VALUES:
        return None
    if record.state == JobState.QUEUED.value:
        return float(config["POLLER_INTERVAL_QUEUED"])
    return float(config["POLLER_INTERVAL_ACTIVE"])


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _outcome(exc: Exception) -> str:
    """An audit outcome: refused (the caller's fault, a 4xx) or error (ours or Slurm's)."""
    if isinstance(exc, (RequestError, JobNotFound, LimitExceeded, Forbidden)):
        return "refused"
    return "error"


def _reason(exc: Exception) -> str:
    if isinstance(exc, RequestError):
        return f"{exc.field}: {exc.message}"
    if isinstance(exc, JobNotFound):
        return "no such job (or not the caller's)"
    return str(getattr(exc, "message", "") or exc or type(exc).__name__)[:500]


def _inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused unless it resolves inside ``root`` (symlinks followed)."""
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root) or path.resolve() == resolved_root:
        raise RequestError("workspace_id", f"the job's directory {str(path)!r} would leave {str(root)!r}")
    return path


def _check_values(flags: NormalisedFlags) -> None:
    """Bounds every option shares: finite numbers of at most MAX_NUMBER, text that cannot read as an option."""
    for key, value in flags.options.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise RequestError(f"flags.{key}", f"--{key} must be a finite number")
            if abs(value) > MAX_NUMBER:
                raise RequestError(f"flags.{key}", f"--{key} must be between -{MAX_NUMBER:g} and {MAX_NUMBER:g}, got {value!r}")
        elif isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                raise RequestError(f"flags.{key}", f"--{key} must not contain {problem}")
            if value.startswith("-"):
                raise RequestError(f"flags.{key}", f"--{key} must not start with '-' (it would read as an option): {value!r}")
            spec = CATALOGUE.get(key)
            if spec is not None and spec.kind == "path" and any(len(part.encode()) > MAX_NAME_BYTES for part in value.split("/")):
                raise RequestError(f"flags.{key}", f"--{key} has a path component longer than {MAX_NAME_BYTES} bytes")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Phases:
    """What the main job's script stamped in its ``phases`` file ("<phase> <epoch>" per line)."""

    stamps: tuple[tuple[str, float | None], ...] = ()

    @classmethod
    def read(cls, log_dir: Path) -> "Phases":
        try:
            lines = (log_dir / "phases").read_text().splitlines()
        except OSError:
            return cls()
        stamps = []
        for line in lines:
            name, _, stamp = line.partition(" ")
            try:
                stamps.append((name, float(stamp)))
            except ValueError:
                stamps.append((name, None))
        return cls(tuple(stamps))

    @property
    def last(self) -> str | None:
        return self.stamps[-1][0] if self.stamps else None

    def count(self, name: str) -> int:
        """More than one "staging": the script ran again (Slurm requeued the job)."""
        return sum(1 for phase, _ in self.stamps if phase == name)

    def last_time(self, name: str) -> float | None:
        return next((t for phase, t in reversed(self.stamps) if phase == name), None)


def _final_message(
    state: JobState,
    log_dir: Path,
    main: SlurmJobInfo | None,
    archive: SlurmJobInfo | None,
    memory_kill: str = "",
    record: JobRecord | None = None,
    starts: int = 1,
) -> str:
    if state == JobState.SUCCEEDED:
        # A requeued job's final success must not hide that it ran more than once.
        return "RELION finished; output archived" + (f" (the main job started {starts} times: Slurm requeued it)" if starts > 1 else "")
    if state == JobState.ARCHIVE_FAILED:
        detail = error_line(log_dir / f"archive-{archive.job_id}.err") if archive else ""
        prefix = "archive failed, workspace kept: "  # what the hook itself prints first
        detail = detail[len(prefix):] if detail.startswith(prefix) else detail
        return f"archive job failed, workspace kept: {detail}".strip()
    if state == JobState.LOST:
        ids = f" (main job {record.main_slurm_id}, archive job {record.archive_slurm_id})" if record else ""
        # Neither squeue nor sacct knows the ids: slurmctld lost the submission (e.g. killed before
        # saving its state), or accounting was purged.
        return f"Slurm no longer knows this job{ids} and it left no result: slurmctld lost it or its records were purged"
    detail = memory_kill or (error_line(log_dir / f"main-{main.job_id}.err") if main else "")
    slurm = main.describe() if main else ""
    return f"{state.value}: Slurm {slurm}" + (f", exit code {main.exit_code}" if main and main.exit_code is not None else "") + (
        f": {detail}" if detail else ""
    )
