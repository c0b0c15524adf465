"""GPUs in requests: the gpus field, its refusals, --gres, and the script handing RELION Slurm's devices."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.errors import RequestError
from gateway.jobs.resources import plan_resources
from tests.conftest import valid_request
from tests.unit.test_render import fixed_job_id, golden_app  # noqa: F401 (fixture)

JOBS = "/v1/relion/jobs"
# A CPU partition (the default) and one of nodes with 2 GPUs each.
PARTITIONS = {"cpu": {"max_ranks": 16, "gpus": 0}, "gpu": {"cpus_per_node": 8, "max_nodes": 2, "gpus": 2}, "plain": {}}
FLAGS = valid_request()["flags"]


@pytest.fixture
def gpu_app(app: Flask) -> Flask:
    config = app.extensions["relion_gateway"].config
    config.update({"SLURM_PARTITION": "cpu", "SLURM_PARTITIONS": PARTITIONS})
    return app


def refusal(client: FlaskClient, **changes: Any) -> tuple[str, str]:
    response = client.post(JOBS, json=valid_request(**changes))
    assert response.status_code == 422, response.json
    (field,) = response.json["errors"]["json"]
    return field, response.json["message"]


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"gpus": 1}, "gpus", "partition cpu has no GPUs ([slurm.partitions.cpu] gpus is 0 or unset)"),
        ({"gpus": 1, "partition": "plain"}, "gpus", "partition plain has no GPUs"),
        ({"gpus": 3, "partition": "gpu"}, "gpus", "gpus 3 exceeds partition gpu's GPUs per node ([slurm.partitions.gpu] gpus = 2)"),
        ({"gpus": 1, "partition": "nowhere"}, "partition", "unknown partition 'nowhere'"),
        # On a partition without GPUs, the gpus field is at fault rather than the --gpu it brings.
        ({"gpus": 1, "flags": {**FLAGS, "gpu": True}}, "gpus", "partition cpu has no GPUs"),
        ({"gpus": 2, "partition": "gpu", "flags": {**FLAGS, "gpu": "0:1"}}, "flags.gpu", "--gpu '0:1' names devices"),
        ({"gpus": 65, "partition": "gpu"}, "gpus", "Must be greater than or equal to 0 and less than or equal to 64"),
        ({"gpus": -1, "partition": "gpu"}, "gpus", "Must be greater than or equal to 0"),
        ({"gpus": "2", "partition": "gpu"}, "gpus", "Not a valid integer"),
        ({"gpus": True, "partition": "gpu"}, "gpus", "Not a valid integer"),
        # The request's partition decides whether GPU options are allowed, not the default one.
        ({"flags": {**FLAGS, "gpu": True}}, "flags.gpu", "--gpu needs a GPU partition"),
    ],
)
def test_gpu_refusals_name_the_field(gpu_app: Flask, client: FlaskClient, scheduler, changes: dict, field: str, fragment: str) -> None:
    got_field, message = refusal(client, **changes)
    assert got_field == field and fragment in message, message
    assert scheduler.submitted == []


def test_gpu_options_follow_the_requests_partition(gpu_app: Flask, client: FlaskClient) -> None:
    config = gpu_app.extensions["relion_gateway"].config
    config["SLURM_PARTITION"] = "gpu"  # a GPU default; the request names the CPU partition
    assert refusal(client, partition="cpu", flags={**FLAGS, "free_gpu_memory": 100})[0] == "flags.free_gpu_memory"
    response = client.post(JOBS, json=valid_request(partition="gpu", gpus=1, flags={**FLAGS, "free_gpu_memory": 100}))
    assert response.status_code == 202, response.json


def test_a_gpu_job_gets_gres_and_relion_gets_slurms_devices(gpu_app: Flask, client: FlaskClient, scheduler) -> None:
    response = client.post(JOBS, json=valid_request(partition="gpu", gpus=2, num_mpi=9, flags={**FLAGS, "gpu": True, "j": 1}))
    assert response.status_code == 202, response.json
    assert response.json["gpus"] == 2
    script = scheduler.submitted[0]
    assert "#SBATCH --nodes=2\n#SBATCH --gres=gpu:2\n" in script
    assert "GPU_DEVICES=$(jobside gpu-layout --mode 2d --ranks 9 --log-dir \"$LOG_DIR\")" in script
    relion_line = next(line for line in script.splitlines() if "relion_refine_mpi" in line)
    # The request's --gpu (true) is the gateway's: given once, with the device string.
    assert relion_line.endswith(' --gpu "$GPU_DEVICES"') and relion_line.count("--gpu") == 1
    job = gpu_app.extensions["relion_gateway"].store.get(response.json["job_id"]).job
    assert "gpu" not in job["request"]["flags"] and job["resources"]["gpus_per_node"] == 2


def test_gpus_zero_is_no_gpus(gpu_app: Flask, client: FlaskClient, scheduler) -> None:
    response = client.post(JOBS, json=valid_request(gpus=0))
    assert response.status_code == 202, response.json
    assert "--gres" not in scheduler.submitted[0] and "gpu-layout" not in scheduler.submitted[0]


def test_plan_resources_checks_gpus_itself() -> None:
    from gateway.config import build_config

    config = {**build_config(environ={}), "SLURM_PARTITIONS": PARTITIONS}
    with pytest.raises(RequestError) as excinfo:
        plan_resources(config, mode="2d", num_mpi=1, threads=1, partition="cpu", time_limit=None, gpus=1)
    assert excinfo.value.field == "gpus"
    assert plan_resources(config, mode="2d", num_mpi=1, threads=1, partition="gpu", time_limit=None, gpus=2).gpus_per_node == 2


def test_the_spec_documents_gpus(client: FlaskClient) -> None:
    spec = client.get("/v1/relion/openapi.json").json
    gpus = spec["components"]["schemas"]["JobRequest"]["properties"]["gpus"]
    assert (gpus["type"], gpus["minimum"], gpus["maximum"]) == ("integer", 0, 64)
    assert "GPUs per node" in gpus["description"] and "gpus" not in spec["components"]["schemas"]["JobRequest"].get("required", [])


def fake_python(path: Path, calls: Path) -> Path:
    """Records its argv; gpu-layout it hands to the real interpreter, so the step itself runs."""
    path.write_text(
        f"#!{sys.executable} -SE\nimport json, os, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"if 'gpu-layout' in sys.argv:\n    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run_gpu_script(tmp_path: Path, **environ: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]], dict[str, Any]]:
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    relion = fake_python(tmp_path / "relion_refine", calls)
    app = golden_app(
        tmp_path,
        PATHS_STATE_DIR=str(tmp_path / "state"),
        JOB_PYTHON=str(fake_python(tmp_path / "python", calls)),
        RELION_REFINE_MPI=str(relion),
        RELION_LAUNCHER="",
        SLURM_PARTITION="gpu",
        SLURM_PARTITIONS=PARTITIONS,
    )
    prepared = app.extensions["relion_gateway"].prepare(valid_request(gpus=2, num_mpi=3))
    job = prepared.job
    Path(job["log_dir"]).mkdir(parents=True)
    (Path(job["workspace_dir"]) / "dataset").mkdir(parents=True)
    script = tmp_path / "main.sh"
    script.write_text(prepared.main_script)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_JOB_ID": "77", **environ}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return result, [json.loads(line) for line in calls.read_text().splitlines()], job


def test_the_script_runs_gpu_layout_and_passes_its_string_to_relion(tmp_path: Path) -> None:
    # Slurm gave this job GPUs 4 and 5; inside it CUDA calls them 0 and 1.
    result, calls, job = run_gpu_script(tmp_path, CUDA_VISIBLE_DEVICES="4,5", SLURM_JOB_GPUS="4,5")
    assert result.returncode == 0, result.stderr
    relion = next(c for c in calls if c[:1] == ["--i"])
    assert relion == [*job["relion_command"][1:], "--gpu", "0:1"]  # leader none, followers 1 and 2 one device each
    layout = [c for c in calls if "gpu-layout" in c]
    assert layout == [["-I", "-m", "gateway.jobside", "gpu-layout", "--mode", "2d", "--ranks", "3", "--log-dir", job["log_dir"]]]
    recorded = json.loads((Path(job["log_dir"]) / "gpus.json").read_text())
    assert (recorded["visible_devices"], recorded["device_string"]) == ("4,5", "0:1")


def test_a_job_slurm_gave_no_gpus_fails_before_staging(tmp_path: Path) -> None:
    result, calls, _ = run_gpu_script(tmp_path)
    assert result.returncode != 0
    assert "gpu-layout failed: no GPU is visible to this job (CUDA_VISIBLE_DEVICES is unset" in result.stderr
    assert [c[3] for c in calls] == ["gpu-layout"]  # no download, no RELION
