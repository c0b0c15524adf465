"""The client commands against a served gateway (fake scheduler): seed spellings, exit codes, --wait."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from werkzeug.serving import make_server

from gateway.cli import cli
from tests.fakes import FakeScheduler


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def run(url: str, token: str | None, *args: str) -> tuple[int, str, str]:
    env = {"RELION_GATEWAY_URL": url}
    if token:
        env["RELION_GATEWAY_TOKEN"] = token
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


SEED = [
    "--user-id", "alice", "--workspace-id", "ws1",
    "--dataset-s3-url", "s3://relion-local/datasets/tiny.tar.gz", "--output-s3-prefix", "s3://relion-local/results",
    "--mode", "2d", "--num-mpi", "3",
    # relion_refine options as the seed's users type them: dashes, underscores, a repeated switch.
    "--i", "particles.star", "--o", "Class2D/run", "--K", "3", "--iter", "2", "--tau2-fudge", "2",
    "--particle-diameter", "100", "--ctf", "--ctf", "--j", "1", "--pool", "10",
]


def test_submit_with_the_seed_options(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    code, out, _ = run(served, app.config["TEST_TOKENS"]["alice"], "submit", "--json", *SEED)
    assert code == 0, out
    job = json.loads(out)
    assert job["flags"]["tau2_fudge"] == 2 and job["flags"]["particle_diameter"] == 100 and job["flags"]["ctf"] is True
    assert "--particle_diameter 100" in scheduler.submitted[0] and "--tau2_fudge 2" in scheduler.submitted[0]


def test_submit_wait_follows_to_the_end_and_saves_metadata(served: str, app: Flask, scheduler: FakeScheduler, tmp_path: Path) -> None:
    service = app.extensions["relion_gateway"]

    def finish_soon() -> None:
        import time

        while len(scheduler.submitted) < 2:
            time.sleep(0.05)
        job_id = service.store.list()[0][0].job_id
        log_dir = Path(app.config["PATHS_LOG_ROOT"]) / "alice" / job_id
        (log_dir / "metadata.json").write_text('{"schema_version": 1}')
        scheduler.set_state("1001", "COMPLETED", exit_code=0)
        scheduler.set_state("1002", "COMPLETED", exit_code=0)
        service.poll()

    threading.Thread(target=finish_soon, daemon=True).start()
    saved = tmp_path / "meta.json"
    code, out, err = run(served, app.config["TEST_TOKENS"]["alice"], "submit", *SEED, "--wait", "--timeout", "60", "--save-metadata", str(saved))
    assert code == 0, (out, err)
    assert "succeeded" in out and json.loads(saved.read_text()) == {"schema_version": 1}


def test_exit_codes_tell_failures_apart(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    assert run(served, None, "status", "job_2d_x_00000000")[0] == 2  # no token: said before any request
    assert run(served, "rg_not_a_token", "status", "job_2d_x_00000000")[0] == 3  # the gateway refuses it (401)
    assert run(served, token, "status", "job_2d_x_00000000")[0] == 3  # unknown job (404)
    assert run(served, token, "submit", "--user-id", "alice")[0] == 2  # usage error
    code, out, _ = run(served, token, "submit", *SEED)
    job_id = out.split()[0]
    scheduler.set_state("1001", "FAILED", exit_code=1)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    app.extensions["relion_gateway"].poll()
    assert run(served, token, "wait", job_id)[0] == 1  # the job failed
    code, out, _ = run(served, token, "list", "--json")
    assert code == 0 and [j["job_id"] for j in json.loads(out)] == [job_id]
    assert run(served, token, "script", job_id)[1].startswith("#!/bin/bash")
    assert run("http://127.0.0.1:9", token, "status", job_id)[0] == 3  # nothing listening


def test_wait_times_out_with_exit_4(served: str, app: Flask) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    job_id = run(served, token, "submit", *SEED)[1].split()[0]
    assert run(served, token, "wait", job_id, "--timeout", "1")[0] == 4


def test_continue_starts_the_next_attempt_and_a_refusal_exits_non_zero(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    code, out, _ = run(served, token, "submit", "--json", *SEED)
    job_id = json.loads(out)["job_id"]
    code, _, err = run(served, token, "continue", job_id)  # still queued: the gateway's 409
    assert code != 0 and "can be continued" in err
    service = app.extensions["relion_gateway"]
    record = service.get(job_id)
    scheduler.set_state(record.main_slurm_id, "TIMEOUT", exit_code=0)
    scheduler.set_state(record.archive_slurm_id, "COMPLETED", exit_code=0)
    files = [{"path": "run_it001_optimiser.star"}]
    service.store.update(job_id, metadata_json=json.dumps({"output": {"files": files}, "slurm": {"main_job_id": record.main_slurm_id}}))
    service.poll()
    code, out, _ = run(served, token, "continue", "--json", job_id)
    assert code == 0, out
    assert [a["trigger"] for a in json.loads(out)["attempts"]] == ["submit", "manual"]
