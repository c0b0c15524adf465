"""Tracking on the real stack: gateway and slurmctld restarts, reused Slurm ids.

Cancel, RELION errors and out-of-memory are in tests/reliability/test_job_endings.py, the time
limit in tests/integration/test_continue.py.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from gateway import create_app
from gateway.process import run_command
from gateway.relion.presets import TINY_FLAGS
from gateway.database import JobRecord
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback
from tests.integration.conftest import allow_admin, free_port, wait_for_end

JOBS = "/v1/relion/jobs"


def post(http: requests.Session, url: str, request: dict[str, Any]) -> dict[str, Any]:
    response = http.post(f"{url}{JOBS}", json=request, timeout=60)
    assert response.status_code == 202, response.text
    return dict(response.json())


def long_2d(dataset_url: str, bucket: str, workspace: str, iterations: int, **changes: Any) -> dict[str, Any]:
    return {
        "user_id": "itrack",
        "workspace_id": workspace,
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-tracking",
        "mode": "2d",
        "num_mpi": 2,
        "flags": {**TINY_FLAGS["2d"], "iter": iterations},
        **changes,
    }


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def private_gateway(gateway_config: dict, tmp_path: Path, admin_token: Any) -> Iterator[Any]:
    """A gateway with its own store, which a test may 'restart' (a new app on the same database)."""
    # One address across restarts: the job asks this gateway (its store knows the job) for its
    # presigned S3 URLs, as jobs of a real deployment ask its one public URL.
    port = free_port()
    url = f"http://{HEAD_NAME}:{port}"
    config = {**gateway_config, "STORE_DATABASE_URL": f"sqlite:///{tmp_path / 'private.sqlite'}", "SERVER_PUBLIC_URL": url}
    servers: list[Any] = []

    def start() -> str:
        app = create_app(config)
        allow_admin(app, admin_token)
        server = make_server(HEAD_NAME, port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, app))
        return url

    def stop() -> None:
        server, app = servers.pop()
        app.extensions["relion_gateway_poller"].stop()
        server.shutdown()

    start.stop = stop  # type: ignore[attr-defined]
    yield start
    while servers:
        stop()


def test_gateway_restart_mid_run_resumes_tracking(http: requests.Session, private_gateway: Any, dataset_url: str, bucket: str) -> None:
    url = private_gateway()
    job = post(http, url, long_2d(dataset_url, bucket, "restart", 4))
    wait_for(lambda: http.get(f"{url}{JOBS}/{job['job_id']}", timeout=10).json()["status"] in ("staging", "running"), 120, "running")
    private_gateway.stop()  # the gateway goes away while Slurm runs the job
    time.sleep(2)
    url = private_gateway()  # a new process on the same store
    ended = wait_for_end(http, url, job["job_id"])
    assert ended["status"] == "succeeded", ended


@pytest.mark.serial  # restarts the slurmctld every other test's jobs depend on
def test_slurmctld_restart_mid_run_is_tracked_to_the_end(
    http: requests.Session, gateway_url: str, dataset_url: str, bucket: str, stack: dict, gateway_config: dict
) -> None:
    from gateway.stack import stack_status, stack_up

    # RELION outlives the outage (~30 s: slurmctld's clean stop, then stack up): a job step that
    # ends while slurmctld is down retries its completion message only a minute later
    # (slurmstepd), and until then the job holds its afterany hook back (measured: 45 s).
    job = post(http, gateway_url, long_2d(dataset_url, bucket, "ctldrestart", 20))
    # Until RELION has finished its first iteration: srun asks slurmctld for its job step, so a
    # controller that is down while the step starts fails the job (srun: "Unable to confirm
    # allocation"); with the dataset in the cache, the stage-in before it is instant.
    first = Path(gateway_config["PATHS_WORKSPACE_ROOT"]) / "itrack" / job["job_id"] / "dataset" / "Class2D" / "run_it001_model.star"
    wait_for(first.exists, 120, "RELION's first iteration")
    pid = stack_status()["daemons"]["slurmctld"]["pid"]
    os.kill(pid, signal.SIGTERM)  # a clean stop: Slurm keeps running jobs (shared notes)
    wait_for(lambda: stack_status()["daemons"]["slurmctld"]["state"] != "up", 30, "slurmctld to stop")
    time.sleep(3)  # the poller meets a dead controller meanwhile and must change nothing
    assert http.get(f"{gateway_url}{JOBS}/{job['job_id']}", timeout=10).json()["status"] in ("staging", "running", "archiving")
    assert stack_up()["all_up"]
    ended = wait_for_end(http, gateway_url, job["job_id"])
    assert ended["status"] == "succeeded", ended


def test_a_reused_slurm_id_ends_lost(gateway_url: str, gateway_config: dict) -> None:
    # A stranger holds the Slurm ids our record points at, as after slurmctld lost our jobs.
    stranger = run_command(["sbatch", "--parsable", "--hold", "--job-name=not-a-gateway-job", "--output=/dev/null", "--wrap", "true"], timeout=30).strip()
    try:
        app = create_app({**gateway_config, "POLLER_ENABLED": False})
        service = app.extensions["relion_gateway"]
        now = time.time()
        service.store.insert(
            JobRecord(
                job_id="job_2d_reused_00000000",
                user_id="itrack",
                workspace_id="reused",
                mode="2d",
                state="running",
                request_json="{}",
                job_json='{"log_dir": "/nonexistent"}',
                output_url="s3://relion-local/x/",
                accepted_at=now,
                updated_at=now,
                main_slurm_id=stranger,
                archive_slurm_id=stranger,
            )
        )
        service.poll()
        record = service.store.get("job_2d_reused_00000000")
        assert record.state == "lost"
        assert "not-a-gateway-job" in record.message
    finally:
        run_command(["scancel", stranger], timeout=30)
