"""What the gateway costs on top of the bare tools: submit latency, submissions/s, end to end.

1. Submit latency: one `POST /v1/relion/jobs` (store the record, render two scripts, two sbatch:
   main + afterany archive) against two bare `sbatch --parsable` calls of the same scripts, and
   against one. Sequential, alternated call by call. Site templates (copies of the packaged ones
   with `#SBATCH --hold`) keep every job pending; all are cancelled.
2. Sustained submissions/s: 4 client threads posting with an admin token and unique
   Idempotency-Keys, against 4 threads running the bare sbatch pairs, blocks alternated (ABBA). The
   gateway's phases (HTTP, auth and schema; validation; rendering; store; sbatch) are timed by
   wrapping JobService, its renderer, its store and the scheduler's runner; sdiag is sampled
   meanwhile (server threads, agent queue, slurmctld's own time per submit RPC).
3. End to end, the tiny 2D job: bare `mpirun -np 2 relion_refine_mpi` in a local copy of the
   dataset against the same job through the gateway (S3 stage-in, Slurm, archive; poller at 1 s),
   alternated (ABBA), with the overhead split by phase from the job's own phase stamps.

The gateways are served in-process (Werkzeug, as tests/integration/conftest.py does) on a temp
state dir with config/local.toml, so the phase timers see the real request path.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from bench.common import (
    Context,
    bench_gateway_config,
    follow_job,
    free_port,
    held_templates,
    machine_cpu_seconds,
    percentile,
    restore_environment,
    row,
)
from gateway import create_app
from gateway.auth import create_token
from gateway.process import run_command
from gateway.relion.dataset import make_dataset
from gateway.relion.flags import normalise_flags
from gateway.relion.presets import TINY_FLAGS
from gateway.slurm.cli import SlurmCliBackend, parse_sbatch_parsable
from gateway.stack.nodes import HEAD_NAME
from gateway.storage.s3 import S3Location, S3Storage, make_s3_client

NAME = "overhead"
TITLE = "Gateway overhead: submit latency, submissions/s, end-to-end tiny 2D"

PLACEHOLDER_ID = "424242424242"  # the main job's id in a pre-rendered archive script
TERMINAL = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "submit_failed", "archive_failed", "lost"}
SDIAG_GAUGES = {
    "server_threads": re.compile(r"^Server thread count:\s+(\d+)", re.M),
    "agent_queue": re.compile(r"^Agent queue size:\s+(\d+)", re.M),
    "agent_threads": re.compile(r"^Agent thread count:\s+(\d+)", re.M),
    "dbd_agent_queue": re.compile(r"^DBD Agent queue size:\s+(\d+)", re.M),
}
SUBMIT_RPC = re.compile(r"^\s+REQUEST_SUBMIT_BATCH_JOB\s+\(\s*\d+\)\s+count:(\d+)\s+ave_time:(\d+)\s+total_time:(\d+)", re.M)
SINCE = re.compile(r"^Data since\s+.*\((\d+)\)", re.M)
DAEMONS = ("slurmctld", "munged", "slurmdbd", "mariadbd")
# Share-of-time categories, in report order.
PHASES = ("sbatch", "store", "validate", "render", "submit other", "http", "client+io")


# -- timing helpers ----------------------------------------------------------------------------


class PhaseTimers:
    """Inclusive and exclusive seconds per named phase; nested phases are charged to the inner one."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.exclusive: dict[str, float] = defaultdict(float)
        self.inclusive: dict[str, float] = defaultdict(float)
        self.cpu_exclusive: dict[str, float] = defaultdict(float)  # this thread's CPU (time.thread_time)
        self.cpu_inclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        frame = [time.perf_counter(), 0.0, time.thread_time(), 0.0]
        stack.append(frame)
        try:
            yield
        finally:
            stack.pop()
            total = time.perf_counter() - frame[0]
            cpu = time.thread_time() - frame[2]
            if stack:
                stack[-1][1] += total
                stack[-1][3] += cpu
            with self._lock:
                self.exclusive[name] += total - frame[1]
                self.inclusive[name] += total
                self.cpu_exclusive[name] += cpu - frame[3]
                self.cpu_inclusive[name] += cpu
                self.calls[name] += 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapper

    def reset(self) -> None:
        with self._lock:
            for table in (self.exclusive, self.inclusive, self.cpu_exclusive, self.cpu_inclusive, self.calls):
                table.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                "exclusive": dict(self.exclusive),
                "inclusive": dict(self.inclusive),
                "cpu_exclusive": dict(self.cpu_exclusive),
                "cpu_inclusive": dict(self.cpu_inclusive),
                "calls": dict(self.calls),
            }


def add_snapshots(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind in ("exclusive", "inclusive", "cpu_exclusive", "cpu_inclusive", "calls"):
        keys = set(a.get(kind, {})) | set(b.get(kind, {}))
        out[kind] = {k: a.get(kind, {}).get(k, 0) + b.get(kind, {}).get(k, 0) for k in keys}
    return out


def phase_breakdown(snap: dict[str, dict[str, float]], latency_sum: float, count: int) -> dict[str, Any]:
    """Milliseconds per submission and share of the client-seen latency, per phase category."""
    exclusive = snap["exclusive"]
    per: dict[str, float] = defaultdict(float)
    for name, seconds in exclusive.items():
        category = "store" if name.startswith("store:") else name
        per[category] += seconds
    per["client+io"] = max(0.0, latency_sum - snap["inclusive"].get("http", 0.0))
    total = sum(per[p] for p in PHASES) or 1.0
    cpu: dict[str, float] = defaultdict(float)
    for name, seconds in snap.get("cpu_exclusive", {}).items():
        cpu["store" if name.startswith("store:") else name] += seconds
    return {
        "server_cpu_ms_per_submission": {p: round(cpu[p] / count * 1000, 2) for p in PHASES if p != "client+io"},
        "server_cpu_ms_total": round(snap.get("cpu_inclusive", {}).get("http", 0.0) / count * 1000, 2),
        "ms_per_submission": {p: round(per[p] / count * 1000, 2) for p in PHASES},
        "share": {p: round(per[p] / total, 4) for p in PHASES},
        "store_ms_per_submission": {
            k.removeprefix("store:"): round(v / count * 1000, 2) for k, v in sorted(exclusive.items()) if k.startswith("store:")
        },
        "calls_per_submission": {k: round(v / count, 2) for k, v in sorted(snap["calls"].items())},
        "latency_ms_per_submission": round(latency_sum / count * 1000, 2),
    }


def daemon_pids() -> dict[str, list[int]]:
    pids: dict[str, list[int]] = defaultdict(list)
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in DAEMONS:
            pids[name].append(int(comm.parent.name))
    return pids


def pids_cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, numbers in pids.items():
        total = 0
        for pid in numbers:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError):
                continue
        out[name] = total / ticks
    return out


