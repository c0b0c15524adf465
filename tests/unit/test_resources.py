"""Partition limits and the memory estimate: over a limit is a 422 that names the limit."""
from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from gateway.config import build_config
from gateway.errors import RequestError
from gateway.process import CommandError
from gateway.jobs.resources import parse_slurm_time, plan_resources
from gateway.slurm.backend import SchedulerError, SchedulerRefused
from gateway.slurm.cli import SlurmCliBackend
from tests.conftest import valid_request
from tests.fakes import FakeScheduler, FakeStorage, RecordedRunner

LIMITS = {"debug": {"max_ranks": 8, "max_threads": 4, "max_cpus": 12, "max_memory_mb": 10000, "max_time": "04:00:00", "gpus": 0}}


def config(**changes: object) -> dict:
    cfg = build_config(environ={})
    cfg.update({"SLURM_PARTITION": "debug", "SLURM_PARTITIONS": LIMITS, **changes})
    return cfg


@pytest.mark.parametrize(("text", "seconds"), [("90", 5400), ("01:30", 90), ("01:30:00", 5400), ("2-00:00:00", 172800), ("1-2", 93600), ("1-02:03", 93780)])
def test_parse_slurm_time(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds


def test_memory_estimate_is_per_rank_spread_over_threads_and_scalable() -> None:
    plan = plan_resources(config(RELION_MEMORY_SCALE=2.0), mode="3d", num_mpi=2, threads=2, partition=None, time_limit=None)
    assert plan.mem_per_cpu_mb == 2000  # 2000 MB/rank x 2 / 2 threads
    assert (plan.total_cpus, plan.total_memory_mb) == (4, 8000)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"num_mpi": 9, "threads": 1}, "num_mpi", "limit max_ranks = 8"),
        ({"num_mpi": 1, "threads": 5}, "flags.j", "limit max_threads = 4"),
        ({"num_mpi": 4, "threads": 4}, "num_mpi", "limit max_cpus = 12"),
        ({"num_mpi": 8, "threads": 1, "mode": "autorefine"}, "num_mpi", "limit max_memory_mb = 10000"),
        ({"num_mpi": 1, "threads": 1, "time_limit": "05:00:00"}, "time_limit", "limit max_time = 04:00:00"),
        ({"num_mpi": 1, "threads": 1, "time_limit": "soon"}, "time_limit", "not a Slurm time"),
        ({"num_mpi": 1, "threads": 1, "partition": "gpu"}, "partition", "unknown partition 'gpu'"),
    ],
)
def test_limits_name_themselves(kwargs: dict, field: str, fragment: str) -> None:
    args = {"mode": "2d", "partition": None, "time_limit": None, **kwargs}
    with pytest.raises(RequestError) as excinfo:
        plan_resources(config(), **args)
    assert excinfo.value.field == field and fragment in excinfo.value.message


def test_api_refuses_an_allocation_over_the_limit(client: FlaskClient, app, scheduler) -> None:
    app.extensions["relion_gateway"].config["SLURM_PARTITIONS"] = LIMITS
    app.extensions["relion_gateway"].config["SLURM_PARTITION"] = "debug"
    response = client.post("/v1/relion/jobs", json=valid_request(num_mpi=13))
    assert response.status_code == 422
    assert "max_ranks = 8" in response.json["message"]
    assert scheduler.submitted == []
    response = client.post("/v1/relion/jobs", json=valid_request(time_limit="tomorrow"))
    assert response.status_code == 422 and "time_limit" in response.json["errors"]["json"]


# -- time limits Slurm reads as "no limit" --------------------------------------------------------

NO_LIMIT = ["0", "00", "0:0", "0:00", "00:00:00", "0-0", "0-00", "0-00:00", "0-00:00:00", "-1", "UNLIMITED", "unlimited", "INFINITE", "Infinite"]


