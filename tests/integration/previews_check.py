"""Previews made in the job, on the real stack: what each mode's finished tiny job (TINY_FLAGS) must
have left as PNGs and index.json in the log directory, in S3 under the job's output prefix, and in
metadata.json. test_chain checks them on its 2D, 3D and auto-refine jobs (one run of each mode
serves both)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from gateway.storage.s3 import S3Storage

# The final iteration's kinds, per mode (3D classification: K = 2 in TINY_FLAGS).
FINAL_KINDS = {
    "2d": ["classes", "history"],
    "3d": ["map-class1", "map-class2", "history"],
    "autorefine": ["map", "fsc", "history"],
}


def _s3_bytes(storage: S3Storage, url: str) -> bytes:
    bucket, key = url[len("s3://"):].split("/", 1)
    return bytes(storage.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def assert_previews(job: dict[str, Any], gateway_config: dict[str, Any], storage: S3Storage) -> None:
    """A finished job's previews: every final kind of its mode, in the log dir, S3 and metadata.json."""
    mode = job["mode"]
    metadata = job["metadata"]
    last = metadata["relion"]["results"]["last_iteration"]
    log_dir = Path(gateway_config["PATHS_LOG_ROOT"]) / job["user_id"] / job["job_id"]
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
