"""The janitor deletes a leftover workspace only when its output is verified in S3."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.maintenance import janitor_verdicts
from gateway.storage.s3 import ObjectInfo
from tests.conftest import valid_request


class HeadOnlyStorage:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def head(self, location):  # type: ignore[no-untyped-def]
        from gateway.storage.s3 import StorageError

        if location.url not in self.sizes:
            raise StorageError("HEAD", location.bucket, location.key, "404")
        return ObjectInfo(self.sizes[location.url], "etag")


def make_job(service, workspace_id: str, state: str, metadata: Any, ended_ago: float) -> Path:
    """``metadata``: a dict, None, or a function of the record (its output URL is the recorded one)."""
    record = service.submit(valid_request(workspace_id=workspace_id))
    changes = {"state": state, "ended_at": time.time() - ended_ago}
    if callable(metadata):
        metadata = metadata(record)
    if metadata is not None:
        changes["metadata_json"] = json.dumps(metadata)
    service.store.update(record.job_id, **changes)
    path = Path(record.job["workspace_dir"])
    path.mkdir(parents=True, exist_ok=True)  # made at submit, as the job's account's
    return path


def test_janitor_keeps_everything_not_proven_safe(app) -> None:
    service = app.extensions["relion_gateway"]
    urls: dict[str, str] = {}

    def out(n: str) -> Any:
        def metadata(record: Any) -> dict:
            urls[n] = record.output_url + "output.tar.gz"  # where the hook uploads, recorded at submit
            return {"output": {"url": urls[n], "bytes": 100}}
        return metadata

    cases = {
        "verified": make_job(service, "a", "succeeded", out("a"), 7200),
        "recent": make_job(service, "b", "succeeded", out("b"), 60),
        "archive_failed": make_job(service, "c", "archive_failed", None, 7200),
        "running": make_job(service, "d", "running", None, 7200),
        "size_mismatch": make_job(service, "e", "failed", out("e"), 7200),
        "missing_in_s3": make_job(service, "f", "failed", out("f"), 7200),
        "no_output": make_job(service, "g", "failed", {"output": None}, 7200),
        "no_metadata": make_job(service, "h", "lost", None, 7200),
    }
    stray = Path(service.config["PATHS_WORKSPACE_ROOT"]) / "alice" / "job_2d_unknown_00000000"
    stray.mkdir(parents=True)
    misdirected = make_job(service, "i", "succeeded", {"output": {"url": urls["a"], "bytes": 100}}, 7200)
    service.storage = HeadOnlyStorage({urls["a"]: 100, urls["e"]: 99})
    verdicts = {v.path: v for v in janitor_verdicts(service, ttl_seconds=3600)}
    deleted = {name for name, path in cases.items() if verdicts[path].action == "delete"}
    assert deleted == {"verified", "no_output"}
    assert verdicts[cases["size_mismatch"]].reason == "archive in S3 is 99 bytes, metadata says 100"
    assert verdicts[cases["archive_failed"]].reason.startswith("archive failed")
    assert verdicts[stray].action == "keep"
    # Metadata naming another job's (verified) output does not make this workspace disposable.
    assert verdicts[misdirected].action == "keep" and verdicts[misdirected].reason.startswith("metadata names ")
