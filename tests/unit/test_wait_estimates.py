"""How long a job will wait (issue 17, wait times): sbatch --test-only's estimate at submit, then the
pending reason and start estimate from the poller's one batched squeue; and a poll that finds
nothing new changes nothing a client sees (its ETag stays, so a conditional GET stays a 304)."""
from __future__ import annotations

import dataclasses
import time

from flask import Flask
from flask.testing import FlaskClient

from gateway.slurm.times import parse_timestamp, start_from_test_only
from tests.conftest import valid_request
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"
TEST_ONLY_START = time.mktime(time.strptime("2026-01-01T00:00:00", "%Y-%m-%dT%H:%M:%S"))


def test_slurm_times_are_read_as_slurm_prints_them() -> None:
    out = "sbatch: Job 1003 to start at 2026-01-01T00:00:00 using 3 processors on nodes vm in partition debug"
    assert start_from_test_only(out) == TEST_ONLY_START
    assert start_from_test_only("sbatch: error: Batch job submission failed") is None
    assert parse_timestamp("N/A") is None and parse_timestamp("Unknown") is None and parse_timestamp("") is None


def pending(scheduler: FakeScheduler, slurm_id: str, reason: str, start: str) -> None:
    scheduler.set_state(slurm_id, "PENDING", reason=reason)
    scheduler.jobs[slurm_id] = dataclasses.replace(scheduler.jobs[slurm_id], start=start)


def test_the_estimate_comes_from_test_only_then_from_the_pollers_squeue_and_goes_once_the_job_runs(
    client: FlaskClient, app: Flask, scheduler: FakeScheduler
) -> None:
    service = app.extensions["relion_gateway"]
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    record = service.store.get(job_id)
    assert (record.estimated_start_at, record.estimate_source) == (TEST_ONLY_START, "sbatch --test-only")

    pending(scheduler, "1001", "Resources", "N/A")  # not planned by backfill yet: the submit estimate stays
    calls = len(scheduler.status_calls)
    service.poll()
    assert len(scheduler.status_calls) == calls + 1  # one batched query per cycle, estimates or not
    record = service.store.get(job_id)
    assert (record.pending_reason, record.estimate_source) == ("Resources", "sbatch --test-only")

    pending(scheduler, "1001", "Priority", "2026-03-04T05:06:07")
    service.poll()
    record = service.store.get(job_id)
    assert record.pending_reason == "Priority" and record.estimate_source == "squeue"
    assert record.estimated_start_at == parse_timestamp("2026-03-04T05:06:07")

    scheduler.set_state("1001", "RUNNING")
    service.poll()
    record = service.store.get(job_id)
    assert (record.pending_reason, record.estimated_start_at, record.estimate_source) == (None, None, None)


def test_estimates_at_submit_can_be_turned_off(client: FlaskClient, app: Flask) -> None:
    service = app.extensions["relion_gateway"]
    service.config["SLURM_ESTIMATE_AT_SUBMIT"] = False
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    assert service.store.get(job_id).estimated_start_at is None


def test_a_poll_that_finds_nothing_new_keeps_the_etag(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    service = app.extensions["relion_gateway"]
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    pending(scheduler, "1001", "Resources", "N/A")
    service.poll()
    first = client.get(f"{JOBS}/{job_id}")
    checked = service.store.get(job_id).checked_at
    time.sleep(0.01)
    service.poll()
    service.poll()
    assert service.store.get(job_id).checked_at > checked  # it did look
    again = client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    scheduler.set_state("1001", "RUNNING")
    service.poll()
    assert client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": first.headers["ETag"]}).status_code == 200


def test_a_queued_job_says_why_it_waits_and_when_it_may_start_as_an_estimate(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    answer = client.post(JOBS, json=valid_request()).json
    wait = answer["wait"]
    assert (wait["pending_reason"], wait["estimate_source"], wait["estimated"]) == (None, "sbatch --test-only", True)
    assert wait["estimated_start"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(TEST_ONLY_START)))
    pending(scheduler, "1001", "Resources", "2026-03-04T05:06:07")
    app.extensions["relion_gateway"].poll()
    job = client.get(f"{JOBS}/{answer['job_id']}").json
    assert job["wait"]["pending_reason"] == "Resources" and job["wait"]["estimate_source"] == "squeue"
    listed = client.get(JOBS).json["jobs"][0]
    assert listed["wait"] == job["wait"]  # in the list's summaries too: a queue page shows it
    scheduler.set_state("1001", "RUNNING")
    app.extensions["relion_gateway"].poll()
    assert client.get(f"{JOBS}/{answer['job_id']}").json["wait"] is None