def sdiag_text() -> str:
    return subprocess.run(["sdiag"], capture_output=True, text=True, timeout=30, check=True).stdout


def submit_rpc(text: str) -> tuple[int | None, int, int]:
    """(data since, REQUEST_SUBMIT_BATCH_JOB count, total microseconds)."""
    since = SINCE.search(text)
    match = SUBMIT_RPC.search(text)
    count, total = (int(match.group(1)), int(match.group(3))) if match else (0, 0)
    return (int(since.group(1)) if since else None), count, total


class SdiagSampler:
    """sdiag every ``interval`` seconds in a thread: the highest server thread count and queues."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.maxima: dict[str, int] = {k: 0 for k in SDIAG_GAUGES}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                text = sdiag_text()
            except (subprocess.SubprocessError, OSError):
                text = ""
            for key, pattern in SDIAG_GAUGES.items():
                if match := pattern.search(text):
                    self.maxima[key] = max(self.maxima[key], int(match.group(1)))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "SdiagSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class CpuWindow:
    """Machine CPU over a window, and the share other processes took (not this process, its children
    or the Slurm/munge/MariaDB daemons; ``extra_s`` adds CPU known to be ours, e.g. a Slurm job's)."""

    def __enter__(self) -> "CpuWindow":
        self.pids = daemon_pids()
        self.daemons0 = pids_cpu_seconds(self.pids)
        self.children0 = _children_cpu()
        self.own0 = time.process_time()
        self.busy0, self.all0 = machine_cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        busy1, all1 = machine_cpu_seconds()
        self.busy = busy1 - self.busy0
        self.all = all1 - self.all0
        self.own = time.process_time() - self.own0
        self.children = _children_cpu() - self.children0
        self.daemons = sum(pids_cpu_seconds(self.pids).values()) - sum(self.daemons0.values())

    def figures(self, extra_s: float = 0.0) -> dict[str, float]:
        if self.all <= 0:
            return {"machine_busy_share": 0.0, "others_cpu_share": 0.0}
        others = max(0.0, self.busy - self.own - self.children - self.daemons - extra_s)
        return {"machine_busy_share": round(self.busy / self.all, 3), "others_cpu_share": round(others / self.all, 3)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def slurm_cpu_seconds(text: str | None) -> float:
    """sacct's TotalCPU ([DD-][HH:]MM:SS[.mmm]) in seconds; 0 when absent."""
    if not text:
        return 0.0
    days, _, rest = text.rpartition("-")
    parts = [float(x) for x in rest.split(":")]
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds + (int(days) * 86400 if days else 0)


def _epoch(stamp: str) -> float:
    """sacct's local ISO time (whole seconds) as an epoch."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").timestamp()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, ctx: Context) -> None:
        from gateway.stack import stack_status

        self.ctx = ctx
        self.quick = ctx.quick
        self.tag = secrets.token_hex(4)
        self.tmp = Path(tempfile.mkdtemp(prefix="relion-gateway-bench-overhead-", dir="/var/tmp"))
        self.tmp.chmod(0o711)  # jobs run as another account ([job] run_as) and must reach their dirs below
        self.status = stack_status()
        if not self.status.get("all_up"):
            raise RuntimeError("the stack is not up: run `relion-gateway stack up` first")
        self.bucket = str(self.status["s3"]["bucket"])
        self.endpoint = str(self.status["s3"]["endpoint_url"])
        self.prefix = f"bench/overhead-{self.tag}"
        # S3 keys for this process (boto3) and, through sbatch's --export=ALL, for the jobs.
        env = {k: v for k, v in self.status["environment"].items() if not k.startswith("GATEWAY_")}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.storage = S3Storage(make_s3_client(self.endpoint, str(self.status["s3"]["region"])))
        self._ids_lock = threading.Lock()
        self.slurm_ids: list[str] = []  # every Slurm job this benchmark submitted and has not cancelled
        self.all_ids = 0
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # -- set-up --------------------------------------------------------------------------------

    def config(self, state: Path, **extra: Any) -> dict[str, Any]:
        config = bench_gateway_config(state, self.endpoint, **{"SERVER_PUBLIC_URL": "", **extra})
        return config

    def request(self) -> dict[str, Any]:
        return {
            "user_id": "bench",
            "workspace_id": "overhead",
            "dataset_s3_url": f"s3://{self.bucket}/{self.prefix}/tiny.tar.gz",
            "output_s3_prefix": f"s3://{self.bucket}/{self.prefix}/results",
            "mode": "2d",
            "num_mpi": 2,
            "flags": dict(TINY_FLAGS["2d"]),
        }

    def serve(self, config: dict[str, Any], **kwargs: Any) -> tuple[Any, Any, str, requests.Session]:
        port = free_port()
        # The head's name: jobs on the compute nodes send their signed events here (never loopback).
        url = f"http://{HEAD_NAME}:{port}"
        config["SERVER_PUBLIC_URL"] = url
        app = create_app(config, **kwargs)
        server = make_server(HEAD_NAME, port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        store = app.extensions["relion_gateway"].store
        self.token = create_token(store, "bench-overhead", admin=True, n=int(config["AUTH_SCRYPT_N"]))[1]
        return app, server, url, self.session()

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def track(self, slurm_id: str) -> None:
        with self._ids_lock:
            self.slurm_ids.append(slurm_id)
            self.all_ids += 1

    def cancel_all(self) -> None:
        with self._ids_lock:
            ids, self.slurm_ids = self.slurm_ids, []
        for start in range(0, len(ids), 200):
            subprocess.run(["scancel", *ids[start:start + 200]], capture_output=True, timeout=120)

    def sbatch(self, script: str) -> str:
        """A bare sbatch, as a portal would run it: the script on stdin, --parsable."""
        slurm_id = parse_sbatch_parsable(run_command(["sbatch", "--parsable"], timeout=60, input=script))
        self.track(slurm_id)
        return slurm_id

    def close(self) -> None:
        self.cancel_all()
        try:
            paginator = self.storage.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
                for item in page.get("Contents", []):
                    self.storage.client.delete_object(Bucket=self.bucket, Key=item["Key"])
        except Exception as exc:  # cleanup must not hide the result
            self.notes.append(f"could not remove s3://{self.bucket}/{self.prefix}/: {exc}")
        restore_environment(self._saved_env)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- parts 1 and 2: held jobs ---------------------------------------------------------------

    def held_gateway(self) -> None:
        templates = held_templates(self.tmp / "held-templates")
        config = self.config(
            self.tmp / "held-state",
            PATHS_TEMPLATE_DIR=str(templates),
            POLLER_ENABLED=False,
            # The per-user quotas stay on (their store queries are part of a submit) but out of reach.
            LIMITS_SUBMISSIONS_PER_MINUTE=1_000_000,
            LIMITS_MAX_ACTIVE_JOBS=1_000_000,
        )
        self.timers = timers = PhaseTimers()
        bench = self

        def runner(argv: Any, **kwargs: Any) -> str:
            with timers.phase("sbatch" if Path(argv[0]).name == "sbatch" else f"slurm {Path(argv[0]).name}"):
                out = run_command(argv, **kwargs)
            if Path(argv[0]).name == "sbatch" and "--parsable" in argv:
                bench.track(parse_sbatch_parsable(out))
            return out

        scheduler = SlurmCliBackend(runner=runner, timeout=float(config["SLURM_COMMAND_TIMEOUT"]))
        app, self.server, url, self.http = self.serve(config, scheduler=scheduler)
        self.jobs_url = f"{url}/v1/relion/jobs"
        service = app.extensions["relion_gateway"]
        # Equivalent scripts for the bare baseline: the gateway's own rendering of the same request.
        prepared = service.prepare(self.request())
        self.main_script = prepared.main_script
        self.archive_script = service.render_archive(prepared, PLACEHOLDER_ID)
        if "#SBATCH --hold" not in self.main_script or "#SBATCH --hold" not in self.archive_script:
            raise RuntimeError("the held site templates were not used")
        # Phase timers around the submit path (nested phases are charged to the innermost).
        app.wsgi_app = timers.wrap("http", app.wsgi_app)
        service.submit = timers.wrap("submit other", service.submit)
        service.prepare = timers.wrap("validate", service.prepare)
        service.renderer.render = timers.wrap("render", service.renderer.render)
        store = service.store
        for name in ("insert", "update", "get", "find_by_idempotency_key", "count_active", "accepted_since",
                     "claim_submission", "get_token", "touch_token"):
            setattr(store, name, timers.wrap(f"store:{name}", getattr(store, name)))

    def gateway_submit(self, session: requests.Session) -> float:
        started = time.perf_counter()
        response = session.post(self.jobs_url, json=self.request(), headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=120)
        elapsed = time.perf_counter() - started
        body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        if response.status_code != 202 or body.get("status") != "queued" or not body.get("slurm", {}).get("archive_job_id"):
            raise RuntimeError(f"submit failed: {response.status_code} {response.text[:300]}")
        return elapsed

    def bare_pair(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        main_id = self.sbatch(self.main_script)
        t1 = time.perf_counter()
        self.sbatch(self.archive_script.replace(PLACEHOLDER_ID, main_id))
        return t1 - t0, time.perf_counter() - t1

    def latency(self) -> None:
        n = 8 if self.quick else 30
        for _ in range(2):  # warm-up: imports, scrypt's first token check, connections
            self.gateway_submit(self.http)
            self.bare_pair()
        self.cancel_all()
        self.timers.reset()
        gateway: list[float] = []
        mains: list[float] = []
        archives: list[float] = []
        window = CpuWindow().__enter__()
        for i in range(n):
            steps = ["gateway", "bare"] if i % 2 == 0 else ["bare", "gateway"]
            for step in steps:
                if step == "gateway":
                    gateway.append(self.gateway_submit(self.http))
                else:
                    main_s, archive_s = self.bare_pair()
                    mains.append(main_s)
                    archives.append(archive_s)
        window.__exit__()
        phases = phase_breakdown(self.timers.snapshot(), sum(gateway), n)
        self.cancel_all()
        # sbatch's own start-up (no RPC): the floor of any sbatch call on this machine.
        version = []
        for _ in range(5):
            started = time.perf_counter()
            run_command(["sbatch", "--version"], timeout=30)
            version.append(time.perf_counter() - started)
        pairs = [m + a for m, a in zip(mains, archives)]
        self.latency_result = result = {
            "submissions": n,
            "gateway_ms": {"median": median(gateway) * 1000, "p95": percentile(gateway, 95) * 1000, "all": [round(x * 1000, 2) for x in gateway]},
            "bare_pair_ms": {"median": median(pairs) * 1000, "p95": percentile(pairs, 95) * 1000, "all": [round(x * 1000, 2) for x in pairs]},
            "bare_main_sbatch_ms": {"median": median(mains) * 1000, "p95": percentile(mains, 95) * 1000},
            "bare_archive_sbatch_ms": {"median": median(archives) * 1000, "p95": percentile(archives, 95) * 1000},
            "sbatch_version_ms": {"median": median(version) * 1000},
            "phases": phases,
            **window.figures(),
        }
        self.details["submit_latency"] = result

    def concurrent(self, fn: Callable[[requests.Session | None], float], count: int, threads: int, use_session: bool) -> dict[str, Any]:
        counter = itertools.count()
        lock = threading.Lock()
        latencies: list[float] = []
        errors: list[str] = []
        client_cpu = [0.0]

        def worker() -> None:
            cpu0 = time.thread_time()
            session = self.session() if use_session else None
            mine = []
            while True:
                with lock:
                    index = next(counter)
                if index >= count:
                    break
                try:
                    mine.append(fn(session))
                except Exception as exc:  # counted and reported, never silently dropped
                    with lock:
                        errors.append(str(exc)[:300])
            with lock:
                latencies.extend(mine)
                client_cpu[0] += time.thread_time() - cpu0

        pids = daemon_pids()
        before = submit_rpc(sdiag_text())
        daemons0 = pids_cpu_seconds(pids)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own0 = time.process_time()
        busy0, all0 = machine_cpu_seconds()
        workers = [threading.Thread(target=worker) for _ in range(threads)]
        with SdiagSampler() as sampler:
            started = time.perf_counter()
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join()
            wall = time.perf_counter() - started
        busy1, all1 = machine_cpu_seconds()
        own = time.process_time() - own0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        daemons = {k: v - daemons0.get(k, 0.0) for k, v in pids_cpu_seconds(pids).items()}
        after = submit_rpc(sdiag_text())
        rpc = None
        if before[0] == after[0] and after[1] >= before[1]:
            calls = after[1] - before[1]
            rpc = {"submit_rpcs": calls, "slurmctld_ms_per_submit_rpc": (after[2] - before[2]) / calls / 1000 if calls else None}
        machine = (busy1 - busy0) / (all1 - all0) if all1 > all0 else 0.0
        accounted = own + children + sum(daemons.values())
        return {
            "count": count,
            "ok": len(latencies),
            "errors": len(errors),
            "first_errors": errors[:3],
            "seconds": wall,
            "latency_sum": sum(latencies),
            "latency_p50_ms": percentile(latencies, 50) * 1000,
            "latency_p95_ms": percentile(latencies, 95) * 1000,
            "cpu_s": {"this_process": round(own, 3), "client_threads": round(client_cpu[0], 3), "children (sbatch, sdiag)": round(children, 3),
                      **{k: round(v, 3) for k, v in daemons.items()}},
            "machine_busy_share": round(machine, 3),
            "others_cpu_share": round(max(0.0, (busy1 - busy0) - accounted) / (all1 - all0), 3) if all1 > all0 else 0.0,
            "sdiag_max": dict(sampler.maxima),
            "sdiag_samples": sampler.samples,
            "sdiag_submit": rpc,
        }

    def throughput(self) -> None:
        threads = 4
        total = 20 if self.quick else 100
        plan = [("gateway", total), ("bare", total)] if self.quick else [
            ("gateway", total // 2), ("bare", total // 2), ("bare", total - total // 2), ("gateway", total - total // 2)
        ]
        blocks: list[dict[str, Any]] = []
        timer_sum: dict[str, dict[str, float]] = {}
        for kind, count in plan:
            self.timers.reset()
            if kind == "gateway":
                stats = self.concurrent(lambda s: self.gateway_submit(s), count, threads, use_session=True)  # type: ignore[arg-type]
                timer_sum = add_snapshots(timer_sum, self.timers.snapshot())
            else:
                stats = self.concurrent(lambda _s: sum(self.bare_pair()), count, threads, use_session=False)
            self.cancel_all()  # between blocks, so both see the same (empty) queue
            if stats["errors"]:
                raise RuntimeError(f"{kind}: {stats['errors']} of {count} submissions failed: {stats['first_errors']}")
            blocks.append({"kind": kind, **stats})
            self.ctx.log(f"    {kind:7s} {count} submissions, {threads} threads: {count / stats['seconds']:.1f}/s")

        def combine(kind: str) -> dict[str, Any]:
            chosen = [b for b in blocks if b["kind"] == kind]
            count = sum(b["count"] for b in chosen)
            seconds = sum(b["seconds"] for b in chosen)
            maxima = {k: max(b["sdiag_max"][k] for b in chosen) for k in SDIAG_GAUGES}
            rpcs = [b["sdiag_submit"] for b in chosen if b["sdiag_submit"] and b["sdiag_submit"]["slurmctld_ms_per_submit_rpc"] is not None]
            cpu: dict[str, float] = defaultdict(float)
            for b in chosen:
                for k, v in b["cpu_s"].items():
                    cpu[k] += v
            return {
                "count": count,
                "seconds": seconds,
                "per_second": count / seconds,
                "latency_sum": sum(b["latency_sum"] for b in chosen),
                "sdiag_max": maxima,
                "slurmctld_ms_per_submit_rpc": (
                    sum(r["slurmctld_ms_per_submit_rpc"] * r["submit_rpcs"] for r in rpcs) / sum(r["submit_rpcs"] for r in rpcs)
                    if rpcs and sum(r["submit_rpcs"] for r in rpcs) else None
                ),
                "cpu_ms_per_submission": {k: round(v / count * 1000, 2) for k, v in cpu.items()},
                "machine_busy_share": round(statistics.mean(b["machine_busy_share"] for b in chosen), 3),
                "others_cpu_share": round(statistics.mean(b["others_cpu_share"] for b in chosen), 3),
            }

        gateway, bare = combine("gateway"), combine("bare")
        gateway["phases"] = phase_breakdown(timer_sum, gateway["latency_sum"], gateway["count"])
        for figures in (gateway, bare):
            figures["cpu"] = cpu_summary(figures, figures.get("phases"))
        self.throughput_result = {"threads": threads, "plan": [f"{k} {c}" for k, c in plan], "gateway": gateway, "bare_pairs": bare, "blocks": blocks}
        self.details["throughput"] = self.throughput_result

    # -- part 3: end to end ---------------------------------------------------------------------

    def end_to_end(self) -> None:
        data = self.tmp / "data" / "tiny"
        data.parent.mkdir()
        tarball = make_dataset(data)
        self.storage.upload_file(str(tarball), S3Location(self.bucket, f"{self.prefix}/tiny.tar.gz"))
        config = self.config(
            self.tmp / "e2e-state",
            POLLER_INTERVAL_ACTIVE=1.0,
            POLLER_INTERVAL_QUEUED=1.0,
            POLLER_INTERVAL_IDLE=2.0,
        )
        app, server, url, http = self.serve(config, storage=self.storage)
        self.e2e_log_root = Path(config["PATHS_LOG_ROOT"])
        order = ["bare", "gateway"] if self.quick else ["bare", "gateway", "gateway", "bare"]
        runs: list[dict[str, Any]] = []
        try:
            for index, kind in enumerate(order):
                with CpuWindow() as window:
                    result = self.bare_run(data, index) if kind == "bare" else self.gateway_run(http, url)
                # The Slurm jobs' CPU is ours too (sacct TotalCPU of main and archive).
                result.update(window.figures(extra_s=result.get("jobs_cpu_s", 0.0)))
                runs.append({"kind": kind, **result})
                self.ctx.log(f"    {kind:7s} tiny 2D: {result['wall_s']:.1f} s")
        finally:
            app.extensions["relion_gateway_poller"].stop()
            server.shutdown()
        self.e2e_runs = runs
        self.details["end_to_end"] = {"order": order, "runs": runs}

    def bare_run(self, data: Path, index: int) -> dict[str, Any]:
        work = self.tmp / f"bare-{index}"
        shutil.copytree(data, work)
        flags = normalise_flags(TINY_FLAGS["2d"])
        (work / flags.output_dir).mkdir(parents=True, exist_ok=True)
        argv = ["mpirun", "--allow-run-as-root", "-np", "2", "relion_refine_mpi", *flags.argv()]
        env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        with open(work / "relion.log", "wb") as log_file:
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            completed = subprocess.run(argv, cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=600)
            wall = time.perf_counter() - started
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        model = work / f"{flags.output_prefix}_it{int(TINY_FLAGS['2d']['iter']):03d}_model.star"
        if completed.returncode != 0 or not model.exists():
            raise RuntimeError(f"bare relion_refine_mpi failed ({completed.returncode}): {(work / 'relion.log').read_text()[-1500:]}")
        cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        shutil.rmtree(work, ignore_errors=True)
        return {"wall_s": wall, "relion_cpu_s": round(cpu, 2), "command": " ".join(argv)}

    def gateway_run(self, http: requests.Session, url: str) -> dict[str, Any]:
        t_post = time.time()
        started = time.perf_counter()
        response = http.post(f"{url}/v1/relion/jobs", json=self.request(), headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=120)
        submit_s = time.perf_counter() - started
        if response.status_code != 202:
            raise RuntimeError(f"submit failed: {response.status_code} {response.text[:300]}")
        job = response.json()
        job_id = job["job_id"]
        for key in ("main_job_id", "archive_job_id"):
            if job["slurm"].get(key):
                self.track(job["slurm"][key])
        current, seen, wall = follow_job(http, url, job_id, started, "")
        log_dir = self.e2e_log_root / "bench" / job_id
        stamps = dict((name, float(stamp)) for name, stamp in (line.split() for line in (log_dir / "phases").read_text().splitlines() if line.strip()))
        metadata_path = log_dir / "metadata.json"
        metadata = json.loads(metadata_path.read_text())
        timings = metadata["timings"]
        archive_end = metadata_path.stat().st_mtime
        archive_start = archive_end - float(timings["archiving"])
        t_seen = t_post + wall
        split = {
            "submit + Slurm start (POST -> staging)": stamps["staging"] - t_post,
            "stage-in (S3)": stamps["running"] - stamps["staging"],
            "RELION under Slurm": stamps["finished"] - stamps["running"],
            "hook start (main end -> archive running)": archive_start - stamps["finished"],
            "archive": float(timings["archiving"]),
            "completion (archive done -> client sees succeeded)": t_seen - archive_end,
        }
        main_id, archive_id = job["slurm"]["main_job_id"], job["slurm"]["archive_job_id"]
        sacct = subprocess.run(
            ["sacct", "-n", "-P", "-j", f"{main_id},{archive_id}", "-o", "JobID,JobName,Submit,Start,End,Elapsed,State,TotalCPU"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()
        fields = [line.split("|") for line in sacct if line.count("|") == 7]
        # The allocation lines carry no CPU in 22.05; the steps (batch, mpirun's) do.
        jobs_cpu = sum(slurm_cpu_seconds(f[7]) for f in fields if "." in f[0])
        allocations = {f[0]: f for f in fields if "." not in f[0]}
        hook_parts = None  # the hook start split at sacct's whole-second resolution
        if main_id in allocations and archive_id in allocations:
            try:
                main_end, archive_slurm_start = _epoch(allocations[main_id][4]), _epoch(allocations[archive_id][3])
                hook_parts = {
                    "main job teardown (finished stamp -> sacct End)": round(main_end - stamps["finished"], 2),
                    "Slurm (main End -> archive Start)": round(archive_slurm_start - main_end, 2),
                    "archive start-up (Start -> archive step)": round(archive_start - archive_slurm_start, 2),
                }
            except ValueError:
                pass
        return {
            "wall_s": wall,
            "job_id": job_id,
            "slurm": job["slurm"],
            "split_s": {k: round(v, 3) for k, v in split.items()},
            "metadata_timings": timings,
            "submit_s": round(submit_s, 3),
            "status_changes_s": seen,
            "sacct": sacct,
            "jobs_cpu_s": round(jobs_cpu, 2),
            "hook_start_parts_s": hook_parts,
        }

    # -- the report -----------------------------------------------------------------------------

    def report(self) -> None:
        lat = self.latency_result
        g_med, g_p95 = lat["gateway_ms"]["median"], lat["gateway_ms"]["p95"]
        pair_med, pair_p95 = lat["bare_pair_ms"]["median"], lat["bare_pair_ms"]["p95"]
        single = lat["bare_main_sbatch_ms"]["median"]
        seq = lat["phases"]["ms_per_submission"]
        group = "1 submit latency (sequential, held jobs)"
        self.rows += [
            row(group, "POST /v1/relion/jobs, median", g_med, unit="ms", baseline=pair_med, baseline_label="2 bare sbatch: main + afterany",
                note=f"{lat['submissions']} of each, alternated; gateway p95 {g_p95:.0f} ms, bare pair p95 {pair_p95:.0f} ms; "
                f"per-submission phases (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in seq.items())
                + f"; `sbatch --version` alone (process start, no RPC) {lat['sbatch_version_ms']['median']:.1f} ms; other "
                f"processes took {lat['others_cpu_share']:.0%} of the machine's CPU meanwhile"),
            row(group, "POST /v1/relion/jobs, p95", g_p95, unit="ms", baseline=pair_p95, baseline_label="2 bare sbatch: main + afterany"),
            row(group, "POST /v1/relion/jobs, median vs one sbatch", g_med, unit="ms", baseline=single, baseline_label="1 bare sbatch",
                note=f"archive sbatch (with --dependency) median {lat['bare_archive_sbatch_ms']['median']:.1f} ms"),
            row(group, "gateway / (2 x bare sbatch), median", g_med / pair_med, unit="x",
                note=f"2 x the single-sbatch median gives {g_med / (2 * single):.2f}; the gateway adds "
                f"{g_med - pair_med:.0f} ms to the two sbatch calls it makes"),
        ]

        tp = self.throughput_result
        gw, bare = tp["gateway"], tp["bare_pairs"]
        phases = gw["phases"]
        group = f"2 sustained submissions ({tp['threads']} client threads, {gw['count']} jobs)"
        gcpu, bcpu = gw["cpu"], bare["cpu"]
        self.rows += [
            row(group, f"wall per submission (gateway {gw['per_second']:.1f}/s, bare {bare['per_second']:.1f} pairs/s)",
                1000 / gw["per_second"], unit="ms", baseline=1000 / bare["per_second"],
                baseline_label=f"bare sbatch pairs, {tp['threads']} threads",
                note=f"blocks {', '.join(tp['plan'])} (alternated); bare = {2 * bare['per_second']:.1f} sbatch/s; latency p50 "
                f"{statistics.median(b['latency_p50_ms'] for b in tp['blocks'] if b['kind'] == 'gateway'):.0f} ms (gateway), "
                f"{statistics.median(b['latency_p50_ms'] for b in tp['blocks'] if b['kind'] == 'bare'):.0f} ms (bare pair); machine busy "
                f"{gw['machine_busy_share']:.0%} (gateway) / {bare['machine_busy_share']:.0%} (bare), of which other processes "
                f"{gw['others_cpu_share']:.0%} / {bare['others_cpu_share']:.0%}"),
            row(group, "gateway submissions/s / bare pairs/s", gw["per_second"] / bare["per_second"], unit="x"),
            row(group, "CPU per submission, all processes", gcpu["total"], unit="ms", baseline=bcpu["total"],
                baseline_label="bare sbatch pair",
                note=f"gateway: its Python process {gcpu['process']:.1f} ms (server threads {gcpu['server']:.1f}, of which sbatch "
                f"spawning {gcpu['server_sbatch']:.1f}, store {gcpu['server_store']:.1f}; client threads {gcpu['client']:.1f}), "
                f"sbatch processes {gcpu['children']:.1f}, Slurm/munge/MariaDB daemons {gcpu['daemons']:.1f}; bare: this process "
                f"{bcpu['process']:.1f}, sbatch processes {bcpu['children']:.1f}, daemons {bcpu['daemons']:.1f}. "
                f"Ceilings on {os.cpu_count()} cores: all CPU {gcpu['cpu_ceiling']:.0f}/s (gateway) vs {bcpu['cpu_ceiling']:.0f}/s "
                f"(bare); one Python process (client + server) {gcpu['process_ceiling']:.0f}/s, server alone "
                f"{gcpu['server_ceiling']:.0f}/s"),
        ]
        conc = phases["ms_per_submission"]
        shown = {
            "sbatch (2 calls)": ("sbatch",),
            "store (SQLite, incl. token lookup)": ("store",),
            "validation + render": ("validate", "render"),
            "HTTP/auth/schema (Flask) + other submit work": ("http", "submit other"),
            "client + Werkzeug I/O": ("client+io",),
        }
        for label, keys in shown.items():
            self.rows.append(
                row(group, f"share of latency: {label}", sum(phases["share"][k] for k in keys) * 100, unit="%",
                    note=f"{sum(conc[k] for k in keys):.1f} ms per submission at {tp['threads']} threads vs "
                    f"{sum(seq[k] for k in keys):.1f} ms sequential")
            )
        smax = gw["sdiag_max"]
        rpc_ms = gw["slurmctld_ms_per_submit_rpc"]
        self.rows.append(
            row(group, "slurmctld server threads, max (sdiag)", float(smax["server_threads"]),
                note=f"agent queue max {smax['agent_queue']}, DBD agent queue max {smax['dbd_agent_queue']}, agent threads max "
                f"{smax['agent_threads']} (bare: server threads {bare['sdiag_max']['server_threads']}); slurmctld time per "
                f"REQUEST_SUBMIT_BATCH_JOB {rpc_ms if rpc_ms is None else f'{rpc_ms:.1f}'} ms (sdiag ave over the gateway blocks) "
                f"vs {conc['sbatch'] / 2:.1f} ms per sbatch call seen by the gateway")
        )
        self.bottleneck = bottleneck(phases, seq, gw, bare, rpc_ms)
        self.notes.append("Bottleneck (submissions): " + self.bottleneck)

        runs = self.e2e_runs
        bare_walls = [r["wall_s"] for r in runs if r["kind"] == "bare"]
        gw_runs = [r for r in runs if r["kind"] == "gateway"]
        gw_walls = [r["wall_s"] for r in gw_runs]
        b, g = median(bare_walls), median(gw_walls)
        split = {k: median([r["split_s"][k] for r in gw_runs]) for k in gw_runs[0]["split_s"]}
        relion_bare_delta = split["RELION under Slurm"] - b
        timings = {k: median([r["metadata_timings"][k] for r in gw_runs if r["metadata_timings"][k] is not None])
                   for k in ("queued", "staging", "running", "archiving")}
        group = f"3 tiny 2D end to end ({len(gw_runs)} run{'s' if len(gw_runs) > 1 else ''} each, medians)"
        self.rows += [
            row(group, "wall, POST -> succeeded (poller 1 s)", g, unit="s", baseline=b, baseline_label="bare mpirun -np 2 relion_refine_mpi",
                note="runs " + ", ".join(f"{r['kind']} {r['wall_s']:.1f} s (other processes {r['others_cpu_share']:.0%} of the CPU)" for r in runs) + "; "
                "metadata timings (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items())),
            row(group, "gateway / bare", g / b, unit="x"),
            row(group, "overhead, total", g - b, unit="s"),
        ]
        labels = {
            "submit + Slurm start (POST -> staging)": "overhead: submit + Slurm start (POST -> staging)",
            "stage-in (S3)": "overhead: stage-in from S3",
            "RELION under Slurm": "overhead: RELION in the job - bare",
            "hook start (main end -> archive running)": "overhead: hook start (main end -> archive)",
            "archive": "overhead: archive to S3",
            "completion (archive done -> client sees succeeded)": "overhead: completion seen (poller)",
        }
        for key, label in labels.items():
            value = relion_bare_delta if key == "RELION under Slurm" else split[key]
            note = ""
            if key.startswith("submit"):
                note = (f"the POST itself took {median([r['submit_s'] for r in gw_runs]):.2f} s (the main job may start before "
                        "it returns); staging = the job script's first phase stamp")
            elif key == "RELION under Slurm":
                note = f"RELION ran {split[key]:.2f} s in the job (with the progress watcher) vs {b:.2f} s bare"
            elif key.startswith("completion"):
                note = "metadata upload, workspace removal, the archive job's exit, then the next poll (1 s) and the client's (0.2 s)"
            elif key.startswith("hook"):
                note = ("RELION's last phase stamp to the archive step's start; per run (split with sacct's whole-second "
                        "End/Start, so +-1 s): " + "; ".join(
                            f"{r['split_s'][key]:.1f} s" + (" = " + ", ".join(f"{k} {v:.1f}" for k, v in r["hook_start_parts_s"].items())
                                                            if r.get("hook_start_parts_s") else "")
                            for r in gw_runs))
            self.rows.append(row(group, label, value, unit="s", note=note))
        self.details["summary"] = {
            "submit_latency_ms": {"gateway_median": g_med, "gateway_p95": g_p95, "bare_pair_median": pair_med, "bare_single_median": single},
            "throughput_per_s": {"gateway": gw["per_second"], "bare_pairs": bare["per_second"]},
            "end_to_end_s": {"gateway_median": g, "bare_median": b, "overhead_split_median": split, "relion_minus_bare": relion_bare_delta},
            "bottleneck": self.bottleneck,
        }
        self.notes += [
            "Held jobs: copies of templates/sbatch/*.j2 with `#SBATCH --hold` in a temp [paths] template_dir, so the gateway "
            "renders and submits its real scripts and nothing runs; the bare baseline submits the gateway's own rendering of "
            "the same request (main, then the archive with --dependency=afterany:<main>) with `sbatch --parsable` on stdin. "
            f"{self.all_ids} Slurm jobs were submitted in all and every one was scancelled.",
            "Gateways are served in-process (Werkzeug threaded server, SQLite store in a temp state dir, config/local.toml, an "
            "admin token; per-user quotas raised out of reach but still checked): client threads and server threads share one "
            "Python process and its GIL, so 'client + Werkzeug I/O' includes the client's own cost.",
            "Phase shares are of the summed client-seen latency; phases nest (validation includes neither the render nor the "
            "store, 'other submit work' is what JobService.submit does outside its timed callees).",
            "End to end: the gateway's split comes from the job's own phase stamps (log dir `phases`), metadata.json's "
            "archiving span and mtime, and the client's clock (all on one machine); the runs alternate "
            f"({', '.join(r['kind'] for r in runs)}). The machine is shared (CI may run jobs meanwhile): "
            "read each run's machine busy share before trusting a median.",
        ]


def cpu_summary(figures: dict[str, Any], phases: dict[str, Any] | None) -> dict[str, float]:
    """CPU milliseconds per submission by who spent them, and the rates they allow on this host."""
    cpu = figures["cpu_ms_per_submission"]
    process = cpu.get("this_process", 0.0)
    children = cpu.get("children (sbatch, sdiag)", 0.0)
    daemons = sum(cpu.get(name, 0.0) for name in DAEMONS)
    total = process + children + daemons
    server = phases["server_cpu_ms_total"] if phases else 0.0
    server_cpu = phases["server_cpu_ms_per_submission"] if phases else {}
    cores = os.cpu_count() or 1
    available = cores * max(0.05, 1.0 - figures["others_cpu_share"])
    return {
        "total": round(total, 2),
        "process": round(process, 2),
        "client": round(cpu.get("client_threads", 0.0), 2),
        "server": round(server, 2),
        "server_sbatch": round(server_cpu.get("sbatch", 0.0), 2),
        "server_store": round(server_cpu.get("store", 0.0), 2),
        "children": round(children, 2),
        "daemons": round(daemons, 2),
        "cpu_ceiling": available * 1000 / total if total else float("inf"),
        "process_ceiling": 1000 / process if process else float("inf"),
        "server_ceiling": 1000 / server if server else float("inf"),
    }


def bottleneck(phases: dict[str, Any], seq: dict[str, float], gw: dict[str, Any], bare: dict[str, Any], rpc_ms: float | None) -> str:
    """Say where the submission rate is limited, from the figures (nothing here is assumed)."""
    share = phases["share"]
    conc = phases["ms_per_submission"]
    groups = {
        "sbatch": share["sbatch"],
        "the store": share["store"],
        "validation + render": share["validate"] + share["render"],
        "HTTP/auth/schema": share["http"] + share["submit other"],
        "client + I/O": share["client+io"],
    }
    top = max(groups, key=lambda k: groups[k])
    parts = [
        f"{top} takes the largest share of a submission's latency at 4 threads ({groups[top]:.0%}; "
        + ", ".join(f"{k} {v:.0%}" for k, v in groups.items() if k != top) + ")."
    ]
    growth = {k: conc[k] - seq[k] for k in ("sbatch", "store", "validate", "render", "http", "client+io")}
    grown = max(growth, key=lambda k: growth[k])
    parts.append(
        f"From 1 to 4 threads, {grown} adds the most time per submission ({seq[grown]:.1f} -> {conc[grown]:.1f} ms; "
        + ", ".join(f"{k} {seq[k]:.1f} -> {conc[k]:.1f}" for k in growth if k != grown) + " ms)."
    )
    smax = gw["sdiag_max"]
    # slurmctld serves RPCs with up to 256 threads; a backlog shows as many threads or a growing agent queue.
    saturated = smax["agent_queue"] > 10 or smax["server_threads"] >= 64
    if rpc_ms is not None:
        parts.append(
            f"slurmctld spends {rpc_ms:.1f} ms per submit RPC of the {conc['sbatch'] / 2:.1f} ms an sbatch call takes in the gateway; "
            f"server threads peaked at {smax['server_threads']} (of 256), agent queue {smax['agent_queue']}"
            f" (the DBD agent queue, slurmctld's asynchronous backlog of records for slurmdbd, reached {smax['dbd_agent_queue']}): "
            + ("slurmctld looks saturated." if saturated else
                                             "slurmctld is not saturated; the rest of an sbatch call is the client process "
                                             "(start-up, munge credential, connection).")
        )
    ratio = gw["per_second"] / bare["per_second"]
    busy = gw["machine_busy_share"]
    cpu = gw["cpu"]
    rate = gw["per_second"]
    consumers = {
        "the gateway's Python process (server + in-process client)": cpu["process"],
        "the sbatch processes": cpu["children"],
        "the Slurm/munge/MariaDB daemons": cpu["daemons"],
    }
    biggest = max(consumers, key=lambda k: consumers[k])
    parts.append(
        f"The gateway reaches {ratio:.0%} of the bare sbatch-pair rate; the machine was {busy:.0%} busy during the gateway "
        f"blocks ({gw['others_cpu_share']:.0%} other processes). A submission costs {cpu['total']:.1f} ms of CPU in all, "
        f"which caps the rate at about {cpu['cpu_ceiling']:.0f}/s with the CPU left over; {biggest} spends the most "
        f"({consumers[biggest]:.1f} ms), and one Python process doing {cpu['process']:.1f} ms per submission caps itself at "
        f"{cpu['process_ceiling']:.0f}/s."
    )
    server_cpu = phases["server_cpu_ms_per_submission"]
    heaviest = max(server_cpu, key=lambda k: server_cpu[k])
    extra = cpu["total"] - bare["cpu"]["total"]
    store_calls = sum(v for k, v in phases["calls_per_submission"].items() if k.startswith("store:"))
    ceilings = {
        f"the CPU of this {os.cpu_count()}-core host": cpu["cpu_ceiling"],
        "the gateway's own CPU (one Python process, one GIL)": cpu["process_ceiling"],
    }
    lowest = min(ceilings, key=lambda k: ceilings[k])
    near = [k for k, v in ceilings.items() if v <= 1.15 * ceilings[lowest]]
    cost = (
        f" The gateway spends {extra:.1f} ms more CPU per submission than the bare pair ({cpu['total']:.1f} vs "
        f"{bare['cpu']['total']:.1f} ms); of its server-side {cpu['server']:.1f} ms, {heaviest} takes the most "
        f"({server_cpu[heaviest]:.1f} ms" + (f" for {store_calls:.0f} store calls" if heaviest == "store" else "") + ")."
    )
    if rate >= 0.75 * ceilings[lowest]:
        parts.append(
            f"Verdict: the rate ({rate:.0f}/s) is at {rate / ceilings[lowest]:.0%} of the ceiling set by "
            + (" and ".join(f"{k} (~{ceilings[k]:.0f}/s)" for k in near)) + ("" if saturated else ", not by slurmctld") + "." + cost
        )
    elif busy >= 0.85:
        parts.append(
            f"Verdict: the host's CPU was saturated ({busy:.0%} busy) with {gw['others_cpu_share']:.0%} taken by other "
            f"processes, so the rate ({rate:.0f}/s) is below what the gateway's own CPU cost allows (~{ceilings[lowest]:.0f}/s); "
            "rerun on a quieter machine." + cost
        )
    else:
        parts.append(f"Verdict: neither CPU nor slurmctld is saturated; the largest latency share ({top}) sets the pace." + cost)
    return " ".join(parts)


def run(ctx: Context) -> dict[str, Any]:
    bench = Bench(ctx)
    try:
        ctx.log("  set-up: held-job gateway (site templates with #SBATCH --hold)")
        bench.held_gateway()
        try:
            ctx.log("  1/3 submit latency: POST vs bare sbatch, sequential")
            bench.latency()
            ctx.log("  2/3 sustained submissions/s, 4 threads")
            bench.throughput()
        finally:
            if getattr(bench, "server", None) is not None:
                bench.server.shutdown()
            bench.cancel_all()
        ctx.log("  3/3 tiny 2D end to end: bare mpirun vs the gateway")
        bench.end_to_end()
        bench.report()
    finally:
        bench.close()
    return {"rows": bench.rows, "details": bench.details, "notes": bench.notes}
