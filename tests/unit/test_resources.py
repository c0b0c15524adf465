"""Partition limits and the memory estimate: over a limit is a 422 that names the limit."""
from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from gateway.config import build_config
from gateway.errors import RequestError
from gateway.resources import parse_slurm_time, plan_resources
from tests.conftest import valid_request

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
