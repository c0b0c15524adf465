"""GPUs on the real stack: Slurm allocates the gpu node's stand-in GPUs, the job side builds RELION's --gpu.

RELION here is a CPU build, so the test stops short of RELION's GPU code: a wrapper installed as
``[relion] refine_mpi`` records, per rank, the exact command line and the GPU variables Slurm set,
then runs the real relion_refine_mpi without the ``--gpu`` pair. Everything else runs for real:
the allocation (``--gres=gpu:2`` on partition gpu), ``jobside gpu-layout``, srun's ranks, RELION,
the archive hook and metadata.json.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from gateway import create_app
from gateway.process import run_command
from gateway.relion.presets import TINY_FLAGS
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback
from tests.integration.conftest import TERMINAL, allow_admin, free_port, wait_for_end

WRAPPER = Path(__file__).with_name("gpu_relion_wrapper.py")
JOBS = "/v1/relion/jobs"


def gpu_node(stack: dict[str, Any]) -> dict[str, Any]:
    """The stack's node with GPUs; skip the module's tests where there is none (or one node only)."""
    if not stack.get("multinode"):
        pytest.skip(f"the stack is not multi-node ({stack.get('fallback_reason') or 'one node'}): no gpu node")
    nodes = [node for node in stack.get("nodes", []) if int(node.get("gpus") or 0) > 0]
    if not nodes or "gpu" not in stack.get("slurm", {}).get("partitions", []):
        pytest.skip("the stack has no gpu node (no node with GPUs, or no partition gpu)")
    return nodes[0]


def install_wrapper(directory: Path, name: str, real: str, log_root: str) -> Path:
    """The wrapper as ``directory/name``, running ``real``; readable and executable by the job account."""
    path = directory / name
    path.write_text(f"#!{sys.executable} -I\n" + WRAPPER.read_text().replace("@REAL@", real).replace("@LOG_ROOT@", log_root))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def gpu_gateway(
    stack: dict[str, Any], gateway_config: dict[str, Any], admin_token: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    node = gpu_node(stack)
    real = {name: shutil.which(name) for name in ("relion_refine", "relion_refine_mpi")}
    missing = [name for name, path in real.items() if path is None]
    assert not missing, f"RELION is not on PATH: {missing}"
    bin_dir = tmp_path_factory.mktemp("gpu-wrapper")
    bin_dir.chmod(0o755)  # its parents are o+x (tests/conftest.py)
    wrappers = {name: install_wrapper(bin_dir, name, str(path), gateway_config["PATHS_LOG_ROOT"]) for name, path in real.items()}
    state = tmp_path_factory.mktemp("gpu-state")
    port = free_port()
    url = f"http://{HEAD_NAME}:{port}"
    config = {
        **gateway_config,
        "SERVER_PUBLIC_URL": url,
        "STORE_DATABASE_URL": f"sqlite:///{state / 'gpu.sqlite'}",
        "RELION_REFINE": str(wrappers["relion_refine"]),
        "RELION_REFINE_MPI": str(wrappers["relion_refine_mpi"]),
        "RELION_ENVIRONMENT": {**gateway_config["RELION_ENVIRONMENT"], "RG_RANK_PROBE": "reaches-ranks"},
    }
    app = create_app(config)
    allow_admin(app, admin_token)
    server = make_server(HEAD_NAME, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": url, "config": config, "node": node, "wrappers": wrappers, "real": real}
    app.extensions["relion_gateway_poller"].stop()
    server.shutdown()


def request_for(dataset_url: str, bucket: str, **changes: Any) -> dict[str, Any]:
    request = {
        "user_id": "itest",
        "workspace_id": "gpus",
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-results",
        "mode": "2d",
        "num_mpi": 3,
        "flags": dict(TINY_FLAGS["2d"]),
    }
    request.update(changes)
    return request


def sacct_row(slurm_id: str, fields: str, timeout: float = 30) -> dict[str, str]:
    """sacct's allocation row for the job (the record may lag the job's end by a moment)."""
    names = fields.split(",")
    deadline = time.monotonic() + timeout
    while True:
        out = run_command(["sacct", "-X", "-n", "-P", "-j", slurm_id, "-o", fields], timeout=30).strip()
        if out:
            row = dict(zip(names, out.splitlines()[-1].split("|")))
            if row.get("State") == "COMPLETED" and row.get("AllocTRES"):
                return row
        assert time.monotonic() < deadline, f"sacct has no completed record of {slurm_id}: {out!r}"
        time.sleep(1.0)


def gres_while_running(http: requests.Session, url: str, job_id: str, slurm_id: str, timeout: float = 300) -> str:
    """``scontrol show job -d``'s per-node lines ("Nodes=... GRES=...") seen while the job ran ("" if never)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = run_command(["scontrol", "show", "job", "-d", slurm_id], timeout=30)
        if "JobState=RUNNING" in detail:
            lines = [line.strip() for line in detail.splitlines() if line.strip().startswith("Nodes=") and "GRES=gpu" in line]
            if lines:
                return "\n".join(lines)
        if http.get(f"{url}{JOBS}/{job_id}", timeout=30).json()["status"] in TERMINAL:
            return ""
        time.sleep(0.3)
    return ""