@pytest.mark.parametrize("text", NO_LIMIT)
def test_no_limit_forms_are_refused_naming_time_limit(text: str) -> None:
    with pytest.raises(ValueError, match="no time limit"):
        parse_slurm_time(text)
    with pytest.raises(RequestError) as excinfo:
        plan_resources(config(), mode="2d", num_mpi=1, threads=1, partition=None, time_limit=text)
    assert excinfo.value.field == "time_limit" and "no time limit" in excinfo.value.message
    # Also where no partition limit would have caught it.
    with pytest.raises(RequestError):
        plan_resources(config(SLURM_PARTITIONS={}), mode="2d", num_mpi=1, threads=1, partition=None, time_limit=text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("\u0661:00:00", "not a Slurm time"),  # Arabic-Indic one: int() reads it, Slurm does not
        (" 90", "not a Slurm time"),
        ("90\n", "not a Slurm time"),
        ("1-2-3", "not a Slurm time"),
        ("99999999999", "longer than Slurm can count"),  # would overflow Slurm's int seconds
        ("24856-00:00:00", "longer than Slurm can count"),
    ],
)
def test_times_slurm_cannot_read_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_slurm_time(text)


def test_the_shortest_limits_are_kept() -> None:
    assert parse_slurm_time("0:1") == 1  # Slurm rounds up to a minute: a limit, not none
    assert parse_slurm_time("0-0:1") == 60 and parse_slurm_time("1") == 60


