"""Cheap, correct polling (issue 17, first slice): ETag and 304, Location on 202, unknown query parameters."""
from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from gateway.client import GatewayClient
from tests.conftest import valid_request
from tests.unit.test_client_cli import served  # noqa: F401 (a fixture: the app on a real port)
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"


def test_a_job_unchanged_since_its_etag_is_a_304_without_a_body(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    first = client.get(f"{JOBS}/{job_id}")
    tag = first.headers["ETag"]
    assert first.status_code == 200 and tag.startswith('"')
    again = client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == tag
    assert again.headers["Retry-After"]  # still queued: when to look again
    assert client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": f"W/{tag}"}).status_code == 304  # weak comparison

    scheduler.set_state("1001", "RUNNING")
    app.extensions["relion_gateway"].poll()
    changed = client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag and changed.json["status"] == "staging"


def test_a_new_child_changes_the_parents_etag(client: FlaskClient, app: Flask) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    tag = client.get(f"{JOBS}/{job_id}").headers["ETag"]
    store = app.extensions["relion_gateway"].store
    other = client.post(JOBS, json=valid_request(workspace_id="ws2")).json["job_id"]
    store.update(other, parent_job_id=job_id)  # as a chained submission records it
    assert client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": tag}).status_code == 200


def test_metadata_has_an_etag_too(client: FlaskClient, app: Flask) -> None:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    app.extensions["relion_gateway"].store.update(job_id, metadata_json=json.dumps({"schema_version": 1}))
    first = client.get(f"{JOBS}/{job_id}/metadata")
    assert first.status_code == 200 and first.json == {"schema_version": 1}
    assert client.get(f"{JOBS}/{job_id}/metadata", headers={"If-None-Match": first.headers["ETag"]}).status_code == 304


def test_an_accepted_submission_says_where_the_job_is(client: FlaskClient) -> None:
    response = client.post(JOBS, json=valid_request())
    assert response.status_code == 202
    location = response.headers["Location"]
    assert location == f"{JOBS}/{response.json['job_id']}"
    assert client.get(location).json["job_id"] == response.json["job_id"]


@pytest.mark.parametrize("query, unknown", [("status=running", "status"), ("state=running&colour=red", "colour")])
def test_an_unknown_query_parameter_is_a_400_naming_it(client: FlaskClient, query: str, unknown: str) -> None:
    response = client.get(f"{JOBS}?{query}")
    assert response.status_code == 400
    assert unknown in response.json["message"] and unknown in response.json["errors"]["query"]
    assert "state" in response.json["message"]  # what the operation does take


def test_the_client_waits_with_conditional_gets(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    session = requests.Session()
    statuses: list[int] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: statuses.append(response.status_code))
    client = GatewayClient(served, token=app.config["TEST_TOKENS"]["alice"], session=session)
    job_id = client.submit(valid_request())["job_id"]
    service = app.extensions["relion_gateway"]
    polls = {"n": 0}
    real_get = client.get_if_changed

    def counting(job: str, etag: str = "") -> tuple[dict[str, Any] | None, str]:
        polls["n"] += 1
        if polls["n"] == 4:  # the job ends after three unchanged polls
            scheduler.set_state("1001", "COMPLETED", exit_code=0)
            scheduler.set_state("1002", "COMPLETED", exit_code=0)
            service.poll()
        return real_get(job, etag)

    client.get_if_changed = counting  # type: ignore[method-assign]
    job = client.wait(job_id, min_interval=0.01, max_interval=0.01)
    assert job["status"] == "succeeded"
    assert statuses.count(304) >= 2 and statuses[-1] == 200


def test_service_info_tells_a_portal_what_it_may_submit(client: FlaskClient, anonymous_client: FlaskClient, app: Flask) -> None:
    config = app.extensions["relion_gateway"].config
    config["SLURM_PARTITIONS"] = {"gpu": {"max_ranks": 8, "gpus": 2, "max_time": "04:00:00"}, "debug": {"max_ranks": 16, "gpus": 0}}
    config["SLURM_PARTITION"] = "debug"
    body = client.get("/v1/relion/service-info").json
    assert body["modes"] == ["2d", "3d", "autorefine"] and "timeout" in body["states"]
    assert body["relion_version"] == str(config["RELION_VERSION"]) and body["gateway_version"]
    partitions = {p["name"]: p for p in body["partitions"]}
    assert partitions["gpu"]["gpus"] == 2 and partitions["gpu"]["max_time"] == "04:00:00" and partitions["debug"]["default"] is True
    assert body["limits"]["max_cores_per_job"] == config["LIMITS_MAX_CORES_PER_JOB"]
    assert body["max_auto_continue"] == config["JOB_MAX_AUTO_CONTINUE"]
    assert anonymous_client.get("/v1/relion/service-info").status_code == 401


@pytest.fixture
def cors_app(tmp_path: Any, scheduler: FakeScheduler, storage: Any) -> Flask:
    from gateway import create_app

    return create_app(
        {
            "TESTING": True,
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "STORE_DATABASE_URL": "",
            "S3_ALLOWED_BUCKETS": ["relion-local"],
            "AUTH_SCRYPT_N": 2,
            "SERVER_CORS_ORIGINS": ["https://portal.example.org"],
        },
        scheduler=scheduler,
        storage=storage,
    )


def test_a_configured_origin_gets_its_preflight_without_a_token_and_nothing_else_does(cors_app: Flask) -> None:
    client = cors_app.test_client()
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = client.options(JOBS, headers={"Origin": "https://portal.example.org", **preflight})
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "https://portal.example.org"
    assert "authorization" in ok.headers["Access-Control-Allow-Headers"].lower()
    other = client.options(JOBS, headers={"Origin": "https://evil.example", **preflight})
    assert other.status_code == 401 and "Access-Control-Allow-Origin" not in other.headers
    # The request itself still needs its token; the answer carries the CORS headers.
    denied = client.get(JOBS, headers={"Origin": "https://portal.example.org"})
    assert denied.status_code == 401 and denied.headers.get("Access-Control-Allow-Origin") == "https://portal.example.org"


def test_without_configured_origins_there_is_no_cors(anonymous_client: FlaskClient) -> None:
    response = anonymous_client.options(JOBS, headers={"Origin": "https://portal.example.org", "Access-Control-Request-Method": "GET"})
    assert response.status_code == 401 and "Access-Control-Allow-Origin" not in response.headers


def test_workers_booting_together_share_one_callback_key(tmp_path: Any) -> None:
    """gunicorn's workers create the app at once on a fresh state dir: every one gets the same key,
    none fails (one did, with FileExistsError, and took the whole server down)."""
    import multiprocessing

    from gateway.callbacks import load_or_create_secret

    with multiprocessing.get_context("fork").Pool(8) as pool:
        keys = pool.starmap(load_or_create_secret, [("", str(tmp_path))] * 16)
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["callback.key"]  # no draft left behind
    assert (tmp_path / "callback.key").stat().st_mode & 0o777 == 0o600
