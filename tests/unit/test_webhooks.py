"""Webhooks (issue 17, push): subscriptions, Standard Webhooks signatures, the outbox and its retries,
the delivery log, and what a webhook may not target. A real receiver on loopback takes the POSTs."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from standardwebhooks.webhooks import Webhook as Verifier

from gateway.api.push import WEBHOOKS_KEY
from gateway.app import DISPATCHER_KEY
from gateway.jobs.dispatch import Dispatcher
from gateway.jobs.webhooks import target_problem, webhook_secret
from tests.conftest import valid_request
from tests.fakes import FakeScheduler
from tests.webhook_receiver import Receiver

HOOKS = "/v1/relion/webhooks"
JOBS = "/v1/relion/jobs"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def dispatcher(app: Flask) -> Dispatcher:
    """The app's dispatcher, allowed to reach loopback (where the receiver listens)."""
    for key in (WEBHOOKS_KEY, DISPATCHER_KEY):
        app.extensions[key].config["WEBHOOKS_ALLOW_NETWORKS"] = ["127.0.0.1/32"]
    dispatcher: Dispatcher = app.extensions[DISPATCHER_KEY]
    dispatcher.config["WEBHOOKS_RETRY_SECONDS"] = [0.05]
    return dispatcher


def test_a_subscription_gets_every_state_change_signed_and_the_end_with_the_result(
    client: FlaskClient, app: Flask, scheduler: FakeScheduler, receiver: Receiver, dispatcher: Dispatcher
) -> None:
    created = client.post(HOOKS, json={"url": receiver.url, "description": "portal"})
    assert created.status_code == 201, created.json
    hook = created.json
    assert hook["secret"].startswith("whsec_") and hook["user_id"] == "alice" and hook["job_id"] is None
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    service = app.extensions["relion_gateway"]
    scheduler.set_state("1001", "RUNNING")
    service.poll()
    service.store.update(job_id, metadata_json=json.dumps({"schema_version": 1, "relion": {"iterations_run": 2}}))
    service.store.update(job_id, state="succeeded", exit_code=0, message="done")
    dispatcher.run_once(wait=True)

    verifier = Verifier(hook["secret"])
    for headers, body in receiver.received:
        verifier.verify(body.decode(), headers)  # raises on a bad signature or a stale timestamp
        assert headers["webhook-id"].startswith("msg_") and headers["content-type"] == "application/json"
    bodies = sorted(receiver.bodies(), key=lambda b: b["data"]["event_id"])
    assert [(b["data"]["previous_status"], b["data"]["status"]) for b in bodies] == [
        (None, "queued"), ("queued", "staging"), ("staging", "succeeded")]
    assert all(b["type"] == "job.state_changed" and b["data"]["job_id"] == job_id for b in bodies)
    assert bodies[-1]["data"]["metadata"]["relion"]["iterations_run"] == 2 and bodies[-1]["data"]["exit_code"] == 0
    assert bodies[0]["timestamp"].endswith("Z")

    log = client.get(f"{HOOKS}/{hook['id']}/deliveries").json
    assert log["total"] == 3 and {d["status"] for d in log["deliveries"]} == {"delivered"}
    assert all(d["attempts"] == 1 and d["last_status_code"] == 204 and d["next_attempt_at"] is None for d in log["deliveries"])
    dispatcher.run_once(wait=True)
    assert len(receiver.received) == 3  # delivered once each, not again


def test_a_failing_endpoint_is_retried_with_the_same_id_until_it_answers(
    client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher
) -> None:
    hook = client.post(HOOKS, json={"url": receiver.url}).json
    receiver.status = 503
    client.post(JOBS, json=valid_request())
    dispatcher.run_once(wait=True)
    pending = client.get(f"{HOOKS}/{hook['id']}/deliveries").json["deliveries"][0]
    assert (pending["status"], pending["attempts"], pending["last_status_code"]) == ("pending", 1, 503)
    assert pending["last_error"].startswith("HTTP 503") and pending["next_attempt_at"] is not None
    time.sleep(0.1)
    receiver.status = 200
    dispatcher.run_once(wait=True)
    ids = [headers["webhook-id"] for headers, _ in receiver.received]
    assert len(ids) == 2 and ids[0] == ids[1]  # the receiver de-duplicates on it
    done = client.get(f"{HOOKS}/{hook['id']}/deliveries").json["deliveries"][0]
    assert (done["status"], done["attempts"]) == ("delivered", 2)


