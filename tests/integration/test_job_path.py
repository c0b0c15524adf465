"""The walking skeleton end to end: REST -> sbatch -> real RELION -> archive hook -> S3."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.demo import DEMO_FLAGS
from gateway.process import run_command
from gateway.storage.s3 import S3Storage, parse_s3_url
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback
from tests.integration.conftest import allow_admin, wait_for_end


def submit(http: requests.Session, url: str, request: dict[str, Any]) -> dict[str, Any]:
    response = http.post(f"{url}/v1/relion/jobs", json=request, timeout=60)
    assert response.status_code == 202, response.text
    return dict(response.json())


def request_for(dataset_url: str, bucket: str, **changes: Any) -> dict[str, Any]:
    request = {
        "user_id": "itest",
        "workspace_id": "tiny",
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-results",
        "mode": "2d",
        "num_mpi": 3,
        "flags": dict(DEMO_FLAGS),
    }
    request.update(changes)
    return request


def test_2d_classification_runs_end_to_end(
    http: requests.Session, gateway_url: str, dataset_url: str, bucket: str, storage: S3Storage, gateway_config: dict,
    stack: dict[str, Any],
) -> None:
    # 3 ranks x 4 threads: more than one node of the local stack, so the ranks span two nodes.
    job = submit(http, gateway_url, request_for(dataset_url, bucket, flags={**DEMO_FLAGS, "j": 4}))
    main_id = job["slurm"]["main_job_id"]
    # An admin at a shell can map the Slurm job back to the gateway job.
    squeue_or_sacct = run_command(["sacct", "-X", "-n", "-P", "-j", main_id, "-o", "JobName"], timeout=30)
    assert job["job_id"] in squeue_or_sacct or squeue_or_sacct.strip() == ""  # the record may lag ~1 s

    job = wait_for_end(http, gateway_url, job["job_id"])
    assert job["status"] == "succeeded", job
    metadata = job["metadata"]
    assert metadata["slurm"]["state"] == "COMPLETED" and metadata["slurm"]["exit_code"] == 0
    assert metadata["slurm"]["main_job_id"] == main_id
    if stack["multinode"]:
        # Nothing the job was told to call is loopback: the scripts name the gateway (and through it S3) by the head's name.
        for which in ("main", "archive"):
            script = http.get(f"{gateway_url}/v1/relion/jobs/{job['job_id']}/script", params={"which": which}, timeout=30).text
            assert "127.0.0.1" not in script and "localhost" not in script, which
        # RELION's own output says where each rank ran: the leader and a follower on one node, the other follower on the other.
        assert len(metadata["resources"]["hosts"]) == 2 and len(metadata["resources"]["rank_hosts"]) == 3, metadata["resources"]
        assert metadata["resources"]["node_list"] and metadata["resources"]["nodes"] == "2"

    # The archive in S3 holds RELION's real output.
    output = parse_s3_url(metadata["output"]["url"])
    body = storage.get_bytes(output)
    assert hashlib.sha256(body).hexdigest() == metadata["output"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        names = set(archive.getnames())
        model = archive.extractfile("Class2D/run_it002_model.star")
        assert model is not None and b"_rlnClassDistribution" in model.read()
    assert {"Class2D/run_it002_classes.mrcs", "Class2D/run_it002_data.star", "Class2D/run_it002_optimiser.star"} <= names

    # metadata.json in S3 is the one the API returns, and its RELION results are real.
    # (The gateway adds the cost, "usage", shortly after the end: it may be in one and not yet in the other.)
    stored = json.loads(storage.get_bytes(parse_s3_url(job["output_url"]).child("metadata.json")))
    assert {k: v for k, v in stored.items() if k != "usage"} == {k: v for k, v in metadata.items() if k != "usage"}
    results = metadata["relion"]["results"]
    assert results["iterations_run"] == 2
    assert len(results["class_distribution"]) == 3
    assert sum(results["class_distribution"]) == pytest.approx(1.0, abs=1e-3)
    assert results["resolution_angstrom"] > 0
    assert metadata["input"]["sha256"] == hashlib.sha256(storage.get_bytes(parse_s3_url(dataset_url))).hexdigest()
    assert metadata["relion"]["command"][0] == "relion_refine_mpi"
    assert all(v is not None and v >= 0 for v in metadata["timings"].values()), metadata["timings"]

    # The workspace is gone only because the upload was verified; the logs stay.
    assert not (Path(gateway_config["PATHS_WORKSPACE_ROOT"]) / "itest" / job["job_id"]).exists()
    log_dir = Path(gateway_config["PATHS_LOG_ROOT"]) / "itest" / job["job_id"]
    assert "Expectation iteration 2 of 2" in (log_dir / f"main-{main_id}.out").read_text()


def test_missing_input_fails_before_relion_and_the_hook_still_archives(http: requests.Session, gateway_url: str, dataset_url: str, bucket: str) -> None:
    flags = {**DEMO_FLAGS, "i": "missing.star"}
    job = wait_for_end(http, gateway_url, submit(http, gateway_url, request_for(dataset_url, bucket, flags=flags))["job_id"])
    assert job["status"] == "failed", job
    # Checked after stage-in, before RELION would have failed on it.
    assert "stage-in failed: missing from the dataset: missing.star" in job["message"]
    assert job["metadata"]["slurm"]["state"] == "FAILED" and job["metadata"]["slurm"]["exit_code"] == 2
    assert job["metadata"]["logs"], "the hook uploaded the logs"


def test_a_missing_dataset_is_refused_at_submit_and_nothing_reaches_slurm(http: requests.Session, gateway_url: str, bucket: str) -> None:
    # Fail fast (issue 16): one HEAD on the real S3 server at submit, not a job that waits in the
    # queue and fails at stage-in when it finally starts.
    url = f"s3://{bucket}/datasets/does-not-exist-{os.getpid()}.tar.gz"
    response = http.post(f"{gateway_url}/v1/relion/jobs", json=request_for(url, bucket, workspace_id="missing"), timeout=60)
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert message.startswith("dataset_s3_url: there is no object at") and "404" in message, message
    listed = http.get(f"{gateway_url}/v1/relion/jobs", params={"page_size": 500}, timeout=30).json()["jobs"]
    assert not any(job["workspace_id"] == "missing" for job in listed)


def test_2d_classification_through_slurmrestd(
    gateway_config: dict, dataset_url: str, bucket: str, storage: S3Storage, tmp_path: Path, http: requests.Session, admin_token: Any
) -> None:
    """The same path with the `rest` backend: the gateway talks to slurmrestd (JWT) instead of sbatch."""
    import threading

    from werkzeug.serving import make_server

    from gateway import create_app
    from gateway.stack import stack_up
    from tests.integration.conftest import free_port

    rest = stack_up(with_rest=True)["slurmrestd"]
    port = free_port()
    config = {
        **gateway_config,
        "SLURM_BACKEND": "rest",
        "SLURM_REST_URL": rest["url"],
        "SERVER_PUBLIC_URL": f"http://{HEAD_NAME}:{port}",
        "STORE_DATABASE_URL": f"sqlite:///{tmp_path / 'rest.sqlite'}",
    }
    app = create_app(config)
    allow_admin(app, admin_token)
    server = make_server(HEAD_NAME, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://{HEAD_NAME}:{port}"
    try:
        job = wait_for_end(http, url, submit(http, url, request_for(dataset_url, bucket, workspace_id="rest"))["job_id"])
    finally:
        app.extensions["relion_gateway_poller"].stop()
        server.shutdown()
    assert job["status"] == "succeeded", job
    results = job["metadata"]["relion"]["results"]
    assert sum(results["class_distribution"]) == pytest.approx(1.0, abs=1e-3)
    assert storage.head(parse_s3_url(job["metadata"]["output"]["url"])).size == job["metadata"]["output"]["bytes"]
    # Slurm saw the job under the gateway's name, with the allocation the script asked for.
    accounted = run_command(["sacct", "-X", "-n", "-P", "-j", job["slurm"]["main_job_id"], "-o", "JobName,NTasks,AllocCPUS"], timeout=30)
    assert accounted.strip().splitlines()[-1].startswith(f"{job['job_id']}|")


def test_a_job_that_cannot_reach_the_gateway_fails_at_once_naming_the_address(gateway_config: dict, stack: dict[str, Any]) -> None:
    # A callback URL on loopback: fine on one host, unreachable from a compute node (its 127.0.0.1
    # is its own). The job side's first step says so within seconds instead of retrying for minutes.
    import time

    callback = "http://127.0.0.1:9/v1/relion"
    started = time.monotonic()
    result = subprocess.run(
        ["srun", "-N1", "-n1", "--chdir=/", gateway_config["JOB_PYTHON"], "-I", "-m", "gateway.jobside", "stage-in",
         "--url", "s3://relion-local/datasets/none.tar.gz", "--dest", "/nonexistent", "--job-id", "job_2d_x_00000000",
         "--callback-url", callback, "--quota-bytes", "1000", "--max-members", "10"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RELION_GATEWAY_JOB_TOKEN": "t"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "stage-in failed" in result.stderr and "cannot reach the gateway at 127.0.0.1:9" in result.stderr, result.stderr
    if stack["multinode"]:
        assert "this node (rgnode" in result.stderr, result.stderr
    assert elapsed < 30, elapsed
