"""Admin commands that work on the store directly: retry an archive, clean old workspaces."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from gateway.jobs.signed import output_archive_location
from gateway.jobs.service import JobService, build_service
from gateway.jobs.states import TERMINAL_VALUES, JobState
from gateway.storage.s3 import StorageError
from gateway.database import JobNotFound

log = logging.getLogger(__name__)


def _service() -> JobService:
    from gateway.config import build_config

    return build_service(build_config())  # no app, no poller thread


@click.command("archive-retry")
@click.argument("job_id")
def archive_retry_command(job_id: str) -> None:
    """Submit the completion hook again for an archive_failed job (its workspace was kept)."""
    from gateway.errors import RequestError

    try:
        record = _service().retry_archive(job_id)
    except (RequestError, JobNotFound) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{record.job_id}: {record.message}")


@dataclass
class Verdict:
    path: Path
    action: str  # "delete" or "keep"
    reason: str


def janitor_verdicts(service: JobService, ttl_seconds: float, now: float | None = None) -> list[Verdict]:
    """Decide, for every workspace left on disk, whether it may go; never one whose output is not safe in S3."""
    now = time.time() if now is None else now
    root = Path(service.config["PATHS_WORKSPACE_ROOT"])
    verdicts: list[Verdict] = []
    terminal = TERMINAL_VALUES
    for path in sorted(p for p in root.glob("*/*") if p.is_dir()):
        try:
            record = service.store.get(path.name)
        except JobNotFound:
            verdicts.append(Verdict(path, "keep", "no such job in the store"))
            continue
        if record.state not in terminal:
            verdicts.append(Verdict(path, "keep", f"job is {record.state}"))
            continue
        if record.state == JobState.ARCHIVE_FAILED.value:
            verdicts.append(Verdict(path, "keep", "archive failed: the workspace holds the only copy"))
            continue
        if record.ended_at is None or now - record.ended_at < ttl_seconds:
            verdicts.append(Verdict(path, "keep", "ended less than the TTL ago"))
            continue
        output = (record.metadata or {}).get("output")
        if output is None and record.metadata is None:
            verdicts.append(Verdict(path, "keep", "no metadata: output not known to be archived"))
            continue
        if output is not None:
            if service.storage is None:
                verdicts.append(Verdict(path, "keep", "no S3 client to verify the archive"))
                continue
            recorded = output_archive_location(record)
            if output.get("url") != recorded.url:
                # Only the location recorded at submit counts: a job's metadata could name any object.
                verdicts.append(Verdict(path, "keep", f"metadata names {output.get('url')}, not the recorded {recorded.url}"))
                continue
            try:
                remote = service.storage.head(recorded)
            except StorageError as exc:
                verdicts.append(Verdict(path, "keep", f"archive not verifiable: {exc}"))
                continue
            if remote.size != output["bytes"]:
                verdicts.append(Verdict(path, "keep", f"archive in S3 is {remote.size} bytes, metadata says {output['bytes']}"))
                continue
        verdicts.append(Verdict(path, "delete", "output verified in S3" if output else "job produced no output"))
    return verdicts


@click.command("janitor")
@click.option("--ttl-hours", type=float, default=24.0, show_default=True, help="keep workspaces of jobs that ended more recently")
@click.option("--dry-run", is_flag=True, help="say what would be deleted, delete nothing")
def janitor_command(ttl_hours: float, dry_run: bool) -> None:
    """Remove leftover workspaces of ended jobs whose output is verified in S3."""
    service = _service()
    for verdict in janitor_verdicts(service, ttl_hours * 3600):
        if verdict.action == "delete" and not dry_run:
            shutil.rmtree(verdict.path)
        click.echo(f"{'would delete' if dry_run and verdict.action == 'delete' else verdict.action:<12} {verdict.path}  ({verdict.reason})")
