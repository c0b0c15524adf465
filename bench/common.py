"""Shared pieces for benchmarks: Slurm RPC counters, a counting runner, rows of the report.

Slurm's daemons count every RPC they serve, by message type and by user: ``sdiag`` prints
slurmctld's counters and ``sacctmgr show stats`` prints slurmdbd's. They are cumulative and shared
with every other client of the stack (other test runs, a gateway on port 9012 polling every
second, slurmd itself), so two figures are kept for each phase:

- attributed: the benchmark runs its slurmctld queries (squeue, scontrol, sinfo) as a user nobody
  else uses (``nobody``, when the benchmark runs as root), and sdiag's per-user counter for that
  uid is exactly what they cost, whatever else the stack is doing;
- by message type, net of background: the phase's per-type deltas minus the background rate of
  an idle control measured right after it (this also catches RPCs that do not go through the
  runner). The readings' own RPCs (REQUEST_STATS_INFO, DBD_GET_STATS) are left out.
"""
from __future__ import annotations

import math
import os
import pwd
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from gateway.process import run_command
from gateway.stack.nodes import HEAD_NAME

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

_RPC_LINE = re.compile(r"^\s+([A-Z][A-Z0-9_]+)\s+\(\s*\d+\)\s+count:(\d+)")
_USER_LINE = re.compile(r"^\s+(\S+)\s+\(\s*(\d+)\)\s+count:(\d+)")
_SINCE = re.compile(r"^Data since\s+.*\((\d+)\)", re.MULTILINE)

# slurmctld query commands the benchmarks run as MEASURE_USER. sacct (slurmdbd, which would show
# nobody only nobody's jobs), sbatch and scancel keep the benchmark's own identity.
CTLD_QUERY_COMMANDS = frozenset({"squeue", "scontrol", "sinfo"})


