"""Continue a job: a new attempt of the same gateway job, RELION resuming from its last finished iteration.

A job that Slurm ended for its time limit, a preemption or a node failure, or that a user cancelled,
has RELION's files up to its last finished iteration in its archived output (and, when the gateway
is to continue it by itself, in the workspace its hook kept). A continuation is one more attempt of
the same job, so a portal keeps one id: the ended attempt is written into the job's record
(``JobSpec.attempts``), the next gets its own Slurm jobs (named ``<job_id>.attempt<n>``) running
``relion_refine --continue <run_itNNN_optimiser.star>`` into the same output prefix, and its hook
archives the whole output again, every attempt's iterations included.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any

from gateway.audit import Actor
from gateway.database import JobNotFound, JobRecord
from gateway.errors import RequestError
from gateway.jobs.context import JobContext
from gateway.jobs.scripts import JobScripts
from gateway.jobs.spec import Attempt, JobSpec
from gateway.jobs.states import AUTO_CONTINUE_ON, CONTINUABLE, JobState, auto_continues
from gateway.jobs.submit import Submitter
from gateway.relion.continuing import continue_arguments
from gateway.slurm.backend import SlurmJobInfo

log = logging.getLogger(__name__)


class NotContinuable(RequestError):
    """Why this job cannot be continued (a 409 naming job_id)."""

    def __init__(self, message: str) -> None:
        super().__init__("job_id", message, status=409)


def last_optimiser(spec: JobSpec, metadata: dict[str, Any] | None) -> tuple[int, str] | None:
    """The last finished iteration (>= 1) and its optimiser file, from the archived output's file list.

    The archive is what a continuation restores, so only an iteration whose optimiser file it
    holds can be continued from (a kill while RELION wrote iteration k leaves k-1 the last whole one).
    """
    files = ((metadata or {}).get("output") or {}).get("files") or []
    base = spec.output_prefix.rsplit("/", 1)[-1]
    pattern = re.compile(re.escape(base) + r"_it(\d{3,})_optimiser\.star")
    found = [int(m.group(1)) for f in files if isinstance(f, dict) and (m := pattern.fullmatch(str(f.get("path", ""))))]
    best = max((i for i in found if i >= 1), default=None)
    if best is None:
        return None
    relative = f"{spec.output_prefix}_it{best:03d}_optimiser.star"
    return best, relative


class Continuer:
    def __init__(self, ctx: JobContext, submitter: Submitter, scripts: JobScripts) -> None:
        self.ctx = ctx
        self.submitter = submitter
        self.scripts = scripts

    def continue_job(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """A user's continue (POST /jobs/<id>/continue): audited, checked against the caller."""
        return self.ctx.audited("job.continue", principal, job_id, lambda: self._manual(job_id, principal), "main_slurm_id")

    def _manual(self, job_id: str, principal: Actor | None) -> JobRecord:
        record = self.ctx.store.get(job_id)
        if principal is not None and not principal.admin and record.user_id != principal.user:
            raise JobNotFound(job_id)  # another user's job does not exist, as for every other action
        if JobState(record.state) not in CONTINUABLE:
            allowed = ", ".join(sorted(s.value for s in CONTINUABLE))
            raise NotContinuable(f"job {job_id} is {record.state}; only a job that ended {allowed} can be continued")
        return self._continue(record, trigger="manual")

    def after_end(self, ended: JobRecord, main: SlurmJobInfo | None, *, stored_state: str) -> tuple[JobRecord | None, str]:
        """The tracker's hook when an attempt has ended, before the end is stored.

        ``ended`` is the record as the tracker is about to store it (terminal state, metadata);
        ``stored_state`` the state the store still holds. Returns the continued record when the
        request asked for an automatic continuation and one was started (the end is then stored
        only in the attempt, so no poll ever sees a continued job as ended), else None and what to
        add to the job's message about a continuation that was asked for but did not happen.
        """
        spec = JobSpec.from_json(ended.job_json)
        if spec.auto_continue <= 0 or main is None or main.state not in AUTO_CONTINUE_ON:
            return None, ""
        if not auto_continues(spec.auto_continue, spec.attempt.number, main.state):
            return None, f"; not continued: the {spec.auto_continue} automatic continuation(s) asked for are used up"
        if ended.state == JobState.ARCHIVE_FAILED.value:
            return None, "; not continued: the output is not archived (retry the archive, then continue)"
        try:
            return self._continue(ended, trigger="auto", expect_state=stored_state), ""
        except NotContinuable as exc:
            return None, f"; not continued: {exc.message}"

    def _continue(self, record: JobRecord, *, trigger: str, expect_state: str | None = None) -> JobRecord:
        spec = JobSpec.from_json(record.job_json)
        found = last_optimiser(spec, record.metadata)
        if found is None:
            raise NotContinuable(
                f"job {record.job_id} finished no iteration that its archived output holds (no {spec.output_prefix}_itNNN_optimiser.star "
                "with NNN >= 1): submit it again instead"
            )
        iteration, optimiser = found
        now = time.time()
        metadata = record.metadata or {}
        ended = current_attempt(spec, record, last_iteration=iteration)
        kept = bool(metadata.get("workspace_kept"))
        following = Attempt(
            number=ended.number + 1,
            trigger=trigger,
            created_at=now,
            from_iteration=iteration,
            continue_from=optimiser,
            workspace="kept" if kept else "restored",
        )
        relion_binary = spec.relion_command[0] if spec.relion_command else str(self.ctx.config["RELION_REFINE"])
        continued = dataclasses.replace(
            spec,
            attempts=(*(spec.attempts[:-1] if spec.attempts else ()), ended, following),
            relion_command=(relion_binary, *continue_arguments(spec.flags, optimiser, spec.output_prefix)),
            main_slurm_id=None,
            archive_slurm_id=None,
        )
        main_script = self.scripts.main(continued)
        how = "its kept workspace" if kept else "its archived output"
        message = f"attempt {following.number} ({trigger}) continues from iteration {iteration} ({how}) after the job ended {record.state}"
        won = self.ctx.store.update_if(
            record.job_id,
            expect_state=expect_state or record.state,
            expect_job_json=record.job_json,
            state=JobState.QUEUED.value,
            job_json=continued.to_json(),
            main_script=main_script,
            archive_script="",
            main_slurm_id=None,
            archive_slurm_id=None,
            slurm_state="",
            exit_code=None,
            metadata_json=None,
            submitted_at=None,
            started_at=None,
            ended_at=None,
            message=message,
            submit_claim_until=now + self.submitter.submit_claim_seconds,
        )
        if not won:
            raise NotContinuable(f"job {record.job_id} changed while it was being continued (another continue won)")
        log.info("job %s: %s", record.job_id, message)
        self.ctx.auditor.record("job.continue", "ok", job_id=record.job_id, attempt=following.number, trigger=trigger, iteration=iteration)
        return self.submitter.submit_record(self.ctx.store.get(record.job_id))


def current_attempt(spec: JobSpec, record: JobRecord, *, last_iteration: int | None) -> Attempt:
    """The spec's current attempt with what the record holds of it (its Slurm jobs, state, times)."""
    return dataclasses.replace(
        spec.attempt,
        main_slurm_id=record.main_slurm_id,
        archive_slurm_id=record.archive_slurm_id,
        state=record.state,
        slurm_state=record.slurm_state,
        exit_code=record.exit_code,
        started_at=record.started_at,
        ended_at=record.ended_at,
        last_iteration=last_iteration,
        message=record.message,
    )


def attempts_view(record: JobRecord) -> list[dict[str, Any]]:
    """Every attempt of a job as the API shows it: the ended ones as recorded, the current one live."""
    spec = JobSpec.from_json(record.job_json)
    current = current_attempt(spec, record, last_iteration=_progress_iteration(record))
    return [a.to_dict() for a in (*spec.attempts[:-1], current)]


def _progress_iteration(record: JobRecord) -> int | None:
    try:
        progress = json.loads(record.progress_json) if record.progress_json else {}
    except ValueError:
        return None
    value = progress.get("iteration") if isinstance(progress, dict) else None
    return value if isinstance(value, int) else None
