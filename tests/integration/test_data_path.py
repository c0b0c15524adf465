"""The data path on the real stack: nested datasets, hostile tarballs, live progress,
metadata checked against RELION's own STAR files."""
from __future__ import annotations

import io
import os
import secrets
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.relion.presets import TINY_FLAGS
from gateway.relion.star import read_star
from gateway.storage.s3 import S3Location, S3Storage, parse_s3_url
from tests.integration.conftest import TERMINAL, wait_for_end

JOBS = "/v1/relion/jobs"


def post(http: requests.Session, url: str, request: dict[str, Any]) -> dict[str, Any]:
    response = http.post(f"{url}{JOBS}", json=request, timeout=60)
    assert response.status_code == 202, response.text
    return dict(response.json())


def request_2d(dataset_url: str, bucket: str, workspace: str, **flags: Any) -> dict[str, Any]:
    return {
        "user_id": "idata",
        "workspace_id": workspace,
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-data",
        "mode": "2d",
        "num_mpi": 2,
        "flags": {**TINY_FLAGS["2d"], **flags},
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gateway.relion.dataset import make_dataset

    tarball = make_dataset(tmp_path_factory.mktemp("datapath") / "tiny")
    return tarball.parent / "tiny"


def upload_tar(storage: S3Storage, bucket: str, name: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    location = S3Location(bucket, f"datasets/itest-{name}-{secrets.token_hex(3)}.tar.gz")
    storage.put_bytes(buffer.getvalue(), location)
    return location.url


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_nested_dataset_runs_and_a_missing_stack_is_named(http: requests.Session, tiny_dir: Path, storage: S3Storage, bucket: str, gateway_url: str) -> None:
    star = (tiny_dir / "particles.star").read_text().replace("@particles.mrcs", "@Extract/job001/particles.mrcs")
    stack = (tiny_dir / "particles.mrcs").read_bytes()
    nested = upload_tar(storage, bucket, "nested", [file_member("particles.star", star.encode()), file_member("Extract/job001/particles.mrcs", stack)])
    broken = upload_tar(storage, bucket, "nostack", [file_member("particles.star", star.encode())])
    ok = post(http, gateway_url, request_2d(nested, bucket, "nested"))
    missing = post(http, gateway_url, request_2d(broken, bucket, "nostack"))
    assert wait_for_end(http, gateway_url, ok["job_id"])["status"] == "succeeded"
    ended = wait_for_end(http, gateway_url, missing["job_id"])
    assert ended["status"] == "failed"
    assert "missing from the dataset: Extract/job001/particles.mrcs (named in particles.star)" in ended["message"]


def test_hostile_tarballs_fail_cleanly(http: requests.Session, storage: S3Storage, bucket: str, gateway_url: str, gateway_config: dict) -> None:
    outside = f"/tmp/rg-escape-{secrets.token_hex(4)}"

    def link(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        return info, None

    bomb = tarfile.TarInfo("bomb.bin")
    bomb.size = 64 * 1024 * 1024  # zeros: tiny compressed, over the 32 MiB quota of this gateway
    cases = {
        "dotdot": ([file_member("../escape.txt", b"x")], "outside the destination"),
        "symlink": ([link("evil", tarfile.SYMTYPE, outside)], "only regular files"),
        "device": ([link("dev", tarfile.CHRTYPE)], "only regular files"),
        "bomb": ([(bomb, b"\0" * bomb.size)], "stage-in quota"),
    }
    jobs = {}
    for name, (members, _) in cases.items():
        jobs[name] = post(http, gateway_url, request_2d(upload_tar(storage, bucket, name, members), bucket, f"hostile-{name}"))["job_id"]
    for name, job_id in jobs.items():
        ended = wait_for_end(http, gateway_url, job_id)
        assert ended["status"] == "failed", (name, ended)
        assert "stage-in failed" in ended["message"] and cases[name][1] in ended["message"], (name, ended["message"])
        workspace = Path(gateway_config["PATHS_WORKSPACE_ROOT"]) / "idata" / job_id
        assert not (workspace / "escape.txt").exists() and not (workspace / "dataset").exists()
    assert not os.path.lexists(outside)


def test_progress_is_reported_during_an_autorefine(http: requests.Session, dataset_url: str, bucket: str, gateway_url: str) -> None:
    request = {
        "user_id": "idata",
        "workspace_id": "progress",
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-data",
        "mode": "autorefine",
        "num_mpi": 3,
        "flags": TINY_FLAGS["autorefine"],
    }
    job_id = post(http, gateway_url, request)["job_id"]
    seen: list[tuple[str, int | None]] = []
    deadline = time.monotonic() + 300
    while True:
        job = http.get(f"{gateway_url}{JOBS}/{job_id}", timeout=10).json()
        progress = job.get("progress") or {}
        point = (job["status"], progress.get("iteration"))
        if progress and (not seen or seen[-1] != point):
            seen.append(point)
        if job["status"] in TERMINAL:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    iterations = {it for status, it in seen if status in ("running", "archiving") and it is not None}
    assert len(iterations) >= 2, seen  # at least two distinct iterations seen while it ran
    assert job["progress"]["converged"] is True


def test_metadata_matches_relions_star_files(http: requests.Session, dataset_url: str, bucket: str, gateway_url: str, storage: S3Storage, tmp_path: Path) -> None:
    ended = wait_for_end(http, gateway_url, post(http, gateway_url, request_2d(dataset_url, bucket, "starcheck"))["job_id"])
    assert ended["status"] == "succeeded"
    body = storage.get_bytes(parse_s3_url(ended["metadata"]["output"]["url"]))
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        archive.extractall(tmp_path, filter="data")
    model = read_star(tmp_path / "Class2D" / "run_it002_model.star")
    results = ended["metadata"]["relion"]["results"]
    assert results["class_distribution"] == model["model_classes"].float_column("rlnClassDistribution")
    assert results["resolution_angstrom"] == model["model_general"].get_float("rlnCurrentResolution")
    assert results["classes"] == model["model_general"].get_int("rlnNrClasses")
    files = {f["path"]: f["bytes"] for f in ended["metadata"]["output"]["files"]}
    assert files["run_it002_model.star"] == (tmp_path / "Class2D" / "run_it002_model.star").stat().st_size
    assert ended["metadata"]["relion"]["version"] == "3.1.3"
