"""Jobs that build on jobs, on the real stack: the dataset cache, and a 2D -> 3D -> auto-refine chain.

The chain's 3D classification and auto-refinement are also this suite's run of those two modes
(they used to run on their own in test_modes): the same assertions on RELION's results, ranks
across both nodes, and --auto_refine; and its three jobs' previews are checked as test_previews
checked its own three (tests/integration/previews_check.py).
"""
from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.relion.dataset import make_dataset
from gateway.relion.presets import TINY_FLAGS
from gateway.storage.s3 import S3Location, S3Storage
from tests.integration.conftest import wait_for_end
from tests.integration.previews_check import assert_previews
from tests.integration.test_modes import RANKS, SPANNING_THREADS, assert_ranks_spanned_the_nodes

JOBS = "/v1/relion/jobs"


def submit(http: requests.Session, url: str, request: dict[str, Any]) -> dict[str, Any]:
    response = http.post(f"{url}{JOBS}", json=request, timeout=60)
    assert response.status_code == 202, response.text
    return dict(response.json())


def request_for(
    mode: str, bucket: str, workspace: str, threads: int = 1, drop: tuple[str, ...] = (), auto_iter_max: int | None = None, **changes: Any
) -> dict[str, Any]:
    # A chained job's --i is the gateway's (its parent's particles); drop names flags to leave out.
    left_out = {*drop, *(("i",) if "input_job_id" in changes else ())}
    flags = {**{k: v for k, v in TINY_FLAGS[mode].items() if k not in left_out}, "j": threads}
    if auto_iter_max is not None:
        # A small class's auto-refinement may take many iterations to converge; RELION stops at
        # this one, and local searches stay coarse (healpix 2, not TINY_FLAGS' 4): each iteration
        # at order 4 took ~10 s here.
        flags["auto_iter_max"] = auto_iter_max
        flags["auto_local_healpix_order"] = 2
    return {
        "user_id": "itest",
        "workspace_id": workspace,
        "output_s3_prefix": f"s3://{bucket}/itest-chain",
        "mode": mode,
        "num_mpi": RANKS[mode],
        "flags": flags,
        **changes,
    }


@pytest.fixture
def new_dataset(tmp_path: Path, storage: S3Storage, bucket: str) -> str:
    """A dataset no job has staged yet (a new object: a new cache key). The same particles every
    run: how long the chain's auto-refinement takes to converge depends on them (20 s to 3 min)."""
    tarball = make_dataset(tmp_path / "fresh", seed=0)
    location = S3Location(bucket, f"datasets/chain-{secrets.token_hex(4)}.tar.gz")
    storage.upload_file(str(tarball), location)
    return location.url


