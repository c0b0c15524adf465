"""All three modes on the real stack: Slurm accepts each rendered script, and each runs to succeeded.

2D runs in test_job_path; 3D classification and auto-refine run as the chain in test_chain.
"""
from __future__ import annotations

from typing import Any

import pytest
import requests

from gateway.relion.presets import TINY_FLAGS

RANKS = {"2d": 3, "3d": 3, "autorefine": 3}
# 3 ranks x 4 threads = 12 CPUs: more than one 8-CPU node of the local stack has, so the gateway
# plans --nodes=2 and Slurm puts two ranks on one node and one on the other.
SPANNING_THREADS = 4


def request_for(mode: str, dataset_url: str, bucket: str, threads: int = 1) -> dict[str, Any]:
    return {
        "user_id": "itest",
        "workspace_id": f"modes-{mode}",
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-modes",
        "mode": mode,
        "num_mpi": RANKS[mode],
        "flags": {**TINY_FLAGS[mode], "j": threads},
    }


def assert_ranks_spanned_the_nodes(http: requests.Session, gateway_url: str, job: dict[str, Any], stack: dict[str, Any]) -> None:
    """Where each rank ran, as RELION itself printed it, and nothing addressed as loopback."""
    resources = job["metadata"]["resources"]
    if stack["multinode"]:
        assert resources["planned_nodes"] == 2 and len(resources["hosts"]) == 2, resources
        assert set(resources["hosts"]) <= {node["name"] for node in stack["nodes"]}
    assert [r["rank"] for r in resources["rank_hosts"]] == list(range(RANKS[job["mode"]])), resources
    for which in ("main", "archive"):
        script = http.get(f"{gateway_url}/v1/relion/jobs/{job['job_id']}/script", params={"which": which}, timeout=30).text
        assert "127.0.0.1" not in script and "localhost" not in script, which


@pytest.mark.parametrize("mode", sorted(TINY_FLAGS))
def test_sbatch_test_only_accepts_every_mode(http: requests.Session, gateway_url: str, dataset_url: str, bucket: str, mode: str) -> None:
    response = http.post(f"{gateway_url}/v1/relion/render?slurm_test=true", json=request_for(mode, dataset_url, bucket), timeout=60)
    assert response.status_code == 200, response.text
    verdict = response.json()["slurm_test"]
    assert "to start at" in verdict and "partition debug" in verdict


def test_sbatch_test_only_refusal_is_reported(http: requests.Session, gateway_url: str, dataset_url: str, bucket: str) -> None:
    request = {**request_for("2d", dataset_url, bucket), "partition": "nonexistent"}
    response = http.post(f"{gateway_url}/v1/relion/render?slurm_test=true", json=request, timeout=60)
    assert response.status_code == 422  # unknown to the configured limits: refused before Slurm
    assert "unknown partition 'nonexistent'" in response.json()["message"]
