"""Submit a job: store it first, then its main Slurm job and its afterany archive hook, exactly once.

Submission is apart from tracking (as in submitit): this module only ever adds jobs to Slurm; the
tracker (gateway.jobs.track) reads what became of them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from gateway.audit import Actor
from gateway.auth import authorize_user
from gateway.callbacks import ROLE_ARCHIVE, ROLE_MAIN
from gateway.database import DuplicateIdempotencyKey, JobRecord
from gateway.errors import RequestError
from gateway.jobs.context import JobContext, audit_outcome, audit_reason
from gateway.jobs.dirs import make_cache_dir, make_job_dirs, write_job_file
from gateway.jobs.budgets import check_budgets
from gateway.jobs.limits import insert_within_limits
from gateway.jobs.prepare import Preparer
from gateway.jobs.rules import check_dataset_object, request_hash
from gateway.jobs.scripts import JobScripts
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import JobState
from gateway.slurm.backend import SchedulerError
from gateway.slurm.times import start_from_test_only

log = logging.getLogger(__name__)

# Margin on top of one sbatch attempt (a find-by-name query and an sbatch, each bounded by
# [slurm] command_timeout) before another process may take over a submission. The holder renews
# its claim before every attempt, so a long retry loop never loses it, while a crashed gateway's
# claims lapse within one attempt's worth of time and the poller finishes those submissions.
SUBMIT_CLAIM_MARGIN_SECONDS = 10.0


class Submitter:
    def __init__(self, ctx: JobContext, preparer: Preparer, scripts: JobScripts) -> None:
        self.ctx = ctx
        self.preparer = preparer
        self.scripts = scripts

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
            self.ctx.auditor.record("job.submit", audit_outcome(exc), actor=principal, **details, reason=audit_reason(exc))
            raise
        self.ctx.auditor.record("job.submit", "ok", actor=principal, job_id=record.job_id, state=record.state, **details)
        return record

    def _submit(
        self, request: dict[str, Any], idempotency_key: str | None, principal: Actor | None, enforce_limits: bool
    ) -> JobRecord:
        store = self.ctx.store
        if principal is not None:
            authorize_user(principal, request["user_id"])
        digest = request_hash(request)
        if idempotency_key is not None:
            existing = store.find_by_idempotency_key(request["user_id"], idempotency_key)
            if existing is not None:
                return self._replay(existing, digest)
        prepared = self.preparer.prepare(request, principal=principal)
        spec = prepared.spec
        if self.ctx.storage is not None:
            check_dataset_object(self.ctx.storage, spec.dataset_s3_url, int(self.ctx.config["JOB_STAGE_IN_QUOTA_BYTES"]))
        estimate = self._estimate(prepared.main_script)
        now = time.time()
        record = JobRecord(
            **estimate,
            job_id=spec.job_id,
            user_id=spec.user_id,
            workspace_id=spec.workspace_id,
            mode=spec.mode,
            state=JobState.QUEUED.value,
            request_json=json.dumps(spec.request, sort_keys=True),
            request_sha256=digest,
            idempotency_key=idempotency_key,
            job_json=spec.to_json(),
            output_url=spec.output_url,
            accepted_at=spec.accepted_at,
            updated_at=now,
            main_script=prepared.main_script,
            submit_claim_until=now + self.submit_claim_seconds,
            parent_job_id=spec.chain.parent_job_id if spec.chain else None,
            slurm_account=spec.resources.account if spec.resources else None,
        )
        check_budgets(store, self.ctx.config, record, spec)
        # The record exists before Slurm hears of the job, so an accepted job is never lost.
        try:
            if enforce_limits:  # count and insert as one step per user: a burst cannot overshoot
                insert_within_limits(store, self.ctx.config, record)
            else:
                store.insert(record)
        except DuplicateIdempotencyKey:
            existing = store.find_by_idempotency_key(request["user_id"], idempotency_key or "")
            assert existing is not None
            return self._replay(existing, digest)
        return self.submit_record(record)

    def _estimate(self, script: str) -> dict[str, Any]:
        """When Slurm would start the job, asked before it is queued (``sbatch --test-only``: one
        more RPC per submit, [slurm] estimate_at_submit). Advisory only: a refusal or an
        unreachable controller leaves no estimate, and sbatch itself has the last word."""
        if not self.ctx.config["SLURM_ESTIMATE_AT_SUBMIT"]:
            return {}
        try:
            start = start_from_test_only(self.ctx.scheduler.test_only(script))
        except SchedulerError as exc:
            log.info("no start estimate: sbatch --test-only said %s", exc.message)
            return {}
        return {"estimated_start_at": start, "estimate_source": "sbatch --test-only"} if start is not None else {}

    @property
    def submit_claim_seconds(self) -> float:
        """How long one sbatch attempt may take: a find-by-name query and an sbatch, plus a margin."""
        return 2 * float(self.ctx.config["SLURM_COMMAND_TIMEOUT"]) + SUBMIT_CLAIM_MARGIN_SECONDS

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
        if not self.ctx.store.claim_submission(record.job_id, self.submit_claim_seconds):
            return record  # another request or process is submitting it right now
        return self.submit_record(self.ctx.store.get(record.job_id), resuming=True)

    def _sbatch(self, script: str, job_name: str, since: float, resuming: bool, job_id: str) -> str:
        """sbatch with bounded retries on transient errors, never submitting one job twice."""
        config, scheduler = self.ctx.config, self.ctx.scheduler
        attempts = int(config["SLURM_SUBMIT_ATTEMPTS"])
        delay = float(config["SLURM_SUBMIT_RETRY_DELAY"])
        for attempt in range(1, attempts + 1):
            # Renew the claim: no other process may take this submission over while we try.
            self.ctx.store.extend_claim(job_id, self.submit_claim_seconds)
            # The name carries the gateway id: if an earlier sbatch got through but its reply was
            # lost (timeout, crash), adopt that job instead of queueing a twin.
            found = scheduler.find_by_name(job_name, since=since) if resuming or attempt > 1 else []
            if found:
                log.info("adopting Slurm job %s already submitted as %s", found[-1], job_name)
                return found[-1]
            try:
                role = ROLE_ARCHIVE if job_name.endswith(".archive") else ROLE_MAIN
                return scheduler.submit(script, environment=self.ctx.job_environment(job_id, role))
            except SchedulerError as exc:
                if not exc.transient or attempt == attempts:
                    raise
                log.warning("sbatch of %s failed (attempt %d/%d), retrying in %.1f s: %s", job_name, attempt, attempts, delay, exc.message)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def submit_record(self, record: JobRecord, resuming: bool = False) -> JobRecord:
        """Submit a stored record's current attempt (a new job, a cut-short one, or a continuation)."""
        store, config = self.ctx.store, self.ctx.config
        spec = JobSpec.from_json(record.job_json)
        log_dir = Path(spec.log_dir)
        since = spec.attempt_started_at  # an earlier attempt's Slurm jobs have other names anyway
        account = spec.run_as
        try:
            # Slurm does not create the --output directory; a missing one makes the job fail silently.
            # Both directories belong to the job's account, and to nobody else.
            make_job_dirs(Path(config["PATHS_LOG_ROOT"]), record.user_id, log_dir, account)
            make_job_dirs(Path(config["PATHS_WORKSPACE_ROOT"]), record.user_id, Path(spec.workspace_dir), account)
            make_cache_dir(config, account)
            write_job_file(log_dir / "job.json", spec.to_json(indent=2), account)
            main_id = record.main_slurm_id or self._sbatch(record.main_script, spec.slurm_name, since, resuming, record.job_id)
        except (SchedulerError, OSError) as exc:
            message = exc.message if isinstance(exc, SchedulerError) else str(exc)
            store.update(record.job_id, state=JobState.SUBMIT_FAILED.value, message=message, ended_at=time.time())
            log.error("submit of %s failed: %s", record.job_id, message)
            return store.get(record.job_id)
        store.update(record.job_id, main_slurm_id=main_id)
        archive_script = self.scripts.archive(spec, main_id)
        try:
            archive_id = self._sbatch(archive_script, spec.slurm_archive_name, since, resuming, record.job_id)
        except SchedulerError as exc:
            # Without its hook the job's output would never be archived: do not let it run.
            self.ctx.scheduler.cancel(main_id)
            store.update(
                record.job_id,
                state=JobState.SUBMIT_FAILED.value,
                archive_script=archive_script,
                message=f"archive job refused, main job {main_id} cancelled: {exc.message}",
                ended_at=time.time(),
            )
            return store.get(record.job_id)
        spec = dataclasses.replace(spec, main_slurm_id=main_id, archive_slurm_id=archive_id)
        write_job_file(log_dir / "job.json", spec.to_json(indent=2), account)
        store.update(
            record.job_id,
            archive_slurm_id=archive_id,
            archive_script=archive_script,
            submitted_at=time.time(),
            slurm_state="PENDING",
            job_json=spec.to_json(),
            submit_claim_until=None,
        )
        log.info("submitted %s as Slurm jobs %s (main) and %s (archive)", record.job_id, main_id, archive_id)
        return store.get(record.job_id)
