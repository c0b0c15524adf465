"""The client on the real stack: submit (seed spellings) -> wait -> metadata -> download; and /readyz
following Slurm and S3 going away and coming back."""
from __future__ import annotations

import json
import os
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from gateway.cli import cli
from gateway.database import JobStore, make_engine
from tests.webhook_receiver import Receiver


def client(url: str, token: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env={"RELION_GATEWAY_URL": url, "RELION_GATEWAY_TOKEN": token}, catch_exceptions=False)
    return result.exit_code, result.stdout


def test_client_submit_wait_metadata_download(gateway_url: str, gateway_config: dict, dataset_url: str, bucket: str, tmp_path: Path) -> None:
    from gateway.auth import create_token

    store = JobStore(make_engine(gateway_config["STORE_DATABASE_URL"]))
    token = create_token(store, "iclient", n=int(gateway_config["AUTH_SCRYPT_N"]))[1]  # a plain user, not an admin
    saved = tmp_path / "metadata.json"
    # The portal's webhook hears the job from queued to its end, and the end carries the result.
    receiver = Receiver()
    hook = requests.post(f"{gateway_url}/v1/relion/webhooks", json={"url": receiver.url}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert hook.status_code == 201, hook.text
    code, out = client(
        gateway_url, token,
        "submit", "--user-id", "iclient", "--workspace-id", "cli", "--dataset-s3-url", dataset_url,
        "--output-s3-prefix", f"s3://{bucket}/results/iclient", "--mode", "2d", "--num-mpi", "2",
        # as the seed's users type them
        "--i", "particles.star", "--o", "Class2D/run", "--K", "3", "--iter", "2", "--tau2-fudge", "2",
        "--particle-diameter", "100", "--ctf", "--ctf", "--zero_mask", "--flatten-solvent", "--psi-step", "10",
        "--offset-range", "4", "--offset-step", "2", "--norm", "--scale", "--j", "1", "--pool", "10",
        "--dont-combine-weights-via-disc", "--preread-images", "--random-seed", "1",
        "--wait", "--timeout", "300", "--save-metadata", str(saved),
    )
    assert code == 0, out
    job_id = out.split()[0]
    metadata = json.loads(saved.read_text())
    assert metadata["request"]["flags"]["tau2_fudge"] == 2 and metadata["relion"]["results"]["iterations_run"] == 2

    code, out = client(gateway_url, token, "metadata", job_id)
    # The cost ("usage") joins metadata.json shortly after the end: the rest is the same document.
    assert code == 0 and without_usage(json.loads(out)) == without_usage(metadata)

    wait_until(lambda: any(b["data"]["status"] == "succeeded" for b in receiver.bodies()), 30)
    receiver.verified(hook.json()["secret"])  # every message signed as Standard Webhooks define
    # What it cost, from Slurm's accounting, once the poller has costed it: in the record, in
    # metadata.json (API and S3) and in the usage report, whose CSV the CLI writes.
    def costed() -> dict[str, Any] | None:
        return json.loads(client(gateway_url, token, "metadata", job_id)[1]).get("usage")

    usage = wait_until(costed, 60)  # asked at the end, then after 5, 10, 20 s while accounting catches up
    assert usage["cpu_hours"] > 0 and usage["cpu_hours_used"] > 0 and len(usage["slurm_jobs"]) == 2
    assert 0 < usage["cpu_efficiency"] <= 1.5 and usage["peak_task_rss_bytes"] > 0
    bucket_name, key = metadata["output"]["url"].removeprefix("s3://").split("/", 1)
    from gateway.storage.s3 import S3Storage, make_s3_client, parse_s3_url

    s3 = S3Storage(make_s3_client(gateway_config["S3_ENDPOINT_URL"], gateway_config["S3_REGION"]))
    stored = json.loads(s3.get_bytes(parse_s3_url(f"s3://{bucket_name}/{key.rsplit('/', 1)[0]}/metadata.json")))
    assert stored["usage"] == usage
    code, out = client(gateway_url, token, "usage", "--csv", "--group-by", "user")
    assert code == 0 and out.splitlines()[1].startswith("iclient,1,1,"), out
    heard = [b["data"] for _, b in sorted(receiver.by_event().items())]
    assert {d["job_id"] for d in heard} == {job_id}
    # Every state change the store saw, in order (a poll cycle on a loaded machine may see staging
    # and running as one change, so the middle ones are those the store recorded).
    statuses = [d["status"] for d in heard]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "archiving" in statuses
    assert statuses == [s for s in ("queued", "staging", "running", "archiving", "succeeded") if s in statuses]
    assert all(later["previous_status"] == earlier["status"] for earlier, later in zip(heard, heard[1:]))
    assert without_usage(heard[-1]["metadata"]) == without_usage(metadata)
    receiver.server.shutdown()
    target = tmp_path / "out.tar.gz"
    code, out = client(gateway_url, token, "download", job_id, "-o", str(target))
    assert code == 0, out
    with tarfile.open(target) as archive:
        assert "Class2D/run_it002_model.star" in archive.getnames()
    code, out = client(gateway_url, token, "logs", job_id, "--tail", "5")
    assert code == 0 and out.strip()
    code, out = client(gateway_url, token, "list", "--json")
    assert code == 0 and [j["job_id"] for j in json.loads(out)] == [job_id]  # a user sees only their jobs


def without_usage(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key != "usage"}


def readyz(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/readyz", timeout=30)
    body = dict(response.json())
    body["status_code"] = response.status_code
    return body


def wait_until(predicate: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.5)


@pytest.mark.serial  # kills the S3 server and stops slurmctld
def test_readyz_follows_slurm_and_s3(gateway_url: str) -> None:
    from gateway.stack import stack_status, stack_up

    assert readyz(gateway_url)["status_code"] == 200
    os.kill(stack_status()["daemons"]["nanio"]["pid"], signal.SIGKILL)
    try:
        body = wait_until(lambda: (b := readyz(gateway_url))["status_code"] == 503 and b)
        assert not body["checks"]["s3"]["ok"] and body["checks"]["slurm"]["ok"]
    finally:
        stack_up()
    wait_until(lambda: readyz(gateway_url)["status_code"] == 200)

    os.kill(stack_status()["daemons"]["slurmctld"]["pid"], signal.SIGTERM)
    try:
        body = wait_until(lambda: (b := readyz(gateway_url))["status_code"] == 503 and b)
        assert not body["checks"]["slurm"]["ok"] and body["checks"]["s3"]["ok"]
    finally:
        stack_up()
    wait_until(lambda: readyz(gateway_url)["status_code"] == 200)
