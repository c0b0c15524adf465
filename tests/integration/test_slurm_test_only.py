"""`POST /render?slurm_test=true` against the local stack's real Slurm: a script Slurm refuses at
`sbatch --test-only` is a 422 carrying Slurm's reason, not a 503 "Slurm is not answering".

The gateway here has no partition limits of its own, so the request reaches Slurm, whose
EnforcePartLimits=ALL refuses more tasks than the one 16-CPU node has. Only the render view and
`sbatch --test-only` run: nothing is submitted. The stack is used as it is (never started here):
without a controller answering, the test is skipped.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from gateway import create_app
from gateway.config import build_config
from gateway.slurm.cli import SlurmCliBackend
from tests.conftest import valid_request
from tests.fakes import FakeStorage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def slurm_client(tmp_path: Path) -> FlaskClient:
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no Slurm client or controller: {exc}")
    if "is UP" not in ping.stdout:
        pytest.skip(f"slurmctld is not answering: {ping.stdout.strip() or ping.stderr.strip()}")
    config: dict[str, Any] = build_config(environ={"GATEWAY_CONFIG": str(ROOT / "config" / "local.toml")})
    config.update(
        {
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "PATHS_WORKSPACE_ROOT": "",
            "PATHS_LOG_ROOT": "",
            "STORE_DATABASE_URL": "",
            "SLURM_PARTITIONS": {},  # no gateway-side limits: Slurm decides
            "S3_ALLOWED_BUCKETS": ["relion-local"],
            "POLLER_ENABLED": False,
            "AUTH_MODE": "none",
        }
    )
    app = create_app(config, scheduler=SlurmCliBackend(timeout=30.0), storage=FakeStorage())  # type: ignore[arg-type]
    return app.test_client()


def test_a_script_slurm_refuses_is_a_422_with_slurms_reason(slurm_client: FlaskClient) -> None:
    accepted = slurm_client.post("/v1/relion/render?slurm_test=true", json=valid_request(num_mpi=2))
    assert accepted.status_code == 200, accepted.json
    assert "to start at" in accepted.json["slurm_test"]

    response = slurm_client.post("/v1/relion/render?slurm_test=true", json=valid_request(num_mpi=64))
    assert response.status_code == 422, response.json
    assert response.json["message"] == (
        "slurm_test: Slurm refused the script (sbatch --test-only): "
        "allocation failure: More processors requested than permitted"
    )
    assert list(response.json["errors"]["json"]) == ["slurm_test"]