def _measure_user() -> tuple[str, int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


MEASURE_USER = _measure_user()

# The RPC each reading itself costs; never part of what a phase is charged with.
SELF_RPCS = {"REQUEST_STATS_INFO", "DBD_GET_STATS"}


class CounterReset(Exception):
    """The daemon restarted (or someone ran `sdiag -r`) between two readings."""


@dataclass(frozen=True)
class RpcSnapshot:
    since: int | None
    counts: dict[str, int]  # by message type
    users: dict[int, int] = field(default_factory=dict)  # by uid


def parse_rpc_stats(text: str) -> RpcSnapshot:
    """Parse the "Remote Procedure Call statistics by message type" and "by user" blocks."""
    counts: dict[str, int] = {}
    users: dict[int, int] = {}
    block = None
    for line in text.splitlines():
        if "statistics by message type" in line:
            block = "type"
        elif "statistics by user" in line:
            block = "user"
        elif line and not line[0].isspace():
            block = None
        elif block == "type" and (match := _RPC_LINE.match(line)):
            counts[match.group(1)] = int(match.group(2))
        elif block == "user" and (match := _USER_LINE.match(line)):
            users[int(match.group(2))] = users.get(int(match.group(2)), 0) + int(match.group(3))
    since = _SINCE.search(text)
    return RpcSnapshot(int(since.group(1)) if since else None, counts, users)


def ctld_snapshot() -> RpcSnapshot:
    return parse_rpc_stats(subprocess.run(["sdiag"], capture_output=True, text=True, check=True, timeout=30).stdout)


def dbd_snapshot() -> RpcSnapshot:
    return parse_rpc_stats(
        subprocess.run(["sacctmgr", "-n", "show", "stats"], capture_output=True, text=True, check=True, timeout=30).stdout
    )


def rpc_delta(before: RpcSnapshot, after: RpcSnapshot) -> dict[str, int]:
    if before.since != after.since:
        raise CounterReset(f"counters restarted ({before.since} -> {after.since})")
    delta = {}
    for name in set(before.counts) | set(after.counts):
        if name in SELF_RPCS:
            continue
        diff = after.counts.get(name, 0) - before.counts.get(name, 0)
        if diff < 0:
            raise CounterReset(f"{name} went down ({diff})")
        if diff:
            delta[name] = diff
    return dict(sorted(delta.items(), key=lambda kv: (-kv[1], kv[0])))


def user_delta(before: RpcSnapshot, after: RpcSnapshot) -> int | None:
    """slurmctld RPCs made by MEASURE_USER between two readings (None when not measurable)."""
    if MEASURE_USER is None:
        return None
    uid = MEASURE_USER[1]
    return after.users.get(uid, 0) - before.users.get(uid, 0)


@dataclass
class Interval:
    """RPC deltas of both daemons over one timed interval."""

    seconds: float
    ctld: dict[str, int]
    dbd: dict[str, int]
    result: Any = None
    ctld_user: int | None = None  # slurmctld RPCs by MEASURE_USER

    @property
    def ctld_total(self) -> int:
        return sum(self.ctld.values())

    @property
    def dbd_total(self) -> int:
        return sum(self.dbd.values())


def timed_interval(fn: Callable[[], Any]) -> Interval:
    ctld0, dbd0 = ctld_snapshot(), dbd_snapshot()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    ctld1, dbd1 = ctld_snapshot(), dbd_snapshot()
    return Interval(seconds, rpc_delta(ctld0, ctld1), rpc_delta(dbd0, dbd1), result, user_delta(ctld0, ctld1))


@dataclass
class Run:
    """One measurement: the readings' overhead, the phase, an idle control right after."""

    overhead: Interval
    phase: Interval
    control: Interval


@dataclass
class Measured:
    """One or more runs of a phase, and what the phase itself cost Slurm.

    Other clients of the stack only ever add RPCs, to any interval. So every estimate takes the
    least over the runs: the phase with the fewest slurmctld RPCs, the readings' overhead (a
    zero-length interval: for slurmdbd, sacctmgr's own connection), and the background rate (the
    idle control minus that overhead, per second), each per RPC type.
    net = sum over the phase's types of (phase - overhead - rate x phase seconds).
    """

    runs: list[Run]

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.phase.ctld_total)

    @property
    def phase(self) -> Interval:
        return self.best.phase

    def _net(self, daemon: str) -> float:
        """Per RPC type: phase - overhead - background rate x phase seconds, never below 0.

        A type the phase did not see cannot have had background in it, so only the phase's types
        are charged (and the background of one type is never taken off another).
        """
        def counts(interval: Interval) -> dict[str, int]:
            return getattr(interval, daemon)

        phase = self.phase
        net = 0.0
        for name, count in counts(phase).items():
            # slurmctld's only reading overhead (REQUEST_STATS_INFO) is left out by type already.
            overhead = 0 if daemon == "ctld" else min(counts(r.overhead).get(name, 0) for r in self.runs)
            rate = min(max(0, counts(r.control).get(name, 0) - overhead) / r.control.seconds for r in self.runs)
            net += max(0.0, count - overhead - rate * phase.seconds)
        return net

    @property
    def ctld_net(self) -> float:
        return self._net("ctld")

    @property
    def dbd_net(self) -> float:
        return self._net("dbd")

    @property
    def ctld_attributed(self) -> int | None:
        """slurmctld RPCs of the phase's runner commands, exactly (sdiag's per-user counter)."""
        if self.phase.ctld_user is None:
            return None
        background = min(r.control.ctld_user or 0 for r in self.runs)  # nobody else should use that uid
        return max(0, self.phase.ctld_user - background)

    def ctld_figure(self) -> float:
        """The attributed count when there is one, else the per-type net."""
        attributed = self.ctld_attributed
        return float(attributed) if attributed is not None else self.ctld_net

    @property
    def ctld_background(self) -> float:
        """The part of the phase's slurmctld RPCs attributed to other clients."""
        return self.phase.ctld_total - self.ctld_net

    def as_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "phase_seconds": round(best.phase.seconds, 3),
            "slurmctld": {
                "attributed": self.ctld_attributed,
                "attributed_user": MEASURE_USER[0] if MEASURE_USER else None,
                "phase": best.phase.ctld,
                "net": round(self.ctld_net, 2),
            },
            "slurmdbd": {"phase": best.phase.dbd, "net": round(self.dbd_net, 2)},
            "runs": [
                {
                    "seconds": {"overhead": round(r.overhead.seconds, 3), "phase": round(r.phase.seconds, 3), "control": round(r.control.seconds, 3)},
                    "slurmctld": {
                        "overhead": r.overhead.ctld,
                        "phase": r.phase.ctld,
                        "control": r.control.ctld,
                        "attributed": {"phase": r.phase.ctld_user, "control": r.control.ctld_user},
                    },
                    "slurmdbd": {"overhead": r.overhead.dbd, "phase": r.phase.dbd, "control": r.control.dbd},
                }
                for r in self.runs
            ],
        }


