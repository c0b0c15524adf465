"""The Slurm allocation a request needs, checked against the partition limits in config."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from gateway.errors import RequestError

# Slurm's time format (sbatch --time, partition MaxTime): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
# D-HH:MM:SS. ASCII digits only: \d would also take Unicode digits, which int() reads and Slurm
# does not. No whitespace: Slurm's own check (_is_valid_timespec) refuses it too.
_TIME = re.compile(r"(?:(?P<days>[0-9]+)-)?(?P<rest>[0-9]+(?::[0-9]+){0,2})")
# What Slurm reads as "no time limit" besides a total of zero (time_str2secs returns INFINITE).
_NO_LIMIT_WORDS = frozenset({"-1", "INFINITE", "UNLIMITED"})
# Slurm counts the seconds in a C int and rounds them up to minutes ((s + 59) / 60): beyond this
# the sum overflows, and a wrap to -1 would be INFINITE. About 68 years.
MAX_SLURM_TIME_S = 2**31 - 1 - 59
EXAMPLES = "e.g. 90, 01:30:00, 2-00:00:00"


def parse_slurm_time(value: str) -> int:
    """Seconds in a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS).

    The one place the gateway reads a time limit (requests, [slurm] time_limit and
    archive_time_limit, partition max_time). A ValueError for anything Slurm would read as no
    limit at all (0, 0:0, 0-0, 00:00:00, -1, INFINITE, UNLIMITED) or could not read.
    """
    if value.strip().upper() in _NO_LIMIT_WORDS:
        raise ValueError(f"{value!r} means no time limit to Slurm; give a positive limit ({EXAMPLES})")
    match = _TIME.fullmatch(value)
    if not match:
        raise ValueError(f"{value!r} is not a Slurm time ({EXAMPLES})")
    parts = [int(p) for p in match.group("rest").split(":")]
    if match.group("days") is not None:
        days = int(match.group("days"))
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 1:
        total = parts[0] * 60
    elif len(parts) == 2:
        total = parts[0] * 60 + parts[1]
    else:
        total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    if total == 0:
        # sbatch --time=0 "requests that no time limit be imposed" (sbatch(1)).
        raise ValueError(f"{value!r} is zero, which Slurm reads as no time limit; give a positive limit ({EXAMPLES})")
    if total > MAX_SLURM_TIME_S:
        raise ValueError(f"{value!r} is longer than Slurm can count ({MAX_SLURM_TIME_S} s); give a shorter limit")
    return total


@dataclass(frozen=True)
class Resources:
    partition: str
    ntasks: int
    cpus_per_task: int
    mem_per_cpu_mb: int
    time_limit: str

    @property
    def total_cpus(self) -> int:
        return self.ntasks * self.cpus_per_task

    @property
    def total_memory_mb(self) -> int:
        return self.total_cpus * self.mem_per_cpu_mb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_cpus": self.total_cpus, "total_memory_mb": self.total_memory_mb}


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
