"""The Slurm allocation a request needs, checked against the partition limits in config."""
from __future__ import annotations

import math
from typing import Any, Mapping

from gateway.errors import RequestError
from gateway.jobs.spec import Resources
from gateway.slurm.times import parse_slurm_time  # the one reader of Slurm time limits


def memory_per_cpu_mb(config: Mapping[str, Any], mode: str, threads: int) -> int:
    """RELION's footprint is per rank; Slurm's request is per CPU, so spread it over the threads."""
    per_rank = float(config["RELION_MEMORY_PER_RANK_MB"].get(mode, 2000)) * float(config["RELION_MEMORY_SCALE"])
    return max(100, math.ceil(per_rank / threads))


def plan_resources(
    config: Mapping[str, Any],
    *,
    mode: str,
    num_mpi: int,
    threads: int,
    partition: str | None,
    time_limit: str | None,
) -> Resources:
    """Work out the allocation and refuse it, naming the limit, if the partition does not allow it."""
    partitions: Mapping[str, Mapping[str, Any]] = config["SLURM_PARTITIONS"]
    chosen = partition or config["SLURM_PARTITION"] or ""
    if partition and partitions and partition not in partitions:
        raise RequestError("partition", f"unknown partition {partition!r}; configured: {sorted(partitions)}")
    time_text = time_limit if time_limit is not None else config["SLURM_TIME_LIMIT"]
    try:
        seconds = parse_slurm_time(time_text)
    except ValueError as exc:
        raise RequestError("time_limit", str(exc)) from exc
    resources = Resources(chosen, num_mpi, threads, memory_per_cpu_mb(config, mode, threads), time_text)
    limits = partitions.get(chosen, {})
    name = chosen or "(default)"

    def over(field: str, what: str, value: int, limit_key: str) -> None:
        limit = limits.get(limit_key)
        if limit is not None and value > int(limit):
            raise RequestError(field, f"{what} {value} exceeds partition {name}'s limit {limit_key} = {limit}")

    over("num_mpi", "num_mpi", num_mpi, "max_ranks")
    over("flags.j", "--j (threads per rank)", threads, "max_threads")
    over("num_mpi", f"num_mpi x j = {num_mpi} x {threads} =", resources.total_cpus, "max_cpus")
    over("num_mpi", "estimated memory (MB)", resources.total_memory_mb, "max_memory_mb")
    if "max_time" in limits and seconds > parse_slurm_time(str(limits["max_time"])):
        raise RequestError("time_limit", f"time limit {time_text} exceeds partition {name}'s limit max_time = {limits['max_time']}")
    return resources
