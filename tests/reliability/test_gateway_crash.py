"""SIGKILL the gateway (gunicorn, all workers) while 200 submissions with Idempotency-Keys are in
flight from concurrent clients, start it again, let the clients retry: every accepted job exists
exactly once in the store and once in Slurm, and a portal's webhook (a receiver on loopback) has
heard every job's first state, signed, at least once, across the kill and the restart.

The jobs are submitted held (`#SBATCH --hold` through [slurm] extra_directives), so the scenario
exercises submission and nothing else: nothing runs, and the test cancels them all at the end.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from gateway.auth import create_token
from gateway.process import run_command
from gateway.database import JobStore, make_engine
from gateway.stack.nodes import HEAD_NAME  # jobs reach the services at the head, never at loopback
from tests.integration.conftest import ROOT, free_port
from tests.reliability.conftest import JOBS, Tally, job_request, slurm_jobs_named, wait_until
from tests.webhook_receiver import Receiver

SUBMISSIONS = 200
CLIENTS = 16
KILL_AFTER_ACCEPTED = 70  # the gateway dies with about a third accepted and many in flight
# sbatch answers in well under a second here; a short timeout makes a dead gateway's submission
# claims lapse in 2 x 5 + 10 = 20 s, so the poller finishes them within the test's bounds.
COMMAND_TIMEOUT_S = 5


def start_gateway(state: Path, port: int, stack: dict[str, Any], log: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(stack["environment"])
    env.update(
        {
            "GATEWAY_CONFIG": str(ROOT / "config" / "local.toml"),
            "GATEWAY_PATHS_STATE_DIR": str(state),
            "GATEWAY_SERVER_PUBLIC_URL": f"http://{HEAD_NAME}:{port}",
            "GATEWAY_SLURM_EXTRA_DIRECTIVES": '["--hold"]',
            "GATEWAY_SLURM_COMMAND_TIMEOUT": str(COMMAND_TIMEOUT_S),
            "GATEWAY_LIMITS_MAX_ACTIVE_JOBS": "0",
            "GATEWAY_LIMITS_SUBMISSIONS_PER_MINUTE": "0",
            "GATEWAY_POLLER_INTERVAL_QUEUED": "1.0",
            "GATEWAY_POLLER_INTERVAL_ACTIVE": "1.0",
            "GATEWAY_POLLER_INTERVAL_IDLE": "1.0",
            "GATEWAY_WEBHOOKS_ALLOW_NETWORKS": '["127.0.0.1/32"]',
            # The dead gateway's leases (poller, webhooks) lapse sooner, so the restart takes over sooner.
            "GATEWAY_POLLER_LEASE_SECONDS": "10",
        }
    )
    # Its own session: SIGKILL to the group takes the gunicorn master and every worker at once,
    # as a crash of the host process would (and any sbatch they were running).
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://{HEAD_NAME}:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, f"gateway exited: {(state / 'serve.log').read_text()[-3000:]}"
        try:
            return requests.get(f"{url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(healthy, 60, "the gateway to serve", interval=0.2)
    return proc


def test_sigkill_under_200_idempotent_submissions_loses_and_duplicates_nothing(
    tmp_path: Path, stack: dict[str, Any], dataset_url: str, bucket: str, tally: Tally
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = JobStore(make_engine(f"sqlite:///{state / 'gateway.sqlite'}"))
    token = create_token(store, "crash-admin", admin=True, n=16)[1]
    port = free_port()
    url = f"http://{HEAD_NAME}:{port}"
    workspace = f"crash{secrets.token_hex(3)}"
    log = open(state / "serve.log", "ab")
    gateway = start_gateway(state, port, stack, log)
    receiver = Receiver()
    hook = requests.post(f"{url}/v1/relion/webhooks", json={"url": receiver.url, "user_id": "crash"},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert hook.status_code == 201, hook.text

    keys = [f"{workspace}-{n:03d}" for n in range(SUBMISSIONS)]
    answers: dict[str, set[str]] = {key: set() for key in keys}  # every job id a key was answered with
    refused: list[str] = []
    retries = {"n": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + 240

    def request_for(key: str) -> dict[str, Any]:
        return job_request("crash", dataset_url, bucket, workspace, flags={"random_seed": int(key.rsplit("-", 1)[1])})

    def client(my_keys: list[str]) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        for key in my_keys:
            while time.monotonic() < deadline:
                try:
                    response = session.post(f"{url}{JOBS}", json=request_for(key), headers={"Idempotency-Key": key}, timeout=30)
                except requests.RequestException:
                    response = None
                if response is not None and response.status_code == 202:
                    with lock:
                        answers[key].add(response.json()["job_id"])
                    break
                if response is not None and response.status_code < 500:
                    with lock:
                        refused.append(f"{key}: {response.status_code} {response.text[:200]}")
                    break
                with lock:
                    retries["n"] += 1
                time.sleep(0.2)  # connection refused or reset while the gateway is down: retry

    threads = [threading.Thread(target=client, args=(keys[i::CLIENTS],)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    restarted = None
    try:
        wait_until(lambda: sum(bool(a) for a in answers.values()) >= KILL_AFTER_ACCEPTED, 120, f"{KILL_AFTER_ACCEPTED} accepted")
        accepted_before_kill = sum(bool(a) for a in answers.values())
        killed_at = time.time()
        os.killpg(gateway.pid, signal.SIGKILL)
        gateway.wait(timeout=30)
        time.sleep(1.0)  # clients meet a dead port meanwhile
        restarted = start_gateway(state, port, stack, log)
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not refused, refused
        assert all(answers.values()), f"keys never accepted: {[k for k, a in answers.items() if not a]}"

        # The new gateway's poller finishes the submissions the dead one had cut short.
        def all_submitted() -> bool:
            records = store.list(user_id="crash", limit=1000)[0]
            return all(r.main_slurm_id and r.archive_slurm_id for r in records)

        wait_until(all_submitted, 120, "every accepted job to reach Slurm")

        def all_heard() -> bool:
            return {b["data"]["job_id"] for b in receiver.bodies()} >= {next(iter(a)) for a in answers.values()}

        wait_until(all_heard, 60, "the webhook to hear every accepted job")
        records = {r.job_id: r for r in store.list(user_id="crash", limit=1000)[0]}
        in_slurm = slurm_jobs_named(f"job_2d_{workspace}_")
    finally:
        for proc in (gateway, restarted):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        log.close()
        receiver.server.shutdown()
        named = slurm_jobs_named(f"job_2d_{workspace}_")
        ids = sorted({i for found in named.values() for i in found})
        for start in range(0, len(ids), 100):
            run_command(["scancel", *ids[start:start + 100]], timeout=60)

    accepted = {next(iter(a)) for a in answers.values()}
    by_key = {r.idempotency_key: r.job_id for r in records.values()}
    mains = {name: found for name, found in in_slurm.items() if not name.endswith(".archive")}
    hooks = {name[: -len(".archive")]: found for name, found in in_slurm.items() if name.endswith(".archive")}
    duplicated = sum(len(found) - 1 for found in in_slurm.values()) + sum(len(a) - 1 for a in answers.values())
    heard = receiver.verified(hook.json()["secret"])  # raises if one message's signature fails
    message_ids = [headers["webhook-id"] for headers, _ in receiver.received]
    tally.counts.update(
        webhook_messages=len(heard),
        webhook_redelivered=len(message_ids) - len(set(message_ids)),
        webhook_jobs_heard=len({b["data"]["job_id"] for b in heard}),
        submitted=SUBMISSIONS,
        accepted=len(accepted),
        accepted_before_kill=accepted_before_kill,
        client_retries=retries["n"],
        in_store=len(records),
        in_slurm=len(mains.keys() & hooks.keys()),
        lost=len(accepted - mains.keys()),
        duplicated=duplicated,
        orphans_in_slurm=len(mains.keys() - records.keys()),
        # accepted by the dead gateway, in Slurm only after the restart (a retry or the poller finished them)
        cut_short=sum(1 for r in records.values() if r.accepted_at < killed_at < (r.submitted_at or 0)),
    )
    assert all(len(a) == 1 for a in answers.values()), "a key was answered with two job ids"
    assert by_key == {key: next(iter(a)) for key, a in answers.items()}  # one record per key, the one the client got
    assert len(records) == SUBMISSIONS == len(accepted)
    assert mains.keys() == hooks.keys() == records.keys()  # nothing missing, nothing Slurm has that the store lacks
    for job_id, record in records.items():
        assert mains[job_id] == {record.main_slurm_id}, (job_id, mains[job_id], record.main_slurm_id)  # exactly once
        assert hooks[job_id] == {record.archive_slurm_id}, (job_id, hooks[job_id], record.archive_slurm_id)
        assert record.state == "queued", (job_id, record.state, record.message)
    assert duplicated == 0
    assert {b["data"]["job_id"] for b in heard} == records.keys()  # every job heard, nothing lost
    assert {(b["data"]["job_id"], b["data"]["status"]) for b in heard} == {(job_id, "queued") for job_id in records}
