"""Previews made in the job, on the real stack: each mode's tiny job (TINY_FLAGS, 3 ranks) leaves its
PNGs and index.json in the log directory, in S3 under the job's output prefix, and in metadata.json."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from gateway.relion.presets import TINY_FLAGS
from gateway.storage.s3 import S3Storage
from tests.integration.conftest import wait_for_end

# The final iteration's kinds, per mode (3D classification: K = 2 in TINY_FLAGS).
FINAL_KINDS = {
    "2d": ["classes", "history"],
    "3d": ["map-class1", "map-class2", "history"],
    "autorefine": ["map", "fsc", "history"],
}


def _request(mode: str, dataset_url: str, bucket: str) -> dict[str, Any]:
    return {
        "user_id": "itest",
        "workspace_id": f"previews-{mode}",
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/itest-previews",
        "mode": mode,
        "num_mpi": 3,
        "flags": dict(TINY_FLAGS[mode]),
    }


def _s3_bytes(storage: S3Storage, url: str) -> bytes:
    bucket, key = url[len("s3://"):].split("/", 1)
    return bytes(storage.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_each_mode_leaves_previews_in_the_log_dir_s3_and_metadata(
    http: requests.Session, gateway_url: str, gateway_config: dict[str, Any], dataset_url: str, bucket: str, storage: S3Storage
) -> None:
    submitted = {}
    for mode in FINAL_KINDS:
        response = http.post(f"{gateway_url}/v1/relion/jobs", json=_request(mode, dataset_url, bucket), timeout=60)
        assert response.status_code == 202, response.text
        submitted[mode] = response.json()["job_id"]
    ended = {mode: wait_for_end(http, gateway_url, job_id, timeout=600) for mode, job_id in submitted.items()}

    for mode, job in ended.items():
        assert job["status"] == "succeeded", (mode, job["message"])
        metadata = job["metadata"]
        last = metadata["relion"]["results"]["last_iteration"]
        log_dir = Path(gateway_config["PATHS_LOG_ROOT"]) / "itest" / job["job_id"]
        previews_dir = log_dir / "previews"
        index = json.loads((previews_dir / "index.json").read_text())
        assert index["schema_version"] == 1
        entries = index["previews"]
        final = [e["kind"] for e in entries if e["iteration"] == last]
        assert final == FINAL_KINDS[mode], (mode, [e["name"] for e in entries], (previews_dir / "render.log").read_text())
        assert {e["kind"] for e in entries} == set(FINAL_KINDS[mode])
        assert [e["iteration"] for e in entries] == sorted(e["iteration"] for e in entries) and min(e["iteration"] for e in entries) >= 1
        for entry in entries:
            data = (previews_dir / entry["name"]).read_bytes()
            assert entry["name"] == f"it{entry['iteration']:03d}-{entry['kind']}.png"
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert Image.open(io.BytesIO(data)).size == (entry["width"], entry["height"])

        # metadata.json: the index's list, each with its S3 URL under the job's own output prefix.
        prefix = metadata["output"]["url"][: -len("output.tar.gz")]
        assert metadata["previews"] == [{**e, "url": f"{prefix}previews/{e['name']}"} for e in entries]
        for entry in metadata["previews"]:
            assert _s3_bytes(storage, entry["url"]) == (previews_dir / entry["name"]).read_bytes()
        assert json.loads(_s3_bytes(storage, f"{prefix}previews/index.json"))["previews"] == entries
        assert json.loads(_s3_bytes(storage, f"{prefix}metadata.json"))["previews"] == metadata["previews"]

        # Rendering failed nowhere, and said nothing on the job's stderr (read as RELION's error).
        render_log = (previews_dir / "render.log").read_text() if (previews_dir / "render.log").exists() else ""
        assert "failed" not in render_log and "timed out" not in render_log and "Traceback" not in render_log, render_log
        for err in log_dir.glob("main-*.err"):
            assert "previews" not in err.read_text(), err
