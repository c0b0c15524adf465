"""What a job's logs tell: the line that explains a failure in its stderr (RELION's own ERROR, or
ours), and from RELION's stdout where each MPI rank ran."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# relion_refine_mpi prints one line per rank as it starts: " Leader  (0) runs on host = rgnode1",
# " Follower     1 runs on host = rgnode2"; RELION before 4.0 says Master and Slave. Ranks print
# concurrently, so a line may carry other output around it: the pattern is searched, not anchored.
_RANK_HOST = re.compile(
    r"\b(?:(?:Leader|Master)\s*\(\s*(?P<leader>\d+)\s*\)|(?:Follower|Slave)\s+(?P<follower>\d+))"
    r"\s+runs on host\s*=\s*(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)"
)


@dataclass(frozen=True)
class RankHost:
    rank: int
    host: str


def error_line(path: Path) -> str:
    """The most telling error line of a stderr file, or "" if there is none."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for index, line in enumerate(lines):
        # RELION prints "ERROR: " alone on one line and the message on the next, then a backtrace.
        if line.rstrip(":") == "ERROR" and index + 1 < len(lines):
            return f"ERROR: {lines[index + 1]}"
        if line.startswith("ERROR"):
            return line
    for line in reversed(lines):
        if "failed" in line or "error" in line.lower():
            return line
    return lines[-1] if lines else ""


def rank_hosts(lines: Iterable[str]) -> list[RankHost]:
    """Where each rank ran, by rank; a rank named twice (a requeued job's log appended) keeps the last."""
    hosts: dict[int, str] = {}
    for line in lines:
        for match in _RANK_HOST.finditer(line):
            rank = match.group("leader") if match.group("leader") is not None else match.group("follower")
            hosts[int(rank)] = match.group("host")
    return [RankHost(rank, hosts[rank]) for rank in sorted(hosts)]


def rank_hosts_in(path: Path) -> list[RankHost]:
    """rank_hosts of a stdout log, read line by line (RELION's stdout can be large); [] without one."""
    try:
        with path.open(errors="replace") as handle:
            return rank_hosts(handle)
    except OSError:
        return []
