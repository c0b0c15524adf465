"""Long-polls (issue 17, RFC 7240 Prefer: wait): a GET held until the job's state changes, a POST held
until the job ends (a client of the synchronous service this gateway replaces works unchanged), and
never more held requests than the process's wait slots."""
from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from gateway.api.push import SLOTS_KEY
from tests.conftest import valid_request

JOBS = "/v1/relion/jobs"


def later(seconds: float, action: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_get_waits_for_the_state_to_change(client: FlaskClient, app: Flask) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    store = app.extensions["relion_gateway"].store
    tag = client.get(f"{JOBS}/{job_id}").headers["ETag"]
    progress = later(0.3, lambda: store.update(job_id, progress_json=json.dumps({"iteration": 1})))  # not a state change
    change = later(1.0, lambda: store.update(job_id, state="staging"))
    started = time.monotonic()
    answer = client.get(f"{JOBS}/{job_id}", headers={"Prefer": "wait=10", "If-None-Match": tag})
    waited = time.monotonic() - started
    progress.join()
    change.join()
    assert answer.status_code == 200 and answer.json["status"] == "staging"
    assert answer.headers["Preference-Applied"] == "wait=10" and answer.headers["Vary"] == "Prefer"
    assert 0.9 < waited < 5  # held past the progress event, answered soon after the change


def test_a_wait_with_no_change_ends_after_n_seconds_as_a_304(client: FlaskClient) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    tag = client.get(f"{JOBS}/{job_id}").headers["ETag"]
    started = time.monotonic()
    answer = client.get(f"{JOBS}/{job_id}", headers={"Prefer": "wait=1", "If-None-Match": tag})
    assert answer.status_code == 304 and answer.headers["Preference-Applied"] == "wait=1"
    assert 0.9 < time.monotonic() - started < 4


def test_a_stale_copy_or_an_ended_job_is_answered_at_once(client: FlaskClient, app: Flask) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    started = time.monotonic()
    stale = client.get(f"{JOBS}/{job_id}", headers={"Prefer": "wait=10", "If-None-Match": '"not-the-current-one"'})
    assert stale.status_code == 200 and "Preference-Applied" not in stale.headers
    app.extensions["relion_gateway"].store.update(job_id, state="cancelled")
    ended = client.get(f"{JOBS}/{job_id}", headers={"Prefer": "wait=10"})
    assert ended.json["status"] == "cancelled" and "Preference-Applied" not in ended.headers
    assert time.monotonic() - started < 2


def test_a_post_with_prefer_wait_answers_the_final_result(client: FlaskClient, app: Flask) -> None:
    store = app.extensions["relion_gateway"].store
    metadata = {"schema_version": 1, "relion": {"results": {"iterations_run": 2}}}

    def finish() -> None:
        job_id = store.list(user_id="alice")[0][0].job_id
        store.update(job_id, state="running")
        time.sleep(0.3)
        store.update(job_id, metadata_json=json.dumps(metadata), state="succeeded", exit_code=0)

    done = later(0.8, finish)
    answer = client.post(JOBS, json=valid_request(), headers={"Prefer": "wait=20"})
    done.join()
    assert answer.status_code == 200 and answer.json["status"] == "succeeded"
    assert answer.headers["Preference-Applied"] == "wait=20" and answer.headers["Location"].endswith(answer.json["job_id"])
    assert json.loads(base64.b64decode(answer.json["metadata_b64"])) == metadata


def test_a_post_whose_job_outlives_the_wait_is_the_usual_202(client: FlaskClient) -> None:
    answer = client.post(JOBS, json=valid_request(), headers={"Prefer": "wait=1"})
    assert answer.status_code == 202 and answer.json["status"] == "queued" and answer.headers["Preference-Applied"] == "wait=1"


def test_without_a_free_wait_slot_the_answer_comes_at_once(client: FlaskClient, app: Flask) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    slots = app.extensions[SLOTS_KEY]
    slots.held = slots.limit
    started = time.monotonic()
    answer = client.get(f"{JOBS}/{job_id}", headers={"Prefer": "wait=10"})
    assert answer.status_code == 200 and "Preference-Applied" not in answer.headers and time.monotonic() - started < 1
