"""Attacker code that runs inside a job, as the job's account, with the job's environment.

The hostile-tenant suite installs this file as the gateway's ``[relion] refine`` binary, so it runs
exactly where RELION would (the dataset as working directory, the job's --export'ed environment,
its token, its Unix account). As the attacker's account it tries every escape it can think of,
prints one ``HOSTILE-PROBE <json>`` line with what happened, then runs the real relion_refine so
the job ends as any other. For every other account it only runs relion_refine.

Targets come from ``PROBE_TARGETS`` (a JSON file path in the first line of this script's config,
see ``install_probe``), never from the job's environment.
"""
from __future__ import annotations

import json
import os
import pwd
import sys
import time
from pathlib import Path
from typing import Any

TARGETS_FILE = "@TARGETS@"


def attempt(results: dict[str, str], name: str, action: Any) -> None:
    """Run one escape; record 'denied: ...' when it raised or was refused, else what it got."""
    try:
        outcome = action()
    except Exception as exc:  # the attempt failed: that is what the suite hopes for
        results[name] = f"denied: {type(exc).__name__}: {str(exc)[:160]}"
        return
    results[name] = str(outcome)[:300]


def http_status(response: Any) -> str:
    return f"HTTP {response.status_code}: {response.text[:120]}"


def probe(targets: dict[str, Any]) -> dict[str, str]:
    import requests

    from gateway.callbacks import SIGNATURE_HEADER, TOKEN_ENV, sign, signed_body

    results: dict[str, str] = {}
    results["account"] = pwd.getpwuid(os.getuid()).pw_name
    attempt(results, "read the store", lambda: len(Path(targets["store"]).read_bytes()))
    attempt(results, "read the callback key", lambda: Path(targets["key"]).read_text()[:4] + "...")
    attempt(results, "list the workspace root", lambda: sorted(os.listdir(targets["workspace_root"])))
    attempt(results, "list the log root", lambda: sorted(os.listdir(targets["log_root"])))
    attempt(results, "read another user's workspace file", lambda: Path(targets["victim_file"]).read_text())
    attempt(results, "list another user's log dir", lambda: sorted(os.listdir(targets["victim_log_dir"])))
    attempt(results, "read another user's job.json", lambda: Path(targets["victim_log_dir"], "job.json").read_text()[:80])
    leaked = sorted(k for k in os.environ if k.startswith(("AWS_", "GATEWAY_")) or "DATABASE" in k or "SECRET" in k)
    results["secrets in the environment"] = f"found {leaked}" if leaked else "denied: none"
    endpoint, bucket = targets["s3_endpoint"], targets["bucket"]
    attempt(results, "GET another user's output from S3 without credentials",
            lambda: _expect_refused(requests.get(f"{endpoint}/{bucket}/{targets['victim_output_key']}", timeout=30)))
    attempt(results, "list the bucket without credentials",
            lambda: _expect_refused(requests.get(f"{endpoint}/{bucket}?list-type=2", timeout=30)))

    url, job_id, token = targets["gateway"], os.environ.get("SLURM_JOB_NAME", ""), os.environ.get(TOKEN_ENV, "")

    def signed_post(path: str, body: bytes, with_token: str = token) -> Any:
        return requests.post(f"{url}{path}", data=body, timeout=30,
                             headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(with_token, body)})

    def storage(op: str, **fields: Any) -> Any:
        return signed_post(f"/jobs/{job_id}/storage", signed_body(job_id, {"type": "storage", "op": op, **fields}))

    attempt(results, "presign an upload with the main job's token", lambda: _expect_refused(storage("put", key="x.txt")))
    attempt(results, "start a multipart upload with the main job's token",
            lambda: _expect_refused(storage("multipart_start", key="x.bin")))
    victim_job = targets["victim_job_id"]
    attempt(results, "post progress to another user's job with my token", lambda: _expect_refused(signed_post(
        f"/jobs/{victim_job}/events", signed_body(victim_job, {"type": "progress", "data": {"iteration": 99}}))))
    attempt(results, "presign another user's dataset with my token", lambda: _expect_refused(signed_post(
        f"/jobs/{victim_job}/storage", signed_body(victim_job, {"type": "storage", "op": "dataset"}))))
    attempt(results, "send metadata with the main job's token", lambda: _expect_refused(signed_post(
        f"/jobs/{job_id}/events", signed_body(job_id, {"type": "metadata", "data": {"output": {"url": "s3://x/y"}}}))))
    body = signed_body(job_id, {"type": "progress", "data": {"iteration": 0, "probe": True}})
    first = signed_post(f"/jobs/{job_id}/events", body)
    attempt(results, "replay a signed event (same body twice)",
            lambda: _expect_refused(signed_post(f"/jobs/{job_id}/events", body), after=first))
    future = json.dumps({"job_id": job_id, "type": "progress", "sent_at": time.time() + 3600, "nonce": "f",
                         "data": {"iteration": 0}}).encode()
    attempt(results, "post an event dated an hour ahead", lambda: _expect_refused(signed_post(f"/jobs/{job_id}/events", future)))
    # Plant a symlink in this job's own log dir (its account owns it) for the gateway to read back:
    # the test then asks GET /logs?stream=err for it (the gateway reads job files without following links).
    err = Path(targets["log_root"], targets["attacker_user"], job_id, f"main-{os.environ.get('SLURM_JOB_ID', '')}.err")
    try:
        err.unlink()
        err.symlink_to(targets["key"])
        results["planted a symlink to the callback key as my stderr"] = "denied: planted (the gateway must not follow it)"
    except OSError as exc:
        results["planted a symlink to the callback key as my stderr"] = f"denied: could not plant it ({exc})"
    return results


def _expect_refused(response: Any, after: Any = None) -> str:
    prefix = f"first {after.status_code}, then " if after is not None else ""
    if response.status_code >= 400:
        raise PermissionError(prefix + http_status(response))
    return prefix + http_status(response)


def main() -> None:
    targets = json.loads(Path(TARGETS_FILE).read_text())
    if pwd.getpwuid(os.getuid()).pw_name == targets["attacker_account"]:
        print("HOSTILE-PROBE " + json.dumps(probe(targets), sort_keys=True), flush=True)
    # The real RELION from PATH (this probe is installed by its full path, not on PATH).
    os.execvp("relion_refine", ["relion_refine", *sys.argv[1:]])


if __name__ == "__main__":
    main()
