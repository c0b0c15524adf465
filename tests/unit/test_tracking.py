"""Tracking: idempotent submit, resumed submissions, reused Slurm ids, the poller's cycle and lease."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.jobs.poller import Poller
from gateway.slurm.backend import SchedulerError
from tests.conftest import valid_request
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"


def service(app):
    return app.extensions["relion_gateway"]


def test_same_idempotency_key_returns_the_same_job(client: FlaskClient, scheduler: FakeScheduler) -> None:
    first = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "portal-42"})
    second = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "portal-42"})
    assert first.status_code == second.status_code == 202
    assert first.json["job_id"] == second.json["job_id"]
    assert len(scheduler.submitted) == 2  # one main + one archive, once


def test_same_key_from_another_user_is_another_job(client: FlaskClient, bob_client: FlaskClient) -> None:
    a = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "k1"}).json
    b = bob_client.post(JOBS, json=valid_request(user_id="bob"), headers={"Idempotency-Key": "k1"}).json
    assert a["job_id"] != b["job_id"]


def test_reusing_a_key_for_a_different_request_is_refused(client: FlaskClient) -> None:
    client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "k2"})
    response = client.post(JOBS, json=valid_request(num_mpi=5), headers={"Idempotency-Key": "k2"})
    assert response.status_code == 422 and "different request" in response.json["message"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "é"])
def test_malformed_idempotency_key(client: FlaskClient, key: str) -> None:
    response = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": key})
    assert response.status_code == 422 and "Idempotency-Key" in response.json["errors"]["json"]


def test_concurrent_retries_with_one_key_make_one_job(app, scheduler: FakeScheduler) -> None:
    results: list[str] = []

    def post() -> None:
        with app.test_client() as c:
            results.append(c.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "race"}).json["job_id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert service(app).store.list()[1] == 1
    assert sum("relion-gateway main job" in s for s in scheduler.submitted) == 1


def test_a_submission_cut_short_is_finished_on_retry_without_a_twin(app, scheduler: FakeScheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = service(app)
    # The gateway "dies" after storing the record and submitting the main job, before storing its id.
    real_update = jobs.store.update
    calls = {"n": 0}

    def dying_update(job_id: str, **changes: object) -> None:
        if "main_slurm_id" in changes and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("killed")
        real_update(job_id, **changes)

    monkeypatch.setattr(jobs.store, "update", dying_update)
    with pytest.raises(RuntimeError):
        jobs.submit(valid_request(), idempotency_key="crash")
    monkeypatch.setattr(jobs.store, "update", real_update)
    jobs.store.update(jobs.store.list()[0][0].job_id, submit_claim_until=None)  # the dead process's claim expired

    record = jobs.submit(valid_request(), idempotency_key="crash")  # the client retries
    assert record.main_slurm_id == "1001" and record.archive_slurm_id == "1002"
    assert len(scheduler.submitted) == 2  # the main job was adopted by name, not submitted twice


def test_transient_sbatch_errors_are_retried(app, scheduler: FakeScheduler) -> None:
    service(app).config["SLURM_SUBMIT_RETRY_DELAY"] = 0.01
    scheduler.transient_failures = 2
    record = service(app).submit(valid_request())
    assert record.state == "queued" and record.main_slurm_id == "1001"


def test_transient_errors_past_the_bound_are_submit_failed(app, scheduler: FakeScheduler) -> None:
    service(app).config.update(SLURM_SUBMIT_RETRY_DELAY=0.01, SLURM_SUBMIT_ATTEMPTS=2)
    scheduler.transient_failures = 5
    record = service(app).submit(valid_request())
    assert record.state == "submit_failed" and "timed out" in record.message


def test_a_reused_slurm_id_marks_the_job_lost_never_adopts_the_stranger(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = client.post(JOBS, json=valid_request()).json
    scheduler.set_state("1001", "COMPLETED", exit_code=0, name="someone-elses-job")
    scheduler.set_state("1002", "COMPLETED", exit_code=0, name="another-one")
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "lost"
    assert "Slurm lost this job" in body["message"] and "someone-elses-job" in body["message"]


def test_one_odd_name_in_a_status_answer_does_not_end_the_job(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = client.post(JOBS, json=valid_request()).json
    scheduler.set_state("1001", "RUNNING", name="allocation", glitch=True)
    service(app).poll()
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "queued"  # unchanged, not lost
    scheduler.set_state("1001", "RUNNING")
    service(app).poll()
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "staging"  # no phase stamped yet


def test_list_filters_and_pages(admin_client: FlaskClient, scheduler: FakeScheduler) -> None:
    client = admin_client  # bob's job and every user's list: an admin's view
    for n in range(3):
        client.post(JOBS, json=valid_request(workspace_id=f"w{n}"))
    client.post(JOBS, json=valid_request(user_id="bob", mode="3d", flags={"i": "p.star", "o": "C/run", "ref": "r.mrc"}))
    scheduler.fail_submit_at = len(scheduler.submitted)
    client.post(JOBS, json=valid_request(workspace_id="broken"))
    everything = client.get(JOBS).json
    assert everything["total"] == 5
    page = client.get(f"{JOBS}?page=2&page_size=2").json
    assert len(page["jobs"]) == 2 and page["page"] == 2
    assert client.get(f"{JOBS}?mode=3d").json["total"] == 1
    assert client.get(f"{JOBS}?user_id=alice").json["total"] == 4
    failed = client.get(f"{JOBS}?state=submit_failed").json
    assert [j["workspace_id"] for j in failed["jobs"]] == ["broken"]
    assert client.get(f"{JOBS}?page=0").status_code == 422


class FlakyScheduler(FakeScheduler):
    down: bool = False

    def status(self, job_ids):  # type: ignore[no-untyped-def]
        if self.down:
            raise SchedulerError("squeue failed (exit code 1): Unable to contact slurm controller", transient=True)
        return super().status(job_ids)


def test_poller_backs_off_on_errors_and_changes_nothing(app) -> None:
    flaky = FlakyScheduler()
    jobs = service(app)
    jobs.scheduler = flaky
    record = jobs.submit(valid_request())
    poller = Poller(jobs, {**jobs.config, "POLLER_INTERVAL_ACTIVE": 5.0, "POLLER_INTERVAL_QUEUED": 15.0, "POLLER_MAX_BACKOFF": 20.0})
    flaky.down = True
    assert [poller.cycle() for _ in range(4)] == [5.0, 10.0, 20.0, 20.0]
    assert jobs.store.get(record.job_id).state == "queued"
    assert poller.stats.errors == 4
    flaky.down = False
    assert poller.cycle() == 15.0  # healthy again: only queued jobs -> the queued interval
    flaky.set_state(record.main_slurm_id, "RUNNING")
    assert poller.cycle() == 5.0  # something runs -> the active interval


def test_one_status_query_per_cycle_whatever_the_number_of_jobs(app, scheduler: FakeScheduler) -> None:
    jobs = service(app)
    for n in range(50):
        jobs.submit(valid_request(workspace_id=f"w{n}"))
    scheduler.status_calls.clear()
    jobs.poll()
    assert len(scheduler.status_calls) == 1 and len(scheduler.status_calls[0]) == 100


def test_only_the_lease_holder_polls(app, scheduler: FakeScheduler) -> None:
    jobs = service(app)
    jobs.submit(valid_request())
    first = Poller(jobs, jobs.config, holder="a")
    second = Poller(jobs, jobs.config, holder="b")
    scheduler.status_calls.clear()
    first.cycle()
    second.cycle()
    assert len(scheduler.status_calls) == 1
    first.stop()  # releases the lease
    second.cycle()
    assert len(scheduler.status_calls) == 2


def test_expired_lease_is_taken_over(app) -> None:
    store = service(app).store
    assert store.acquire_lease("poller", "a", 0.05)
    assert not store.acquire_lease("poller", "b", 10)
    time.sleep(0.1)
    assert store.acquire_lease("poller", "b", 10)


def test_a_crashed_submission_is_finished_by_the_poller_once_its_claim_lapses(app, scheduler: FakeScheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = service(app)
    jobs.config["SLURM_COMMAND_TIMEOUT"] = 1.0
    assert jobs.submit_claim_seconds == 2 * 1.0 + 10.0  # one find-by-name and one sbatch, plus a margin
    # The gateway "dies" after storing the record, before sbatch: the record keeps the dead claim.
    monkeypatch.setattr(jobs.submitter, "submit_record", lambda record, resuming=False: record)
    job_id = jobs.submit(valid_request(), idempotency_key="died").job_id
    monkeypatch.undo()
    jobs.poll()
    assert scheduler.submitted == []  # the claim is still held: nobody may take it over yet
    record = jobs.submit(valid_request(), idempotency_key="died")  # a client retry meanwhile
    assert record.job_id == job_id and record.state == "queued" and record.main_slurm_id is None
    jobs.store.update(job_id, submit_claim_until=time.time() - 1)  # the claim lapses
    jobs.poll()
    record = jobs.store.get(job_id)
    assert (record.main_slurm_id, record.archive_slurm_id) == ("1001", "1002")
    assert record.submit_claim_until is None


def test_the_claim_is_renewed_before_every_sbatch_attempt(app, scheduler: FakeScheduler) -> None:
    jobs = service(app)
    jobs.config.update(SLURM_SUBMIT_RETRY_DELAY=0.01, SLURM_COMMAND_TIMEOUT=0.01)
    renewed: list[str] = []
    real_extend = jobs.store.extend_claim
    jobs.store.extend_claim = lambda job_id, seconds: (renewed.append(job_id), real_extend(job_id, seconds))  # type: ignore[method-assign]
    scheduler.transient_failures = 2
    record = jobs.submit(valid_request())
    assert record.main_slurm_id == "1001"
    assert len(renewed) == 4  # three attempts for the main job, one for the archive job


@pytest.mark.parametrize(
    ("slurm_state", "stderr", "expected"),
    [
        # jobacct_gather OverMemoryKill (no cgroups), as the local stack's Slurm 22.05 writes it.
        ("FAILED", "slurmstepd-vm: error: StepId=5798.batch exceeded memory limit (205733888 > 104857600), being killed\n"
         "slurmstepd-vm: error: *** JOB 5798 ON vm CANCELLED AT 2026-11-24T04:23:13 ***\n", "out_of_memory"),
        # task/cgroup with ConstrainRAMSpace.
        ("FAILED", "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=17.batch. Some of your processes may have been killed by the cgroup out-of-memory handler.\n", "out_of_memory"),
        ("OUT_OF_MEMORY", "", "out_of_memory"),
        ("CANCELLED by 0", "slurmstepd: error: *** JOB 5 ON vm CANCELLED AT 2026-11-24T04:23:13 ***\n", "cancelled"),
        ("FAILED", "ERROR: \nsomething else went wrong\n", "failed"),
    ],
)
def test_a_memory_kill_is_out_of_memory_whatever_state_slurm_ends_it_in(
    client: FlaskClient, app, scheduler: FakeScheduler, tmp_path, slurm_state: str, stderr: str, expected: str
) -> None:
    service(app).config["PATHS_LOG_ROOT"] = str(tmp_path / "logs")
    job = client.post(JOBS, json=valid_request()).json
    log_dir = tmp_path / "logs" / "alice" / job["job_id"]
    (log_dir / "main-1001.err").write_text(stderr)
    scheduler.set_state("1001", slurm_state, exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == expected
    if expected == "out_of_memory" and stderr:
        assert "oom-kill event" in body["message"] or "exceeded memory limit" in body["message"]


def test_a_lost_archive_hook_is_replaced_while_the_main_job_runs(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = client.post(JOBS, json=valid_request()).json
    scheduler.set_state("1001", "RUNNING")
    scheduler.forget("1002")  # slurmctld lost the hook (killed right after the submission)
    scheduler.names.pop("1002")
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert "Slurm lost archive job 1002; resubmitted as job 1003" in body["message"]
    assert "--dependency=afterany:1001" in scheduler.submitted[-1]
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1003", "COMPLETED", exit_code=0)
    service(app).poll()
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "succeeded"


def test_a_hook_whose_id_was_reused_is_found_by_name_or_resubmitted_without_dependency(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = client.post(JOBS, json=valid_request()).json
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "PENDING", name="someone-elses-job")
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] != "lost"
    assert "now belongs to 'someone-elses-job'" in body["message"] and "resubmitted as job 1003" in body["message"]
    assert "--dependency" not in scheduler.submitted[-1]  # the main job has ended: nothing to wait for
    submitted = len(scheduler.submitted)
    scheduler.forget("1003")  # lost again, but this time Slurm lists a hook under our name
    scheduler.names["1004"] = f"{job['job_id']}.archive"
    scheduler.set_state("1004", "COMPLETED", exit_code=0)
    service(app).poll()
    assert len(scheduler.submitted) == submitted  # adopted, not submitted again
    assert "found under its name as job 1004" in client.get(f"{JOBS}/{job['job_id']}").json["message"]
    service(app).poll()
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "succeeded"


def test_a_requeued_job_says_so(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = client.post(JOBS, json=valid_request()).json
    scheduler.set_state("1001", "RUNNING")
    service(app).poll()
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "staging"
    scheduler.set_state("1001", "PENDING", reason="BeginTime")  # a node failure requeued it
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "queued"
    assert body["message"].startswith("Slurm requeued the main job after it had started (PENDING (BeginTime))")
    # The second run completes; its phases file records both starts.
    phases = Path(service(app).store.get(job["job_id"]).job["log_dir"]) / "phases"
    phases.parent.mkdir(parents=True, exist_ok=True)
    phases.write_text("staging 1.0\nrunning 2.0\nstaging 3.0\nrunning 4.0\nfinished 5.0\n")
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert (body["status"], body["message"]) == ("succeeded", "RELION finished; output archived (the main job started 2 times: Slurm requeued it)")


def test_a_job_slurm_still_runs_long_after_its_script_finished_is_flagged(client: FlaskClient, app, scheduler: FakeScheduler, tmp_path) -> None:
    service(app).config["PATHS_LOG_ROOT"] = str(tmp_path / "logs")
    job = client.post(JOBS, json=valid_request()).json
    phases = tmp_path / "logs" / "alice" / job["job_id"] / "phases"
    now = time.time()
    phases.write_text(f"staging {now - 400:.3f}\nrunning {now - 390:.3f}\nfinished {now - 60:.3f}\n")
    scheduler.set_state("1001", "RUNNING")
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "running" and "finished" not in (body["message"] or "")  # a minute: normal epilog lag
    phases.write_text(f"staging {now - 400:.3f}\nrunning {now - 390:.3f}\nfinished {now - 300:.3f}\n")
    service(app).poll()
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "running"  # no outcome is guessed
    assert body["message"].startswith("the job script finished 300 s ago but Slurm still lists main job 1001 as RUNNING")
    service(app).store.update(job["job_id"], message="")
    phases.write_text(phases.read_text() + f"staging {now - 20:.3f}\nrunning {now - 10:.3f}\n")  # requeued, running again
    service(app).poll()
    assert not client.get(f"{JOBS}/{job['job_id']}").json["message"]


def test_a_job_slurm_held_after_a_failed_launch_is_released_once(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    # Seen in CI: slurmctld SIGKILLed as a job started; Slurm requeued it "launch failed requeued
    # held" and it would have waited held forever.
    service = app.extensions["relion_gateway"]
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    scheduler.set_state("1001", "PENDING", reason="launch failed requeued held")
    service.poll()
    record = service.store.get(job_id)
    assert scheduler.released == ["1001"] and record.state == "queued" and "released main job 1001" in record.message
    scheduler.set_state("1001", "PENDING", reason="launch failed requeued held")  # held again
    service.poll()
    assert scheduler.released == ["1001"] and "an admin must look" in service.store.get(job_id).message
