"""SIGKILL slurmctld while jobs queue and run, restart it, and submit more.

Measured on this stack (shared notes): jobs submitted within ~2 s of a SIGKILL are lost and their
ids handed to later submissions; a job that had just started may run again from scratch. Which
jobs are hit varies from run to run, so the test checks the promise for every job whichever way
it went: nothing is silently lost (every job ends), a job whose id Slurm lost or reused ends
`lost` with a message that says so, and every other job ends in its true state (here: succeeded,
with Slurm agreeing and its output archived).
"""
from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import requests

from gateway.process import run_command
from gateway.jobs.phases import Phases
from tests.reliability.conftest import SEP, Tally, get, job_request, post, slurm_jobs_named, wait_for_all, wait_until

PER_BATCH = 3


def test_slurmctld_sigkill_while_jobs_queue_and_run(
    http: requests.Session, own_gateway: Callable[..., str], dataset_url: str, bucket: str, tally: Tally, tmp_path: Path
) -> None:
    from gateway.stack import stack_status, stack_up

    url = own_gateway()
    workspace = f"ctld{secrets.token_hex(3)}"

    def submit(n: int, iterations: int = 2) -> list[str]:
        request = job_request("ctldcrash", dataset_url, bucket, workspace, num_mpi=1, flags={"iter": iterations})
        return [post(http, url, request)["job_id"] for _ in range(n)]

    first_submitted = time.monotonic()
    # Long enough to be mid-run at the kill. A job that completes within a second or two before a
    # SIGKILL can have its completion unsaved: slurmctld then recovers it as RUNNING and only
    # notices, at the node's next registration (~5 min), that it is gone (NODE_FAIL, requeued).
    running_before = submit(PER_BATCH, iterations=10)
    wait_until(lambda: any(get(http, url, j)["status"] in ("staging", "running") for j in running_before), 120, "a job to start")
    # slurmctld saves its state within seconds; jobs this old survive a SIGKILL (shared notes).
    time.sleep(max(0.0, 6.0 - (time.monotonic() - first_submitted)))
    just_submitted = submit(PER_BATCH)
    try:
        os.kill(stack_status()["daemons"]["slurmctld"]["pid"], signal.SIGKILL)  # right after the sbatches
        time.sleep(1.0)
    finally:
        assert stack_up()["all_up"]
    after_restart = submit(PER_BATCH)  # may be handed the ids of jobs slurmctld lost
    jobs = running_before + just_submitted + after_restart

    ended = wait_for_all(http, url, jobs, timeout=420)  # room for that rare ghost and its re-run
    in_slurm = slurm_jobs_named(f"job_2d_{workspace}_")
    accounted = run_command(
        ["sacct", "-X", "--noheader", "--parsable2", f"--delimiter={SEP}", "--starttime=now-1hours", "--format=JobID,JobName,State"],
        timeout=60,
    )
    slurm_state = {(row.split(SEP)[0], row.split(SEP)[1]): row.split(SEP)[2] for row in accounted.splitlines() if row.count(SEP) == 2}

    statuses = {job_id: job["status"] for job_id, job in ended.items()}
    lost = [j for j, s in statuses.items() if s == "lost"]
    tally.counts.update(
        submitted=len(jobs),
        accepted=len(ended),
        in_slurm=sum(1 for j in jobs if j in in_slurm),
        succeeded=sum(1 for s in statuses.values() if s == "succeeded"),
        lost=len(lost),
        duplicated=sum(len(found) - 1 for found in in_slurm.values()),
        # jobs whose script started more than once (Slurm re-ran or requeued them after the restart)
        reran=sum(1 for j in jobs if Phases.read(tmp_path / "logs" / "ctldcrash" / j).count("staging") > 1),
        hooks_replaced=sum(1 for job in ended.values() if "Slurm lost archive job" in (job.get("message") or "")),
    )
    tally.notes.extend(f"{j}: {ended[j]['status']}: {ended[j]['message']}" for j in jobs if ended[j]["status"] != "succeeded")

    for job_id, job in ended.items():
        if job["status"] == "lost":
            assert "Slurm" in job["message"] and ("lost" in job["message"] or "no longer knows" in job["message"]), job
            continue
        assert job["status"] == "succeeded", job  # the true state: nothing else happened to these jobs
        assert job["metadata"]["output"]["files"], job  # its output is in S3
        assert any(name == job_id and state == "COMPLETED" for (_, name), state in slurm_state.items()), job_id  # Slurm agrees
    # Jobs that ran before the crash were saved in slurmctld's state: they are never the lost ones.
    assert not set(lost) & set(running_before), lost
    assert tally.counts["duplicated"] == 0

