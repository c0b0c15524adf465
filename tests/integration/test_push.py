"""Push on the real stack (issue 17): a client written for a synchronous service (one POST with
Prefer: wait, the final result in the answer), a browser's event stream and a long-poll, all on one
real job that is cancelled soon after it starts (Slurm cancels it, the archive hook still runs and
writes metadata.json: a few seconds, no RELION run to wait for)."""
from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import requests

from gateway.relion.presets import TINY_FLAGS

USER = "ipush"
JOBS = "/v1/relion/jobs"


def test_a_synchronous_post_a_stream_and_a_long_poll_follow_one_real_job(
    gateway_url: str, http: requests.Session, dataset_url: str, bucket: str
) -> None:
    request = {"user_id": USER, "workspace_id": f"push{int(time.time())}", "dataset_s3_url": dataset_url,
               "output_s3_prefix": f"s3://{bucket}/results/{USER}", "mode": "2d", "num_mpi": 1, "flags": {**TINY_FLAGS["2d"], "j": 1}}
    answers: dict[str, Any] = {}

    def synchronous() -> None:
        answers["post"] = http.post(f"{gateway_url}{JOBS}", json=request, headers={"Prefer": "wait=180"}, timeout=200)

    poster = threading.Thread(target=synchronous)
    poster.start()
    deadline = time.monotonic() + 60
    while not (listed := http.get(f"{gateway_url}{JOBS}", params={"user_id": USER, "page_size": 1}, timeout=30).json()["jobs"]) \
            or listed[0]["workspace_id"] != request["workspace_id"]:
        assert time.monotonic() < deadline, "the job was not stored"
        time.sleep(0.2)
    job_id = listed[0]["job_id"]

    def stream() -> None:
        with http.get(f"{gateway_url}{JOBS}/{job_id}/events", stream=True, timeout=200) as response:
            answers["stream_status"] = response.status_code
            answers["events"] = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]

    def long_poll() -> None:
        current = http.get(f"{gateway_url}{JOBS}/{job_id}", timeout=30)
        answers["before"] = current.json()["status"]
        answers["poll"] = http.get(f"{gateway_url}{JOBS}/{job_id}", headers={"Prefer": "wait=120", "If-None-Match": current.headers["ETag"]},
                                   timeout=150)

    readers = [threading.Thread(target=stream), threading.Thread(target=long_poll)]
    for reader in readers:
        reader.start()
    time.sleep(1.0)
    assert http.delete(f"{gateway_url}{JOBS}/{job_id}", timeout=30).status_code in (202, 409)
    poster.join(timeout=200)
    for reader in readers:
        reader.join(timeout=200)

    post = answers["post"]
    assert post.status_code == 200 and post.headers["Preference-Applied"] == "wait=180", post.text[:500]
    final = post.json()
    assert final["job_id"] == job_id and final["status"] == "cancelled", final["message"]
    metadata = json.loads(base64.b64decode(final["metadata_b64"]))  # the seed's synchronous answer: the result inside
    assert metadata["job"]["job_id"] == job_id and metadata["slurm"]["main_job_id"] == final["slurm"]["main_job_id"]

    poll = answers["poll"]
    assert poll.status_code == 200 and poll.headers["Preference-Applied"] == "wait=120" and poll.json()["status"] != answers["before"]

    assert answers["stream_status"] == 200
    changes = [event for event in answers["events"] if "progress" not in event]  # state changes, not RELION's progress
    statuses = [event["status"] for event in changes]
    assert statuses[0] == "queued" and statuses[-1] == "cancelled", statuses
    assert all(later["previous_status"] == earlier["status"] for earlier, later in zip(changes, changes[1:]))