def test_after_the_last_attempt_a_delivery_is_failed_and_the_log_says_why(
    client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher
) -> None:
    dispatcher.config["WEBHOOKS_MAX_ATTEMPTS"] = 2
    hook = client.post(HOOKS, json={"url": receiver.url}).json
    receiver.status = 500
    client.post(JOBS, json=valid_request())
    for _ in range(2):
        dispatcher.run_once(wait=True)
        time.sleep(0.1)
    failed = client.get(f"{HOOKS}/{hook['id']}/deliveries", query_string={"status": "failed"}).json
    assert failed["total"] == 1 and failed["deliveries"][0]["attempts"] == 2
    assert failed["deliveries"][0]["payload"]["data"]["status"] == "queued"


def test_a_job_scoped_webhook_hears_only_its_job_and_another_user_sees_none(
    client: FlaskClient, bob_client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher
) -> None:
    first = client.post(JOBS, json=valid_request()).json["job_id"]
    hook = client.post(HOOKS, json={"url": receiver.url, "job_id": first}).json
    assert bob_client.post(HOOKS, json={"url": receiver.url, "job_id": first}).status_code == 404
    assert bob_client.get(f"{HOOKS}/{hook['id']}").status_code == 404
    assert bob_client.get(f"{HOOKS}/{hook['id']}/deliveries").status_code == 404
    assert bob_client.delete(f"{HOOKS}/{hook['id']}").status_code == 404
    assert bob_client.get(HOOKS).json == {"webhooks": []}
    client.post(JOBS, json=valid_request(workspace_id="ws2"))
    client.delete(f"{JOBS}/{first}")  # a message only: no state change yet
    dispatcher.run_once(wait=True)
    # A job's subscription hears all of its job, from its first state; never another job.
    assert [(b["data"]["job_id"], b["data"]["status"]) for b in receiver.bodies()] == [(first, "queued")]
    assert client.get(f"{HOOKS}/{hook['id']}").json["job_id"] == first
    assert "secret" not in client.get(f"{HOOKS}/{hook['id']}").json


def test_deleting_a_webhook_cancels_what_it_still_had_to_send(client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher) -> None:
    hook = client.post(HOOKS, json={"url": receiver.url}).json
    client.post(JOBS, json=valid_request())
    dispatcher.fan_out()
    assert client.delete(f"{HOOKS}/{hook['id']}").status_code == 204
    dispatcher.run_once(wait=True)
    assert receiver.received == [] and client.get(f"{HOOKS}/{hook['id']}").status_code == 404
    assert client.get(HOOKS).json == {"webhooks": []}


