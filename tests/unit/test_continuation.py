"""Continuing a job: attempts, auto_continue after a time limit, a user's continue, RELION's --continue argv."""
from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from gateway.callbacks import ROLE_MAIN
from gateway.jobs.signed import EventRefused, storage_answer
from gateway.jobs.spec import JobSpec
from gateway.jobside.watch import IterationClock
from gateway.relion.continuing import CONTINUE_OPTIONS, continue_arguments
from gateway.relion.catalogue import CATALOGUE
from tests.conftest import valid_request
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"


def jobs(app: Any) -> Any:
    return app.extensions["relion_gateway"]


def archived(iterations: range, *, kept: bool = False, main_job_id: str = "1001") -> str:
    """A metadata.json as the hook writes it, listing the optimiser files of ``iterations``."""
    files = [{"path": f"run_it{i:03d}_optimiser.star", "bytes": 10} for i in iterations]
    return json.dumps({"output": {"files": files}, "workspace_kept": kept, "slurm": {"main_job_id": main_job_id}})


def end_attempt(app: Any, scheduler: FakeScheduler, job_id: str, main_state: str, metadata: str | None, exit_code: int = 0) -> dict[str, Any]:
    record = jobs(app).get(job_id)
    scheduler.set_state(record.main_slurm_id, main_state, exit_code=exit_code)
    scheduler.set_state(record.archive_slurm_id, "COMPLETED", exit_code=0)
    if metadata is not None:
        jobs(app).store.update(job_id, metadata_json=metadata)  # what the hook's signed event delivers
    jobs(app).poll()
    return dict(json.loads(jobs(app).get(job_id).job_json))


def test_a_timeout_with_auto_continue_starts_attempt_two_from_the_last_iteration(client: FlaskClient, app: Any, scheduler: FakeScheduler) -> None:
    job = client.post(JOBS, json=valid_request(auto_continue=1, flags={**valid_request()["flags"], "iter": 25})).json
    assert job["auto_continue"] == 1 and [a["trigger"] for a in job["attempts"]] == ["submit"]
    end_attempt(app, scheduler, job["job_id"], "TIMEOUT", archived(range(0, 8), kept=True))

    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "queued", body["message"]
    first, second = body["attempts"]
    assert (first["number"], first["state"], first["main_slurm_id"], first["last_iteration"]) == (1, "timeout", "1001", 7)
    assert (second["number"], second["trigger"], second["from_iteration"], second["workspace"]) == (2, "auto", 7, "kept")
    assert body["slurm"]["main_job_id"] == second["main_slurm_id"] == "1003"
    main_script = scheduler.submitted[2]
    # Its own Slurm names (an earlier attempt's jobs must never be taken for this one's) ...
    assert f"#SBATCH --job-name={job['job_id']}.attempt2\n" in main_script
    assert f"#SBATCH --job-name={job['job_id']}.attempt2.archive\n" in scheduler.submitted[3]
    # ... and RELION continues from iteration 7 into the same prefix, with only what --continue reads.
    assert "--continue Class2D/run_it007_optimiser.star --o Class2D/run" in main_script
    assert "--iter 25" in main_script and "--K" not in main_script and "--ctf" not in main_script
    assert "--continue-from Class2D/run_it007_optimiser.star" in main_script and "--output-dir Class2D" in main_script

    # The second attempt times out too: its one automatic continuation is used up.
    spec = end_attempt(app, scheduler, job["job_id"], "TIMEOUT", archived(range(0, 12), main_job_id="1003"))
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "timeout" and "used up" in body["message"]
    assert len(spec["attempts"]) == 2 and len(scheduler.submitted) == 4


@pytest.mark.parametrize("main_state, continued", [("FAILED", False), ("NODE_FAIL", True), ("PREEMPTED", True), ("CANCELLED by 0", False)])
def test_auto_continue_follows_slurm_endings_never_relions_error(
    client: FlaskClient, app: Any, scheduler: FakeScheduler, main_state: str, continued: bool
) -> None:
    job_id = client.post(JOBS, json=valid_request(auto_continue=2)).json["job_id"]
    end_attempt(app, scheduler, job_id, main_state, archived(range(0, 3)), exit_code=1)
    body = client.get(f"{JOBS}/{job_id}").json
    assert (body["status"] == "queued") is continued, body
    assert len(body["attempts"]) == (2 if continued else 1)


def test_without_a_finished_iteration_an_auto_continue_says_why_and_the_job_stays_ended(
    client: FlaskClient, app: Any, scheduler: FakeScheduler
) -> None:
    job_id = client.post(JOBS, json=valid_request(auto_continue=1)).json["job_id"]
    end_attempt(app, scheduler, job_id, "TIMEOUT", archived(range(0, 1)))  # only it000: the initial references
    body = client.get(f"{JOBS}/{job_id}").json
    assert body["status"] == "timeout" and "not continued" in body["message"] and "no iteration" in body["message"]


