"""Every way a running job can end badly: cancel, RELION error, out of memory (and the time limit).

All three run at once. For each: the completion hook ran (its Slurm job COMPLETED and
metadata.json was recorded), the gateway state is the right one and differs from the others, and
what RELION had written was archived to S3. The time limit is the first attempt of
tests/integration/test_continue.py (ended timeout, Slurm TIMEOUT, its hook archived the iterations
it had finished, which the next attempt continued from): one minute of waiting, run once.

Out of memory is real: the local stack enforces --mem (JobAcctGatherParams=OverMemoryKill), and
this gateway gives 3D classification 100 MB per rank, far below what RELION needs for a 192 px box.
"""
from __future__ import annotations

import secrets
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest
import requests

from gateway.relion.dataset import make_dataset
from gateway.slurm.memory import MEMORY_KILL_MARKERS
from gateway.storage.s3 import S3Location, S3Storage
from tests.reliability.conftest import Tally, get, job_request, post, slurm_jobs_named, wait_for_all, wait_until


def upload(storage: S3Storage, bucket: str, tarball: Path, name: str) -> str:
    location = S3Location(bucket, f"datasets/itest-{name}-{secrets.token_hex(3)}.tar.gz")
    storage.upload_file(str(tarball), location)
    return location.url


@pytest.fixture(scope="module")
def wrong_box_dataset(tmp_path_factory: pytest.TempPathFactory, storage: S3Storage, bucket: str) -> str:
    """Particles of 32 px with a 48 px reference: RELION refuses it with an ERROR."""
    tarball = make_dataset(tmp_path_factory.mktemp("wrongbox") / "tiny")
    folder = tarball.parent / "tiny"
    with mrcfile.new(folder / "ref48.mrc") as mrc:
        mrc.set_data(np.zeros((48, 48, 48), dtype=np.float32))
        mrc.voxel_size = 4.0
    wrong = tarball.parent / "wrongbox.tar.gz"
    with tarfile.open(wrong, "w:gz") as archive:
        for name in ("particles.star", "particles.mrcs", "ref48.mrc"):
            archive.add(folder / name, arcname=name)
    return upload(storage, bucket, wrong, "wrongbox")


@pytest.fixture(scope="module")
def large_box_dataset(tmp_path_factory: pytest.TempPathFactory, storage: S3Storage, bucket: str) -> str:
    """192 px particles: each RELION rank needs a few hundred MB (the stage-in, ~100 MB, fits in 200)."""
    return upload(storage, bucket, make_dataset(tmp_path_factory.mktemp("large") / "large", box=192, particles=200), "large")


def test_cancel_relion_error_and_oom_each_end_distinctly_with_the_hook_run(
    http: requests.Session,
    own_gateway: Callable[..., str],
    dataset_url: str,
    wrong_box_dataset: str,
    large_box_dataset: str,
    bucket: str,
    tally: Tally,
    tmp_path: Path,
) -> None:
    url = own_gateway(
        RELION_MEMORY_PER_RANK_MB={"2d": 1000, "3d": 100, "autorefine": 1500},
        JOB_STAGE_IN_QUOTA_BYTES=256 * 1024 * 1024,  # the 192 px dataset is ~53 MB
    )
    workspace = f"end{secrets.token_hex(3)}"

    def request(mode: str, dataset: str, **changes: Any) -> dict[str, Any]:
        return job_request("endings", dataset, bucket, workspace, mode=mode, **changes)

    jobs = {
        "cancel": post(http, url, request("2d", dataset_url, flags={"iter": 200}))["job_id"],
        "relion_error": post(http, url, request("3d", wrong_box_dataset, flags={"ref": "ref48.mrc"}))["job_id"],
        "out_of_memory": post(http, url, request("3d", large_box_dataset, flags={"particle_diameter": 600}))["job_id"],
    }
    workspace_dir = tmp_path / "workspaces" / "endings"
    first_iteration = workspace_dir / jobs["cancel"] / "dataset" / "Class2D" / "run_it001_model.star"
    wait_until(first_iteration.exists, 180, "the first iteration of the job to cancel")
    assert http.delete(f"{url}/v1/relion/jobs/{jobs['cancel']}", timeout=30).status_code == 202

    ended = wait_for_all(http, url, list(jobs.values()), timeout=300)
    named = slurm_jobs_named(f"job_2d_{workspace}_") | slurm_jobs_named(f"job_3d_{workspace}_")
    states = {kind: ended[job_id]["status"] for kind, job_id in jobs.items()}
    tally.counts.update(
        submitted=len(jobs),
        accepted=len(ended),
        in_slurm=sum(1 for j in jobs.values() if j in named),
        hooks_ran=sum(1 for j in jobs.values() if ended[j]["metadata"] and ended[j]["metadata"]["output"] is not None),
        distinct_states=len(set(states.values())),
        lost=sum(1 for s in states.values() if s == "lost"),
        duplicated=sum(len(found) - 1 for found in named.values()),
    )
    tally.notes.extend(f"{kind}: {ended[j]['status']}: {ended[j]['message']}" for kind, j in jobs.items())

    assert states == {"cancel": "cancelled", "relion_error": "failed", "out_of_memory": "out_of_memory"}, tally.notes
    for kind, job_id in jobs.items():
        job = ended[job_id]
        metadata = job["metadata"]
        assert metadata is not None and metadata["output"] is not None, (kind, job)  # the hook ran and archived
        assert metadata["slurm"]["archive_job_id"] in named[f"{job_id}.archive"], kind
        assert get(http, url, job_id)["metadata_b64"], kind
    archived = {kind: {f["path"] for f in ended[j]["metadata"]["output"]["files"]} for kind, j in jobs.items()}
    assert "run_it001_model.star" in archived["cancel"]  # what RELION had written before the cancel is in S3
    assert ended[jobs["cancel"]]["metadata"]["slurm"]["state"].startswith("CANCELLED")
    assert "The reference box size is 48 px" in ended[jobs["relion_error"]]["message"]
    # slurmstepd's own line, whichever of its wordings came first (on a compute node it may write
    # only "Exceeded job memory limit").
    oom_message = ended[jobs["out_of_memory"]]["message"].lower()
    assert any(marker in oom_message for marker in MEMORY_KILL_MARKERS), oom_message
    assert "running" in (tmp_path / "logs" / "endings" / jobs["out_of_memory"] / "phases").read_text()  # RELION, not the stage-in, was killed
    assert tally.counts["duplicated"] == 0
