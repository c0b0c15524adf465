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


def _limits(config: Mapping[str, Any], partition: str | None) -> tuple[str, Mapping[str, Any]]:
    """The chosen partition (the request's, else [slurm] partition) and its limits ({} if unlisted)."""
    chosen = partition or config["SLURM_PARTITION"] or ""
    return chosen, config["SLURM_PARTITIONS"].get(chosen, {})


def _partition(config: Mapping[str, Any], partition: str | None) -> tuple[str, Mapping[str, Any]]:
    """As _limits, but a partition the request names must be a configured one (when any are)."""
    partitions: Mapping[str, Mapping[str, Any]] = config["SLURM_PARTITIONS"]
    if partition and partitions and partition not in partitions:
        raise RequestError("partition", f"unknown partition {partition!r}; configured: {sorted(partitions)}")
    return _limits(config, partition)


def gpus_per_node(config: Mapping[str, Any], partition: str | None) -> int:
    """The GPUs per node of the request's partition ([slurm.partitions.<name>] gpus); 0 when it has none."""
    return int(_limits(config, partition)[1].get("gpus", 0))


def check_gpus(config: Mapping[str, Any], partition: str | None, gpus: int) -> None:
    """A request's gpus (per node) must fit the partition's GPUs per node; Slurm would refuse it at submit."""
    if gpus <= 0:
        return
    chosen, limits = _partition(config, partition)
    name = chosen or "(default)"
    available = int(limits.get("gpus", 0))
    if available == 0:
        raise RequestError("gpus", f"partition {name} has no GPUs ([slurm.partitions.{name}] gpus is 0 or unset)")
    if gpus > available:
        raise RequestError("gpus", f"gpus {gpus} exceeds partition {name}'s GPUs per node ([slurm.partitions.{name}] gpus = {available})")


def plan_nodes(limits: Mapping[str, Any], name: str, *, num_mpi: int, threads: int, mem_per_cpu_mb: int) -> int:
    """The nodes the ranks need when the partition says how many CPUs a node has; 1 otherwise.

    A rank's threads share its memory, so a rank never spans nodes: a node takes
    cpus_per_node // threads ranks, and Slurm fills the nodes in order (block distribution).
    """
    cpus_per_node = limits.get("cpus_per_node")
    if cpus_per_node is None:
        # Without it the gateway cannot tell; Slurm places the tasks itself (no --nodes).
        return 1
    where = f"[slurm.partitions.{name}]"
    if threads > cpus_per_node:
        raise RequestError(
            "flags.j", f"--j (threads per rank) {threads} exceeds the CPUs of one node of partition {name} ({where} cpus_per_node = {cpus_per_node})"
        )
    tasks_per_node = cpus_per_node // threads
    nodes = math.ceil(num_mpi / tasks_per_node)
    max_nodes = limits.get("max_nodes")
    if max_nodes is not None and nodes > max_nodes:
        raise RequestError(
            "num_mpi",
            f"{num_mpi} ranks x {threads} threads need {nodes} nodes of {cpus_per_node} CPUs "
            f"({tasks_per_node} ranks a node); the limit ({where} max_nodes) is {max_nodes}",
        )
    memory_per_node = limits.get("memory_per_node_mb")
    used = min(num_mpi, tasks_per_node)
    needed = used * threads * mem_per_cpu_mb
    if memory_per_node is not None and needed > memory_per_node:
        # One rank alone too large: no number of ranks helps, only another partition.
        field = "num_mpi" if used > 1 else "partition"
        raise RequestError(
            field,
            f"{used} ranks a node x {threads} threads x {mem_per_cpu_mb} MB = {needed} MB estimated memory a node; "
            f"the limit ({where} memory_per_node_mb) is {memory_per_node}",
        )
    return nodes


def plan_resources(
    config: Mapping[str, Any],
    *,
    mode: str,
    num_mpi: int,
    threads: int,
    partition: str | None,
    time_limit: str | None,
    gpus: int = 0,
) -> Resources:
    """Work out the allocation and refuse it, naming the limit, if the partition does not allow it."""
    chosen, limits = _partition(config, partition)
    time_text = time_limit if time_limit is not None else config["SLURM_TIME_LIMIT"]
    try:
        seconds = parse_slurm_time(time_text)
    except ValueError as exc:
        raise RequestError("time_limit", str(exc)) from exc
    name = chosen or "(default)"
    mem_per_cpu = memory_per_cpu_mb(config, mode, threads)
    totals = Resources(chosen, num_mpi, threads, mem_per_cpu, time_text)

    def over(field: str, what: str, value: int, limit_key: str) -> None:
        limit = limits.get(limit_key)
        if limit is not None and value > int(limit):
            raise RequestError(field, f"{what} {value} exceeds partition {name}'s limit {limit_key} = {limit}")

    over("num_mpi", "num_mpi", num_mpi, "max_ranks")
    over("flags.j", "--j (threads per rank)", threads, "max_threads")
    over("num_mpi", f"num_mpi x j = {num_mpi} x {threads} =", totals.total_cpus, "max_cpus")
    over("num_mpi", "estimated memory (MB)", totals.total_memory_mb, "max_memory_mb")
    if "max_time" in limits and seconds > parse_slurm_time(str(limits["max_time"])):
        raise RequestError("time_limit", f"time limit {time_text} exceeds partition {name}'s limit max_time = {limits['max_time']}")
    check_gpus(config, partition, gpus)
    nodes = plan_nodes(limits, name, num_mpi=num_mpi, threads=threads, mem_per_cpu_mb=mem_per_cpu)
    return Resources(chosen, num_mpi, threads, mem_per_cpu, time_text, nodes=nodes, gpus_per_node=gpus)