def test_a_gpu_job_gets_its_gpus_and_relion_the_device_string(
    gpu_gateway: dict[str, Any], http: requests.Session, dataset_url: str, bucket: str
) -> None:
    url, node = gpu_gateway["url"], gpu_gateway["node"]["name"]
    response = http.post(f"{url}{JOBS}", json=request_for(dataset_url, bucket, partition="gpu", gpus=2), timeout=60)
    assert response.status_code == 202, response.text
    job_id, main_id = response.json()["job_id"], response.json()["slurm"]["main_job_id"]

    # The script asks Slurm for the GPUs and hands RELION the string the job side builds from them.
    script = http.get(f"{url}{JOBS}/{job_id}/script", timeout=30).text
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:2" in lines and "#SBATCH --partition=gpu" in lines and "#SBATCH --ntasks=3" in lines, script
    assert "jobside gpu-layout --mode 2d --ranks 3" in script and '--gpu "$GPU_DEVICES"' in script, script
    assert str(gpu_gateway["wrappers"]["relion_refine_mpi"]) in script

    # While it runs, Slurm names the GPU indices it gave the job (the detail is cleared at the end).
    running = gres_while_running(http, url, job_id, main_id)
    assert f"Nodes={node} " in running and "GRES=gpu:2(IDX:0-1)" in running, running
    job = wait_for_end(http, url, job_id)
    assert job["status"] == "succeeded", job
    metadata = job["metadata"]
    assert metadata["slurm"]["state"] == "COMPLETED" and metadata["slurm"]["exit_code"] == 0, metadata["slurm"]

    # Slurm allocated the two GPUs, on the gpu node.
    row = sacct_row(main_id, "JobID,Partition,NodeList,AllocTRES,State")
    assert row["Partition"] == "gpu" and row["NodeList"] == node, row
    assert "gres/gpu=2" in row["AllocTRES"].split(","), row
    # The archive hook needs no GPU: [slurm] archive_partition (debug in config/local.toml) keeps it off the gpu node's CPUs.
    hook = sacct_row(job["slurm"]["archive_job_id"], "JobID,Partition,NodeList,AllocTRES,State")
    assert hook["Partition"] == gpu_gateway["config"]["SLURM_ARCHIVE_PARTITION"] == "debug" and "gres/gpu" not in hook["AllocTRES"], hook
    detail = run_command(["scontrol", "show", "job", "-d", main_id], timeout=30)  # kept MinJobAge (300 s) after the end
    assert "JOB_GRES=gpu:2" in detail and "TresPerNode=gres:gpu:2" in detail and f"NodeList={node}\n" in detail, detail

    # Every rank ran on the gpu node, saw both GPUs, and was started with --gpu 0:1: the leader
    # coordinates, the two followers take ordinals 0 and 1.
    log_dir = Path(gpu_gateway["config"]["PATHS_LOG_ROOT"]) / "itest" / job_id
    records = sorted((json.loads(p.read_text()) for p in log_dir.glob("gpu-wrapper-*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1, 2], records
    wrapper, real = str(gpu_gateway["wrappers"]["relion_refine_mpi"]), gpu_gateway["real"]["relion_refine_mpi"]
    for record in records:
        env = record["env"]
        assert record["hostname"] == node and env["SLURMD_NODENAME"] == node, record
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1", record
        assert env["SLURM_JOB_GPUS"] == "0,1" and env["SLURM_STEP_GPUS"] == "0,1", record
        # What the job script exports reaches srun's ranks (sbatch --export leaves SLURM_EXPORT_ENV behind).
        assert env["RG_RANK_PROBE"] == "reaches-ranks", record
        # No job environment on the stack names 127.0.0.1 or localhost, but for the PMIx server that
        # slurmstepd starts on each node for its own ranks (node-local by design).
        assert [k for k in record["loopback"] if not k.startswith("PMIX_SERVER_URI")] == [], record
        argv = record["argv"]
        assert argv[0] == wrapper and argv.count("--gpu") == 1, argv
        assert argv[argv.index("--gpu") + 1] == "0:1", argv
        assert argv[-2:] == ["--gpu", "0:1"], argv
        # The gateway's own command line, then the job side's --gpu, as metadata.json records it;
        # RELION (CPU build) ran the rest.
        assert argv[1:] == metadata["relion"]["command"][1:], (argv, metadata["relion"]["command"])
        assert record["exec"] == [real, *argv[1:-2]], record
    assert len({json.dumps(r["argv"]) for r in records}) == 1, "every rank gets the same command line"

    # metadata.json keeps the layout the job side built (gpus.json), and where the ranks ran.
    gpus = metadata["resources"]["gpus"]
    assert gpus["device_string"] == "0:1" and gpus["visible_devices"] == "0,1", gpus
    assert gpus["ranks"] == 3 and gpus["mode"] == "2d" and gpus["source"] == "CUDA_VISIBLE_DEVICES" and gpus["warnings"] == [], gpus
    assert metadata["resources"]["gpus_per_node"] == 2 and metadata["resources"]["planned_nodes"] == 1, metadata["resources"]
    assert metadata["resources"]["hosts"] == [node] and len(metadata["resources"]["rank_hosts"]) == 3, metadata["resources"]
    # RELION really ran: two iterations of 2D classification into three classes.
    results = metadata["relion"]["results"]
    assert results["iterations_run"] == 2 and len(results["class_distribution"]) == 3, results


def test_gpus_are_refused_where_the_partition_has_none(
    gpu_gateway: dict[str, Any], http: requests.Session, dataset_url: str, bucket: str
) -> None:
    url = gpu_gateway["url"]
    for partition, gpus, says in (("debug", 1, "partition debug has no GPUs"), ("gpu", 3, "exceeds partition gpu's GPUs per node")):
        response = http.post(f"{url}{JOBS}", json=request_for(dataset_url, bucket, partition=partition, gpus=gpus), timeout=60)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["message"].startswith("gpus: ") and says in body["message"], body
        assert list(body["errors"]["json"]) == ["gpus"], body
