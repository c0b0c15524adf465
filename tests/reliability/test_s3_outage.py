"""Stop the S3 server just as a job's completion hook starts archiving, then bring it back.

The hook fails (its upload cannot reach S3), the job ends `archive_failed` with the workspace
kept, and nothing is lost: once S3 is back an archive retry uploads everything and the job
succeeds.
"""
from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path

import requests

from tests.reliability.conftest import JOBS, Tally, job_request, post, slurm_jobs_named, wait_for_all, wait_until


def test_s3_stopped_during_archiving_loses_nothing_and_the_retry_succeeds(
    http: requests.Session, own_gateway: Callable[..., str], dataset_url: str, bucket: str, tally: Tally, tmp_path: Path
) -> None:
    from gateway.stack import stack_status, stack_up

    url = own_gateway()
    request = job_request("s3outage", dataset_url, bucket, f"s3out{secrets.token_hex(3)}", flags={"iter": 3})
    job_id = post(http, url, request)["job_id"]
    phases = tmp_path / "logs" / "s3outage" / job_id / "phases"
    # The main job stamps "finished" as its last act; the hook starts right after it (afterany).
    wait_until(lambda: phases.exists() and "finished" in phases.read_text(), 180, "RELION to finish", interval=0.05)
    os.kill(stack_status()["daemons"]["nanio"]["pid"], signal.SIGKILL)
    try:
        failed = wait_for_all(http, url, [job_id], timeout=300)[job_id]
    finally:
        assert stack_up()["all_up"]
    workspace_dir = tmp_path / "workspaces" / "s3outage" / job_id
    kept = sorted(p.name for p in (workspace_dir / "dataset" / "Class2D").iterdir())

    response = http.post(f"{url}{JOBS}/{job_id}/archive", timeout=30)
    assert response.status_code == 202, response.text
    ended = wait_for_all(http, url, [job_id], timeout=300)[job_id]
    archived = {f["path"] for f in ended["metadata"]["output"]["files"]}
    named = slurm_jobs_named(job_id)
    tally.counts.update(
        submitted=1,
        accepted=1,
        in_slurm=len(named.get(job_id, ())),
        archive_attempts=len(named.get(f"{job_id}.archive", ())),
        files_kept_in_workspace=len(kept),
        files_archived_after_retry=len(archived),
        lost=len(set(kept) - archived),
        duplicated=len(named.get(job_id, ())) - 1,
    )
    tally.notes.append(f"first end: {failed['status']}: {failed['message']}")

    assert failed["status"] == "archive_failed", failed
    assert "run_it003_model.star" in kept  # nothing was deleted
    assert ended["status"] == "succeeded", ended
    assert set(kept) <= archived  # everything RELION wrote is in S3 now
    assert not workspace_dir.exists()  # and only then was the workspace removed
    assert tally.counts["archive_attempts"] == 2 and tally.counts["duplicated"] == 0
