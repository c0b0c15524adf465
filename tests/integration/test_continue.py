"""Continuing jobs on the real stack: a time limit with auto_continue, a user's continue after a cancel.

The timed-out first attempt is also the suite's job ending at its time limit (the other endings
are in tests/reliability/test_job_endings.py).
"""
from __future__ import annotations

import io
import math
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.demo import DEMO_FLAGS
from gateway.process import run_command
from gateway.relion.star import parse_star
from gateway.storage.s3 import S3Storage, parse_s3_url
from tests.integration.conftest import wait_for_end
from tests.integration.test_job_path import request_for, submit

pytestmark = pytest.mark.long  # ~3 minutes: Slurm's one-minute time limit, then the continuation

# 3-4.6 s an iteration on one core, as the machine is shared: 28 iterations need 85-130 s, more
# than the one-minute time limit (Slurm ends the job 60-75 s after it starts), so the first
# attempt always times out, after 13-25 of them. The test then gives the continuation (whose
# script asks the same one minute) five minutes, as an admin may with scontrol: otherwise how
# many iterations it can do would depend on the machine's load, and so would the attempt count.
# --perturb 0: RELION's --continue seeds its random generator again, so the random perturbation of
# the angular sampling would differ from an uninterrupted run's after a continue; without it the
# two runs differ only by what STAR files round (their values are written with 6 digits).
SLOW_FLAGS = {**DEMO_FLAGS, "iter": 28, "psi_step": 5, "offset_range": 8, "perturb": 0, "random_seed": 7, "j": 1}


def final_model(storage: S3Storage, job: dict[str, Any], name: str) -> dict[str, Any]:
    body = storage.get_bytes(parse_s3_url(job["metadata"]["output"]["url"]))
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        member = archive.extractfile(f"Class2D/{name}")
        assert member is not None, name
        blocks = parse_star(member.read().decode(), source=name)
    general = blocks["model_general"].values
    classes = sorted(float(row["rlnClassDistribution"]) for row in blocks["model_classes"].loop)
    return {
        "resolution": float(general["rlnCurrentResolution"]),
        "image_size": int(general["rlnCurrentImageSize"]),
        "log_likelihood": float(general["rlnLogLikelihood"]),
        "classes": classes,
    }


def test_a_timed_out_job_continues_by_itself_to_the_result_of_an_uninterrupted_run(
    http: requests.Session, gateway_url: str, dataset_url: str, bucket: str, storage: S3Storage, gateway_config: dict[str, Any]
) -> None:
    base = request_for(dataset_url, bucket, workspace_id="cont", num_mpi=1, flags=SLOW_FLAGS)
    timed = submit(http, gateway_url, {**base, "time_limit": "1", "auto_continue": 1})
    reference = submit(http, gateway_url, base)
    # The user's continue, meanwhile: a short job cancelled after its first iteration.
    short = submit(http, gateway_url, request_for(dataset_url, bucket, workspace_id="cont", num_mpi=1, flags={**DEMO_FLAGS, "iter": 6, "j": 1}))
    first = Path(gateway_config["PATHS_WORKSPACE_ROOT"]) / "itest" / short["job_id"] / "dataset" / "Class2D" / "run_it001_optimiser.star"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert time.monotonic() < deadline, "the job to cancel finished no iteration"
        time.sleep(0.2)
    assert http.delete(f"{gateway_url}/v1/relion/jobs/{short['job_id']}", timeout=30).status_code == 202
    cancelled = wait_for_end(http, gateway_url, short["job_id"])
    assert cancelled["status"] == "cancelled", cancelled
    response = http.post(f"{gateway_url}/v1/relion/jobs/{short['job_id']}/continue", timeout=60)
    assert response.status_code == 202, response.text
    continued = wait_for_end(http, gateway_url, short["job_id"])
    assert continued["status"] == "succeeded", continued
    attempts = continued["attempts"]
    assert [(a["trigger"], a["state"]) for a in attempts] == [("submit", "cancelled"), ("manual", "succeeded")]
    assert attempts[1]["workspace"] == "restored" and attempts[1]["from_iteration"] >= 1
    assert attempts[0]["main_slurm_id"] != attempts[1]["main_slurm_id"] == continued["slurm"]["main_job_id"]
    metadata = continued["metadata"]
    assert [a["number"] for a in metadata["attempts"]] == [1, 2] and metadata["input"]["workspace"] == "restored"
    files = {f["path"] for f in metadata["output"]["files"]}
    assert {"run_it001_model.star", "run_it006_model.star"} <= files  # both attempts' iterations, in one output
    logs = {url.rsplit("/", 1)[1] for url in metadata["logs"]}
    assert {f"main-{a['main_slurm_id']}.out" for a in attempts} <= logs  # and both attempts' logs

    deadline = time.monotonic() + 300
    while len((current := http.get(f"{gateway_url}/v1/relion/jobs/{timed['job_id']}", timeout=30).json())["attempts"]) < 2 or not current["slurm"]["main_job_id"]:
        assert current["status"] not in ("succeeded", "failed", "timeout") or len(current["attempts"]) > 1, current["message"]
        assert time.monotonic() < deadline, "the timed-out job was not continued"
        time.sleep(0.5)
    run_command(["scontrol", "update", f"JobId={current['slurm']['main_job_id']}", "TimeLimit=5"], timeout=30)
    timed = wait_for_end(http, gateway_url, timed["job_id"], timeout=600)
    reference = wait_for_end(http, gateway_url, reference["job_id"], timeout=600)
    assert reference["status"] == "succeeded" and len(reference["attempts"]) == 1, reference
    assert timed["status"] == "succeeded", timed
    ran = timed["attempts"]
    assert [(a["trigger"], a["state"]) for a in ran] == [("submit", "timeout"), ("auto", "succeeded")], ran
    assert ran[1]["workspace"] == "kept" and timed["metadata"]["input"]["workspace"] == "kept"  # no second download
    # The first attempt is the suite's time-limit ending: Slurm's TIMEOUT, said in its message,
    # and the iterations it finished archived by its hook (the second attempt continued from them).
    assert timed["metadata"]["attempts"][0]["slurm_state"] == "TIMEOUT"
    assert ran[0]["message"].startswith("timeout: Slurm TIMEOUT"), ran[0]
    assert ran[0]["last_iteration"] == ran[1]["from_iteration"] >= 1
    assert 1 <= ran[1]["from_iteration"] < 28
    # The watcher timed the iterations; the continued attempt's last report says they fit.
    assert timed["progress"]["seconds_per_iteration"] > 0

    # The same request and seed, interrupted or not: the same final model, to STAR's rounding.
    got, expected = (final_model(storage, job, "run_it028_model.star") for job in (timed, reference))
    assert got["resolution"] == expected["resolution"] and got["image_size"] == expected["image_size"]
    assert math.isclose(got["log_likelihood"], expected["log_likelihood"], rel_tol=1e-3), (got, expected)
    assert all(abs(a - b) < 0.1 for a, b in zip(got["classes"], expected["classes"])), (got, expected)