def measure_once(
    fn: Callable[[], Any], *, min_control: float = 3.0, attempts: int = 3, before: Callable[[], None] | None = None
) -> Run:
    """Measure the readings' overhead, then ``fn``, then an idle control; retry on a counter reset.

    ``before`` runs ahead of each attempt (to reset what ``fn`` counts by itself).
    """
    for attempt in range(1, attempts + 1):
        try:
            overhead = timed_interval(lambda: None)
            if before is not None:
                before()
            phase = timed_interval(fn)
            control_seconds = max(phase.seconds, min_control)
            control = timed_interval(lambda: time.sleep(control_seconds))
            return Run(overhead, phase, control)
        except CounterReset:
            if attempt == attempts:
                raise
            time.sleep(2.0)
    raise AssertionError("unreachable")


def measure(
    fn: Callable[[], Any],
    *,
    repeats: int = 1,
    min_control: float = 3.0,
    before: Callable[[], None] | None = None,
) -> Measured:
    """``measure_once`` up to ``repeats`` times (see Measured for how the runs combine).

    Stops early once two runs saw identical phase and control counters (nothing else was going
    on) or a phase saw no slurmctld RPC at all.
    """
    runs: list[Run] = []
    for _ in range(max(1, repeats)):
        run = measure_once(fn, min_control=min_control, before=before)
        runs.append(run)
        quiet = any(r.phase.ctld == run.phase.ctld and not r.control.ctld and not run.control.ctld for r in runs[:-1])
        if run.phase.ctld_total == 0 or quiet:
            break
    return Measured(runs)


def run_attributed(
    argv: Sequence[str],
    *,
    timeout: float,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
    **kwargs: Any,
) -> str:
    """gateway.process.run_command, but slurmctld queries run as MEASURE_USER (see module doc)."""
    if MEASURE_USER is None or Path(argv[0]).name not in CTLD_QUERY_COMMANDS:
        return run_command(argv, timeout=timeout, input=input, env=env, merge_stderr=merge_stderr, **kwargs)
    _, uid, gid = MEASURE_USER
    # From /: nobody may not be allowed into the caller's directory (so a cwd keyword is not passed on).
    return run_command(argv, timeout=timeout, input=input, env=env, merge_stderr=merge_stderr, cwd="/", run_as=(uid, gid))


class CountingRunner:
    """A gateway ``Runner`` that runs the real command (slurmctld queries attributed) and counts it."""

    def __init__(self, inner: Callable[..., str] = run_attributed) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> str:
        with self._lock:
            self.counts[argv[0]] += 1
        return self._inner(argv, **kwargs)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def session_cpu_seconds(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session ``sid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values) - idle) / ticks, sum(values) / ticks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HEAD_NAME, 0))  # where the benchmarks' gateways listen: the nodes reach it
        return int(sock.getsockname()[1])


