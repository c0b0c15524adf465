"""Health, readiness, Prometheus metrics and JSON logs.

Metrics use prometheus_client; under gunicorn (several worker processes) its multiprocess mode
is used, with PROMETHEUS_MULTIPROC_DIR set by `relion-gateway serve` before any metric exists.
Jobs by state are read from the store at scrape time, so every worker reports the same truth.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.process import CommandError, Runner, run_command
from gateway.storage.s3 import make_s3_client

log = logging.getLogger(__name__)

# /readyz is public (load balancers probe it without a token), so it answers from a result at most
# this old: a flood of probes costs each process one store query, one Slurm ping and one S3 call
# per TTL, not one per request. Short enough for a balancer to see an outage within seconds.
READINESS_TTL_S = 5.0

SUBMITS = Counter("relion_gateway_submits_total", "Job submissions by mode and outcome", ["mode", "outcome"])
POLL_CYCLE = Histogram(
    "relion_gateway_poll_cycle_seconds", "Duration of one poller cycle", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
)
POLL_ERRORS = Counter("relion_gateway_poll_errors_total", "Poller cycles that failed (Slurm unreachable)")
SLURM_LATENCY = Histogram(
    "relion_gateway_slurm_command_seconds",
    "Latency of Slurm commands by program",
    ["command"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SLURM_ERRORS = Counter("relion_gateway_slurm_command_errors_total", "Slurm commands that failed, by program", ["command"])


def instrumented(runner: Runner = run_command) -> Runner:
    """Wrap a command runner so each Slurm command's latency and failures are counted."""

    def run(argv: Sequence[str], *, timeout: float, input: str | None = None, env: Mapping[str, str] | None = None, merge_stderr: bool = False) -> str:
        name = os.path.basename(argv[0]) if argv else "?"
        started = time.monotonic()
        try:
            return runner(argv, timeout=timeout, input=input, env=env, merge_stderr=merge_stderr)
        except CommandError:
            SLURM_ERRORS.labels(name).inc()
            raise
        finally:
            SLURM_LATENCY.labels(name).observe(time.monotonic() - started)

    return run


class JobsByStateCollector(Collector):
    """`relion_gateway_jobs{state=...}`, counted in the store when scraped."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from gateway.database import jobs_table

        gauge = GaugeMetricFamily("relion_gateway_jobs", "Jobs in the store by gateway state", labels=["state"])
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)).all()
        for state, count in rows:
            gauge.add_metric([state], count)
        yield gauge


def render_metrics(engine: sa.Engine) -> bytes:
    """The Prometheus text exposition for this deployment."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        # Only the gateway's own metrics (they also live in the default registry).
        for collector in (SUBMITS, POLL_CYCLE, POLL_ERRORS, SLURM_LATENCY, SLURM_ERRORS):
            registry.register(collector)
    registry.register(JobsByStateCollector(engine))
    return generate_latest(registry)


_JOB_ID = re.compile(r"\bjob_(?:2d|3d|autorefine)_[A-Za-z0-9._-]+?_[0-9a-f]{8}\b")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a `job_id` field whenever the line is about a job."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        job_id = getattr(record, "job_id", None)
        if job_id is None:
            match = _JOB_ID.search(message)
            job_id = match.group(0) if match else None
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=False)


def configure_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def readiness(service: Any, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """Check what the gateway needs: its store, Slurm (ping), and S3. Never raises."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, probe: Any) -> None:
        started = time.monotonic()
        try:
            ok, detail = probe()
        except Exception as exc:  # a readiness probe reports, it does not crash
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        checks[name] = {"ok": bool(ok), "detail": detail, "seconds": round(time.monotonic() - started, 3)}

    def store() -> tuple[bool, str]:
        with service.store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True, "reachable"

    def slurm() -> tuple[bool, str]:
        return (True, "controller answers") if service.scheduler.ping() else (False, "controller does not answer")

    def s3() -> tuple[bool, str]:
        # A probe client of its own: one attempt, short timeouts (the job client retries for minutes).
        client = make_s3_client(
            service.config["S3_ENDPOINT_URL"], service.config["S3_REGION"], connect_timeout=timeout, read_timeout=timeout, attempts=1
        )
        buckets = service.config["S3_ALLOWED_BUCKETS"]
        if buckets:
            client.head_bucket(Bucket=buckets[0])
            return True, f"bucket {buckets[0]} reachable"
        client.list_buckets()
        return True, "endpoint reachable"

    check("store", store)
    check("slurm", slurm)
    check("s3", s3)
    return checks


class CachedReadiness:
    """``readiness(service)``, run at most once per ``ttl`` seconds in this process.

    Callers arriving while a check runs wait for it and share its result (one check, not one per
    waiting thread); ``clock`` is replaceable for tests.
    """

    def __init__(self, service: Any, ttl: float = READINESS_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._checks: dict[str, dict[str, Any]] | None = None
        self._checked_at = 0.0

    def __call__(self) -> tuple[dict[str, dict[str, Any]], float]:
        """The checks and their age in seconds."""
        with self._lock:
            if self._checks is None or self.clock() - self._checked_at >= self.ttl:
                self._checks = readiness(self.service)
                self._checked_at = self.clock()
            return self._checks, max(0.0, self.clock() - self._checked_at)
