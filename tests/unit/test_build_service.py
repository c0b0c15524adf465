"""One way to build the job service; a dry run starts no thread and writes no file."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.config import build_config
from gateway.jobs.service import JobService, build_service


def test_an_offline_render_starts_no_thread_and_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("GATEWAY_PATHS_STATE_DIR", str(state))
    before = {t.name for t in threading.enumerate()}
    result = CliRunner().invoke(cli, ["render", "--mode", "2d", "--num-mpi", "3", "--i", "particles.star", "--o", "Class2D/run", "--archive"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --ntasks=3" in result.output and "archive job" in result.output
    assert not state.exists(), sorted(p.name for p in state.rglob("*"))  # no store, no callback.key
    assert {t.name for t in threading.enumerate()} == before


def test_the_online_service_has_its_store_storage_and_key(tmp_path: Path) -> None:
    config = build_config({"PATHS_STATE_DIR": str(tmp_path / "state")}, environ={})
    service = build_service(config)
    assert isinstance(service, JobService) and service.storage is not None and len(service.callback_secret) == 64
    assert (tmp_path / "state" / "callback.key").exists()
    offline = build_service(config, offline=True)
    assert offline.storage is None and offline.callback_secret == b""


def test_a_gateway_whose_jobs_would_call_loopback_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.config import build_config
    from gateway.jobs.service import warn_if_jobs_get_loopback

    with caplog.at_level("WARNING"):
        warned = warn_if_jobs_get_loopback(build_config(environ={"GATEWAY_S3_ENDPOINT_URL": "http://localhost:9010"}))
    assert len(warned) == 2 and "public_url" in caplog.text and "compute nodes cannot reach" in caplog.text
    assert warn_if_jobs_get_loopback(build_config(environ={"GATEWAY_SERVER_PUBLIC_URL": "http://head.cluster:9012",
                                                           "GATEWAY_S3_ENDPOINT_URL": "http://s3.cluster:9000"})) == []
