"""Server-sent events of a job (issue 17, push for browsers) and the Prefer: wait parser."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.api.push import SLOTS_KEY, wait_preference
from tests.conftest import valid_request

JOBS = "/v1/relion/jobs"


def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            events.append(fields)
    return events


def test_a_stream_replays_the_history_follows_live_changes_and_ends_with_the_job(client: FlaskClient, app: Flask) -> None:
    import json

    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    store = app.extensions["relion_gateway"].store
    store.update(job_id, state="staging")
    chunks: list[str] = []

    def read() -> None:
        response = client.get(f"{JOBS}/{job_id}/events", buffered=False)
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        for chunk in response.response:
            chunks.append(chunk.decode() if isinstance(chunk, bytes) else chunk)
        response.close()

    reader = threading.Thread(target=read)
    started = time.monotonic()
    reader.start()
    time.sleep(0.5)
    store.update(job_id, state="running", progress_json=json.dumps({"iteration": 1}))
    time.sleep(0.3)
    store.update(job_id, state="succeeded")
    reader.join(timeout=15)
    assert not reader.is_alive() and time.monotonic() - started < 10  # it ended by itself after the end
    events = parse_sse("".join(chunks))
    assert [(e["event"], json.loads(e["data"])["status"]) for e in events] == [
        ("job.state_changed", "queued"), ("job.state_changed", "staging"), ("job.state_changed", "running"),
        ("job.progress", "running"), ("job.state_changed", "succeeded")]
    assert json.loads(events[3]["data"])["progress"] == {"iteration": 1}
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)

    # Resuming after the third event replays only what came after it.
    resumed = client.get(f"{JOBS}/{job_id}/events", headers={"Last-Event-ID": str(ids[2])})
    assert [int(e["id"]) for e in parse_sse(resumed.get_data(as_text=True))] == ids[3:]


def test_another_users_job_has_no_stream_and_a_full_process_says_503(client: FlaskClient, bob_client: FlaskClient, app: Flask) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    assert bob_client.get(f"{JOBS}/{job_id}/events").status_code == 404
    slots = app.extensions[SLOTS_KEY]
    slots.held = slots.limit
    full = client.get(f"{JOBS}/{job_id}/events")
    assert full.status_code == 503 and full.headers["Retry-After"] == "5" and full.json["code"] == 503
    assert slots.held == slots.limit  # the refused stream took no slot


@pytest.mark.parametrize("header, expected", [
    ("wait=10", 10.0), ("respond-async, wait=5", 5.0), ("wait=1000", 300.0), ("WAIT = 3", 3.0),
    ("wait=abc", None), ("handling=strict", None), (None, None), ("wait=-4", 0.0), ("wait=nan", None),
])
def test_prefer_wait_is_read_as_rfc_7240_writes_it(header: Any, expected: float | None) -> None:
    assert wait_preference(header, 300.0) == expected
