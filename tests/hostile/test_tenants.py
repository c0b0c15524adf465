"""One user's job tries to reach what is not its own: the store, the keys, another user's files, jobs,
events and S3 objects. Every attempt is recorded in the run's summary table.

The attacker (``mallory``) runs as the account ``rgjob2``; the victim (``victim``) as ``rgjob``,
the local profile's default. The attacker's code is tests/hostile/probe.py, installed as the
gateway's relion_refine, so it runs inside a real job exactly where RELION would.
"""
from __future__ import annotations

import json
import shutil
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from gateway import create_app
from gateway.auth import create_token
from gateway.callbacks import ROLE_ARCHIVE, SIGNATURE_HEADER, job_token, sign, signed_body
from gateway.jobs.dirs import make_job_dirs
from gateway.relion.presets import TINY_FLAGS
from gateway.storage.s3 import S3Storage, parse_s3_url
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback
from tests.hostile.conftest import record
from tests.integration.conftest import allow_admin, free_port, wait_for_end

JOBS = "/v1/relion/jobs"
ATTACKER, ATTACKER_ACCOUNT, VICTIM = "mallory", "rgjob2", "victim"
PROBE = Path(__file__).with_name("probe.py")


class Tenants:
    def __init__(self, url: str, config: dict[str, Any], tokens: dict[str, str]) -> None:
        self.url, self.config = url, config
        self.sessions = {}
        for user, token in tokens.items():
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token}"
            self.sessions[user] = session

    def request(self, user: str, dataset_url: str, bucket: str, **changes: Any) -> dict[str, Any]:
        return {
            "user_id": user,
            "workspace_id": "hostile",
            "dataset_s3_url": dataset_url,
            "output_s3_prefix": f"s3://{bucket}/results/{user}",
            "mode": "2d",
            "num_mpi": 1,
            "flags": dict(TINY_FLAGS["2d"], j=2),
            **changes,
        }

    def submit(self, user: str, request: dict[str, Any]) -> requests.Response:
        return self.sessions[user].post(f"{self.url}{JOBS}", json=request, timeout=60)


