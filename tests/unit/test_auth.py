"""Authentication, authorization, audit and per-user limits, through the API with a fake scheduler."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from gateway.auth import AUTH_KEY, Unauthenticated, check_secret, create_token, revoke_token, token_group
from tests.conftest import TEST_SCRYPT_N, valid_request
from tests.fakes import FakeScheduler, FakeStorage

JOBS = "/v1/relion/jobs"
ALICE_JOB_ENDPOINTS = [
    ("get", "/{job}"),
    ("delete", "/{job}"),
    ("get", "/{job}/script"),
    ("get", "/{job}/script?which=archive"),
    ("get", "/{job}/metadata"),
    ("post", "/{job}/archive"),
]
AUTHENTICATED = [
    ("get", JOBS),
    ("post", JOBS),
    ("get", f"{JOBS}/job_2d_ws1_00000000"),
    ("delete", f"{JOBS}/job_2d_ws1_00000000"),
    ("get", f"{JOBS}/job_2d_ws1_00000000/script"),
    ("get", f"{JOBS}/job_2d_ws1_00000000/metadata"),
    ("post", f"{JOBS}/job_2d_ws1_00000000/archive"),
    ("post", "/v1/relion/render"),
    ("get", "/v1/relion/admin/tokens"),
    ("get", "/v1/relion/no-such-endpoint"),
]


def service(app: Flask):  # type: ignore[no-untyped-def]
    return app.extensions["relion_gateway"]


def submit(client: FlaskClient, **changes: object) -> dict:
    response = client.post(JOBS, json=valid_request(**changes))
    assert response.status_code == 202, response.json
    return dict(response.json)


def call(client: FlaskClient, method: str, url: str, **kwargs: object):  # type: ignore[no-untyped-def]
    if method == "post" and "json" not in kwargs:
        kwargs["json"] = valid_request()
    return getattr(client, method)(url, **kwargs)


# -- authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "url"), AUTHENTICATED)
def test_no_token_is_401_with_a_bearer_challenge(anonymous_client: FlaskClient, scheduler: FakeScheduler, method: str, url: str) -> None:
    response = call(anonymous_client, method, url)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="relion-gateway"'
    assert response.json["code"] == 401 and response.json["status"] == "Unauthorized"
    assert "Bearer" in response.json["message"]
    assert scheduler.submitted == [] and scheduler.cancelled == []


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer nonsense",
        "Bearer rg_0123456789ab_" + "A" * 43,  # well formed, no such id
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer ",
        "Bearer",
        "rg_0123456789ab_" + "A" * 43,  # no scheme
    ],
)
def test_a_wrong_token_is_401_invalid_token(app: Flask, authorization: str) -> None:
    response = app.test_client(token=None).get(JOBS, headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="relion-gateway", error="invalid_token"')
    assert authorization.split(" ")[-1] not in response.get_data(as_text=True) or authorization.endswith(("Bearer ", "Bearer"))


def test_a_right_id_with_a_wrong_secret_is_401(app: Flask) -> None:
    alice = app.config["TEST_TOKENS"]["alice"]
    forged = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
    response = app.test_client(token=forged).get(JOBS)
    assert response.status_code == 401 and response.json["message"] == "invalid or revoked token"
    assert app.test_client().get(JOBS).status_code == 200  # the real one still works


def test_revoked_token_stops_working_at_once(app: Flask) -> None:
    store = service(app).store
    record, token = create_token(store, "carol", n=TEST_SCRYPT_N)
    client = app.test_client(token=token)
    assert client.get(JOBS).status_code == 200  # verified once: now in the process's cache
    result = CliRunner().invoke(token_group, ["revoke", record.id], env=_cli_env(app))
    assert result.exit_code == 0, result.output
    response = client.get(JOBS)
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_only_a_salted_scrypt_hash_is_stored(app: Flask) -> None:
    store = service(app).store
    record, token = create_token(store, "dave", admin=True, n=TEST_SCRYPT_N)
    match = re.fullmatch(r"rg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})", token)
    assert match and match.group(1) == record.id
    stored = store.get_token(record.id)
    assert stored is not None and stored.admin and stored.user == "dave"
    secret = match.group(2)
    assert secret not in stored.hash and secret not in stored.salt
    assert stored.hash.startswith(f"scrypt${TEST_SCRYPT_N}$8$1$") and len(stored.salt) == 32
    assert check_secret(secret, stored.salt, stored.hash) and not check_secret(secret + "x", stored.salt, stored.hash)
    # Same secret, another salt: another hash.
    other, _ = create_token(store, "dave", n=TEST_SCRYPT_N)
    assert store.get_token(other.id).salt != stored.salt  # type: ignore[union-attr]


def test_last_used_at_is_recorded(app: Flask) -> None:
    store = service(app).store
    record, token = create_token(store, "erin", n=TEST_SCRYPT_N)
    assert store.get_token(record.id).last_used_at is None  # type: ignore[union-attr]
    app.test_client(token=token).get(JOBS)
    assert store.get_token(record.id).last_used_at == pytest.approx(time.time(), abs=5)  # type: ignore[union-attr]


def test_health_and_the_spec_are_open(anonymous_client: FlaskClient) -> None:
    assert anonymous_client.get("/healthz").status_code == 200
    spec = anonymous_client.get("/v1/relion/openapi.json")
    assert spec.status_code == 200
    assert spec.json["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec.json["paths"]["/jobs/{job_id}/events"]["post"]["security"] == []


def test_job_events_need_their_signature_not_a_bearer_token(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    from gateway.callbacks import SIGNATURE_HEADER, TOKEN_ENV, sign

    job = submit(client)
    token = scheduler.environments[0][TOKEN_ENV]
    body = json.dumps({"job_id": job["job_id"], "type": "progress", "sent_at": time.time(), "data": {"iteration": 1}}).encode()
    anonymous = app.test_client(token=None)
    url = f"{JOBS}/{job['job_id']}/events"
    ok = anonymous.post(url, data=body, headers={SIGNATURE_HEADER: sign(token, body)}, content_type="application/json")
    assert ok.status_code == 204
    # A bearer token does not replace the signature.
    assert client.post(url, data=body, content_type="application/json").status_code == 401
    # Without a signature nobody learns whether a job exists.
    missing = anonymous.post(f"{JOBS}/job_2d_x_00000000/events", data=body, content_type="application/json")
    assert missing.status_code == 401
    nan_body = body.replace(str(json.loads(body)["sent_at"]).encode(), b"NaN")
    nan = anonymous.post(url, data=nan_body, headers={SIGNATURE_HEADER: sign(token, nan_body)}, content_type="application/json")
    assert nan.status_code in (401, 422)


# -- authorization --------------------------------------------------------------------------------


def test_submitting_as_another_user_is_403_naming_user_id(client: FlaskClient, scheduler: FakeScheduler) -> None:
    for url in (JOBS, "/v1/relion/render"):
        response = client.post(url, json=valid_request(user_id="bob"))
        assert response.status_code == 403
        assert "user_id" in response.json["message"] and "'bob'" in response.json["message"]
        assert "user_id" in response.json["errors"]["json"]
    assert scheduler.submitted == []


def test_an_admin_may_submit_for_anyone(admin_client: FlaskClient) -> None:
    assert submit(admin_client, user_id="bob")["user_id"] == "bob"


@pytest.mark.parametrize(("method", "path"), ALICE_JOB_ENDPOINTS)
def test_another_users_job_is_404_on_every_endpoint(
    client: FlaskClient, bob_client: FlaskClient, app: Flask, scheduler: FakeScheduler, method: str, path: str
) -> None:
    job = submit(client)
    # Ended, archived and with metadata, so that each endpoint would have something to show.
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "FAILED", exit_code=3)
    service(app).poll()
    service(app).store.update(job["job_id"], metadata_json='{"schema_version": 1}')
    before = len(scheduler.submitted)

    response = getattr(bob_client, method)(f"{JOBS}{path.format(job=job['job_id'])}")
    assert response.status_code == 404
    assert response.json == {"code": 404, "status": "Not Found", "message": f"no job {job['job_id']!r}"}
    assert "alice" not in response.get_data(as_text=True)
    assert scheduler.cancelled == [] and len(scheduler.submitted) == before
    # Its owner and an admin still reach it.
    owner = getattr(client, method)(f"{JOBS}{path.format(job=job['job_id'])}")
    assert owner.status_code != 404
    admin = app.test_client(token=app.config["TEST_TOKENS"]["admin"])
    assert getattr(admin, "get")(f"{JOBS}/{job['job_id']}").status_code == 200


def test_cancel_of_another_users_running_job_changes_nothing(client: FlaskClient, bob_client: FlaskClient, scheduler: FakeScheduler) -> None:
    job = submit(client)
    assert bob_client.delete(f"{JOBS}/{job['job_id']}").status_code == 404
    assert scheduler.cancelled == []
    assert client.get(f"{JOBS}/{job['job_id']}").json["message"] != "cancel requested"


def test_lists_show_own_jobs_unless_admin(client: FlaskClient, bob_client: FlaskClient, admin_client: FlaskClient) -> None:
    submit(client)
    submit(client, workspace_id="ws2")
    submit(bob_client, user_id="bob")
    assert {j["user_id"] for j in client.get(JOBS).json["jobs"]} == {"alice"}
    assert client.get(JOBS).json["total"] == 2
    assert bob_client.get(JOBS).json["total"] == 1
    assert client.get(f"{JOBS}?user_id=alice").json["total"] == 2  # one's own name is allowed
    refused = client.get(f"{JOBS}?user_id=bob")
    assert refused.status_code == 403 and "user_id filter is for admins" in refused.json["message"]
    assert admin_client.get(JOBS).json["total"] == 3
    assert admin_client.get(f"{JOBS}?user_id=bob").json["total"] == 1


def test_admin_views_are_for_admins_only(client: FlaskClient, admin_client: FlaskClient, app: Flask) -> None:
    refused = client.get("/v1/relion/admin/tokens")
    assert refused.status_code == 403 and refused.json["message"] == "this endpoint is for admins"
    tokens = admin_client.get("/v1/relion/admin/tokens")
    assert tokens.status_code == 200
    assert {t["user"] for t in tokens.json} >= {"alice", "bob", "root"}
    text = tokens.get_data(as_text=True)
    for secret in app.config["TEST_TOKENS"].values():
        assert secret not in text and secret.split("_", 2)[2] not in text
    assert all(set(t) == {"id", "user", "admin", "created_at", "last_used_at", "revoked_at"} for t in tokens.json)


# -- proxy header mode and mode "none" ------------------------------------------------------------


def make_app(tmp_path: Path, **overrides: object) -> Flask:
    return create_app(
        {"TESTING": True, "PATHS_STATE_DIR": str(tmp_path / "state"), "S3_ALLOWED_BUCKETS": ["relion-local"], **overrides},
        scheduler=FakeScheduler(),
        storage=FakeStorage(),  # type: ignore[arg-type]
    )


def test_proxy_header_is_trusted_only_from_trusted_proxies(tmp_path: Path) -> None:
    app = make_app(tmp_path, AUTH_PROXY_HEADER="X-Remote-User", AUTH_TRUSTED_PROXIES=["127.0.0.1", "::1/128"], AUTH_PROXY_ADMINS=["ops"])
    client = app.test_client()
    trusted = {"REMOTE_ADDR": "127.0.0.1"}
    ok = client.post(JOBS, json=valid_request(), headers={"X-Remote-User": "alice"}, environ_base=trusted)
    assert ok.status_code == 202 and ok.json["user_id"] == "alice"
    assert client.post(JOBS, json=valid_request(user_id="bob"), headers={"X-Remote-User": "alice"}, environ_base=trusted).status_code == 403
    assert client.get(JOBS, headers={"X-Remote-User": "ops"}, environ_base=trusted).json["total"] == 1  # an admin sees all
    assert client.get(JOBS, headers={"X-Remote-User": "bob"}, environ_base=trusted).json["total"] == 0
    # The same header from anywhere else is ignored: no credentials.
    spoofed = client.get(JOBS, headers={"X-Remote-User": "ops"}, environ_base={"REMOTE_ADDR": "127.0.0.9"})
    assert spoofed.status_code == 401
    bad_name = client.get(JOBS, headers={"X-Remote-User": "../root"}, environ_base=trusted)
    assert bad_name.status_code == 401 and "X-Remote-User" in bad_name.json["message"]


def test_proxy_header_without_trusted_proxies_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        make_app(tmp_path, AUTH_PROXY_HEADER="X-Remote-User")


def test_mode_none_needs_no_token_and_warns_on_every_app(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.auth")
    for _ in range(2):
        app = make_app(tmp_path, AUTH_MODE="none")
    warnings = [r for r in caplog.records if r.name == "gateway.auth" and r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "AUTHENTICATION IS OFF" in warnings[0].getMessage()
    assert app.test_client().post(JOBS, json=valid_request(user_id="anyone")).status_code == 202


def test_the_default_mode_is_token_and_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    assert make_app(tmp_path).test_client().get(JOBS).status_code == 401
    with pytest.raises(ValueError, match="mode"):
        make_app(tmp_path, AUTH_MODE="off")


def test_local_profile_keeps_token_mode() -> None:
    from gateway.config import build_config

    root = Path(__file__).resolve().parents[2]
    assert build_config(environ={"GATEWAY_CONFIG": str(root / "config" / "local.toml")})["AUTH_MODE"] == "token"


# -- the token command ----------------------------------------------------------------------------


def _cli_env(app: Flask) -> dict[str, str]:
    return {
        "GATEWAY_STORE_DATABASE_URL": app.config["STORE_DATABASE_URL"],
        "GATEWAY_AUTH_SCRYPT_N": str(TEST_SCRYPT_N),
        "GATEWAY_AUDIT_FILE": str(Path(app.config["PATHS_STATE_DIR"]) / "audit.jsonl"),
    }


def test_token_create_list_revoke(app: Flask) -> None:
    runner = CliRunner()
    env = _cli_env(app)
    created = runner.invoke(token_group, ["create", "--user", "frank", "--admin"], env=env)
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert re.fullmatch(r"rg_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token)
    token_id = token.split("_")[1]
    assert app.test_client(token=token).get("/v1/relion/admin/tokens").status_code == 200

    listed = runner.invoke(token_group, ["list", "--json"], env=env)
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows[token_id]["user"] == "frank" and rows[token_id]["admin"] is True
    assert token.split("_", 2)[2] not in listed.output
    table = runner.invoke(token_group, ["list"], env=env)
    assert token_id in table.output and token.split("_", 2)[2] not in table.output

    assert runner.invoke(token_group, ["revoke", token_id], env=env).exit_code == 0
    again = runner.invoke(token_group, ["revoke", token_id], env=env)
    assert again.exit_code != 0 and "no live token" in again.output
    assert app.test_client(token=token).get(JOBS).status_code == 401
    bad = runner.invoke(token_group, ["create", "--user", "a b"], env=env)
    assert bad.exit_code != 0

    audit = [json.loads(line) for line in Path(env["GATEWAY_AUDIT_FILE"]).read_text().splitlines()]
    assert [(a["action"], a["outcome"]) for a in audit] == [("token.create", "ok"), ("token.revoke", "ok"), ("token.revoke", "not_found")]
    assert all(a["token_id"] == token_id and a["principal"].startswith("local:") for a in audit)
    assert token.split("_", 2)[2] not in Path(env["GATEWAY_AUDIT_FILE"]).read_text()


# -- audit ----------------------------------------------------------------------------------------


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]


def test_submit_cancel_and_archive_retry_are_audited(
    client: FlaskClient, bob_client: FlaskClient, app: Flask, scheduler: FakeScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    job = submit(client)
    bob_client.delete(f"{JOBS}/{job['job_id']}")  # refused: not bob's
    client.post(JOBS, json=valid_request(user_id="bob"))  # refused: not alice
    client.post(f"{JOBS}/{job['job_id']}/archive")  # refused: not archive_failed
    client.delete(f"{JOBS}/{job['job_id']}")
    scheduler.set_state("1002", "FAILED", exit_code=3)
    service(app).poll()
    client.post(f"{JOBS}/{job['job_id']}/archive")
    lines = audit_lines(caplog)
    seen = [(a["action"], a["principal"], a["outcome"]) for a in lines]
    assert seen == [
        ("job.submit", "alice", "ok"),
        ("job.cancel", "bob", "refused"),
        ("job.submit", "alice", "refused"),
        ("job.archive_retry", "alice", "refused"),
        ("job.cancel", "alice", "ok"),
        ("job.archive_retry", "alice", "ok"),
    ]
    for line in lines:
        assert line["via"] == "token" and re.fullmatch(r"[0-9a-f]{12}", line["token_id"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])
    assert lines[0]["job_id"] == job["job_id"] and lines[0]["user_id"] == "alice"
    assert lines[1]["job_id"] == job["job_id"] and "no such job" in lines[1]["reason"]
    assert "user_id" in lines[2]["reason"]


def test_refused_logins_are_audited_and_the_audit_file_is_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    audit_file = tmp_path / "audit" / "gateway-audit.jsonl"
    app = make_app(tmp_path, AUDIT_FILE=str(audit_file), AUTH_SCRYPT_N=TEST_SCRYPT_N)
    _, token = create_token(app.extensions["relion_gateway"].store, "alice", n=TEST_SCRYPT_N)
    client = app.test_client()
    client.get(JOBS, headers={"Authorization": "Bearer rg_0123456789ab_" + "Z" * 43})
    client.post(JOBS, json=valid_request(), headers={"Authorization": f"Bearer {token}"})
    written = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [(a["action"], a["outcome"]) for a in written] == [("authenticate", "denied"), ("job.submit", "ok")]
    assert written[0]["reason"] == "invalid or revoked token" and written[0]["path"] == JOBS
    assert "Z" * 43 not in audit_file.read_text() and token not in audit_file.read_text()
    assert audit_lines(caplog) == written


# -- timing and throttling of failed checks -------------------------------------------------------

TIMING_SCRYPT_N = 2**12  # a few ms per check: enough to dwarf the store lookup, short enough for a test


def _median_s(check: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        check()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def test_an_unknown_id_takes_as_long_as_a_wrong_secret(tmp_path: Path) -> None:
    app = make_app(tmp_path, AUTH_SCRYPT_N=TIMING_SCRYPT_N, AUTH_FAILURE_LIMIT=0)
    authenticator = app.extensions[AUTH_KEY]
    store = app.extensions["relion_gateway"].store
    real, token = create_token(store, "alice", n=TIMING_SCRYPT_N)
    revoked, revoked_token = create_token(store, "alice", n=TIMING_SCRYPT_N)
    revoke_token(store, revoked.id)
    secret = token.split("_", 2)[2]
    wrong_secret = f"rg_{real.id}_{'A' * 43 if not secret.startswith('A') else 'B' * 43}"
    unknown_id = f"rg_{'0' * 12}_{secret}"
    assert store.get_token("0" * 12) is None

    def refused(presented: str) -> object:
        def check() -> None:
            with pytest.raises(Unauthenticated):
                authenticator.verify_token(presented)
        return check

    refused(wrong_secret)()  # warm up: imports, the first query
    ratios, revoked_ratios = [], []
    for _ in range(3):  # interleaved, so a slow moment of the machine hits both sides
        wrong = _median_s(refused(wrong_secret), 15)
        ratios.append(_median_s(refused(unknown_id), 15) / wrong)
        revoked_ratios.append(_median_s(refused(revoked_token), 15) / wrong)
    ratio, revoked_ratio = sorted(ratios)[1], sorted(revoked_ratios)[1]
    print(f"unknown id / wrong secret = {ratio:.2f}, revoked / wrong secret = {revoked_ratio:.2f} (scrypt n={TIMING_SCRYPT_N})")
    assert 0.7 <= ratio <= 1.4, ratios
    assert 0.7 <= revoked_ratio <= 1.4, revoked_ratios
    # Measured where it matters, against a check that costs nothing: the malformed token.
    assert _median_s(refused("rg_nonsense"), 15) < 0.5 * _median_s(refused(unknown_id), 15)


def _bad(n: int) -> dict[str, str]:
    return {"Authorization": f"Bearer rg_{n:012x}_{'Q' * 43}"}


def test_repeated_failures_from_one_client_are_throttled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.audit")
    app = make_app(tmp_path, AUTH_SCRYPT_N=TEST_SCRYPT_N)
    assert (app.config["AUTH_FAILURE_LIMIT"], app.config["AUTH_FAILURE_WINDOW"]) == (10, 60.0)  # the defaults
    store = app.extensions["relion_gateway"].store
    _, token = create_token(store, "alice", n=TEST_SCRYPT_N)
    clock = [1000.0]
    app.extensions[AUTH_KEY].throttle.clock = lambda: clock[0]
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "198.51.100.2"
    good = {"Authorization": f"Bearer {token}"}

    for n in range(10):
        clock[0] += 1.0
        assert guesser.get(JOBS, headers=_bad(n)).status_code == 401
    response = guesser.get(JOBS, headers=_bad(10))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "51"  # the first failure (t=1001) leaves the window at t=1061
    assert response.json["code"] == 429 and response.json["status"] == "Too Many Requests"
    assert "[auth] failure_limit" in response.json["message"] and "is 10" in response.json["message"]
    assert response.json["errors"] == {"limits": {"failure_limit": [response.json["message"]]}}
    # Throttled means not checked: a right token from that address waits too (else a guess's 200
    # would still tell), and a malformed header as well.
    assert guesser.get(JOBS, headers=good).status_code == 429
    assert guesser.get(JOBS, headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"}).status_code == 429
    # Another client is not affected.
    assert other.get(JOBS, headers=good).status_code == 200
    assert other.get(JOBS, headers=_bad(99)).status_code == 401

    refused = [a for a in audit_lines(caplog) if a["action"] == "authenticate" and a["outcome"] == "refused"]
    assert len(refused) == 3 and refused[0]["client"] == "203.0.113.7" and refused[0]["limit"] == "failure_limit"
    assert refused[0]["retry_after"] == 51 and "Q" * 43 not in json.dumps(refused)

    clock[0] = 1061.0  # the oldest failure is a window old: one more try
    assert guesser.get(JOBS, headers=_bad(11)).status_code == 401
    assert guesser.get(JOBS, headers=_bad(12)).status_code == 429
    clock[0] = 1071.0  # all ten have left the window
    assert guesser.get(JOBS, headers=good).status_code == 200


def test_a_valid_token_is_not_slowed_by_a_throttled_client(tmp_path: Path) -> None:
    app = make_app(tmp_path, AUTH_SCRYPT_N=TEST_SCRYPT_N)
    _, token = create_token(app.extensions["relion_gateway"].store, "alice", n=TEST_SCRYPT_N)
    good = {"Authorization": f"Bearer {token}"}
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "198.51.100.2"

    def valid() -> None:
        assert other.get("/v1/relion/admin/tokens", headers=good).status_code == 403  # authenticated; no job listing cost

    valid()
    before = _median_s(valid, 41)
    for n in range(10):
        guesser.get(JOBS, headers=_bad(n))
    assert guesser.get(JOBS, headers=_bad(10)).status_code == 429
    after = _median_s(valid, 41)
    print(f"valid-token request: {before * 1e3:.2f} ms before, {after * 1e3:.2f} ms while another client is throttled")
    assert after < 1.5 * before


@pytest.mark.parametrize(
    ("remote", "forwarded", "client"),
    [
        ("203.0.113.7", "", "203.0.113.7"),
        ("203.0.113.7", "10.0.0.9", "203.0.113.7"),  # an untrusted peer's header is not believed
        ("10.0.0.2", "", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.2", "198.51.100.2"),
        ("10.0.0.2", "1.2.3.4, 198.51.100.2, 10.0.0.3", "198.51.100.2"),  # what the client wrote first is ignored
        ("10.0.0.2", "10.0.0.4, 10.0.0.3", "10.0.0.4"),
    ],
)
def test_failures_are_counted_against_the_real_client(tmp_path: Path, remote: str, forwarded: str, client: str) -> None:
    app = make_app(tmp_path, AUTH_TRUSTED_PROXIES=["10.0.0.0/24"])
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    assert app.extensions[AUTH_KEY].client_address(headers, remote) == client


def test_failure_limit_zero_turns_throttling_off_and_bad_values_are_refused(tmp_path: Path) -> None:
    app = make_app(tmp_path / "off", AUTH_FAILURE_LIMIT=0)
    client = app.test_client()
    assert all(client.get(JOBS, headers=_bad(n)).status_code == 401 for n in range(15))
    with pytest.raises(ValueError, match="failure_limit"):
        make_app(tmp_path / "bad", AUTH_FAILURE_WINDOW=0)


# -- per-user limits ------------------------------------------------------------------------------


def test_active_jobs_limit_is_a_429_naming_it(client: FlaskClient, bob_client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    app.config["LIMITS_MAX_ACTIVE_JOBS"] = 2
    service(app).config["LIMITS_MAX_ACTIVE_JOBS"] = 2
    first = submit(client)
    submit(client, workspace_id="ws2")
    response = client.post(JOBS, json=valid_request(workspace_id="ws3"))
    assert response.status_code == 429
    assert "max_active_jobs" in response.json["message"] and "is 2" in response.json["message"]
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json["errors"] == {"limits": {"max_active_jobs": [response.json["message"]]}}
    assert submit(bob_client, user_id="bob")  # per user
    # An idempotent replay is not a new job: never refused for the limit.
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    service(app).poll()
    assert service(app).get(first["job_id"]).state == "succeeded"
    assert submit(client, workspace_id="ws3")  # one ended: room again


def test_submissions_per_minute_limit_is_a_429_with_retry_after(client: FlaskClient, app: Flask) -> None:
    service(app).config["LIMITS_SUBMISSIONS_PER_MINUTE"] = 2
    replayed = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "k"})
    submit(client, workspace_id="ws2")
    response = client.post(JOBS, json=valid_request(workspace_id="ws3"))
    assert response.status_code == 429 and "submissions_per_minute" in response.json["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    again = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "k"})
    assert again.status_code == 202 and again.json["job_id"] == replayed.json["job_id"]


def test_cores_per_job_limit_names_it(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    service(app).config["LIMITS_MAX_CORES_PER_JOB"] = 8
    response = client.post(JOBS, json=valid_request(num_mpi=3, flags={**valid_request()["flags"], "j": 3}))
    assert response.status_code == 422
    assert "max_cores_per_job" in response.json["message"] and "9 cores" in response.json["message"]
    assert client.post(JOBS, json=valid_request(num_mpi=4, flags={**valid_request()["flags"], "j": 2})).status_code == 202
    assert len(scheduler.submitted) == 2
