"""What a job's own dataset can make the job side run.

The main job's script changes into the dataset (RELION resolves image paths against its working
directory) and starts the progress watcher there. Without isolation, `python -m` put that directory
first on sys.path, so a `gateway/` package in the user's tarball replaced the real one and ran
with the job's environment (S3 keys, the event token) and the job account's file access.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import requests

from gateway.relion.presets import TINY_FLAGS
from gateway.storage.s3 import S3Storage
from tests.hostile.conftest import hostile_tarball, record, upload
from tests.integration.conftest import wait_for_end

JOBS = "/v1/relion/jobs"
# Modules the job side imports (its own package and its third-party imports) and the files Python
# itself runs at start-up if they are on sys.path.
SHADOWED = [
    "gateway/__init__.py",
    "gateway/jobside/__init__.py",
    "gateway/jobside/__main__.py",
    "click/__init__.py",
    "requests/__init__.py",
    "boto3/__init__.py",
    "urllib3/__init__.py",
    "sitecustomize.py",
    "usercustomize.py",
]


def payload(marker_dir: Path, name: str) -> bytes:
    """Code that leaves a marker (and what it could see) if Python ever imports it."""
    return (
        "import os, pathlib\n"
        f"d = pathlib.Path({str(marker_dir)!r}); d.mkdir(parents=True, exist_ok=True)\n"
        f"(d / {name.replace('/', '_')!r}).write_text(repr(sorted(os.environ)))\n"
    ).encode()


def test_shadow_packages_in_the_dataset_never_run(
    http: requests.Session, gateway_url: str, bucket: str, storage: S3Storage, tmp_path: Path, gateway_config: dict[str, Any]
) -> None:
    marker_dir = Path("/tmp") / f"rg-shadow-{secrets.token_hex(4)}"
    extra = {name: payload(marker_dir, name) for name in SHADOWED}
    url = upload(storage, bucket, hostile_tarball(tmp_path, extra))
    request = {
        "user_id": "mallory",
        "workspace_id": "shadow",
        "dataset_s3_url": url,
        "output_s3_prefix": f"s3://{bucket}/results/mallory",
        "mode": "2d",
        "num_mpi": 1,
        "flags": dict(TINY_FLAGS["2d"], j=2),
    }
    response = http.post(f"{gateway_url}{JOBS}", json=request, timeout=60)
    assert response.status_code == 202, response.text
    job = wait_for_end(http, gateway_url, response.json()["job_id"])
    ran = sorted(p.name for p in marker_dir.glob("*")) if marker_dir.exists() else []
    assert record(
        "dataset ships gateway/, click/, requests/, boto3/, sitecustomize.py",
        "only the installed code runs",
        f"shadow modules imported: {ran or 'none'}; job {job['status']}",
        denied=not ran,
    ), ran
    assert job["status"] == "succeeded", job
    # The real watcher ran: it reported RELION's iterations.
    assert (job.get("progress") or {}).get("iteration") == 2, job.get("progress")
