"""The job service: the one object the API, the CLI commands and the poller call.

It holds no lifecycle logic of its own: preparing (gateway.jobs.prepare), submitting
(gateway.jobs.submit) and tracking (gateway.jobs.track) each live in their own module; this class
wires them to one ``JobContext`` and adds the per-job actions a caller asks for by id (read, list,
cancel, retry the archive, links, events), each checked against the caller.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gateway.audit import Actor, Auditor
from gateway.database import JobNotFound, JobRecord, JobStore
from gateway.errors import RequestError
from gateway.jobfiles import read_job_text
from gateway.jobs.context import JobContext
from gateway.jobs.continuation import Continuer
from gateway.jobs.prepare import PreparedJob, Preparer
from gateway.jobs.previews import Listing, PreviewImage, PreviewReader
from gateway.jobs.scripts import JobScripts, callback_url
from gateway.jobs.signed import apply_event, output_archive_location, storage_answer, verify_job_request
from gateway.jobs.spec import JobSpec
from gateway.jobs.states import TERMINAL_VALUES, JobState
from gateway.jobs.submit import Submitter
from gateway.jobs.track import Tracker, next_poll_seconds
from gateway.jobs.usage import UsageCollector, usage_summary
from gateway.callbacks import ROLE_ARCHIVE, ROLE_MAIN
from gateway.sbatch.render import ScriptRenderer
from gateway.slurm.backend import SchedulerBackend
from gateway.storage.s3 import S3Storage

log = logging.getLogger(__name__)


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
        self.ctx = JobContext(config, store, scheduler, renderer, storage, callback_secret, auditor or Auditor())
        self.scripts = JobScripts(config, renderer)
        self.preparer = Preparer(config, self.scripts, find_job=lambda job_id: self.ctx.store.get(job_id))
        self.submitter = Submitter(self.ctx, self.preparer, self.scripts)
        self.continuer = Continuer(self.ctx, self.submitter, self.scripts)
        self.tracker = Tracker(self.ctx, self.submitter, self.scripts, self.continuer, UsageCollector(self.ctx))

    # The clients live in the shared context, so one swapped here is the one every part uses.
    config = property(lambda self: self.ctx.config)
    store = property(lambda self: self.ctx.store)
    renderer = property(lambda self: self.ctx.renderer)
    callback_secret = property(lambda self: self.ctx.callback_secret)
    auditor = property(lambda self: self.ctx.auditor)

    @property
    def scheduler(self) -> SchedulerBackend:
        return self.ctx.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: SchedulerBackend) -> None:
        self.ctx.scheduler = scheduler

    @property
    def storage(self) -> S3Storage | None:
        return self.ctx.storage

    @storage.setter
    def storage(self, storage: S3Storage | None) -> None:
        self.ctx.storage = storage

    @property
    def _log_root(self) -> Path | None:
        return Path(self.config["PATHS_LOG_ROOT"]) if self.config.get("PATHS_LOG_ROOT") else None

    @property
    def callback_url(self) -> str:
        return callback_url(self.config)

    @property
    def submit_claim_seconds(self) -> float:
        return self.submitter.submit_claim_seconds

    # -- the lifecycle, delegated ---------------------------------------------------------------

    def prepare(self, request: dict[str, Any], *, principal: Actor | None = None) -> PreparedJob:
        return self.preparer.prepare(request, principal=principal)

    def render_archive(self, prepared: PreparedJob, main_slurm_id: str) -> str:
        return self.scripts.archive(prepared.spec, main_slurm_id)

    def test_only(self, script: str) -> str:
        """What ``sbatch --test-only`` says of a script: whether and when Slurm would start it."""
        return self.scheduler.test_only(script)

    def submit(self, request: dict[str, Any], **options: Any) -> JobRecord:
        """Submitter.submit: idempotency_key, principal, enforce_limits."""
        return self.submitter.submit(request, **options)

    def resume(self, record: JobRecord) -> JobRecord:
        return self.submitter.resume(record)

    def poll(self) -> int:
        return self.tracker.poll()

    def refresh(self, records: list[JobRecord]) -> None:
        self.tracker.refresh(records)

    def job_environment(self, job_id: str, role: str = ROLE_MAIN) -> dict[str, str]:
        return self.ctx.job_environment(job_id, role)

    def next_poll_seconds(self, record: JobRecord) -> float | None:
        return next_poll_seconds(record, self.config)

    # -- one job, by id ---------------------------------------------------------------------------

    def get(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """Read a job from the store; this never calls Slurm (the poller keeps records fresh).

        With a ``principal`` that is not an admin, another user's job does not exist (JobNotFound),
        so its id cannot even be confirmed.
        """
        record = self.store.get(job_id)
        if principal is not None and not principal.admin and record.user_id != principal.user:
            raise JobNotFound(job_id)
        return record

    def list_jobs(
        self, *, user_id: str | None, states: list[str] | None, mode: str | None, limit: int, offset: int
    ) -> tuple[list[JobRecord], int]:
        """A page of jobs, newest first, and how many match (the view has already scoped ``user_id``)."""
        return self.store.list(user_id=user_id, states=states, mode=mode, limit=limit, offset=offset)

    def usage(self, **query: Any) -> dict[str, Any]:
        """The usage report (gateway.jobs.usage.usage_summary): the view has already scoped ``user_id``."""
        return usage_summary(self.store, self.config, **query)

    def children(self, job_id: str) -> list[str]:
        """The jobs chained on this one (their input_job_id), oldest first."""
        return self.store.child_ids(job_id)

    def read_log(self, job_id: str, stream: str, tail: int | None, *, principal: Actor | None = None) -> str:
        """The text of one of the job's Slurm log files (the log dir outlives the workspace)."""
        record = self.get(job_id, principal=principal)
        slurm_id = record.archive_slurm_id if stream.startswith("archive") else record.main_slurm_id
        kind = "archive" if stream.startswith("archive") else "main"
        suffix = "err" if stream.endswith("err") else "out"
        path = Path(JobSpec.from_json(record.job_json).log_dir) / f"{kind}-{slurm_id}.{suffix}"
        # The log dir is the job's: a symlink planted there must not hand the caller a gateway file.
        text = read_job_text(self._log_root, path) if slurm_id else None
        if text is None:
            raise JobNotFound(f"{job_id} has no {stream} log yet (state {record.state})")
        lines = text.splitlines(keepends=True)
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

    def previews(self, job_id: str, *, principal: Actor | None = None) -> Listing:
        """The job's preview images: its log dir's index while that exists, else metadata.json's list."""
        return self._preview_reader().listing(self.get(job_id, principal=principal))

    def preview_image(self, job_id: str, name: str, *, principal: Actor | None = None) -> PreviewImage:
        """One listed preview (its bytes read on demand: from the log dir, else from the recorded output_url)."""
        return self._preview_reader().image(self.get(job_id, principal=principal), name)

    def _preview_reader(self) -> PreviewReader:
        return PreviewReader(self.config["PATHS_LOG_ROOT"], self.storage)

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
        return self.ctx.audited("job.archive_retry", principal, job_id, lambda: self._retry_archive(job_id, principal), "archive_slurm_id")

    def _retry_archive(self, job_id: str, principal: Actor | None) -> JobRecord:
        record = self.get(job_id, principal=principal)
        if record.state != JobState.ARCHIVE_FAILED.value:
            raise RequestError("job_id", f"job {job_id} is {record.state}; only archive_failed jobs can be archived again", status=409)
        # No dependency this time: the main job has long ended (and may have left Slurm's memory).
        script = self.scripts.archive(JobSpec.from_json(record.job_json), record.main_slurm_id, after_main=False)
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

    def continue_job(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """A new attempt of an ended job, RELION continuing from its last finished iteration."""
        return self.continuer.continue_job(job_id, principal=principal)

    def cancel(self, job_id: str, *, principal: Actor | None = None) -> JobRecord:
        """Cancel the main job; its afterany hook still runs and archives what was produced."""
        return self.ctx.audited("job.cancel", principal, job_id, lambda: self._cancel(job_id, principal), "main_slurm_id")

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
    from gateway.database import make_engine
    from gateway.slurm.factory import make_scheduler

    renderer = ScriptRenderer(config["PATHS_TEMPLATE_DIR"] or None)
    warn_if_jobs_get_loopback(config)
    if offline:
        return JobService(
            config=config,
            store=store or JobStore(make_engine("sqlite://")),
            scheduler=scheduler or make_scheduler(config),
            renderer=renderer,
            storage=None,
            auditor=auditor,
        )
    return JobService(
        config=config,
        store=store or JobStore(make_engine(config["STORE_DATABASE_URL"])),
        scheduler=scheduler or make_scheduler(config),
        renderer=renderer,
        storage=storage if storage is not None else _s3_storage(config),
        callback_secret=load_or_create_secret(config["SERVER_CALLBACK_SECRET"], config["PATHS_STATE_DIR"]),
        auditor=auditor,
    )


def warn_if_jobs_get_loopback(config: dict[str, Any]) -> list[str]:
    """Say so (a WARNING) when jobs would be told to call a loopback address: on a cluster the
    compute nodes cannot reach the gateway or S3 there. Returns what was warned about."""
    from urllib.parse import urlsplit

    from gateway.jobs.scripts import callback_url as jobs_callback_url

    seen = {"[server] public_url (where jobs send events)": jobs_callback_url(config),
            "[s3] job_endpoint_url (S3 for jobs)": config["S3_JOB_ENDPOINT_URL"] or config["S3_ENDPOINT_URL"]}
    loopback = [f"{key} = {url}" for key, url in seen.items() if url and (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")]
    for line in loopback:
        log.warning("jobs will call a loopback address, which compute nodes cannot reach: %s; fine on one host only", line)
    return loopback


def _s3_storage(config: dict[str, Any]) -> S3Storage:
    from gateway.storage.s3 import make_s3_client

    job_endpoint = config["S3_JOB_ENDPOINT_URL"]
    job_client = make_s3_client(job_endpoint, config["S3_REGION"]) if job_endpoint and job_endpoint != config["S3_ENDPOINT_URL"] else None
    return S3Storage(make_s3_client(config["S3_ENDPOINT_URL"], config["S3_REGION"]), job_client=job_client)
