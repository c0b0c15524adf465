"""Multi-node planning: --nodes from a partition's cpus_per_node, its per-node limits, and the record."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import build_config
from gateway.errors import RequestError
from gateway.jobs.resources import plan_resources
from gateway.jobs.spec import JobSpec, Resources
from gateway.jobside.archive import run_archive
from gateway.storage.s3 import S3Storage
from tests.conftest import valid_request
from tests.unit.test_archive import finished_scheduler, make_job, storage, validate_metadata  # noqa: F401 (fixture)
from tests.unit.test_render import fixed_job_id, golden_app  # noqa: F401 (fixture)

# Nodes of 4 CPUs and 8000 MB, at most 3 of them.
NODES = {"multi": {"cpus_per_node": 4, "max_nodes": 3, "memory_per_node_mb": 8000}, "single": {"max_ranks": 64}}


def config(**changes: Any) -> dict[str, Any]:
    cfg = build_config(environ={})
    cfg.update({"SLURM_PARTITION": "multi", "SLURM_PARTITIONS": NODES, **changes})
    return cfg


def plan(num_mpi: int, threads: int = 1, mode: str = "2d", partition: str | None = None, **changes: Any) -> Resources:
    return plan_resources(config(**changes), mode=mode, num_mpi=num_mpi, threads=threads, partition=partition, time_limit=None)


@pytest.mark.parametrize(
    ("num_mpi", "threads", "nodes"),
    [(1, 1, 1), (4, 1, 1), (5, 1, 2), (12, 1, 3), (2, 2, 1), (3, 2, 2), (6, 2, 3), (3, 3, 3), (1, 4, 1), (3, 4, 3)],
)
def test_nodes_are_the_ranks_over_the_ranks_a_node_takes(num_mpi: int, threads: int, nodes: int) -> None:
    # A node takes 4 // threads ranks: a rank's threads never span nodes.
    assert plan(num_mpi, threads).nodes == nodes


def test_without_cpus_per_node_slurm_places_the_ranks() -> None:
    assert plan(64, partition="single").nodes == 1


@pytest.mark.parametrize(
    ("num_mpi", "threads", "changes", "field", "fragment"),
    [
        (1, 5, {}, "flags.j", "exceeds the CPUs of one node of partition multi ([slurm.partitions.multi] cpus_per_node = 4)"),
        (13, 1, {}, "num_mpi", "need 4 nodes of 4 CPUs (4 ranks a node); the limit ([slurm.partitions.multi] max_nodes) is 3"),
        (7, 2, {}, "num_mpi", "([slurm.partitions.multi] max_nodes) is 3"),
        # 3d: 2000 MB a rank; 4 ranks a node = 8000 MB fits, the autorefine scale of 1.5 does not.
        (8, 1, {"RELION_MEMORY_SCALE": 1.5}, "num_mpi", "4 ranks a node x 1 threads x 3000 MB = 12000 MB"),
        (1, 1, {"RELION_MEMORY_SCALE": 5.0}, "partition", "the limit ([slurm.partitions.multi] memory_per_node_mb) is 8000"),
    ],
)
def test_per_node_refusals_name_the_field_and_key(num_mpi: int, threads: int, changes: dict, field: str, fragment: str) -> None:
    with pytest.raises(RequestError) as excinfo:
        plan(num_mpi, threads, mode="3d", **changes)
    assert excinfo.value.field == field and fragment in excinfo.value.message, excinfo.value.message


def test_memory_per_node_counts_only_the_ranks_on_a_node() -> None:
    # 2 ranks x 2000 MB on one node; 12 ranks on 3 nodes of 4 x 2000 MB: both fit 8000 MB a node.
    assert plan(2, mode="3d").nodes == 1 and plan(12, mode="3d").nodes == 3


@pytest.mark.parametrize(
    ("partition", "fragment"),
    [
        ({"max_nodes": 0, "cpus_per_node": 4}, "[slurm.partitions.p] max_nodes: must be a whole number >= 1, not 0"),
        ({"cpus_per_node": "4"}, "[slurm.partitions.p] cpus_per_node: must be a whole number >= 1, not '4'"),
        ({"cpus_per_node": True}, "[slurm.partitions.p] cpus_per_node: must be a whole number >= 1, not True"),
        ({"cpus_per_node": 4, "memory_per_node_mb": 1.5}, "[slurm.partitions.p] memory_per_node_mb: must be a whole number >= 1"),
        ({"gpus": -1}, "[slurm.partitions.p] gpus: must be a whole number >= 0, not -1"),
        ({"max_nodes": 2}, "[slurm.partitions.p] max_nodes: needs cpus_per_node"),
        ({"memory_per_node_mb": 64000}, "[slurm.partitions.p] memory_per_node_mb: needs cpus_per_node"),
    ],
)
def test_config_refuses_bad_node_keys_naming_them(partition: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        build_config({"SLURM_PARTITIONS": {"p": partition}}, environ={})
    assert fragment in str(excinfo.value)


def test_config_takes_node_keys_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[slurm.partitions.gpu]\nmax_nodes = 2\ncpus_per_node = 32\nmemory_per_node_mb = 256000\ngpus = 4\n")
    cfg = build_config(environ={"GATEWAY_CONFIG": str(path)})
    assert cfg["SLURM_PARTITIONS"]["gpu"] == {"max_nodes": 2, "cpus_per_node": 32, "memory_per_node_mb": 256000, "gpus": 4}


def test_a_record_without_nodes_or_gpus_loads_with_one_node_and_none() -> None:
    old = {"partition": "debug", "ntasks": 3, "cpus_per_task": 1, "mem_per_cpu_mb": 1000, "time_limit": "00:30:00", "total_cpus": 3}
    resources = Resources.from_dict(old)
    assert resources == Resources("debug", 3, 1, 1000, "00:30:00") and (resources.nodes, resources.gpus_per_node) == (1, 0)
    assert Resources.from_dict({"partition": "debug"}) is None  # still: a record without its counts is none
    planned = Resources("multi", 12, 1, 1000, "01:00:00", nodes=3, gpus_per_node=2)
    assert planned.as_dict()["nodes"] == 3 and planned.as_dict()["gpus_per_node"] == 2
    spec = JobSpec(job_id="j", resources=planned)
    assert JobSpec.from_json(spec.to_json()).resources == planned


def test_the_script_asks_for_the_nodes_only_when_more_than_one(tmp_path: Path, fixed_job_id: None) -> None:
    service = golden_app(tmp_path, SLURM_PARTITION="multi", SLURM_PARTITIONS=NODES, RELION_LAUNCHER="srun --mpi=pmix").extensions["relion_gateway"]
    spread = service.prepare(valid_request(num_mpi=9, flags={**valid_request()["flags"], "j": 1}))
    assert "#SBATCH --ntasks=9\n#SBATCH --cpus-per-task=1\n#SBATCH --nodes=3\n" in spread.main_script
    assert spread.job["resources"]["nodes"] == 3
    assert "srun --mpi=pmix relion_refine_mpi" in spread.main_script
    one = service.prepare(valid_request(num_mpi=4))
    assert "--nodes" not in one.main_script and one.job["resources"]["nodes"] == 1


def test_metadata_keeps_the_plan_beside_what_sacct_says_ran(tmp_path: Path, storage: S3Storage) -> None:
    job = make_job(tmp_path)
    job["resources"].update(nodes=3, gpus_per_node=2)
    metadata = run_archive(
        JobSpec.from_dict(job), "1001", storage=storage, scheduler=finished_scheduler(), compressor="gzip",
        accounting=lambda job_id: {"nodes": "3", "node_list": "rgnode[1-3]"},
    )
    validate_metadata(metadata)
    resources = metadata["resources"]
    assert (resources["planned_nodes"], resources["nodes"], resources["gpus_per_node"]) == (3, "3", 2)
