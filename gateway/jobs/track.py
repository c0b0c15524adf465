"""Track jobs: reconcile Slurm's answers (one batched query per cycle) into the portal's job states.

The state table itself is gateway.jobs.states; this module decides what each answer means for one
record: a requeue, a lost or stolen Slurm id, a hook to replace, a memory kill, the final message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.callbacks import ROLE_ARCHIVE
from gateway.database import JobRecord
from gateway.jobfiles import read_job_text
from gateway.jobs.context import JobContext
from gateway.jobs.phases import Phases
from gateway.jobs.scripts import JobScripts
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import TERMINAL_VALUES, JobState, gateway_state
from gateway.jobs.submit import Submitter
from gateway.relion.logs import error_line
from gateway.slurm.backend import LAUNCH_FAILED_HELD, SchedulerError, SlurmJobInfo
from gateway.slurm.memory import memory_kill_line
from gateway.slurm.states import SlurmState
from gateway.slurm.times import parse_timestamp
from gateway.storage.s3 import StorageError, parse_s3_url

if TYPE_CHECKING:
    from gateway.jobs.continuation import Continuer
    from gateway.jobs.usage import UsageCollector

log = logging.getLogger(__name__)

RELEASED_AFTER_FAILED_LAUNCH = "Slurm held the job after its launch failed; the gateway released main job"

# A main job Slurm still lists as running this long after its script stamped "finished" is
# reported as suspect (see Tracker.apply).
FINISHED_BUT_RUNNING_S = 120.0


class Tracker:
    def __init__(
        self, ctx: JobContext, submitter: Submitter, scripts: JobScripts, continuer: "Continuer | None" = None, usage: "UsageCollector | None" = None
    ) -> None:
        self.ctx = ctx
        self.submitter = submitter
        self.scripts = scripts
        self.continuer = continuer
        self.usage = usage  # costs the jobs that have ended, once a cycle

    def poll(self) -> int:
        """One poll cycle: resume cut-short submissions, then one batched status query for the rest.

        Returns the number of live jobs looked at.
        """
        live = self.ctx.store.live(TERMINAL_VALUES)
        now = time.time()
        for record in live:
            # A submission whose claim has lapsed was cut short (its gateway died): finish it.
            if not record.archive_slurm_id and (record.submit_claim_until or 0) < now:
                self.submitter.resume(record)
        self.refresh([r for r in live if r.main_slurm_id and r.archive_slurm_id])
        if self.usage is not None:
            self.usage.collect()
        return len(live)

    def refresh(self, records: list[JobRecord]) -> None:
        """Update live records from one batched Slurm status query (one squeue, at most one sacct)."""
        live = [r for r in records if r.main_slurm_id and r.state not in TERMINAL_VALUES]
        if not live:
            return
        ids = [i for r in live for i in (r.main_slurm_id, r.archive_slurm_id) if i]
        infos = self.ctx.scheduler.status(ids)
        for record in live:
            self.apply(record, infos.get(record.main_slurm_id or ""), infos.get(record.archive_slurm_id or ""))

    def _strangers(self, record: JobRecord, infos: dict[str, SlurmJobInfo | None]) -> list[str] | None:
        """Drop answers about Slurm jobs that are not ours; None: ignore this whole answer."""
        strangers = []
        # A Slurm id is not a durable identity: slurmctld killed right after a submit loses the
        # job and hands its id to the next submission. Never adopt a job with another name.
        spec = JobSpec.from_json(record.job_json)
        expected = {"main": spec.slurm_name, "archive": spec.slurm_archive_name}
        for role, info in infos.items():
            if info is None or not info.name or info.name == expected[role]:
                continue
            # Before calling the job lost, ask Slurm by name: one odd answer must not end a job.
            ours = self.ctx.scheduler.find_by_name(expected[role], since=spec.attempt_started_at)
            if info.job_id in ours:
                log.warning(
                    "job %s: Slurm reported %s job %s as %r (%s) but lists it under our name; ignoring this answer",
                    record.job_id, role, info.job_id, info.name, info.source,
                )
                return None
            strangers.append(f"{role} job {info.job_id} now belongs to {info.name!r}")
            infos[role] = None
        return strangers

    def apply(self, record: JobRecord, main: SlurmJobInfo | None, archive: SlurmJobInfo | None) -> None:
        spec = JobSpec.from_json(record.job_json)
        log_dir = Path(spec.log_dir)
        infos = {"main": main, "archive": archive}
        strangers = self._strangers(record, infos)
        if strangers is None:
            return
        main, archive = infos["main"], infos["archive"]
        if archive is None and main is not None:
            # Slurm lost (or gave away) the hook but still runs our main job: without a new hook
            # the output would never be archived and a finished RELION run would read as lost.
            self._replace_lost_archive(record, spec, main, " ".join(strangers))
            return
        log_root = self._log_root
        phases = Phases.read(log_dir, log_root)  # once per job and cycle
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
        progress = _read_json(log_root, log_dir / "progress.json")
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
            # Each earlier attempt stamped "staging" once too: only this attempt's starts are requeues.
            starts = phases.count("staging") - (spec.attempt.number - 1)
            changes["message"] = final_message(state, log_dir, main, archive, memory_kill, record, starts)
            if strangers:
                changes["message"] = "Slurm lost this job (" + "; ".join(strangers) + ")"
        elif state == JobState.UNKNOWN:
            log.warning("job %s: Slurm state %r is not in the state table", record.job_id, main.raw_state if main else None)
        if state.value != record.state:
            log.info("job %s: %s -> %s (%s)", record.job_id, record.state, state.value, changes.get("slurm_state", ""))
        changes.update(wait_estimate(record, state, main))
        if main is not None and main.state == SlurmState.PENDING and LAUNCH_FAILED_HELD in main.reason.lower():
            changes["message"] = self._release_after_failed_launch(record, main)
        if state.is_terminal and self.continuer is not None:
            # Decided before the end is stored: a job its request continues never reads as ended.
            continued, note = self.continuer.after_end(dataclasses.replace(record, **changes), main, stored_state=record.state)
            if continued is not None:
                return
            changes["message"] += note
        visible = {key: value for key, value in changes.items() if key != "checked_at" and getattr(record, key) != value}
        # updated_at is the job's last visible change (its ETag and the API's updated_at come from
        # it): a cycle that found nothing new only notes when it looked, or every poll would
        # change the ETag of every live job and a conditional GET would never be a 304.
        self.ctx.store.update(record.job_id, checked_at=now, **(visible or {"updated_at": record.updated_at}))

    def _release_after_failed_launch(self, record: JobRecord, main: SlurmJobInfo) -> str:
        """Release a main job Slurm held after its launch failed, once: seen when slurmctld was
        SIGKILLed as the job started (the job would wait held forever). A second hold is an admin's."""
        if record.message.startswith(RELEASED_AFTER_FAILED_LAUNCH):
            return (f"Slurm holds main job {main.job_id} after a failed launch although the gateway released it once: "
                    f"an admin must look (scontrol show job {main.job_id}; scontrol release {main.job_id})")
        try:
            self.ctx.scheduler.release(main.job_id)
        except SchedulerError as exc:
            return f"Slurm held main job {main.job_id} after a failed launch and releasing it failed: {exc.message}"
        log.warning("job %s: Slurm held main job %s after a failed launch; released it", record.job_id, main.job_id)
        return f"{RELEASED_AFTER_FAILED_LAUNCH} {main.job_id} (Slurm: {main.describe()}); it runs again from the start"

    def _replace_lost_archive(self, record: JobRecord, spec: JobSpec, main: SlurmJobInfo, why: str) -> None:
        name = spec.slurm_archive_name
        scheduler = self.ctx.scheduler
        try:
            found = [i for i in scheduler.find_by_name(name, since=spec.attempt_started_at) if i != record.archive_slurm_id]
            if found:
                archive_id, how = found[-1], "found under its name"
                script = record.archive_script
            else:
                # Depend on the main job only while it runs: once it has ended there is nothing to
                # wait for (and kill_invalid_depend would cancel a hook that depends on a purged id).
                script = self.scripts.archive(spec, record.main_slurm_id, after_main=not main.state.is_terminal)
                environment = self.ctx.job_environment(record.job_id, ROLE_ARCHIVE)
                archive_id, how = scheduler.submit(script, environment=environment), "resubmitted"
        except SchedulerError as exc:
            log.warning("job %s: Slurm lost archive job %s and it could not be replaced yet: %s", record.job_id, record.archive_slurm_id, exc.message)
            return
        message = f"Slurm lost archive job {record.archive_slurm_id}" + (f" ({why})" if why else "") + f"; {how} as job {archive_id}"
        log.warning("job %s: %s", record.job_id, message)
        self.ctx.store.update(record.job_id, archive_slurm_id=archive_id, archive_script=script, message=message, checked_at=time.time())

    @property
    def _log_root(self) -> Path | None:
        return Path(self.ctx.config["PATHS_LOG_ROOT"]) if self.ctx.config.get("PATHS_LOG_ROOT") else None

    def _find_metadata(self, record: JobRecord, log_dir: Path) -> str | None:
        # Read as a job file: the job's account owns the log dir (gateway/jobfiles.py says why).
        text = read_job_text(self._log_root, log_dir / "metadata.json")
        if text is not None and _of_main_job(text, record.main_slurm_id):
            return text
        if self.ctx.storage is None:
            return None
        try:
            text = self.ctx.storage.get_bytes(parse_s3_url(record.output_url).child("metadata.json")).decode()
        except StorageError as exc:
            log.info("job %s: no metadata.json in S3 (%s)", record.job_id, exc)
            return None
        return text if _of_main_job(text, record.main_slurm_id) else None