@pytest.mark.long  # three RELION modes one after the other
def test_a_dataset_is_staged_once_and_jobs_chain_2d_3d_autorefine_on_the_cache(
    http: requests.Session, gateway_url: str, new_dataset: str, bucket: str, gateway_config: dict[str, Any], stack: dict[str, Any],
    storage: S3Storage,
) -> None:
    workspace = f"chain{secrets.token_hex(2)}"
    # Two jobs on the same new dataset, submitted together: one download between them.
    pair = [submit(http, gateway_url, request_for("2d", bucket, workspace, dataset_s3_url=new_dataset)) for _ in range(2)]
    ended = [wait_for_end(http, gateway_url, job["job_id"]) for job in pair]
    assert all(job["status"] == "succeeded" for job in ended), [job["message"] for job in ended]
    inputs = sorted((job["metadata"]["input"] for job in ended), key=lambda record: record["cache"]["hit"])
    assert [record["cache"]["hit"] for record in inputs] == [False, True], inputs
    assert inputs[0]["bytes"] > 0 and inputs[1]["bytes"] == 0 and inputs[0]["sha256"] == inputs[1]["sha256"]
    entry = Path(gateway_config["JOB_CACHE_DIR"]) / "rgjob" / "entries" / inputs[0]["cache"]["entry"]
    assert entry.is_dir() and inputs[0]["cache"]["entry"] == inputs[1]["cache"]["entry"]

    # The 2D parent's two most populated classes become the 3D job's particles, read from the
    # parent's output that its hook left in the cache and from the parent's cached dataset.
    parent = ended[0]
    outputs = parent["metadata"]["outputs"]
    counts = {int(n): c for n, c in outputs["class_particles"].items()}
    chosen = sorted(sorted(counts, key=counts.__getitem__)[-2:])
    three_d = submit(
        http, gateway_url,
        request_for("3d", bucket, workspace, threads=SPANNING_THREADS, input_job_id=parent["job_id"], select_classes=chosen),
    )
    assert three_d["flags"]["i"] == "parent/particles.star" and three_d["input_job_id"] == parent["job_id"]

    # Once the 3D job has linked its input, a damaged entry is found by the next job and
    # refetched. The damage replaces the file (a new inode, as a stray copy or a half-done repair
    # leaves it): the old inode is the 3D job's input through its hard link, which a write in
    # place would change under RELION's feet (measured: RELION killed).
    deadline = time.monotonic() + 300
    while http.get(f"{gateway_url}{JOBS}/{three_d['job_id']}", timeout=30).json()["status"] in ("queued", "staging"):
        assert time.monotonic() < deadline, "the 3D job did not get past its stage-in"
        time.sleep(0.5)
    damaged = entry / "tree" / "particles.mrcs"
    truncated = damaged.read_bytes()[:1024]
    entry_tree = damaged.parent
    entry_tree.chmod(0o755)
    damaged.unlink()
    damaged.write_bytes(truncated)
    entry_tree.chmod(0o555)
    third = wait_for_end(http, gateway_url, submit(http, gateway_url, request_for("2d", bucket, workspace, dataset_s3_url=new_dataset))["job_id"])
    assert third["status"] == "succeeded", third["message"]
    assert "particles.mrcs" in third["metadata"]["input"]["cache"]["refetched"] and third["metadata"]["input"]["bytes"] > 0

    three_d = wait_for_end(http, gateway_url, three_d["job_id"], timeout=600)
    assert three_d["status"] == "succeeded", three_d["message"]
    staged = three_d["metadata"]["input"]
    assert staged["bytes"] == 0 and staged["parent"]["bytes"] == 0, staged  # nothing crossed S3
    assert staged["parent"]["cache"]["hit"] is True and staged["parent"]["classes"] == chosen
    assert three_d["metadata"]["parent"] == {
        "job_id": parent["job_id"], "mode": "2d", "select_classes": chosen, "ref_class": None,
        "particles": sum(counts[n] for n in chosen), "star": "parent/particles.star", "from_cache": True,
    }
    classes = three_d["metadata"]["relion"]["results"]
    assert classes["iterations_run"] == 2 and len(classes["class_distribution"]) == 2
    assert sum(classes["class_distribution"]) == pytest.approx(1.0, abs=1e-3)
    assert_ranks_spanned_the_nodes(http, gateway_url, three_d, stack)
    assert http.get(f"{gateway_url}{JOBS}/{parent['job_id']}", timeout=30).json()["children"] == [three_d["job_id"]]

    # Auto-refine on the 3D job's most populated class, with that class's map as the reference
    # (both classes together, two different maps, took 3 minutes to converge; one class, seconds).
    counts_3d = {int(n): c for n, c in three_d["metadata"]["outputs"]["class_particles"].items()}
    best = max(counts_3d, key=counts_3d.__getitem__)
    refine = submit(
        http, gateway_url,
        request_for("autorefine", bucket, workspace, threads=SPANNING_THREADS, drop=("ref",), input_job_id=three_d["job_id"],
                    select_classes=[best], ref_class=best, auto_iter_max=5),
    )
    assert refine["flags"]["ref"] == f"parent/{three_d['metadata']['outputs']['class_maps'][str(best)]}"
    refine = wait_for_end(http, gateway_url, refine["job_id"], timeout=600)
    assert refine["status"] == "succeeded", refine["message"]
    results = refine["metadata"]["relion"]["results"]
    assert results["converged"] is True and results["final_resolution_angstrom"] > 8.0  # Nyquist is 8 A at 4 A/px
    assert "--auto_refine" in refine["metadata"]["relion"]["command"]
    assert refine["metadata"]["parent"]["particles"] == counts_3d[best]
    assert_ranks_spanned_the_nodes(http, gateway_url, refine, stack)
    # Each mode's previews (tests/integration/previews_check.py), on this one run of each.
    for job in (parent, three_d, refine):
        assert_previews(job, gateway_config, storage)