@pytest.fixture(scope="module")
def tenants(gateway_config: dict[str, Any], admin_token: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    state = tmp_path_factory.mktemp("hostile-state")
    state.chmod(0o711)
    probe_dir = tmp_path_factory.mktemp("probe")
    probe_dir.chmod(0o755)
    probe = probe_dir / "relion_refine"
    targets = probe_dir / "targets.json"
    probe.write_text(f"#!{sys.executable} -I\n"
                     + PROBE.read_text().replace("@TARGETS@", str(targets)))
    probe.chmod(0o755)
    targets.write_text(json.dumps({"attacker_account": ATTACKER_ACCOUNT}))  # the full list comes later
    port = free_port()
    url = f"http://{HEAD_NAME}:{port}"
    config = {
        **gateway_config,
        "PATHS_STATE_DIR": str(state),
        "PATHS_WORKSPACE_ROOT": str(state / "workspaces"),
        "PATHS_LOG_ROOT": str(state / "logs"),
        "STORE_DATABASE_URL": f"sqlite:///{state / 'gateway.sqlite'}",
        "SERVER_PUBLIC_URL": url,
        "JOB_RUN_AS_USERS": {ATTACKER: ATTACKER_ACCOUNT},
        "RELION_REFINE": str(probe),
    }
    app = create_app(config)
    allow_admin(app, admin_token)
    service = app.extensions["relion_gateway"]
    tokens = {user: create_token(service.store, user, n=16)[1] for user in (ATTACKER, VICTIM)}
    server = make_server(HEAD_NAME, port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    t = Tenants(url, config, tokens)
    t.targets_file = targets  # type: ignore[attr-defined]
    yield t
    app.extensions["relion_gateway_poller"].stop()
    server.shutdown()


def test_one_users_job_cannot_reach_anything_not_its_own(
    tenants: Tenants, dataset_url: str, bucket: str, storage: S3Storage, stack: dict[str, Any]
) -> None:
    config = tenants.config
    # The victim's real job: its output is in S3, its log directory stays on disk.
    response = tenants.submit(VICTIM, tenants.request(VICTIM, dataset_url, bucket))
    assert response.status_code == 202, response.text
    victim = wait_for_end(tenants.sessions[VICTIM], tenants.url, response.json()["job_id"])
    assert victim["status"] == "succeeded", victim
    victim_output = parse_s3_url(victim["output_url"]).child("output.tar.gz")
    # A workspace the victim's job still has (as the gateway makes them, the victim's account's).
    victim_ws = Path(config["PATHS_WORKSPACE_ROOT"]) / VICTIM / "job_2d_hostile_00000000"
    make_job_dirs(Path(config["PATHS_WORKSPACE_ROOT"]), VICTIM, victim_ws, "rgjob")
    secret_file = victim_ws / "particles.star"
    secret_file.write_text("the victim's data\n")
    shutil.chown(secret_file, "rgjob", "rgjob")
    secret_file.chmod(stat.S_IRUSR | stat.S_IWUSR)

    # Naming another user's output as a dataset is refused before anything reaches Slurm.
    stolen = tenants.submit(ATTACKER, tenants.request(ATTACKER, victim_output.url, bucket))
    assert record("submit with another user's output.tar.gz as the dataset", "403 naming dataset_s3_url",
                  f"{stolen.status_code} {stolen.json().get('message', '')[:90]}",
                  denied=stolen.status_code == 403 and "dataset_s3_url" in stolen.text), stolen.text
    elsewhere = tenants.submit(ATTACKER, tenants.request(ATTACKER, dataset_url, bucket, output_s3_prefix=f"s3://{bucket}/results/{VICTIM}"))
    assert record("submit with another user's output prefix", "403 naming output_s3_prefix",
                  f"{elsewhere.status_code} {elsewhere.json().get('message', '')[:90]}",
                  denied=elsewhere.status_code == 403 and "output_s3_prefix" in elsewhere.text), elsewhere.text

    # The attacker's job runs the probe (as relion_refine) with these targets.
    tenants.targets_file.write_text(json.dumps({  # type: ignore[attr-defined]
        "attacker_account": ATTACKER_ACCOUNT,
        "attacker_user": ATTACKER,
        "store": config["STORE_DATABASE_URL"].removeprefix("sqlite:///"),
        "key": str(Path(config["PATHS_STATE_DIR"]) / "callback.key"),
        "workspace_root": config["PATHS_WORKSPACE_ROOT"],
        "log_root": config["PATHS_LOG_ROOT"],
        "victim_file": str(secret_file),
        "victim_log_dir": str(Path(config["PATHS_LOG_ROOT"]) / VICTIM / victim["job_id"]),
        "victim_job_id": victim["job_id"],
        "victim_output_key": victim_output.key,
        "s3_endpoint": stack["s3"]["endpoint_url"],
        "bucket": bucket,
        "gateway": tenants.url + config["SERVER_BASE_PATH"],
    }))
    response = tenants.submit(ATTACKER, tenants.request(ATTACKER, dataset_url, bucket))
    assert response.status_code == 202, response.text
    attack = wait_for_end(tenants.sessions[ATTACKER], tenants.url, response.json()["job_id"])
    log_dir = Path(config["PATHS_LOG_ROOT"]) / ATTACKER / attack["job_id"]
    out = (log_dir / f"main-{attack['slurm']['main_job_id']}.out").read_text()
    line = next(l for l in out.splitlines() if l.startswith("HOSTILE-PROBE "))
    results: dict[str, str] = json.loads(line.removeprefix("HOSTILE-PROBE "))
    assert results.pop("account") == ATTACKER_ACCOUNT, "the probe did not run as the attacker's account"
    for name, observed in results.items():
        record(f"inside a job: {name}", "denied", observed, denied=observed.startswith("denied"))
    assert attack["status"] == "succeeded", attack
    assert all(v.startswith("denied") for v in results.values()), results

    # A stolen hook token (the attacker's own job's) cannot move its output elsewhere or write
    # outside its prefix; the output link is the recorded location, not what an event says.
    secret = Path(config["PATHS_STATE_DIR"], "callback.key").read_text().strip().encode()
    hook_token = job_token(secret, attack["job_id"], ROLE_ARCHIVE)
    events = f"{tenants.url}{JOBS}/{attack['job_id']}"

    def post(path: str, fields: dict[str, Any]) -> requests.Response:
        body = signed_body(attack["job_id"], fields)
        return requests.post(f"{events}/{path}", data=body, timeout=30,
                             headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(hook_token, body)})

    forged = dict(attack["metadata"], output={**attack["metadata"]["output"], "url": victim_output.url})
    taken = post("events", {"type": "metadata", "data": forged})
    link = tenants.sessions[ATTACKER].get(f"{events}/output", timeout=30).json()
    own = parse_s3_url(attack["output_url"]).child("output.tar.gz")
    assert record("metadata event naming another user's output, then GET /output",
                  "the link is for the job's recorded output",
                  f"event {taken.status_code}; link for {'own output' if f'/{own.key}?' in link['url'] else link['url'][:80]}",
                  denied=f"/{own.key}?" in link["url"] and victim_output.key not in link["url"]), link
    for key in (f"../../{VICTIM}/{victim['job_id']}/output.tar.gz", "/etc/passwd", "a/../../x"):
        answer = post("storage", {"type": "storage", "op": "put", "key": key})
        assert record(f"presign a PUT outside the job's prefix ({key})", "422 naming key",
                      f"{answer.status_code} {answer.json().get('message', '')[:80]}",
                      denied=answer.status_code == 422 and "key" in answer.text), answer.text
    other = requests.post(f"{tenants.url}{JOBS}/{victim['job_id']}/storage", timeout=30,
                          data=(b := signed_body(victim["job_id"], {"type": "storage", "op": "put", "key": "x"})),
                          headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(hook_token, b)})
    assert record("presign a PUT for another user's job with my hook token", "401", f"{other.status_code}",
                  denied=other.status_code == 401), other.text
    # The attack job's stderr is now a symlink to the gateway's callback key (the probe planted it).
    planted = tenants.sessions[ATTACKER].get(f"{events}/logs", params={"stream": "err"}, timeout=30)
    assert record("read the callback key through GET /logs via a planted symlink", "404, not the key",
                  f"{planted.status_code}", denied=planted.status_code == 404 and secret.decode() not in planted.text), planted.text
    # Through the API the victim's job does not exist for the attacker.
    for path in ("", "/script", "/metadata", "/output", "/logs?stream=out"):
        seen = tenants.sessions[ATTACKER].get(f"{tenants.url}{JOBS}/{victim['job_id']}{path}", timeout=30)
        assert record(f"GET another user's job{path or ''} via the API", "404", f"{seen.status_code}",
                      denied=seen.status_code == 404), seen.text
