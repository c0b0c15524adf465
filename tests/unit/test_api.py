"""The REST API against a fake scheduler: contract, errors, state tracking."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.conftest import valid_request
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"


def poll(app) -> None:
    """One poller cycle (the background poller does not run in tests)."""
    app.extensions["relion_gateway"].poll()


def submit(client: FlaskClient, **changes: object) -> dict:
    response = client.post(JOBS, json=valid_request(**changes))
    assert response.status_code == 202, response.json
    return response.json


def test_submit_returns_202_with_seed_style_job_id(client: FlaskClient, scheduler: FakeScheduler) -> None:
    job = submit(client)
    assert re.fullmatch(r"job_2d_ws1_[0-9a-f]{8}", job["job_id"])
    assert job["status"] == "queued"
    assert job["slurm"] == {"main_job_id": "1001", "archive_job_id": "1002", "state": "PENDING", "exit_code": None}
    assert job["output_url"] == f"s3://relion-local/results/{job['job_id']}/"
    main, archive = scheduler.submitted
    assert "#SBATCH --ntasks=3" in main and "#SBATCH --cpus-per-task=1" in main
    assert "relion_refine_mpi --i particles.star --o Class2D/run --ctf --iter 2 --j 1 --K 3" in main
    assert "#SBATCH --dependency=afterany:1001" in archive


def test_submit_writes_job_file_and_stores_scripts(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = submit(client)
    log_dir = Path(app.config["PATHS_LOG_ROOT"]) / "alice" / job["job_id"]
    recorded = json.loads((log_dir / "job.json").read_text())
    assert recorded["main_slurm_id"] == "1001" and recorded["output_dir"] == "Class2D"
    record = app.extensions["relion_gateway"].store.get(job["job_id"])
    assert record.main_script == scheduler.submitted[0]
    assert record.archive_script == scheduler.submitted[1]


def test_single_rank_runs_sequential_relion(client: FlaskClient, scheduler: FakeScheduler) -> None:
    submit(client, num_mpi=1)
    main = scheduler.submitted[0]
    assert "\nrelion_refine --i particles.star" in main
    assert "mpirun" not in main


def test_dashed_flags_are_normalised(client: FlaskClient, scheduler: FakeScheduler) -> None:
    flags = {"--i": "particles.star", "--o": "Class2D/run", "--particle-diameter": 100, "--tau2-fudge": 2, "--ctf": True}
    job = submit(client, flags=flags)
    assert job["flags"] == {"i": "particles.star", "o": "Class2D/run", "particle_diameter": 100, "tau2_fudge": 2, "ctf": True}
    assert "--ctf --particle_diameter 100 --tau2_fudge 2" in scheduler.submitted[0]


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"mode": "4d"}, "mode", "Must be one of"),
        ({"num_mpi": 0}, "num_mpi", "greater than or equal to 1"),
        ({"num_mpi": "3"}, "num_mpi", "Not a valid integer"),
        ({"user_id": "../etc"}, "user_id", "letters, digits"),
        ({"workspace_id": ".."}, "workspace_id", "letters, digits"),
        ({"dataset_s3_url": "http://example.org/x.tar.gz"}, "dataset_s3_url", "s3:// URL"),
        ({"dataset_s3_url": "s3://other-bucket/x.tar.gz"}, "dataset_s3_url", "not one of the allowed buckets"),
        ({"dataset_s3_url": "s3://relion-local/x.zip"}, "dataset_s3_url", ".tar.gz"),
        ({"output_s3_prefix": "/tmp/out"}, "output_s3_prefix", "s3:// URL"),
        ({"flags": {"o": "Class2D/run"}}, "flags.i", "required"),
        ({"flags": {"i": "p.star", "o": "run"}}, "flags.o", "directory"),
        ({"flags": {"i": "/etc/passwd", "o": "C/run"}}, "flags.i", "relative"),
        ({"flags": {"i": "../p.star", "o": "C/run"}}, "flags.i", "'..'"),
        ({"flags": {"i": "-rf", "o": "C/run"}}, "flags.i", "must not start with '-'"),
        ({"flags": {"i": "p.star", "o": "C/run", "K": [1, 2]}}, "flags.K", "switch"),
        ({"flags": {"i": "p.star\n", "o": "C/run"}}, "flags.i", "control characters"),
        ({"flags": {"i": "p.star", "o": "C/run", "j": 0}}, "flags.j", "at least 1"),
        ({"flags": {"i": "p.star", "o": "C/run", "ref": "ref.mrc"}}, "flags.ref", "takes no --ref"),
        ({"mode": "3d"}, "flags.ref", "needs --ref"),
        ({"mode": "autorefine", "num_mpi": 4, "flags": {"i": "p.star", "o": "R/run", "ref": "ref.mrc"}}, "num_mpi", "odd number"),
        ({"extra": 1}, "extra", "Unknown field"),
    ],
)
def test_bad_requests_get_422_naming_the_field(
    client: FlaskClient, scheduler: FakeScheduler, changes: dict, field: str, fragment: str
) -> None:
    response = client.post(JOBS, json=valid_request(**changes))
    assert response.status_code == 422
    body = response.json
    assert body["code"] == 422 and body["status"] == "Unprocessable Entity"
    assert field in body["errors"]["json"], body
    assert fragment in " ".join(body["errors"]["json"][field]), body
    assert field in body["message"]
    assert scheduler.submitted == []  # nothing reached Slurm


def test_malformed_json_is_a_400_in_the_error_shape(client: FlaskClient) -> None:
    response = client.post(JOBS, data="{not json", content_type="application/json")
    assert response.status_code in (400, 422)
    assert set(response.json) >= {"code", "status", "message"}


def test_unknown_job_is_404(client: FlaskClient) -> None:
    response = client.get(f"{JOBS}/job_2d_x_00000000")
    assert response.status_code == 404
    assert response.json["message"] == "no job 'job_2d_x_00000000'"


def test_failed_sbatch_is_recorded_as_submit_failed(client: FlaskClient, scheduler: FakeScheduler) -> None:
    scheduler.fail_submit_at = 0
    job = submit(client)
    assert job["status"] == "submit_failed"
    assert "Invalid partition name" in job["message"]
    # The record survives: the job can be read back.
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "submit_failed"


def test_refused_archive_job_cancels_the_main_job(client: FlaskClient, scheduler: FakeScheduler) -> None:
    scheduler.fail_submit_at = 1
    job = submit(client)
    assert job["status"] == "submit_failed"
    assert scheduler.cancelled == ["1001"]
    assert "main job 1001 cancelled" in job["message"]


def write_metadata(app, job: dict, metadata: dict) -> None:
    log_dir = Path(app.config["PATHS_LOG_ROOT"]) / "alice" / job["job_id"]
    (log_dir / "metadata.json").write_text(json.dumps(metadata))


def test_job_follows_slurm_states_to_succeeded(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = submit(client)
    url = f"{JOBS}/{job['job_id']}"
    scheduler.set_state("1001", "PENDING", reason="Resources")
    poll(app)
    body = client.get(url).json
    assert body["status"] == "queued" and body["slurm"]["state"] == "PENDING (Resources)"

    scheduler.set_state("1001", "RUNNING")
    log_dir = Path(app.config["PATHS_LOG_ROOT"]) / "alice" / job["job_id"]
    (log_dir / "phases").write_text("staging 1700000000\n")
    poll(app)
    assert client.get(url).json["status"] == "staging"
    (log_dir / "phases").write_text("staging 1700000000\nrunning 1700000005\n")
    poll(app)
    running = client.get(url)
    assert running.json["status"] == "running" and running.json["started_at"] is not None
    assert running.headers["Retry-After"] == "5" and running.json["next_poll_s"] == 5.0

    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "RUNNING")
    poll(app)
    assert client.get(url).json["status"] == "archiving"

    metadata = {"schema_version": 1, "relion": {"results": {"class_distribution": [0.5, 0.5]}}}
    write_metadata(app, job, metadata)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    poll(app)
    body = client.get(url).json
    assert body["status"] == "succeeded" and body["next_poll_s"] is None
    assert body["metadata"] == metadata
    assert json.loads(base64.b64decode(body["metadata_b64"])) == metadata
    # Reads never cost Slurm anything, and ended jobs are not polled again.
    calls = len(scheduler.status_calls)
    for _ in range(20):
        client.get(url)
    poll(app)
    assert len(scheduler.status_calls) == calls


@pytest.mark.parametrize(
    ("main_state", "exit_code", "expected"),
    [
        ("FAILED", 1, "failed"),
        ("CANCELLED by 0", 0, "cancelled"),
        ("TIMEOUT", 0, "timeout"),
        ("OUT_OF_MEMORY", 0, "out_of_memory"),
        ("NODE_FAIL", 0, "node_fail"),
    ],
)
def test_main_job_fates_stay_distinct(client: FlaskClient, app, scheduler: FakeScheduler, main_state: str, exit_code: int, expected: str) -> None:
    job = submit(client)
    scheduler.set_state("1001", main_state, exit_code=exit_code)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    poll(app)
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == expected
    assert main_state.split()[0] in body["message"]


def test_failed_archive_job_is_archive_failed(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = submit(client)
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "FAILED", exit_code=3)
    log_dir = Path(app.extensions["relion_gateway"].store.get(job["job_id"]).job["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "archive-1002.err").write_text("archive failed, workspace kept: S3 PUT s3://b/k failed: Could not connect\n")
    poll(app)
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "archive_failed"
    assert body["message"] == "archive job failed, workspace kept: S3 PUT s3://b/k failed: Could not connect"


def test_vanished_job_is_lost_not_succeeded(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = submit(client)
    scheduler.forget("1001")
    scheduler.forget("1002")
    poll(app)
    body = client.get(f"{JOBS}/{job['job_id']}").json
    assert body["status"] == "lost"
    assert body["message"].startswith("Slurm no longer knows this job (main job 1001, archive job 1002)")


def test_cancel_cancels_the_main_job_only_and_repeating_is_harmless(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = submit(client)
    response = client.delete(f"{JOBS}/{job['job_id']}")
    assert response.status_code == 202 and response.json["message"] == "cancel requested"
    assert scheduler.cancelled == ["1001"]
    assert client.delete(f"{JOBS}/{job['job_id']}").status_code == 202
    poll(app)
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "archiving"  # the hook still has to run
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    poll(app)
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "cancelled"
    assert client.delete(f"{JOBS}/{job['job_id']}").status_code == 409


def test_cancel_of_an_ended_job_is_409(client: FlaskClient, scheduler: FakeScheduler) -> None:
    scheduler.fail_submit_at = 0
    job = submit(client)
    response = client.delete(f"{JOBS}/{job['job_id']}")
    assert response.status_code == 409
    assert "already ended" in response.json["message"]


def test_openapi_spec_lists_the_job_endpoints(client: FlaskClient) -> None:
    spec = client.get("/v1/relion/openapi.json").json
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/script", "/render"} <= set(spec["paths"])
    assert "JobRequest" in spec["components"]["schemas"]


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").json["status"] == "ok"


def test_script_endpoint_returns_the_exact_submitted_text(client: FlaskClient, scheduler: FakeScheduler) -> None:
    job = submit(client)
    response = client.get(f"{JOBS}/{job['job_id']}/script")
    assert response.status_code == 200 and response.mimetype == "text/x-shellscript"
    assert response.get_data(as_text=True) == scheduler.submitted[0]
    archive = client.get(f"{JOBS}/{job['job_id']}/script?which=archive")
    assert archive.get_data(as_text=True) == scheduler.submitted[1]
    assert client.get(f"{JOBS}/{job['job_id']}/script?which=other").status_code == 422
    assert client.get(f"{JOBS}/job_2d_x_00000000/script").status_code == 404


def test_render_is_a_dry_run(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    response = client.post("/v1/relion/render?slurm_test=true", json=valid_request())
    assert response.status_code == 200
    body = response.json
    assert body["main_script"].startswith("#!/bin/bash") and "afterany:MAIN_JOB_ID" in body["archive_script"]
    assert body["command_line"] == "relion_refine_mpi --i particles.star --o Class2D/run --ctf --iter 2 --j 1 --K 3"
    assert body["slurm_test"].startswith("sbatch: Job")
    assert body["resources"]["ntasks"] == 3
    assert scheduler.submitted == []  # nothing queued
    assert app.extensions["relion_gateway"].store.list() == ([], 0)  # nothing stored


def test_render_applies_the_same_rules(client: FlaskClient) -> None:
    response = client.post("/v1/relion/render", json=valid_request(mode="autorefine", num_mpi=2, flags={"i": "p.star", "o": "R/run", "ref": "r.mrc"}))
    assert response.status_code == 422 and "odd number" in response.json["message"]


def test_signed_progress_and_metadata_events(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    from gateway.callbacks import SIGNATURE_HEADER, TOKEN_ENV, sign

    job = submit(client)
    token = scheduler.environments[0][TOKEN_ENV]  # handed to the job at sbatch time, not in the script
    assert token not in scheduler.submitted[0] and token not in scheduler.submitted[1]

    def send(kind: str, data: dict, signed_with: str = token, job_id: str = job["job_id"], age: float = 0.0):
        import time as _time

        body = json.dumps({"job_id": job_id, "type": kind, "sent_at": _time.time() - age, "data": data}).encode()
        return client.post(f"{JOBS}/{job['job_id']}/events", data=body, headers={SIGNATURE_HEADER: sign(signed_with, body)}, content_type="application/json")

    assert send("progress", {"iteration": 3, "iterations_planned": 25, "resolution_angstrom": 12.5}).status_code == 204
    assert client.get(f"{JOBS}/{job['job_id']}").json["progress"]["iteration"] == 3
    assert send("progress", {"iteration": 4}, signed_with="0" * 64).status_code == 401
    assert send("progress", {"iteration": 4}, age=3600).status_code == 401
    assert send("progress", {"iteration": 4}, job_id="job_2d_other_00000000").status_code == 401
    assert send("bogus", {}).status_code == 422
    # Each Slurm job has its own token: the main job's may not send the hook's metadata.
    assert send("metadata", {"schema_version": 1}).status_code == 401
    archive_token = scheduler.environments[1][TOKEN_ENV]
    assert archive_token != token
    assert send("progress", {"iteration": 5}, signed_with=archive_token).status_code == 401
    # A job cannot report what it cost: the gateway costs it from Slurm's accounting.
    assert send("metadata", {"schema_version": 1, "usage": {"cpu_hours": 0.0}}, signed_with=archive_token).status_code == 204
    assert client.get(f"{JOBS}/{job['job_id']}/metadata").json == {"schema_version": 1}


def test_metadata_before_the_job_ends_is_404(client: FlaskClient) -> None:
    job = submit(client)
    response = client.get(f"{JOBS}/{job['job_id']}/metadata")
    assert response.status_code == 404 and "no metadata yet" in response.json["message"]


def test_archive_retry_only_for_archive_failed(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    job = submit(client)
    assert client.post(f"{JOBS}/{job['job_id']}/archive").status_code == 409
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "FAILED", exit_code=3)
    poll(app)
    response = client.post(f"{JOBS}/{job['job_id']}/archive")
    assert response.status_code == 202
    assert response.json["status"] == "archiving" and response.json["slurm"]["archive_job_id"] == "1003"
    retry_script = scheduler.submitted[-1]
    assert "--dependency" not in retry_script and "--main-slurm-id 1001" in retry_script
    scheduler.set_state("1003", "COMPLETED", exit_code=0)
    poll(app)
    assert client.get(f"{JOBS}/{job['job_id']}").json["status"] == "succeeded"


def test_metadata_is_fetched_from_s3_when_no_callback_came(client: FlaskClient, app, scheduler: FakeScheduler, storage) -> None:
    job = submit(client)
    storage.objects[f"{job['output_url']}metadata.json"] = b'{"schema_version": 1, "from": "s3"}'
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    poll(app)
    assert client.get(f"{JOBS}/{job['job_id']}").json["metadata"] == {"schema_version": 1, "from": "s3"}


def test_response_shows_the_requested_partition_and_time_limit(client: FlaskClient) -> None:
    job = submit(client, time_limit="00:20:00")
    assert (job["partition"], job["time_limit"]) == (None, "00:20:00")


def test_the_hook_gets_its_own_memory_whatever_relion_was_given(client: FlaskClient, app, scheduler: FakeScheduler) -> None:
    jobs = app.extensions["relion_gateway"]
    jobs.config["RELION_MEMORY_PER_RANK_MB"] = {"2d": 100}  # 100 MB per CPU: too little for the hook's upload buffers
    job = submit(client)
    main_script, archive_script = scheduler.submitted[-2:]
    assert "#SBATCH --mem-per-cpu=100M" in main_script
    assert "#SBATCH --mem=1024M" in archive_script and "--mem-per-cpu" not in archive_script
    # A record stored before [slurm] archive_memory_mb existed is still archived again on retry.
    record = jobs.store.get(job["job_id"])
    old = record.job  # as a gateway before the typed record stored it: template variables, one missing
    del old["schema_version"]
    old["archive_context"] = {"job_id": job["job_id"], "after_main": True, "archive_cpus": 2}
    jobs.store.update(job["job_id"], job_json=json.dumps(old))
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "FAILED", exit_code=3)
    poll(app)
    assert client.post(f"{JOBS}/{job['job_id']}/archive").status_code == 202
    assert "#SBATCH --mem=1024M" in scheduler.submitted[-1]