@pytest.mark.parametrize("url, rule", [
    ("ftp://portal.example/hook", "http:// or https://"),
    ("http://127.0.0.1:6820/slurm", "127.0.0.1"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("http://[::1]:9010/", "::1"),
    ("https://user:pw@portal.example/hook", "user name or password"),
    ("http://0.0.0.0/", "0.0.0.0"),
])
def test_a_webhook_may_not_target_the_gateways_neighbours(client: FlaskClient, url: str, rule: str) -> None:
    response = client.post(HOOKS, json={"url": url})
    assert response.status_code == 422
    assert response.json["errors"]["json"]["url"] and rule in response.json["message"]


def test_allowed_networks_and_resolution_are_checked_by_address() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return {"portal.example": ["192.0.2.10"], "rebound.example": ["127.0.0.1"]}[host]

    assert target_problem("https://portal.example/hook", [], resolver) is None
    assert "127.0.0.1" in (target_problem("http://rebound.example/", [], resolver) or "")
    assert target_problem("http://rebound.example/", ["127.0.0.0/8"], resolver) is None


def test_bad_subscriptions_are_422s_naming_the_field(client: FlaskClient) -> None:
    bad = client.post(HOOKS, json={"url": "https://portal.example/h", "event_types": ["job.deleted"]})
    assert bad.status_code == 422 and "event_types" in bad.json["errors"]["json"]
    other = client.post(HOOKS, json={"url": "https://portal.example/h", "user_id": "bob"})
    assert other.status_code == 403 and "user_id" in other.json["message"]


def test_the_secret_is_derived_not_stored(app: Flask) -> None:
    key = app.extensions["relion_gateway"].callback_secret
    assert webhook_secret(key, "wh_1") == webhook_secret(key, "wh_1") != webhook_secret(key, "wh_2")
    with app.extensions["relion_gateway"].store.engine.connect() as conn:
        stored = json.dumps([list(r) for r in conn.exec_driver_sql("SELECT * FROM webhooks")])
    assert "whsec_" not in stored


def test_a_dead_endpoint_holds_one_slot_and_others_are_still_delivered(
    client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher
) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts, never answers: every attempt waits out the timeout
    dispatcher.config["WEBHOOKS_TIMEOUT_SECONDS"] = 30.0
    client.post(HOOKS, json={"url": f"http://127.0.0.1:{silent.getsockname()[1]}/dead"})
    client.post(HOOKS, json={"url": receiver.url})
    for ws in ("a", "b", "c"):
        client.post(JOBS, json=valid_request(workspace_id=ws))
    # The live endpoint gets all three while the dead one's first attempt still waits out its 30 s.
    deadline = time.monotonic() + 20
    while len(receiver.received) < 3 and time.monotonic() < deadline:
        dispatcher.run_once()
        time.sleep(0.05)
    assert len(receiver.received) == 3
    dead = [f for hook, f in dispatcher._in_flight.items() if not f.done()]
    assert len(dead) == 1  # one sender holds the dead endpoint's one delivery; nothing else waits behind it
    silent.close()  # the dead attempt ends (connection reset) and the pool drains
    dispatcher.drain()


def test_a_jobs_webhook_made_after_its_events_went_out_is_backfilled(
    client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher, app: Flask
) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    app.extensions["relion_gateway"].store.update(job_id, state="staging")
    dispatcher.run_once(wait=True)  # both events fanned out (to nobody) before the subscription
    client.post(HOOKS, json={"url": receiver.url, "job_id": job_id})
    dispatcher.run_once(wait=True)
    assert [b["data"]["status"] for b in sorted(receiver.bodies(), key=lambda b: b["data"]["event_id"])] == ["queued", "staging"]


def test_a_webhook_in_the_submit_request_hears_that_job_and_a_replay_answers_the_same(
    client: FlaskClient, receiver: Receiver, dispatcher: Dispatcher
) -> None:
    request = valid_request(webhook={"url": receiver.url})
    first = client.post(JOBS, json=request, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202, first.json
    hook = first.json["webhook"]
    assert hook["id"].startswith("wh_") and hook["secret"].startswith("whsec_") and hook["job_id"] == first.json["job_id"]
    again = client.post(JOBS, json=request, headers={"Idempotency-Key": "k-1"})
    assert again.json["job_id"] == first.json["job_id"] and again.json["webhook"] == hook
    assert len(client.get(HOOKS).json["webhooks"]) == 1
    assert "webhook" not in client.get(f"{JOBS}/{first.json['job_id']}").json["flags"]
    dispatcher.run_once(wait=True)
    assert [b["data"]["status"] for b in receiver.verified(hook["secret"])] == ["queued"]


def test_a_submit_with_a_webhook_the_gateway_may_not_call_stores_no_job(client: FlaskClient, app: Flask) -> None:
    refused = client.post(JOBS, json=valid_request(webhook={"url": "http://127.0.0.1:6820/"}))
    assert refused.status_code == 422 and "webhook.url" in refused.json["errors"]["json"]
    assert app.extensions["relion_gateway"].store.list()[1] == 0
