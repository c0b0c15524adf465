"""Fail fast at submit (issue 16): one HEAD of the dataset before anything reaches Slurm."""
from __future__ import annotations

from flask.testing import FlaskClient

from tests.fakes import FakeScheduler, FakeStorage
from tests.conftest import valid_request
from tests.unit.test_api import JOBS


def _dataset(request: dict) -> str:
    return str(request["dataset_s3_url"])


def test_a_missing_dataset_is_a_422_and_nothing_is_queued(client: FlaskClient, app, scheduler: FakeScheduler, storage: FakeStorage) -> None:
    request = valid_request()
    storage.head_errors[_dataset(request)] = "404"
    response = client.post(JOBS, json=request)
    assert response.status_code == 422, response.text
    body = response.get_json()
    assert "dataset_s3_url" in body["message"] and "no object" in body["message"] and "404" in body["message"]
    assert scheduler.submitted == [] and app.extensions["relion_gateway"].store.list(user_id=None, states=None, mode=None, limit=10, offset=0)[1] == 0


def test_an_unreadable_or_too_large_dataset_is_a_422_naming_it(client: FlaskClient, app, scheduler: FakeScheduler, storage: FakeStorage) -> None:
    request = valid_request()
    storage.head_errors[_dataset(request)] = "AccessDenied"
    denied = client.post(JOBS, json=request)
    assert denied.status_code == 422 and "may not read" in denied.get_json()["message"]
    del storage.head_errors[_dataset(request)]
    app.extensions["relion_gateway"].config["JOB_STAGE_IN_QUOTA_BYTES"] = 500
    storage.sizes[_dataset(request)] = 501
    large = client.post(JOBS, json=request)
    assert large.status_code == 422 and "stage_in_quota_bytes" in large.get_json()["message"]
    storage.sizes[_dataset(request)] = 0
    empty = client.post(JOBS, json=request)
    assert empty.status_code == 422 and "empty object" in empty.get_json()["message"]
    assert scheduler.submitted == []


def test_s3_not_answering_at_submit_is_a_503_with_retry_after_and_nothing_queued(
    client: FlaskClient, app, scheduler: FakeScheduler, storage: FakeStorage
) -> None:
    request = valid_request()
    storage.head_errors[_dataset(request)] = ""  # a connection error carries no S3 code
    response = client.post(JOBS, json=request)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert scheduler.submitted == []
    del storage.head_errors[_dataset(request)]
    assert client.post(JOBS, json=request).status_code == 202  # the same request once S3 answers
