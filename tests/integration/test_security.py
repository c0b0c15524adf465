"""Security on the real stack: bearer tokens over HTTP, users kept apart, and no secret in any output.

A real 2D classification runs as one user; another user is refused (404) on every one of its
endpoints; then the job's scripts, every file in its log directory, its metadata.json and logs in
S3, and everything the gateway logged (audit lines included) are searched for the S3 secret key,
the bearer tokens, the callback secret and the job's event token.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.auth import create_token
from gateway.callbacks import job_token, load_or_create_secret
from gateway.relion.presets import TINY_FLAGS
from gateway.storage.s3 import S3Storage, parse_s3_url
from gateway.database import JobStore, make_engine
from tests.integration.conftest import wait_for_end

JOBS = "/v1/relion/jobs"


def session_for(token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session


@pytest.fixture(scope="module")
def user_tokens(gateway_config: dict[str, Any]) -> dict[str, str]:
    store = JobStore(make_engine(gateway_config["STORE_DATABASE_URL"]))
    n = int(gateway_config["AUTH_SCRYPT_N"])
    return {user: create_token(store, user, n=n)[1] for user in ("isec", "isec-other")}


def test_requests_without_or_with_a_wrong_token_are_401(gateway_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer rg_0123456789ab_" + "A" * 43}, {"Authorization": "Basic aXNlYzp4"}):
        response = requests.get(f"{gateway_url}{JOBS}", headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="relion-gateway"')
        assert set(response.json()) == {"code", "status", "message"}
    assert requests.get(f"{gateway_url}/healthz", timeout=30).status_code == 200


def test_a_real_job_is_its_owners_alone_and_no_secret_leaks(
    gateway_url: str,
    gateway_config: dict[str, Any],
    dataset_url: str,
    bucket: str,
    storage: S3Storage,
    stack: dict[str, Any],
    admin_token: Any,
    user_tokens: dict[str, str],
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    owner, other = session_for(user_tokens["isec"]), session_for(user_tokens["isec-other"])
    request = {
        "user_id": "isec",
        "workspace_id": "secrets",
        "dataset_s3_url": dataset_url,
        "output_s3_prefix": f"s3://{bucket}/results/isec",  # the user's own ([s3] output_prefixes)
        "mode": "2d",
        "num_mpi": 2,
        "flags": TINY_FLAGS["2d"],
    }
    assert other.post(f"{gateway_url}{JOBS}", json=request, timeout=60).status_code == 403  # not isec-other's user_id
    response = owner.post(f"{gateway_url}{JOBS}", json=request, timeout=60)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    ended = wait_for_end(owner, gateway_url, job_id)
    assert ended["status"] == "succeeded", ended

    # Another user: the job does not exist, on every endpoint; nothing is cancelled or re-archived.
    url = f"{gateway_url}{JOBS}/{job_id}"
    for method, path in [("get", ""), ("delete", ""), ("get", "/script"), ("get", "/metadata"), ("post", "/archive")]:
        refused = getattr(other, method)(f"{url}{path}", timeout=30)
        assert refused.status_code == 404, (method, path, refused.text)
        assert refused.json()["message"] == f"no job {job_id!r}"
    assert job_id not in {j["job_id"] for j in other.get(f"{gateway_url}{JOBS}", timeout=30).json()["jobs"]}
    assert other.get(f"{gateway_url}{JOBS}?user_id=isec", timeout=30).status_code == 403
    assert owner.get(f"{url}/metadata", timeout=30).status_code == 200
    assert http.get(url, timeout=30).json()["status"] == "succeeded"  # an admin sees it

    # Where a secret could end up.
    scripts = owner.get(f"{url}/script", timeout=30).text + owner.get(f"{url}/script?which=archive", timeout=30).text
    log_dir = Path(gateway_config["PATHS_LOG_ROOT"]) / "isec" / job_id
    log_files = {str(p): p.read_bytes().decode(errors="replace") for p in log_dir.rglob("*") if p.is_file()}
    assert any(name.endswith(".out") for name in log_files) and any(name.endswith("job.json") for name in log_files)
    output = parse_s3_url(ended["output_url"])
    listed = storage.client.list_objects_v2(Bucket=output.bucket, Prefix=output.key)
    s3_texts = {
        obj["Key"]: storage.get_bytes(parse_s3_url(f"s3://{output.bucket}/{obj['Key']}")).decode(errors="replace")
        for obj in listed.get("Contents", [])
        if not obj["Key"].endswith(".tar.gz")
    }
    assert any(key.endswith("metadata.json") for key in s3_texts), sorted(s3_texts)
    gateway_log = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "gateway.audit" in gateway_log and "job.submit" in gateway_log

    callback_secret = load_or_create_secret(gateway_config["SERVER_CALLBACK_SECRET"], gateway_config["PATHS_STATE_DIR"])
    secrets = {
        "S3 secret key": stack["s3"]["secret_key"],
        "owner's bearer token": user_tokens["isec"],
        "other's bearer token": user_tokens["isec-other"],
        "admin bearer token": admin_token[1],
        "callback secret": callback_secret.decode(),
        "job event token": job_token(callback_secret, job_id),
    }
    for token in (user_tokens["isec"], admin_token[1]):
        secrets[f"secret part of {token[:15]}"] = token.split("_", 2)[2]
    places = {"scripts": scripts, "gateway log": gateway_log, **log_files, **{f"s3://{output.bucket}/{k}": v for k, v in s3_texts.items()}}
    for where, text in places.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in {where}"