@pytest.mark.parametrize("text", ["0", "0:0", "0-0", "-1", "UNLIMITED", "INFINITE"])
def test_api_refuses_no_limit_time_limits(client: FlaskClient, scheduler, text: str) -> None:
    response = client.post("/v1/relion/jobs", json=valid_request(time_limit=text))
    assert response.status_code == 422, response.json
    assert "time_limit" in response.json["errors"]["json"] and "time_limit" in response.json["message"]
    assert scheduler.submitted == []


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"GATEWAY_SLURM_TIME_LIMIT": "0"}, "[slurm] time_limit: '0' is zero"),
        ({"GATEWAY_SLURM_TIME_LIMIT": "UNLIMITED"}, "[slurm] time_limit: 'UNLIMITED' means no time limit"),
        ({"GATEWAY_SLURM_ARCHIVE_TIME_LIMIT": "0-0"}, "[slurm] archive_time_limit: '0-0' is zero"),
        ({"GATEWAY_SLURM_ARCHIVE_TIME_LIMIT": "soon"}, "[slurm] archive_time_limit: 'soon' is not a Slurm time"),
        ({"GATEWAY_SLURM_PARTITIONS": '{debug = {max_time = "INFINITE"}}'}, "[slurm.partitions.debug] max_time: 'INFINITE'"),
        ({"GATEWAY_SLURM_PARTITIONS": "{debug = {max_time = 0}}"}, "[slurm.partitions.debug] max_time: '0' is zero"),
        (
            {"GATEWAY_SLURM_PARTITION": "debug", "GATEWAY_SLURM_PARTITIONS": '{debug = {max_time = "00:30:00"}}'},
            "exceeds the default partition debug's max_time",
        ),
    ],
)
def test_config_time_limits_are_checked_at_load(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        build_config(environ=environ)
    assert fragment in str(excinfo.value)


def test_config_time_limits_in_a_file_are_checked_at_load(tmp_path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[slurm.partitions.gpu]\nmax_ranks = 4\nmax_time = "UNLIMITED"\n')
    with pytest.raises(ValueError, match=r"\[slurm.partitions.gpu\] max_time: 'UNLIMITED' means no time limit"):
        build_config(environ={"GATEWAY_CONFIG": str(path)})


def test_config_minutes_given_as_a_number_become_text() -> None:
    # GATEWAY_SLURM_TIME_LIMIT=90 parses as the TOML integer 90: still 90 minutes, as text.
    cfg = build_config(environ={"GATEWAY_SLURM_TIME_LIMIT": "90", "GATEWAY_SLURM_PARTITIONS": "{debug = {max_time = 240}}"})
    assert cfg["SLURM_TIME_LIMIT"] == "90" and cfg["SLURM_PARTITIONS"]["debug"]["max_time"] == "240"
    plan = plan_resources(cfg, mode="2d", num_mpi=1, threads=1, partition="debug", time_limit=None)
    assert plan.time_limit == "90"


# -- sbatch --test-only: Slurm saying no is a 422, Slurm not answering a 503 ------------------------

# Recorded from Slurm 22.05.8 (the local stack, EnforcePartLimits=ALL): exit 1, stderr only.
REFUSED_NTASKS = "allocation failure: More processors requested than permitted\n"
REFUSED_PARTITION = "sbatch: error: invalid partition specified: nope\nallocation failure: Invalid partition name specified\n"
UNREACHABLE = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"


class RefusingScheduler(FakeScheduler):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def test_only(self, script: str) -> str:
        raise self.error


def _cli(stderr: str, returncode: int | None = 1, reason: str = "") -> SlurmCliBackend:
    argv = ["sbatch", "--test-only"]
    return SlurmCliBackend(RecordedRunner({"sbatch": CommandError(argv, returncode, "", stderr, reason)}))


@pytest.mark.parametrize(("stderr", "reason"), [
    (REFUSED_NTASKS, "allocation failure: More processors requested than permitted"),
    (REFUSED_PARTITION, "sbatch: error: invalid partition specified: nope allocation failure: Invalid partition name specified"),
])
def test_cli_test_only_refusal_is_slurm_saying_no(stderr: str, reason: str) -> None:
    with pytest.raises(SchedulerRefused) as excinfo:
        _cli(stderr).test_only("#!/bin/bash\ntrue\n")
    assert excinfo.value.reason == reason and not excinfo.value.transient


@pytest.mark.parametrize(
    ("stderr", "returncode", "reason", "transient"),
    [
        (UNREACHABLE, 1, "", True),
        ("", None, "timed out after 30 s", True),
        ("No such file or directory: 'sbatch'", None, "could not be started", False),
    ],
)
def test_cli_test_only_without_an_answer_is_not_a_refusal(stderr: str, returncode: int | None, reason: str, transient: bool) -> None:
    with pytest.raises(SchedulerError) as excinfo:
        _cli(stderr, returncode, reason).test_only("#!/bin/bash\ntrue\n")
    assert not isinstance(excinfo.value, SchedulerRefused) and excinfo.value.transient is transient


def test_rest_test_only_refusal_is_slurm_saying_no() -> None:
    from tests.unit.test_slurm_rest import backend, recorded

    def refusing(argv: list[str], **_: object) -> str:
        raise CommandError(argv, 1, "", REFUSED_NTASKS)

    def unreachable(argv: list[str], **_: object) -> str:
        raise CommandError(argv, 1, "", UNREACHABLE)

    rest, _, _ = backend(recorded, runner=refusing)
    with pytest.raises(SchedulerRefused, match="More processors requested than permitted"):
        rest.test_only("#!/bin/bash\ntrue\n")
    rest, _, _ = backend(recorded, runner=unreachable)
    with pytest.raises(SchedulerError) as excinfo:
        rest.test_only("#!/bin/bash\ntrue\n")
    assert not isinstance(excinfo.value, SchedulerRefused) and excinfo.value.transient


def _render_app(tmp_path, error: Exception):  # type: ignore[no-untyped-def]
    from gateway import create_app

    app = create_app(
        {"TESTING": True, "PATHS_STATE_DIR": str(tmp_path / "state"), "S3_ALLOWED_BUCKETS": ["relion-local"], "AUTH_MODE": "none"},
        scheduler=RefusingScheduler(error),
        storage=FakeStorage(),  # type: ignore[arg-type]
    )
    return app.test_client()


def test_render_with_slurm_test_refused_is_a_422_naming_slurms_reason(tmp_path) -> None:
    refused = SchedulerRefused("sbatch --test-only refused the script: x", reason=REFUSED_NTASKS.strip())
    response = _render_app(tmp_path, refused).post("/v1/relion/render?slurm_test=true", json=valid_request(num_mpi=64))
    assert response.status_code == 422, response.json
    assert response.json["message"] == (
        "slurm_test: Slurm refused the script (sbatch --test-only): allocation failure: More processors requested than permitted"
    )
    assert list(response.json["errors"]["json"]) == ["slurm_test"]


def test_render_with_slurm_test_unanswered_stays_a_503(tmp_path) -> None:
    away = SchedulerError("sbatch --test-only failed (timed out after 30 s): ", transient=True)
    response = _render_app(tmp_path, away).post("/v1/relion/render?slurm_test=true", json=valid_request())
    assert response.status_code == 503 and "Slurm is not answering" in response.json["message"]
