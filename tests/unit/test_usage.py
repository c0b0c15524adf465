"""What a job cost (issue 17, usage): sacct's accounting parsed by field name, one query per poll
cycle for every ended job, the figures in the record and in metadata.json (store and S3)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.slurm.accounting import SacctAccounting, parse_cpu_time, parse_size, parse_usage
from tests.conftest import valid_request
from tests.fakes import FakeScheduler, FakeStorage
from tests.unit.test_client_cli import served  # noqa: F401 (a fixture: the app on a real port)

FIXTURE = (Path(__file__).resolve().parents[1] / "fixtures" / "slurm" / "sacct_usage.txt").read_text()
JOBS = "/v1/relion/jobs"


@pytest.mark.parametrize("text, expected", [("45136K", 45136 * 1024), ("2000M", 2000 * 2**20), ("1.5G", int(1.5 * 2**30)), ("", 0), ("0", 0)])
def test_sizes_read_as_sacct_prints_them(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, expected", [("00:07.851", 7.851), ("01:02:03", 3723.0), ("1-02:03:04.500", 93784.5), ("", 0.0)])
def test_cpu_times_read_as_sacct_prints_them(text: str, expected: float) -> None:
    assert parse_cpu_time(text) == pytest.approx(expected)


def test_a_job_and_its_steps_become_one_record() -> None:
    usage = parse_usage(FIXTURE)
    two_nodes = usage["504"]
    assert (two_nodes.complete, two_nodes.elapsed_s, two_nodes.cpu_seconds, two_nodes.nodes, two_nodes.account) == (True, 9, 108, 2, "lab-a")
    assert two_nodes.cpu_seconds_used == pytest.approx(8.105) and two_nodes.memory_bytes == 4500 * 2**20
    assert two_nodes.peak_task_rss_bytes == 66392 * 1024 and two_nodes.peak_step_rss_bytes == 3 * 66392 * 1024
    gpu = usage["510"]
    assert (gpu.gpus, gpu.gpu_seconds, gpu.time_limit_s) == (2, 7200, 3600) and gpu.complete
    assert not usage["511"].complete  # slurmdbd has not heard of its end yet
    assert usage["512"].cpu_seconds == 0 and usage["512"].peak_task_rss_bytes == 0  # cancelled before it ran


def test_one_sacct_for_every_job_with_steps_and_all_users() -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str], **_: object) -> str:
        calls.append(argv)
        return FIXTURE

    found = SacctAccounting(runner).usage(["505", "504", "504"])
    assert set(found) >= {"504", "505"} and len(calls) == 1
    assert "--jobs=504,505" in calls[0] and "--allusers" in calls[0] and "-X" not in calls[0]


def finished(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> str:
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    service = app.extensions["relion_gateway"]
    service.store.update(job_id, metadata_json=json.dumps({"schema_version": 1}))
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    return job_id


def test_an_ended_job_is_costed_once_in_its_record_and_its_metadata(
    client: FlaskClient, app: Flask, scheduler: FakeScheduler, storage: FakeStorage
) -> None:
    service = app.extensions["relion_gateway"]
    job_id = finished(client, app, scheduler)
    scheduler.set_usage("1001", cpus=6, elapsed=600, used=1800, gpus=2, memory_mb=6000, peak_mb=1000, ntasks=3, limit_s=3600, account="lab-a")
    scheduler.set_usage("1002", cpus=2, elapsed=30, used=15)
    service.poll()
    record = service.store.get(job_id)
    assert record.state == "succeeded" and record.usage_at is not None
    usage = record.usage
    assert usage["cpu_hours"] == pytest.approx((6 * 600 + 2 * 30) / 3600) and usage["gpu_hours"] == pytest.approx(2 * 600 / 3600)
    assert usage["cpu_efficiency"] == pytest.approx(1815 / 3660, abs=1e-4) and usage["time_efficiency"] == pytest.approx(600 / 3600, abs=1e-4)
    assert usage["memory_efficiency"] == pytest.approx(3000 / 6000) and usage["slurm_jobs"] == ["1001", "1002"]
    assert record.usage_cpu_hours == usage["cpu_hours"] and usage["account"] == "lab-a"
    assert record.metadata["usage"] == usage
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[2] / "gateway" / "jobside" / "metadata.schema.json").read_text())
    jsonschema.validate(usage, schema["properties"]["usage"])
    assert json.loads(storage.objects[record.output_url + "metadata.json"])["usage"] == usage
    calls = len(scheduler.usage_calls)
    service.poll()
    assert len(scheduler.usage_calls) == calls  # costed once: nothing left to ask


def test_accounting_that_has_not_caught_up_is_asked_again_later_not_every_cycle(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    import time

    service = app.extensions["relion_gateway"]
    job_id = finished(client, app, scheduler)
    scheduler.set_usage("1001", complete=False)
    scheduler.set_usage("1002")
    service.poll()
    assert service.store.get(job_id).usage_at is None and len(scheduler.usage_calls) == 1
    scheduler.set_usage("1001")
    service.poll()
    assert len(scheduler.usage_calls) == 1  # not asked again at once: a poller at 1 s would run sacct every second
    collector = service.tracker.usage
    assert collector is not None
    collector.collect(now=time.time() + 6)  # after the first retry delay (5 s)
    assert service.store.get(job_id).usage["cpu_hours"] > 0 and len(scheduler.usage_calls) == 2


def test_the_usage_report_sums_per_user_account_and_month_and_users_see_their_own(
    client: FlaskClient, bob_client: FlaskClient, admin_client: FlaskClient, app: Flask, scheduler: FakeScheduler
) -> None:
    service = app.extensions["relion_gateway"]
    first = finished(client, app, scheduler)
    scheduler.set_usage("1001", cpus=6, elapsed=600, used=1800)
    scheduler.set_usage("1002", cpus=2, elapsed=30, used=15)
    service.poll()
    bobs = bob_client.post(JOBS, json=valid_request(user_id="bob", output_s3_prefix="s3://relion-local/results")).json["job_id"]
    service.store.update(bobs, state="cancelled", ended_at=service.store.get(first).ended_at)  # ended, not costed
    report = admin_client.get("/v1/relion/usage", query_string={"group_by": ["user", "month"]}).json
    rows = {row["user"]: row for row in report["rows"]}
    assert rows["alice"]["jobs"] == 1 and rows["alice"]["cpu_hours"] == pytest.approx(3660 / 3600, abs=1e-3)
    assert rows["alice"]["cpu_efficiency"] == pytest.approx(1815 / 3660, abs=1e-3)
    assert (rows["bob"]["jobs"], rows["bob"]["costed_jobs"], rows["bob"]["cpu_hours"]) == (1, 0, 0.0)
    assert report["total"]["jobs"] == 2 and len(rows["alice"]["month"]) == 7
    mine = client.get("/v1/relion/usage").json
    assert [row["user"] for row in mine["rows"]] == ["alice"]
    assert client.get("/v1/relion/usage", query_string={"user_id": "bob"}).status_code == 403
    assert client.get("/v1/relion/usage", query_string={"from": "yesterday"}).status_code == 422
    assert admin_client.get("/v1/relion/usage", query_string={"from": "2000-01-01", "to": "2000-02-01"}).json["total"]["jobs"] == 0


def test_the_usage_command_writes_csv(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.client import GatewayClient

    token = app.config["TEST_TOKENS"]["admin"]
    GatewayClient(served, token).submit(valid_request())
    service = app.extensions["relion_gateway"]
    job_id = service.store.list()[0][0].job_id
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    scheduler.set_usage("1001", cpus=4, elapsed=900, used=1800)
    scheduler.set_usage("1002", cpus=2, elapsed=0, used=0)
    service.poll()
    assert service.store.get(job_id).usage_at is not None
    result = CliRunner().invoke(cli, ["usage", "--url", served, "--token", token, "--csv", "--group-by", "user"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "user,jobs,costed_jobs,cpu_hours,cpu_hours_used,gpu_hours,elapsed_hours,cpu_efficiency"
    assert lines[1].startswith("alice,1,1,1.0,0.5,0.0,0.25,0.5") and lines[2].startswith("total,1,1,")
    assert CliRunner().invoke(cli, ["usage", "--url", served, "--token", token, "--group-by", "colour"]).exit_code == 2


def test_accounting_out_of_reach_is_said_once_not_every_cycle(
    client: FlaskClient, app: Flask, scheduler: FakeScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.slurm.backend import SchedulerError

    service = app.extensions["relion_gateway"]
    job_id = finished(client, app, scheduler)

    def no_sacct(job_ids: object) -> dict:
        raise SchedulerError("sacct failed: could not be started: No such file or directory")

    scheduler.usage = no_sacct  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="gateway.jobs.usage"):
        for _ in range(3):
            service.poll()
    warnings = [r for r in caplog.records if r.name == "gateway.jobs.usage" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and service.store.get(job_id).usage_at is None
