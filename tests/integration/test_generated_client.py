"""The client generated from the served gateway's spec (issue 17) on the real stack: it submits a real
2D job, cancels it at once (so it ends fast, but for real: Slurm cancels the main job and the
archive hook still runs and writes metadata.json), follows it to its end as the JobState enum,
reads metadata.json as the typed JobMetadata model, and finds the job's summary in the list."""
from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

from gateway.relion.presets import TINY_FLAGS
from tests.unit.test_openapi_client import generate_client, load_portal

USER = "igenerated"


@pytest.fixture(scope="session")
def portal(gateway_url: str, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """One generation per session, from the spec the served gateway (its configuration) gives."""
    spec = requests.get(f"{gateway_url}/v1/relion/openapi.json", timeout=30).json()
    where: Path = generate_client(spec, tmp_path_factory.mktemp("generated-client"))
    return load_portal(where)


def test_the_generated_client_runs_a_job(portal: ModuleType, gateway_url: str, admin_token: tuple[Any, str], dataset_url: str, bucket: str) -> None:
    client = portal.connect(f"{gateway_url}/v1/relion", admin_token[1])  # the spec's server: its paths are relative to it
    request = {
        "user_id": USER, "workspace_id": "generated", "dataset_s3_url": dataset_url, "output_s3_prefix": f"s3://{bucket}/results/{USER}",
        "mode": "2d", "num_mpi": 1, "flags": {**TINY_FLAGS["2d"], "j": 1},
    }
    job = portal.submit(client, request)
    assert job.status in (portal.JobState.QUEUED, portal.JobState.STAGING) and job.slurm.main_job_id
    portal.cancel(client, job.job_id)
    deadline = time.monotonic() + 120
    while not portal.ended(state := portal.status(client, job.job_id)):
        assert time.monotonic() < deadline, f"{job.job_id} still {state} after 120 s"
        time.sleep(0.5)
    assert state is portal.JobState.CANCELLED
    metadata = portal.metadata(client, job.job_id)
    assert metadata is not None and metadata.job.job_id == job.job_id and metadata.slurm.main_job_id == job.slurm.main_job_id
    summaries, total, _ = portal.jobs(client, user_id=USER)
    assert total >= 1 and job.job_id in [s.job_id for s in summaries]
