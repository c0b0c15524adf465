"""Accounts and budgets (issue 17, cost): which Slurm account a job is charged to ([slurm.accounts]),
and budgets per user or account in CPU/GPU-hours checked at submit against used + unfinished + the
request's own maximum."""
from __future__ import annotations

import time

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import build_config
from gateway.jobs.budgets import period_start
from tests.conftest import valid_request
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"


def configure(app: Flask, **values: object) -> None:
    app.extensions["relion_gateway"].config.update(values)


def test_the_account_comes_from_the_users_map_and_a_request_may_choose_only_its_own(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    configure(app, SLURM_ACCOUNTS={"alice": ["lab-a", "grant-7"], "*": "facility"})
    default = client.post(JOBS, json=valid_request())
    assert default.status_code == 202 and "#SBATCH --account=lab-a\n" in scheduler.submitted[-2]
    chosen = client.post(JOBS, json=valid_request(account="grant-7"))
    assert chosen.status_code == 202 and "--account=grant-7" in scheduler.submitted[-2]
    store = app.extensions["relion_gateway"].store
    assert store.get(chosen.json["job_id"]).slurm_account == "grant-7"
    refused = client.post(JOBS, json=valid_request(account="lab-b"))
    assert refused.status_code == 403 and "lab-a" in refused.json["message"] and "account" in refused.json["errors"]["json"]
    configure(app, SLURM_ACCOUNTS={"bob": "lab-b"})
    unmapped = client.post(JOBS, json=valid_request())
    assert unmapped.status_code == 403 and "[slurm.accounts]" in unmapped.json["message"]


def test_without_a_map_only_the_configured_account_is_charged(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    configure(app, SLURM_ACCOUNT="facility")
    assert client.post(JOBS, json=valid_request()).status_code == 202 and "--account=facility" in scheduler.submitted[-2]
    refused = client.post(JOBS, json=valid_request(account="lab-x"))
    assert refused.status_code == 422 and "[slurm.accounts]" in refused.json["message"]


def test_a_budget_refuses_what_the_used_hours_cannot_take_and_holds_running_jobs_at_their_maximum(
    client: FlaskClient, app: Flask, scheduler: FakeScheduler
) -> None:
    service = app.extensions["relion_gateway"]
    configure(app, BUDGETS_USERS={"alice": {"cpu_hours": 12}})
    # valid_request may use 5 CPU-hours: 3 ranks x 1 thread for the default hour, and the 2-CPU hook's hour.
    first = client.post(JOBS, json=valid_request())
    assert first.status_code == 202  # 0 used + 0 held + 5 <= 12
    second = client.post(JOBS, json=valid_request(workspace_id="ws2"))
    assert second.status_code == 202  # 5 held + 5 <= 12
    third = client.post(JOBS, json=valid_request(workspace_id="ws3"))
    assert third.status_code == 429 and third.headers["Retry-After"]  # 10 held + 5 > 12: running jobs may free it
    assert "[budgets.users.alice] cpu_hours = 12" in third.json["message"] and "2.00 left" in third.json["message"]
    # The first job ends and is costed at what it used: 1 CPU-hour.
    job_id = first.json["job_id"]
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    scheduler.set_usage("1001", cpus=3, elapsed=1200)
    scheduler.set_usage("1002", cpus=2, elapsed=0)
    service.poll()
    assert service.store.get(job_id).usage_cpu_hours == pytest.approx(1.0)
    assert client.post(JOBS, json=valid_request(workspace_id="ws3")).status_code == 202  # 1 used + 5 held + 5 <= 12
    configure(app, BUDGETS_USERS={"alice": {"cpu_hours": 5.5}})
    refused = client.post(JOBS, json=valid_request(workspace_id="ws4"))
    assert refused.status_code == 403 and "budget" in refused.json["errors"]["json"]  # 1 used + 5 > 5.5: waiting cannot help


def test_a_gpu_budget_of_an_account(client: FlaskClient, app: Flask) -> None:
    configure(app, SLURM_ACCOUNTS={"*": "lab-g"}, BUDGETS_ACCOUNTS={"lab-g": {"gpu_hours": 1}},
              SLURM_PARTITIONS={"gpu": {"gpus": 2}})
    assert client.post(JOBS, json=valid_request(partition="gpu", gpus=1)).status_code == 202  # 1 GPU x 1 h
    refused = client.post(JOBS, json=valid_request(partition="gpu", gpus=1, workspace_id="ws2"))
    assert refused.status_code == 429 and "[budgets.accounts.lab-g] gpu_hours = 1" in refused.json["message"]
    assert client.post(JOBS, json=valid_request(workspace_id="ws3")).status_code == 202  # no GPUs: within it
    report = app.test_client(token=app.config["TEST_TOKENS"]["admin"]).get("/v1/relion/usage").json
    assert {(b["name"], b["kind"], b["held"]) for b in report["budgets"]} >= {("lab-g", "gpu_hours", 1.0)}


def test_budget_periods_begin_at_the_month_or_the_year() -> None:
    now = time.mktime((2026, 12, 2, 6, 30, 0, 0, 0, -1))
    assert time.gmtime(period_start("month", now))[:3] == (2026, 12, 1)
    assert time.gmtime(period_start("year", now))[:3] == (2026, 1, 1)
    assert period_start("all", now) == 0.0


@pytest.mark.parametrize("values, key", [
    ({"GATEWAY_BUDGETS_PERIOD": '"week"'}, "[budgets] period"),
    ({"GATEWAY_BUDGETS_USERS": '{alice = {cpu_hours = -1}}'}, "[budgets.users.alice] cpu_hours"),
    ({"GATEWAY_BUDGETS_ACCOUNTS": '{lab = {hours = 3}}'}, "[budgets.accounts.lab]"),
    ({"GATEWAY_SLURM_ACCOUNTS": '{alice = []}'}, "[slurm.accounts] alice"),
])
def test_budget_and_account_settings_are_checked_at_load(values: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_config(environ=values)
