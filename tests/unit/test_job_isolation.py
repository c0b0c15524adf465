"""What a job may ask of the gateway, and what a user may name: each refusal names the field and the rule."""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.callbacks import SIGNATURE_HEADER, TOKEN_ENV, sign, signed_body
from gateway.jobside import brokered
from gateway.jobside.brokered import BrokeredStorage
from gateway.storage.base import ObjectInfo, S3Location, StorageError
from tests.conftest import valid_request
from tests.fakes import FakeScheduler, FakeStorage

JOBS = "/v1/relion/jobs"


@dataclass
class PresigningStorage(FakeStorage):
    """FakeStorage that also presigns (URLs name the operation and key) and runs multipart uploads."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def head(self, location: S3Location) -> ObjectInfo:
        if location.url not in self.objects:
            raise StorageError("HEAD", location.bucket, location.key, "404 Not Found", "404")
        return ObjectInfo(len(self.objects[location.url]), "etag")

    def presigned_get(self, location: S3Location, expires_s: int = 3600, *, for_job: bool = False) -> str:
        self.calls.append(("get", location.url))
        return f"https://s3.example/get/{location.key}"

    def presigned_put(self, location: S3Location, expires_s: int) -> str:
        self.calls.append(("put", location.url))
        return f"https://s3.example/put/{location.key}"

    def start_multipart(self, location: S3Location) -> str:
        self.calls.append(("start", location.url))
        return "upload-1"

    def presigned_part(self, location: S3Location, upload_id: str, part: int, expires_s: int) -> str:
        return f"https://s3.example/part/{location.key}?n={part}&u={upload_id}"

    def complete_multipart(self, location: S3Location, upload_id: str, parts: list[tuple[int, str]]) -> ObjectInfo:
        self.calls.append(("complete", location.url))
        return ObjectInfo(123, "etag-2")

    def abort_multipart(self, location: S3Location, upload_id: str) -> None:
        self.calls.append(("abort", location.url))


@pytest.fixture
def storage() -> PresigningStorage:
    store = PresigningStorage()
    # The datasets this module's requests name: the gateway HEADs a dataset at submit (issue 16).
    for url in ("datasets/tiny.tar.gz", "results/alice/job_x/output.tar.gz", "results/alice/x.tar.gz"):
        store.objects[f"s3://relion-local/{url}"] = b"x" * 10
    return store


def submitted(client: FlaskClient, scheduler: FakeScheduler) -> tuple[dict[str, Any], str, str]:
    response = client.post(JOBS, json=valid_request())
    assert response.status_code == 202, response.json
    return response.json, scheduler.environments[0][TOKEN_ENV], scheduler.environments[1][TOKEN_ENV]


def ask(client: FlaskClient, job_id: str, token: str, path: str = "storage", **fields: Any) -> Any:
    body = signed_body(job_id, fields)
    return client.post(f"{JOBS}/{job_id}/{path}", data=body, content_type="application/json",
                       headers={SIGNATURE_HEADER: sign(token, body)})


def test_each_token_does_only_its_own_jobs_storage_work(client: FlaskClient, scheduler: FakeScheduler, storage: PresigningStorage) -> None:
    job, main, hook = submitted(client, scheduler)
    job_id = job["job_id"]
    dataset = ask(client, job_id, main, type="storage", op="dataset")
    assert dataset.status_code == 200 and dataset.json["dataset_s3_url"] == "s3://relion-local/datasets/tiny.tar.gz"
    assert dataset.json["size"] == 10 and dataset.json["url"].startswith("https://s3.example/get/datasets/tiny.tar.gz")
    # The main job may not upload; the hook may not read the dataset.
    for token, op, fields in ((main, "put", {"key": "x"}), (main, "multipart_start", {"key": "x"}), (hook, "dataset", {})):
        refused = ask(client, job_id, token, type="storage", op=op, **fields)
        assert refused.status_code == 401 and f"may not {op}" in refused.json["message"], refused.json
    put = ask(client, job_id, hook, type="storage", op="put", key="logs/main-1.out")
    assert put.status_code == 200 and ("put", f"{job['output_url']}logs/main-1.out") in storage.calls
    parts = ask(client, job_id, hook, type="storage", op="multipart_parts", key="output.tar.gz", upload_id="u", parts=[1, 2])
    assert sorted(parts.json["urls"]) == ["1", "2"]
    too_many = ask(client, job_id, hook, type="storage", op="multipart_parts", key="output.tar.gz", upload_id="u", parts=list(range(1, 200)))
    assert too_many.status_code == 422 and "parts" in too_many.json["message"]
    unknown = ask(client, job_id, hook, type="storage", op="delete", key="x")
    assert unknown.status_code == 422 and unknown.json["message"].startswith("op: unknown storage operation")


@pytest.mark.parametrize("key", ["../other/output.tar.gz", "a/../../x", "/abs", "", "x\u202ey", "x%2e%2e"])
def test_keys_outside_the_jobs_own_prefix_are_422_naming_key(client: FlaskClient, scheduler: FakeScheduler, key: str) -> None:
    job, _, hook = submitted(client, scheduler)
    refused = ask(client, job["job_id"], hook, type="storage", op="put", key=key)
    assert refused.status_code == 422 and refused.json["message"].startswith("key: "), refused.json


def test_a_missing_dataset_is_422_naming_dataset_s3_url(client: FlaskClient, scheduler: FakeScheduler, storage: PresigningStorage) -> None:
    job, main, _ = submitted(client, scheduler)
    storage.objects.clear()
    refused = ask(client, job["job_id"], main, type="storage", op="dataset")
    assert refused.status_code == 422 and "dataset_s3_url" in refused.json["message"] and "NoSuchKey" in refused.json["message"]


def test_replays_future_dates_and_ended_jobs_are_refused(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    job, main, _ = submitted(client, scheduler)
    job_id = job["job_id"]
    body = signed_body(job_id, {"type": "progress", "data": {"iteration": 1}})
    post = lambda b: client.post(f"{JOBS}/{job_id}/events", data=b, content_type="application/json", headers={SIGNATURE_HEADER: sign(main, b)})  # noqa: E731
    assert post(body).status_code == 204
    replay = post(body)
    assert replay.status_code == 401 and "replay" in replay.json["message"]
    ahead = json.dumps({"job_id": job_id, "type": "progress", "sent_at": time.time() + 120, "data": {}}).encode()
    assert "in the future" in post(ahead).json["message"]
    nested = json.dumps({"job_id": job_id, "type": "progress", "sent_at": time.time()}).encode()[:-1] + b', "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert post(nested).status_code == 422
    service = app.extensions["relion_gateway"]
    service.store.update(job_id, state="succeeded", ended_at=time.time() - 301)
    late = post(signed_body(job_id, {"type": "progress", "data": {"iteration": 2}}))
    assert late.status_code == 401 and "its tokens work for 300 s after the end" in late.json["message"]
    service.store.update(job_id, ended_at=time.time() - 10)  # within the grace period
    assert post(signed_body(job_id, {"type": "progress", "data": {"iteration": 2}})).status_code == 204


def test_users_are_held_to_their_own_s3_prefixes_and_admins_are_not(app: Flask, client: FlaskClient, admin_client: FlaskClient) -> None:
    app.extensions["relion_gateway"].config.update(
        S3_DATASET_PREFIXES=["s3://relion-local/datasets/", "s3://relion-local/results/{user}/"],
        S3_OUTPUT_PREFIXES=["s3://relion-local/results/{user}"],
    )
    mine = valid_request(output_s3_prefix="s3://relion-local/results/alice/run1")
    assert client.post(JOBS, json=mine).status_code == 202
    assert client.post(JOBS, json=dict(mine, dataset_s3_url="s3://relion-local/results/alice/job_x/output.tar.gz")).status_code == 202
    for changes, field_name in (
        ({"dataset_s3_url": "s3://relion-local/results/bob/job_x/output.tar.gz"}, "dataset_s3_url"),
        ({"output_s3_prefix": "s3://relion-local/results/bob"}, "output_s3_prefix"),
        ({"output_s3_prefix": "s3://relion-local/results/alice2"}, "output_s3_prefix"),  # not a '/' boundary
        ({"output_s3_prefix": "s3://relion-local/results"}, "output_s3_prefix"),
    ):
        refused = client.post(JOBS, json=dict(mine, **changes))
        assert refused.status_code == 403, refused.json
        assert refused.json["message"].startswith(f"{field_name}: user 'alice' may ") and "[s3]" in refused.json["message"]
        assert client.post("/v1/relion/render", json=dict(mine, **changes)).status_code == 403
    assert admin_client.post(JOBS, json=valid_request(user_id="bob", dataset_s3_url="s3://relion-local/results/alice/x.tar.gz")).status_code == 202


def test_jobs_run_as_the_mapped_account_with_an_explicit_export_list(app: Flask, client: FlaskClient, scheduler: FakeScheduler) -> None:
    config = app.extensions["relion_gateway"].config
    config.update(JOB_RUN_AS="no-such-account-{user}")
    refused = client.post(JOBS, json=valid_request())
    assert refused.status_code == 422 and refused.json["message"].startswith("user_id: no Unix account 'no-such-account-alice'")
    config.update(JOB_RUN_AS_USERS={"alice": "nobody"})
    assert client.post(JOBS, json=valid_request()).status_code == 202
    main, archive = scheduler.submitted[-2:]
    for script in (main, archive):
        assert "#SBATCH --uid=nobody\n#SBATCH --gid=nogroup\n" in script
        assert "#SBATCH --export=LANG,LC_ALL,PATH,RELION_GATEWAY_JOB_TOKEN,TZ\n" in script
        assert "--export=ALL" not in script and "AWS_" not in script


class FakeLink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.calls.append((op, fields))
        if op == "multipart_start":
            return {"upload_id": "u1"}
        if op == "multipart_parts":
            return {"urls": {str(n): f"https://s3/{n}" for n in fields["parts"]}}
        if op == "put":
            return {"url": "https://s3/put"}
        return {}


class Response:
    def __init__(self, status: int, etag: str) -> None:
        self.status_code, self.headers, self.text = status, {"ETag": etag}, ""


def test_a_stream_goes_up_in_parts_through_presigned_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: dict[str, bytes] = {}
    monkeypatch.setattr(brokered, "part_size_for", lambda size_hint: 1000)
    monkeypatch.setattr(brokered.requests, "put", lambda url, data, **kw: (sent.__setitem__(url, data), Response(200, f'"{url[-1]}"'))[1])
    link = FakeLink()
    storage = BrokeredStorage(link, "s3://b/results/job_1/")  # type: ignore[arg-type]
    payload = bytes(range(256)) * 14  # 3584 bytes: parts of 1000, 1000, 1000, 584
    storage.upload_stream(io.BytesIO(payload), S3Location("b", "results/job_1/output.tar.gz"))
    assert b"".join(sent[f"https://s3/{n}"] for n in (1, 2, 3, 4)) == payload
    ops = [op for op, _ in link.calls]
    assert ops == ["multipart_start", "multipart_parts", "multipart_complete"]
    assert link.calls[-1][1]["parts"] == [[1, '"1"'], [2, '"2"'], [3, '"3"'], [4, '"4"']]
    assert link.calls[0][1]["key"] == "output.tar.gz"
    # Smaller than a part: one presigned PUT.
    storage.upload_stream(io.BytesIO(b"small"), S3Location("b", "results/job_1/logs/a.out"))
    assert link.calls[-1] == ("put", {"key": "logs/a.out"}) and sent["https://s3/put"] == b"small"
    # Outside the prefix the job side refuses before asking.
    with pytest.raises(StorageError, match="outside this job's output prefix"):
        storage.put_json({}, S3Location("b", "results/job_2/metadata.json"))


def test_a_failed_part_aborts_the_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brokered, "part_size_for", lambda size_hint: 1000)
    monkeypatch.setattr(brokered.requests, "put", lambda url, data, **kw: Response(500 if url.endswith("2") else 200, '"e"'))
    link = FakeLink()
    with pytest.raises(StorageError, match="S3 answered 500"):
        BrokeredStorage(link, "s3://b/r/").upload_stream(io.BytesIO(b"x" * 2500), S3Location("b", "r/o.tgz"))  # type: ignore[arg-type]
    assert [op for op, _ in link.calls][-1] == "multipart_abort"


def test_urls_for_jobs_are_signed_for_the_job_endpoint() -> None:
    # [s3] job_endpoint_url: the nodes may reach S3 by another address than the gateway; a
    # presigned URL names its host, so jobs' URLs come from a client for that endpoint.
    import boto3
    from botocore.config import Config

    from gateway.storage.s3 import S3Storage

    def client(endpoint: str) -> object:
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                            aws_secret_access_key="s", config=Config(signature_version="s3v4"))

    storage = S3Storage(client("http://s3.internal:9010"), job_client=client("http://rghead:9010"))
    where = S3Location("b", "results/j/output.tar.gz")
    assert storage.presigned_put(where, 60).startswith("http://rghead:9010/b/results/j/output.tar.gz?")
    assert storage.presigned_part(where, "u1", 1, 60).startswith("http://rghead:9010/")
    assert storage.presigned_get(where, 60, for_job=True).startswith("http://rghead:9010/")
    # A portal's download link keeps the gateway's own endpoint.
    assert storage.presigned_get(where, 60).startswith("http://s3.internal:9010/")
    assert S3Storage(client("http://one:1")).presigned_put(where, 60).startswith("http://one:1/")