def row(
    group: str,
    metric: str,
    value: float,
    *,
    unit: str = "",
    goal: tuple[str, float] | None = None,
    baseline: float | None = None,
    baseline_label: str = "",
    note: str = "",
) -> dict[str, Any]:
    """One line of the report. ``goal`` is (op, threshold) with op one of <=, <, >=, >."""
    return {
        "group": group,
        "metric": metric,
        "value": value,
        "unit": unit,
        "goal": list(goal) if goal else None,
        "baseline": baseline,
        "baseline_label": baseline_label,
        "note": note,
    }


_OPS: Mapping[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
}


def goal_met(value: float, goal: Sequence[Any] | None) -> bool | None:
    if not goal or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    op, threshold = goal
    return _OPS[op](float(value), float(threshold))


def ratio_text(value: float, baseline: float | None, goal: Sequence[Any] | None) -> str:
    """How many times better than the baseline: baseline/value for costs, value/baseline for rates."""
    if baseline is None:
        return ""
    higher_is_better = bool(goal) and goal[0] in (">=", ">")
    num, den = (value, baseline) if higher_is_better else (baseline, value)
    if den <= 0:
        return "∞" if num > 0 else "="
    return f"{num / den:,.0f}×" if num / den >= 10 else f"{num / den:.1f}×"


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != 0 else "0"
    return str(value)


@dataclass
class Context:
    """What the driver hands every benchmark."""

    quick: bool = False
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


def bench_gateway_config(state: Path, endpoint: str, **extra: Any) -> dict[str, Any]:
    """A benchmark gateway's config: config/local.toml with its own state dir, store and roots."""
    from gateway.config import build_config

    config = build_config(environ={"GATEWAY_CONFIG": str(ROOT / "config" / "local.toml")})
    config.update(
        {
            "PATHS_STATE_DIR": str(state),
            "PATHS_WORKSPACE_ROOT": str(state / "workspaces"),
            "PATHS_LOG_ROOT": str(state / "logs"),
            "STORE_DATABASE_URL": f"sqlite:///{state / 'gateway.sqlite'}",
            "S3_ENDPOINT_URL": endpoint,
            **extra,
        }
    )
    return config


def remove_s3_prefix(storage: Any, bucket: str, prefix: str) -> None:
    """Delete every object under ``prefix`` (a benchmark's own objects, at its end)."""
    for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            storage.client.delete_object(Bucket=bucket, Key=item["Key"])


def restore_environment(saved: Mapping[str, str | None]) -> None:
    """Put back the variables a benchmark changed (None: it was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def follow_job(http: Any, url: str, job_id: str, started: float, what: str = "", timeout: float = 300) -> tuple[dict[str, Any], list[tuple[float, str]], float]:
    """Poll a job to its end: its final record, each status change the client saw (seconds after
    ``started``, a perf_counter reading) and the wall time; RuntimeError unless it succeeded."""
    from gateway.jobs.states import TERMINAL_VALUES

    prefix = f"{what}: " if what else ""
    seen: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        current = http.get(f"{url}/v1/relion/jobs/{job_id}", timeout=30).json()
        if not seen or seen[-1][1] != current["status"]:
            seen.append((round(time.perf_counter() - started, 2), current["status"]))
        if current["status"] in TERMINAL_VALUES:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{prefix}{job_id} still {current['status']} after the deadline")
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if current["status"] != "succeeded":
        raise RuntimeError(f"{prefix}{job_id} ended {current['status']}: {current.get('message')}")
    return current, seen, wall


def held_templates(directory: Path) -> Path:
    """The project's sbatch templates with ``#SBATCH --hold`` added: jobs Slurm queues but never starts."""
    directory.mkdir()
    for source in sorted((ROOT / "templates" / "sbatch").glob("*.j2")):
        lines = source.read_text().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH --job-name="))
        lines.insert(at + 1, "#SBATCH --hold\n")
        (directory / source.name).write_text("".join(lines))
    return directory


def wait_serving(base: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    """Until a served gateway answers /healthz; RuntimeError with its log's end if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not answer in {timeout:.0f} s: {log_path.read_text(errors='replace')[-2000:]}")