def _of_main_job(text: str, main_slurm_id: str | None) -> bool:
    """Whether a metadata.json is this attempt's: a continued job's earlier attempt wrote one too."""
    try:
        recorded = (json.loads(text).get("slurm") or {}).get("main_job_id")
    except (ValueError, AttributeError):
        return False
    return recorded is None or str(recorded) == str(main_slurm_id)


def next_poll_seconds(record: JobRecord, config: dict[str, Any]) -> float | None:
    """When a client should look again: how often the poller refreshes a job in this state."""
    if record.state in TERMINAL_VALUES:
        return None
    if record.state == JobState.QUEUED.value:
        return float(config["POLLER_INTERVAL_QUEUED"])
    return float(config["POLLER_INTERVAL_ACTIVE"])


def _read_json(log_root: Path | None, path: Path) -> dict[str, Any] | None:
    text = read_job_text(log_root, path)
    try:
        return dict(json.loads(text)) if text is not None else None
    except (ValueError, TypeError):
        return None


def final_message(
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


def wait_estimate(record: JobRecord, state: JobState, main: SlurmJobInfo | None) -> dict[str, Any]:
    """Why a queued job waits and when Slurm expects to start it, from the poller's one batched
    query (squeue's %r and %S); cleared once it starts. An estimate squeue does not have (N/A: the
    backfill scheduler has not planned the job yet) leaves the one sbatch --test-only gave at submit."""
    if state != JobState.QUEUED or main is None or main.state != SlurmState.PENDING:
        cleared = {"pending_reason": None, "estimated_start_at": None, "estimate_source": None}
        return cleared if (record.pending_reason or record.estimated_start_at) else {}
    reason = main.reason if main.reason not in ("", "None", "(null)") else None
    start = parse_timestamp(main.start)
    changes: dict[str, Any] = {"pending_reason": reason}
    if start is not None:
        changes.update(estimated_start_at=start, estimate_source="squeue")
    return changes