def test_a_user_continues_a_cancelled_job_once(client: FlaskClient, app: Any, scheduler: FakeScheduler) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    end_attempt(app, scheduler, job_id, "CANCELLED by 0", archived(range(0, 3)))
    assert client.get(f"{JOBS}/{job_id}").json["status"] == "cancelled"

    response = client.post(f"{JOBS}/{job_id}/continue")
    assert response.status_code == 202, response.json
    attempts = response.json["attempts"]
    assert [(a["trigger"], a["state"]) for a in attempts] == [("submit", "cancelled"), ("manual", "queued")]
    assert attempts[1]["workspace"] == "restored" and attempts[1]["from_iteration"] == 2
    # A second continue while the first one runs is refused, and queues nothing.
    again = client.post(f"{JOBS}/{job_id}/continue")
    assert again.status_code == 409 and "job_id" in again.json["errors"]["json"] and len(scheduler.submitted) == 4


def test_continue_is_refused_for_running_succeeded_and_other_users_jobs(
    client: FlaskClient, bob_client: FlaskClient, app: Any, scheduler: FakeScheduler
) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    assert client.post(f"{JOBS}/{job_id}/continue").status_code == 409  # queued
    assert bob_client.post(f"{JOBS}/{job_id}/continue").status_code == 404  # not bob's: it does not exist
    end_attempt(app, scheduler, job_id, "COMPLETED", archived(range(0, 3)))
    response = client.post(f"{JOBS}/{job_id}/continue")
    assert response.status_code == 409 and "succeeded" in response.json["message"]


def test_continuing_a_job_with_no_finished_iteration_is_a_409_naming_the_file(client: FlaskClient, app: Any, scheduler: FakeScheduler) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    end_attempt(app, scheduler, job_id, "TIMEOUT", json.dumps({"output": None}))
    response = client.post(f"{JOBS}/{job_id}/continue")
    assert response.status_code == 409 and "Class2D/run_itNNN_optimiser.star" in response.json["message"]


def test_auto_continue_is_bounded_by_the_configuration(client: FlaskClient, app: Any) -> None:
    app.config["JOB_MAX_AUTO_CONTINUE"] = 2
    jobs(app).config["JOB_MAX_AUTO_CONTINUE"] = 2
    response = client.post(JOBS, json=valid_request(auto_continue=3))
    assert response.status_code == 422 and "auto_continue" in response.json["errors"]["json"]
    assert client.post(JOBS, json=valid_request(auto_continue=-1)).status_code == 422


def test_only_a_continued_attempt_may_restore_the_archived_output(
    client: FlaskClient, app: Any, scheduler: FakeScheduler, storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "presigned_get", lambda location, expires, for_job=False: f"https://s3.test/{location.key}", raising=False)
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    with pytest.raises(EventRefused):
        storage_answer(storage, jobs(app).get(job_id), ROLE_MAIN, {"type": "storage", "op": "restore"})
    end_attempt(app, scheduler, job_id, "TIMEOUT", archived(range(0, 3)))
    client.post(f"{JOBS}/{job_id}/continue")
    record = jobs(app).get(job_id)
    storage.objects[record.output_url + "output.tar.gz"] = b"x" * 10
    answer = storage_answer(storage, record, ROLE_MAIN, {"type": "storage", "op": "restore"})
    assert answer["s3_url"] == record.output_url + "output.tar.gz" and answer["size"] == 10
    assert answer["url"].endswith("/output.tar.gz")


def test_a_metadata_file_of_an_earlier_attempt_is_not_taken_for_this_ones() -> None:
    from gateway.jobs.track import _of_main_job

    assert _of_main_job(json.dumps({"slurm": {"main_job_id": "1001"}}), "1001")
    assert not _of_main_job(json.dumps({"slurm": {"main_job_id": "1001"}}), "1003")
    assert not _of_main_job("not json", "1001")


def test_continue_arguments_keep_only_what_relion_reads_when_continuing() -> None:
    assert CONTINUE_OPTIONS <= set(CATALOGUE)
    argv = continue_arguments({"iter": 25, "K": 3, "ctf": True, "j": 2, "pool": 3, "healpix_order": 2}, "C/run_it004_optimiser.star", "C/run")
    assert argv == ["--continue", "C/run_it004_optimiser.star", "--o", "C/run", "--iter", "25", "--j", "2", "--pool", "3"]


def test_legacy_records_read_as_one_first_attempt() -> None:
    spec = JobSpec.from_dict({"job_id": "job_2d_ws_1", "accepted_at": 5.0})
    assert spec.attempt.number == 1 and spec.slurm_name == "job_2d_ws_1" and spec.attempt_started_at == 5.0
    assert JobSpec.from_json(spec.to_json()).attempts == () and JobSpec.from_json(spec.to_json()).attempt == spec.attempt


def test_the_iteration_clock_warns_when_the_rest_will_not_fit() -> None:
    clock = IterationClock()
    assert clock.estimate(0, 25, 10_000.0, 0.0) == {}  # one sighting: no estimate yet
    clock.saw(0, 0.0)
    clock.saw(4, 400.0)  # 100 s per iteration
    fits = clock.estimate(4, 25, 10_000.0, 400.0)
    assert fits["seconds_per_iteration"] == 100.0 and fits["fits_time_limit"] and "time_warning" not in fits
    late = clock.estimate(4, 25, 1_500.0, 400.0)
    assert late["fits_time_limit"] is False and late["estimated_finish_at"] == 2500.0
    assert "remaining 21 iterations need 35 min" in late["time_warning"] and "18 min" in late["time_warning"]
    # Auto-refine plans no count: only the next iteration is judged.
    assert "the next iteration" in clock.estimate(4, None, 450.0, 400.0)["time_warning"]
