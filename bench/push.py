"""Issue 17, "push instead of poll": what conditional reads save, what held requests cost, how soon a
webhook follows Slurm.

1. Conditional poll vs full read: a real `relion-gateway serve` (gunicorn, 2 workers, the default
   thread count, poller off) on a store of finished jobs whose metadata is ~9 KB (25 iterations of
   history). K client threads GET /jobs/<id> with the job's ETag in If-None-Match (304) against
   the same GET without it (200), blocks alternated: reads/s and bytes per read (status line,
   headers and body as received); also the bytes of one list page of 20 jobs.
2. Held requests: the same serve with many threads per worker ([server] threads) holds 1,000
   requests open at once: server-sent event streams (GET /jobs/<id>/events) and, where the GET
   honours it, `Prefer: wait=60` long-polls with If-None-Match. Meanwhile: plain reads' latency
   (against the same server holding none), the server's RSS, how many were really held. Then every
   job's state changes in the store and each held request's wait for the news is timed.
3. Webhook latency: an in-process gateway (poller at 1 s, dispatcher) with a loopback receiver
   subscribed; held jobs (site templates with `#SBATCH --hold`) are submitted over HTTP and their
   main Slurm job is scancel'ed one by one: the time from scancel to the signed POST of the state
   change it causes.

Clients of parts 1 and 2 are plain http.client connections and, for the held requests, raw sockets
under one selector thread (a thousand client threads would compete with the server for the two
cores). Nothing here asserts a timing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    wait_serving,
    ROOT,
    Context,
    bench_gateway_config,
    free_port,
    held_templates,
    percentile,
    remove_s3_prefix,
    restore_environment,
    row,
    session_cpu_seconds,
)
from gateway.auth import create_token
from gateway.database import JobRecord, JobStore, make_engine
from gateway.stack.nodes import HEAD_NAME

NAME = "push"
TITLE = "Push instead of poll: conditional reads, waiters and streams, webhook latency"

API = "/v1/relion"
USER = "bench"
RUNNING = b'"status":"running"'  # the SSE data line of the change (compact JSON, gateway/api/push.py)
FIRST_EVENT = b"event: job.state_changed"


# -- records -------------------------------------------------------------------------------------


def realistic_metadata(job_id: str, iterations: int = 25) -> dict[str, Any]:
    """metadata.json as the archive hook writes it (gateway/jobside/archive.py), for a 2D run of
    ``iterations`` iterations: the per-iteration history is what makes a finished job's record big."""
    resolutions = [round(40.0 / (1 + 0.08 * n), 3) for n in range(1, iterations + 1)]
    return {
        "schema_version": 1,
        "job": {"job_id": job_id, "user_id": USER, "workspace_id": "push", "mode": "2d", "accepted_at": "2025-01-01T00:00:00Z"},
        "request": {"mode": "2d", "num_mpi": 2, "flags": {"K": 3, "iter": iterations, "ctf": True, "particle-diameter": 100, "tau2_fudge": 2}},
        "resources": {"ntasks": 2, "cpus_per_task": 1, "memory_mb": 2000, "nodes": "1", "node_list": "rgnode1",
                      "rank_hosts": [{"rank": r, "host": "rgnode1"} for r in range(2)], "hosts": ["rgnode1"]},
        "slurm": {"main_job_id": "1001", "archive_job_id": "1002", "state": "COMPLETED", "exit_code": 0, "signal": 0,
                  "start": "2025-01-01T00:00:05", "end": "2025-01-01T00:04:05", "elapsed": "00:04:00",
                  "total_cpu": "00:07:40", "cpu_time_allocated": "00:08:00"},
        "relion": {
            "version": "3.1.4",
            "command": ["relion_refine_mpi", "--i", "particles.star", "--o", "Class2D/run", "--K", "3", "--iter", str(iterations)],
            "error": None,
            "results": {
                "mode": "2d", "output_prefix": "Class2D/run", "iterations_run": iterations, "last_iteration": iterations,
                "iterations_known": True, "iterations_planned": iterations,
                "resolution_angstrom": resolutions[-1], "final_resolution_angstrom": resolutions[-1],
                "resolution_per_iteration": [{"iteration": n + 1, "resolution_angstrom": r} for n, r in enumerate(resolutions)],
                "classes": 3,
                "class_distribution": [0.412, 0.331, 0.257],
                "class_resolution_angstrom": [resolutions[-1], resolutions[-1] + 1.1, resolutions[-1] + 2.3],
                # The per-iteration history a portal plots (distribution and change per iteration).
                "history": [
                    {"iteration": n + 1, "class_distribution": [round(0.33 + 0.003 * n, 4), round(0.34 - 0.001 * n, 4), round(0.33 - 0.002 * n, 4)],
                     "changes_optimal_orientations": round(30.0 / (n + 1), 3), "changes_optimal_offsets": round(2.0 / (n + 1), 3),
                     "changes_optimal_classes": round(0.4 / (n + 1), 4), "log_likelihood": -1.0e6 + 1234.5 * n}
                    for n in range(iterations)
                ],
                "converged": None, "completed": True, "relion_version": "3.1.4",
                "fsc": None,
                "files": {f"run_it{iterations:03d}_{kind}": f"Class2D/run_it{iterations:03d}_{kind}" for kind in ("data.star", "model.star", "optimiser.star", "classes.mrcs")},
            },
        },
        "input": {"url": "s3://relion-local/datasets/tiny.tar.gz", "bytes": 1_234_567, "sha256": "0" * 64, "cache": "hit"},
        "output": {"url": f"s3://relion-local/results/{USER}/{job_id}/output.tar.gz", "bytes": 7_654_321, "sha256": "f" * 64},
        "logs": [f"s3://relion-local/results/{USER}/{job_id}/logs/main-1001.out"],
        "previews": [],
        "timings": {"queued_s": 5.0, "staging_s": 1.2, "running_s": 238.8, "archiving_s": 3.1},
        "attempts": [],
        "outputs": None,
        "parent": None,
        "workspace_kept": False,
    }


def job_record(job_id: str, *, state: str, metadata: bool) -> JobRecord:
    now = time.time()
    ended = state in ("succeeded",)
    finished: dict[str, Any] = {"metadata_json": json.dumps(realistic_metadata(job_id), sort_keys=True), "exit_code": 0,
                                "started_at": now - 240, "ended_at": now} if metadata and ended else {}
    return JobRecord(
        job_id=job_id,
        user_id=USER,
        workspace_id="push",
        mode="2d",
        state=state,
        request_json=json.dumps({"mode": "2d", "num_mpi": 2}),
        job_json=json.dumps({"job_id": job_id, "log_dir": "/nonexistent"}),
        output_url=f"s3://relion-local/results/{USER}/{job_id}/",
        accepted_at=now,
        updated_at=now,
        main_slurm_id=str(100000 + int(job_id.rsplit("-", 1)[1])),
        archive_slurm_id=str(200000 + int(job_id.rsplit("-", 1)[1])),
        **finished,
    )


def make_store(state: Path, records: list[JobRecord]) -> str:
    """A serve's store (its state dir's default gateway.sqlite) with ``records`` and an admin token."""
    state.mkdir(parents=True)
    store = JobStore(make_engine(f"sqlite:///{state / 'gateway.sqlite'}"))
    for record in records:
        store.insert(record)
    token = create_token(store, USER, admin=True)[1]
    store.engine.dispose()
    return token


# -- a served gateway (gunicorn) -----------------------------------------------------------------


class Served:
    """`python -m gateway serve --workers 2` in a session of its own, with the poller off."""

    def __init__(self, state: Path, token: str, *, threads: int | None = None, workers: int = 2) -> None:
        self.state = state
        self.token = token
        self.port = free_port()
        self.host = socket.gethostbyname(HEAD_NAME)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update({
            "GATEWAY_CONFIG": str(ROOT / "config" / "local.toml"),
            "GATEWAY_PATHS_STATE_DIR": str(state),
            "GATEWAY_POLLER_ENABLED": "false",  # nothing here may call Slurm
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        })
        if threads is not None:
            env["GATEWAY_SERVER_THREADS"] = str(threads)
        self.log_path = state / f"serve-{self.port}.log"
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--host", self.host, "--port", str(self.port), "--workers", str(workers)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
            )
        self.base = f"http://{self.host}:{self.port}"
        wait_serving(self.base, self.proc, self.log_path)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def connection(self) -> HTTPConnection:
        return HTTPConnection(self.host, self.port, timeout=30)

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def rss_bytes(self) -> int:
        """Resident memory of the gunicorn master and its workers (every process of its session)."""
        return session_rss_bytes(self.proc.pid)

    def cpu_seconds(self) -> float:
        return session_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        # SIGQUIT is gunicorn's quick shutdown: held streams would keep a graceful one (SIGTERM)
        # waiting for up to graceful_timeout.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def session_rss_bytes(sid: int) -> int:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != sid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        if match := re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE):
            total += int(match.group(1)) * 1024
    return total


def response_bytes(response: HTTPResponse, body: bytes) -> int:
    """Bytes of a response as sent: status line, header lines, the blank line and the body."""
    head = len(f"HTTP/1.1 {response.status} {response.reason}\r\n") + 2
    head += sum(len(name) + len(value) + 4 for name, value in response.getheaders())
    return head + len(body)


def get(conn: HTTPConnection, path: str, headers: dict[str, str]) -> tuple[HTTPResponse, bytes]:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    return response, response.read()


def read_latencies(served: Served, job_ids: list[str], count: int) -> list[float]:
    """``count`` plain GET /jobs/<id> one after another on one keep-alive connection (seconds each)."""
    conn = served.connection()
    latencies = []
    try:
        for i in range(count):
            started = time.perf_counter()
            response, _ = get(conn, f"{API}/jobs/{job_ids[i % len(job_ids)]}", served.headers())
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"plain read answered {response.status}")
    finally:
        conn.close()
    return latencies


# -- held requests: raw sockets under one selector -----------------------------------------------


@dataclass
class Held:
    kind: str  # "sse" or "poll"
    job_id: str
    etag: str = ""
    sock: socket.socket | None = None
    buf: bytearray = field(default_factory=bytearray)
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    refused: int = 0  # 503s (no wait slot in the process it reached)
    opened_at: float | None = None
    first_event_at: float | None = None  # SSE: the history's first event arrived
    running_at: float | None = None  # SSE: the change to running arrived
    answered_at: float | None = None  # long-poll: its answer's headers arrived
    closed: bool = False
    error: str = ""

    @property
    def held(self) -> bool:
        if self.kind == "sse":
            return self.status == 200 and self.first_event_at is not None
        return self.answered_at is None and self.opened_at is not None and not self.error

    @property
    def preference_applied(self) -> bool:
        return "preference-applied" in self.headers


class HeldClients:
    """Opens and follows many held requests from one thread (a selector over raw sockets)."""

    def __init__(self, served: Served, requests_: list[Held], *, retries: int = 5) -> None:
        self.served = served
        self.items = requests_
        self.retries = retries
        self.selector = selectors.DefaultSelector()
        self._todo: list[tuple[float, Held]] = [(0.0, item) for item in requests_]  # (not before, request)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-held-clients", daemon=True)
        self.changing = False  # set once the jobs start changing: a long-poll's answer is then news

    def start(self) -> None:
        self._thread.start()

    def request_bytes(self, item: Held) -> bytes:
        lines = [f"GET {API}/jobs/{item.job_id}{'/events' if item.kind == 'sse' else ''} HTTP/1.1",
                 f"Host: {self.served.host}:{self.served.port}", f"Authorization: Bearer {self.served.token}"]
        if item.kind == "sse":
            lines.append("Accept: text/event-stream")
        else:
            lines += ["Prefer: wait=60", f"If-None-Match: {item.etag}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _open(self, item: Held) -> None:
        item.attempts += 1
        item.buf.clear()
        item.status, item.headers = None, {}
        try:
            # A blocking connect is instant on this host; then the request, then non-blocking reads.
            sock = socket.create_connection((self.served.host, self.served.port), timeout=10)
            sock.sendall(self.request_bytes(item))
            sock.setblocking(False)
        except OSError as exc:
            item.error = f"connect: {exc}"
            return
        item.sock = sock
        item.opened_at = time.monotonic()
        self.selector.register(sock, selectors.EVENT_READ, item)

    def _close(self, item: Held) -> None:
        if item.sock is not None:
            try:
                self.selector.unregister(item.sock)
            except (KeyError, ValueError):
                pass
            item.sock.close()
            item.sock = None
        item.closed = True

    def _read(self, item: Held) -> None:
        assert item.sock is not None
        now = time.monotonic()
        try:
            data = item.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data, item.error = b"", f"recv: {exc}"
        if not data:
            if item.kind == "poll" and item.status is not None and item.answered_at is None:
                item.answered_at = now
            elif item.kind == "sse" or item.status is None:
                item.error = item.error or "closed by the server"
            self._close(item)
            return
        item.buf += data
        if item.status is None:
            end = item.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = item.buf[:end].decode("latin-1").split("\r\n")
            item.status = int(lines[0].split()[1])
            item.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if item.status == 503 and item.attempts <= self.retries:
                item.refused += 1
                self._close(item)
                item.closed = False
                with self._lock:  # as an EventSource would: come back after a pause
                    self._todo.append((now + 0.5, item))
                return
            if item.kind == "poll":
                self._close(item)
                if not self.changing and "preference-applied" not in item.headers and item.attempts <= self.retries:
                    # Answered at once: its process had no wait slot free. A portal polls again.
                    item.refused += 1
                    item.closed = False
                    with self._lock:
                        self._todo.append((now + 0.5, item))
                    return
                item.answered_at = now
                return
            if item.status != 200:
                item.error = f"answered {item.status}"
                self._close(item)
                return
        if item.kind == "sse":
            if item.first_event_at is None and FIRST_EVENT in item.buf:
                item.first_event_at = now
            if item.running_at is None and RUNNING in item.buf:
                item.running_at = now
            if len(item.buf) > 1 << 16 and item.running_at is not None:
                del item.buf[:-4096]  # keep the tail only once what is looked for has come

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [entry for entry in self._todo if entry[0] <= now][:50]
                for entry in due:
                    self._todo.remove(entry)
            for _, item in due:
                self._open(item)
            for key, _ in self.selector.select(timeout=0.02 if due or self._todo else 0.1):
                self._read(key.data)

    def pending(self) -> int:
        with self._lock:
            return len(self._todo)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for item in self.items:
            self._close(item)
        self.selector.close()


# -- the benchmark -------------------------------------------------------------------------------


def raise_fd_limit(wanted: int) -> None:
    """Held requests need a descriptor each, here and in the server (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted, hard))


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class CountingHandler(logging.Handler):
    """Counts the log records whose message contains ``text`` (a gateway warning seen during a phase)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1


class Bench:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.quick = ctx.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="relion-gateway-bench-push-", dir="/var/tmp"))
        self.tmp.chmod(0o711)  # jobs run as another account ([job] run_as) and must reach their dirs below
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []

    # -- 1. conditional poll vs full read ------------------------------------------------------

    def conditional(self) -> None:
        jobs = [f"push-read-{i}" for i in range(20)]
        token = make_store(self.tmp / "read-state", [job_record(j, state="succeeded", metadata=True) for j in jobs])
        threads = 4
        block_s = 1.0 if self.quick else 2.5
        served = Served(self.tmp / "read-state", token)
        try:
            conn = served.connection()
            tags: dict[str, str] = {}
            full_bytes: list[int] = []
            first_body = b""
            for job_id in jobs:
                response, body = get(conn, f"{API}/jobs/{job_id}", served.headers())
                if response.status != 200:
                    raise RuntimeError(f"GET {job_id}: {response.status} {body[:200]!r}")
                tags[job_id] = response.getheader("ETag") or ""
                full_bytes.append(response_bytes(response, body))
                first_body = first_body or body
            metadata_bytes = len(job_record(jobs[0], state="succeeded", metadata=True).metadata_json or "")
            response, body = get(conn, f"{API}/jobs/{jobs[0]}", served.headers(**{"If-None-Match": tags[jobs[0]]}))
            if response.status != 304:
                raise RuntimeError(f"a GET with the current ETag answered {response.status}, not 304")
            response, list_body = get(conn, f"{API}/jobs?page_size=20", served.headers())
            if response.status != 200 or len(json.loads(list_body)["jobs"]) != 20:
                raise RuntimeError(f"list page: {response.status} {list_body[:200]!r}")
            list_bytes = float(response_bytes(response, list_body))
            b64_bytes = len(json.loads(first_body).get("metadata_b64") or "")
            conn.close()

            def block(conditional: bool) -> dict[str, Any]:
                counts, sizes, wrong = [0] * threads, [0] * threads, [0] * threads
                expected = 304 if conditional else 200
                stop_at = time.monotonic() + block_s

                def worker(index: int) -> None:
                    connection = served.connection()
                    i = index
                    try:
                        while time.monotonic() < stop_at:
                            job_id = jobs[i % len(jobs)]
                            extra = {"If-None-Match": tags[job_id]} if conditional else {}
                            response, body = get(connection, f"{API}/jobs/{job_id}", served.headers(**extra))
                            counts[index] += 1
                            sizes[index] += response_bytes(response, body)
                            wrong[index] += response.status != expected
                            i += 1
                    finally:
                        connection.close()

                cpu0 = served.cpu_seconds()
                started = time.perf_counter()
                workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
                for thread in workers:
                    thread.start()
                for thread in workers:
                    thread.join()
                seconds = time.perf_counter() - started
                return {"reads": sum(counts), "bytes": sum(sizes), "seconds": seconds, "wrong_status": sum(wrong),
                        "server_cpu_s": served.cpu_seconds() - cpu0}

            block(True)  # warm-up: connections, the token cache, imports in both workers
            blocks: dict[str, list[dict[str, Any]]] = {"304": [], "200": []}
            for conditional in (True, False, False, True):  # ABBA, so drift favours neither
                blocks["304" if conditional else "200"].append(block(conditional))
        finally:
            served.stop()

        def total(kind: str) -> dict[str, Any]:
            chosen = blocks[kind]
            reads = sum(b["reads"] for b in chosen)
            seconds = sum(b["seconds"] for b in chosen)
            return {"reads": reads, "seconds": round(seconds, 3), "per_second": reads / seconds, "bytes_per_read": sum(b["bytes"] for b in chosen) / reads,
                    "wrong_status": sum(b["wrong_status"] for b in chosen),
                    "server_cpu_ms_per_read": sum(b["server_cpu_s"] for b in chosen) / reads * 1000}

        cond, full = total("304"), total("200")
        self.details["conditional"] = {
            "jobs": len(jobs), "client_threads": threads, "block_s": block_s, "metadata_json_bytes": metadata_bytes,
            "full_read_bytes_each": sorted(set(full_bytes)), "metadata_b64_chars": b64_bytes, "list_page_bytes": list_bytes,
            "conditional_304": cond, "full_200": full, "blocks": blocks,
        }
        group = f"1 conditional poll ({threads} threads, gunicorn 2 workers)"
        full_read = full["bytes_per_read"]
        self.rows += [
            row(group, "bytes per read, 304 (If-None-Match)", round(cond["bytes_per_read"], 1), unit="B", goal=("<=", round(0.05 * full_read, 1)),
                baseline=round(full_read, 1), baseline_label="200 full read",
                note=f"status line + headers (+ body) as received; goal 5% of a full read; metadata.json {metadata_bytes:,} B "
                     f"(25 iterations), carried base64 in the 200 ({b64_bytes:,} B of it); {cond['wrong_status'] + full['wrong_status']} unexpected statuses"),
            row(group, "reads/s, 304", round(cond["per_second"], 1), unit="/s", goal=(">=", round(full["per_second"], 1)),
                baseline=round(full["per_second"], 1), baseline_label="200 full read",
                note=f"server CPU per read {cond['server_cpu_ms_per_read']:.2f} ms vs {full['server_cpu_ms_per_read']:.2f} ms; "
                     f"client and server share {os.cpu_count()} cores"),
            row(group, "list page bytes, 20 jobs (page_size=20)", list_bytes, unit="B", goal=("<=", round(20 * full_read / 4, 0)),
                baseline=round(20 * full_read, 0), baseline_label="20 full reads",
                note="summaries only (no metadata); goal a quarter of 20 full reads"),
        ]
        self.ctx.log(f"    304: {cond['per_second']:.0f} reads/s, {cond['bytes_per_read']:.0f} B; 200: {full['per_second']:.0f}/s, "
                     f"{full_read:.0f} B; list {list_bytes} B")

    # -- 2. held requests ----------------------------------------------------------------------

    def held(self) -> None:
        from gateway.config import build_config

        held_total = 200 if self.quick else 1000
        threads = 150 if self.quick else 600
        n_jobs = 20 if self.quick else 100
        reads = 100 if self.quick else 200
        raise_fd_limit(4 * held_total + 1024)
        jobs = [f"push-held-{i}" for i in range(n_jobs)]
        state = self.tmp / "held-state"
        token = make_store(state, [job_record(j, state="queued", metadata=False) for j in jobs])
        served = Served(state, token, threads=threads)
        clients: HeldClients | None = None
        try:
            read_latencies(served, jobs, 50)  # warm-up
            idle_rss = served.rss_bytes()
            idle = read_latencies(served, jobs, reads)
            # Does GET /jobs/<id> honour Prefer: wait? One probe: held (Preference-Applied) or not.
            conn = served.connection()
            tags = {}
            for job_id in jobs:
                response, _ = get(conn, f"{API}/jobs/{job_id}", served.headers())
                tags[job_id] = response.getheader("ETag") or ""
            probe_started = time.monotonic()
            response, _ = get(conn, f"{API}/jobs/{jobs[0]}", served.headers(**{"Prefer": "wait=1", "If-None-Match": tags[jobs[0]]}))
            probe = {"status": response.status, "preference_applied": response.getheader("Preference-Applied"),
                     "seconds": round(time.monotonic() - probe_started, 3)}
            conn.close()
            long_polls = probe["preference_applied"] is not None
            per_kind = held_total // 2 if long_polls else held_total
            items = [Held("sse", jobs[i % n_jobs]) for i in range(per_kind)]
            if long_polls:
                items += [Held("poll", jobs[i % n_jobs], etag=tags[jobs[i % n_jobs]]) for i in range(held_total - per_kind)]
            self.ctx.log(f"    opening {len(items)} held requests ({per_kind} SSE"
                         + (f" + {held_total - per_kind} long-polls" if long_polls else "; long-poll not honoured yet") + ")")
            clients = HeldClients(served, items)
            opened = time.monotonic()
            clients.start()
            deadline = opened + (30 if self.quick else 60)
            while time.monotonic() < deadline:
                settled = all(
                    i.closed or i.error or (i.first_event_at is not None if i.kind == "sse" else i.opened_at is not None)
                    for i in items
                ) and clients.pending() == 0
                if settled:
                    break
                time.sleep(0.1)
            time.sleep(1.5)  # long-polls that were not going to be held have answered by now
            open_s = time.monotonic() - opened
            sse_held = sum(1 for i in items if i.kind == "sse" and i.held)
            poll_held = sum(1 for i in items if i.kind == "poll" and i.held)
            first_events = [i.first_event_at - i.opened_at for i in items if i.first_event_at and i.opened_at]
            held_rss = served.rss_bytes()
            while_held = read_latencies(served, jobs, reads)

            # Every job's state changes, one store update each, from this process (as the poller would).
            store = JobStore(make_engine(f"sqlite:///{state / 'gateway.sqlite'}"))
            changed_at: dict[str, float] = {}
            clients.changing = True
            for job_id in jobs:
                store.update(job_id, state="running")
                changed_at[job_id] = time.monotonic()
            store.engine.dispose()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if all(i.running_at is not None for i in items if i.kind == "sse" and i.held) and \
                        all(i.answered_at is not None for i in items if i.kind == "poll" and i.opened_at and not i.error):
                    break
                time.sleep(0.05)
            after_rss = served.rss_bytes()
            sse_waits = [i.running_at - changed_at[i.job_id] for i in items if i.kind == "sse" and i.running_at is not None]
            held_polls = [i for i in items if i.kind == "poll" and i.answered_at is not None and i.answered_at >= changed_at[i.job_id]]
            poll_waits = [i.answered_at - changed_at[i.job_id] for i in held_polls if i.answered_at is not None]
            poll_applied = sum(1 for i in held_polls if i.preference_applied)
            errors = [f"{i.kind} {i.job_id}: {i.error}" for i in items if i.error]
            refused = sum(i.refused for i in items)
            still_refused = sum(1 for i in items if i.status == 503)
        finally:
            if clients is not None:
                clients.close()
            served.stop()

        config = build_config(environ={})
        default_threads = int(config["SERVER_THREADS"])
        default_workers = int(config["SERVER_WORKERS"])
        default_waiters = int(config["SERVER_MAX_WAITERS"]) or max(1, default_threads - 4)
        configured_waiters = max(1, threads - 4)
        held_count = sse_held + poll_held
        self.details["held"] = {
            "requested": len(items), "sse": per_kind, "long_polls": len(items) - per_kind, "jobs": n_jobs,
            "server_threads_per_worker": threads, "workers": 2, "max_waiters_per_worker": configured_waiters,
            "long_poll_probe": probe, "open_s": round(open_s, 2),
            "held": {"sse": sse_held, "long_poll": poll_held},
            "first_event_ms": {"p50": ms(percentile(first_events, 50)), "p99": ms(percentile(first_events, 99))},
            "refused_then_retried": refused, "refused_503_final": still_refused, "errors": len(errors), "first_errors": errors[:5],
            "rss_bytes": {"idle": idle_rss, "held": held_rss, "after_change": after_rss},
            "read_ms": {
                "idle": {"p50": ms(percentile(idle, 50)), "p99": ms(percentile(idle, 99)), "max": ms(max(idle))},
                "held": {"p50": ms(percentile(while_held, 50)), "p99": ms(percentile(while_held, 99)), "max": ms(max(while_held))},
            },
            "change_wait_ms": {
                "sse": {"count": len(sse_waits), **({"p50": ms(percentile(sse_waits, 50)), "p99": ms(percentile(sse_waits, 99)), "max": ms(max(sse_waits))} if sse_waits else {})},
                "long_poll": {"count": len(poll_waits), "preference_applied": poll_applied,
                              **({"p50": ms(percentile(poll_waits, 50)), "p99": ms(percentile(poll_waits, 99)), "max": ms(max(poll_waits))} if poll_waits else {})},
            },
            "defaults": {"server_threads": default_threads, "workers": default_workers, "max_waiters_per_worker": default_waiters,
                         "held_requests_allowed": default_waiters * default_workers},
        }
        group = f"2 held requests ({threads} threads x 2 workers)"
        kinds = f"{sse_held} SSE streams" + (f" + {poll_held} long-polls" if long_polls else "")
        waits = sse_waits + poll_waits
        self.rows += [
            row(group, "requests held at once", float(held_count), goal=(">=", held_total),
                note=f"{kinds} (SSE: 200 and a first event; long-poll: no answer until the change); {refused} refusals retried "
                     f"(a worker's max_waiters={configured_waiters} full: SSE 503, long-poll answered at once), {still_refused} left refused, {len(errors)} errors; "
                     f"first event p50 {percentile(first_events, 50) * 1000:.0f} ms after the request"
                     + ("" if long_polls else "; long-poll (Prefer: wait) not honoured by this commit's GET: not measured")),
            row(group, "plain read p99 while held", ms(percentile(while_held, 99)), unit="ms", goal=("<=", 500),
                baseline=ms(percentile(idle, 99)), baseline_label="0 held",
                note=f"{reads} sequential GET /jobs/<id>; p50 {percentile(while_held, 50) * 1000:.1f} ms "
                     f"(0 held: {percentile(idle, 50) * 1000:.1f} ms)"),
            row(group, "server RSS while held", round(held_rss / 2**20, 1), unit="MiB", goal=("<=", 1024),
                baseline=round(idle_rss / 2**20, 1), baseline_label="0 held",
                note=f"VmRSS of the gunicorn master + 2 workers; {(held_rss - idle_rss) / max(1, held_count) / 1024:.0f} KiB per held request"),
            row(group, "change -> held request saw it, p99", ms(percentile(waits, 99)), unit="ms", goal=("<=", 2000),
                note=f"{len(sse_waits)} streams" + (f", {len(poll_waits)} long-polls ({poll_applied} with Preference-Applied)" if long_polls else "")
                     + f"; p50 {percentile(waits, 50) * 1000:.0f} ms, max {max(waits) * 1000 if waits else float('nan'):.0f} ms; "
                     f"{n_jobs} store updates from another process; each worker's event feed reads every 0.5 s"),
            row("2 held requests (defaults)", "held requests the default config allows", float(default_waiters * default_workers),
                goal=(">=", held_total),
                note=f"[server] threads={default_threads} per worker, max_waiters=threads-4 -> {default_waiters} per worker x "
                     f"{default_workers} workers; set [server] threads (and max_waiters) to hold many"),
        ]
        if long_polls:
            self.rows.append(row(group, "long-poll change -> answer, p50", ms(percentile(poll_waits, 50)), unit="ms", goal=("<=", 1000),
                                 note=f"{len(poll_waits)} answered after the change, {poll_applied} with Preference-Applied"))
        else:
            self.notes.append(f"Long-poll (Prefer: wait=N on GET /jobs/<id>) was not measured: this commit's GET answered the probe "
                              f"{probe['status']} in {probe['seconds']} s without Preference-Applied, so all {held_total} held requests are SSE streams.")
        self.ctx.log(f"    held {held_count}/{held_total}; reads p99 {percentile(while_held, 99) * 1000:.1f} ms "
                     f"(idle {percentile(idle, 99) * 1000:.1f}); RSS {held_rss / 2**20:.0f} MiB (idle {idle_rss / 2**20:.0f}); "
                     f"change seen p50 {percentile(waits, 50) * 1000:.0f} ms, p99 {percentile(waits, 99) * 1000:.0f} ms")

    # -- 3. webhook latency from a Slurm state change ------------------------------------------

    def webhooks(self) -> None:
        from werkzeug.serving import make_server

        from gateway import create_app
        from gateway.api.push import WEBHOOKS_KEY
        from gateway.app import DISPATCHER_KEY, POLLER_KEY
        from gateway.relion.dataset import make_dataset
        from gateway.relion.presets import TINY_FLAGS
        from gateway.stack import stack_status
        from gateway.storage.s3 import S3Location, S3Storage, make_s3_client
        from tests.webhook_receiver import Receiver

        count = 3 if self.quick else 10
        status = stack_status()
        if not status.get("all_up"):
            raise RuntimeError("the stack is not up: run `relion-gateway stack up` first")
        bucket, endpoint = str(status["s3"]["bucket"]), str(status["s3"]["endpoint_url"])
        prefix = f"bench/push-{secrets.token_hex(4)}"
        env = {k: v for k, v in status["environment"].items() if not k.startswith("GATEWAY_")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # S3 keys for boto3 here
        storage = S3Storage(make_s3_client(endpoint, str(status["s3"]["region"])))
        slurm_ids: list[str] = []
        receiver = Receiver()
        stamps: list[float] = []

        class Stamped(list):  # type: ignore[type-arg]
            """The receiver's record, with the time each POST arrived (the handler appends to it)."""

            def append(self, item: Any) -> None:
                stamps.append(time.monotonic())
                super().append(item)

        receiver.received = Stamped()
        server = app = None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # The poller drops a whole Slurm answer when sacct names a job otherwise than squeue does
        # (slurmdbd's stub of a job cancelled while pending is named "allocation" for a while).
        ignored = CountingHandler("lists it under our name; ignoring this answer")
        track_log = logging.getLogger("gateway.jobs.track")
        track_log.addHandler(ignored)
        try:
            data = self.tmp / "data" / "tiny"
            data.parent.mkdir(parents=True)
            tarball = make_dataset(data)
            storage.upload_file(str(tarball), S3Location(bucket, f"{prefix}/tiny.tar.gz"))
            port = free_port()
            url = f"http://{HEAD_NAME}:{port}"
            config = bench_gateway_config(
                self.tmp / "hook-state", endpoint,
                SERVER_PUBLIC_URL=url,
                PATHS_TEMPLATE_DIR=str(held_templates(self.tmp / "held-templates")),
                POLLER_ENABLED=True, WEBHOOKS_ENABLED=True,
                POLLER_INTERVAL_QUEUED=1.0, POLLER_INTERVAL_ACTIVE=1.0,
                WEBHOOKS_ALLOW_NETWORKS=["127.0.0.1/32"],  # the receiver listens on loopback
            )
            app = create_app(config)
            server = make_server(HEAD_NAME, port, app, threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            token = create_token(app.extensions["relion_gateway"].store, USER, admin=True, n=int(config["AUTH_SCRYPT_N"]))[1]
            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {token}"
            created = http.post(f"{url}{API}/webhooks", json={"url": receiver.url, "description": "bench"}, timeout=30)
            if created.status_code != 201:
                raise RuntimeError(f"webhook subscription: {created.status_code} {created.text[:300]}")
            secret = created.json()["secret"]
            request: dict[str, Any] = {"user_id": USER, "workspace_id": "push", "dataset_s3_url": f"s3://{bucket}/{prefix}/tiny.tar.gz",
                       "output_s3_prefix": f"s3://{bucket}/{prefix}/results", "mode": "2d", "num_mpi": 2, "flags": dict(TINY_FLAGS["2d"])}
            jobs: dict[str, str] = {}  # gateway job id -> main Slurm id
            submitted_at: dict[str, float] = {}
            for _ in range(count):
                response = http.post(f"{url}{API}/jobs", json=request, headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=120)
                body = response.json()
                if response.status_code != 202 or body.get("status") != "queued":
                    raise RuntimeError(f"submit: {response.status_code} {response.text[:300]}")
                submitted_at[body["job_id"]] = time.monotonic()
                jobs[body["job_id"]] = body["slurm"]["main_job_id"]
                slurm_ids += [i for i in (body["slurm"]["main_job_id"], body["slurm"]["archive_job_id"]) if i]

            def arrivals(wanted: Callable[[dict[str, Any]], bool]) -> dict[str, float]:
                """Job id -> when the first body ``wanted`` accepts arrived."""
                seen: dict[str, float] = {}
                for (_, raw), at in zip(list(receiver.received), list(stamps)):
                    data = json.loads(raw)["data"]
                    if wanted(data) and data["job_id"] not in seen:
                        seen[data["job_id"]] = at
                return seen

            def wait_for(wanted: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, float]:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    seen = arrivals(wanted)
                    if set(jobs) <= set(seen):
                        return seen
                    time.sleep(0.02)
                return arrivals(wanted)

            queued = wait_for(lambda d: d["status"] == "queued", 30)
            time.sleep(1.5)  # the poller's first cycles over the new jobs, so the scancels land mid-interval
            cancelled_at: dict[str, float] = {}
            scancel_s: list[float] = []
            for job_id, main_id in jobs.items():
                cancelled_at[job_id] = time.monotonic()
                subprocess.run(["scancel", main_id], capture_output=True, timeout=60, check=True)
                scancel_s.append(time.monotonic() - cancelled_at[job_id])
                time.sleep(0.37)  # spread over the poller's interval and the dispatcher's tick (not a multiple of either)
            # The held archive hook never runs, so a cancelled main job makes the job "archiving" (its first change).
            changed = wait_for(lambda d: d["previous_status"] == "queued" and d["status"] != "queued", 60)
            time.sleep(1.0)  # late duplicates or further changes, for the record
            states = sorted({json.loads(raw)["data"]["status"] for _, raw in list(receiver.received)})
            verified = len(receiver.verified(secret))
            received = len(receiver.received)
            change_states = sorted({d["status"] for d in (json.loads(raw)["data"] for _, raw in list(receiver.received)) if d["previous_status"] == "queued"})
        finally:
            if slurm_ids:
                subprocess.run(["scancel", *slurm_ids], capture_output=True, timeout=60, check=False)
            if app is not None:
                app.extensions[POLLER_KEY].stop()
                app.extensions[DISPATCHER_KEY].stop()
            if server is not None:
                server.shutdown()
            receiver.server.shutdown()
            try:
                remove_s3_prefix(storage, bucket, prefix + "/")
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
                self.notes.append(f"could not remove s3://{bucket}/{prefix}/: {exc}")
            restore_environment(saved)
            track_log.removeHandler(ignored)

        latencies = [changed[j] - cancelled_at[j] for j in jobs if j in changed]
        submit_latencies = [queued[j] - submitted_at[j] for j in jobs if j in queued]
        self.details["webhooks"] = {
            "jobs": count, "heard_change": len(latencies), "received_posts": received, "signatures_verified": verified,
            "states_heard": states, "first_change_after_queued": change_states,
            "poll_answers_ignored_sacct_name": ignored.count,
            "scancel_ms": {"p50": ms(percentile(scancel_s, 50)), "max": ms(max(scancel_s))},
            "scancel_to_webhook_ms": [ms(x) for x in latencies],
            "submit_to_queued_webhook_ms": [ms(x) for x in submit_latencies],
            "poller_interval_s": 1.0, "dispatcher_tick_s": 0.5, "webhooks_key": WEBHOOKS_KEY,
        }
        group = f"3 webhook latency ({count} held jobs, poller 1 s)"
        self.rows += [
            row(group, "scancel -> signed webhook of the change, p50", round(percentile(latencies, 50), 2), unit="s", goal=("<=", 3),
                note=f"max {max(latencies) if latencies else float('nan'):.2f} s; {len(latencies)}/{count} heard; the change is "
                     f"{'/'.join(change_states) or '?'} (the held archive hook never runs, so the job never reaches cancelled); "
                     f"includes the poller's interval (1 s), the dispatcher's tick (0.5 s) and scancel itself "
                     f"(p50 {percentile(scancel_s, 50) * 1000:.0f} ms); {verified}/{received} POSTs' signatures verified; the poller "
                     f"ignored {ignored.count} Slurm answers meanwhile (sacct's 'allocation' stub name)"),
            row(group, "submit -> queued webhook, p50", round(percentile(submit_latencies, 50), 2), unit="s", goal=("<=", 1),
                note=f"max {max(submit_latencies) if submit_latencies else float('nan'):.2f} s: the event is written with the job, "
                     "so only the dispatcher's tick (0.5 s) and the POST are in it"),
        ]
        self.ctx.log(f"    scancel -> webhook p50 {percentile(latencies, 50):.2f} s, max {max(latencies) if latencies else float('nan'):.2f} s "
                     f"({len(latencies)}/{count}); states {states}")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def run(ctx: Context) -> dict[str, Any]:
    import traceback

    bench = Bench(ctx)
    parts: list[tuple[str, Callable[[], None]]] = [
        ("1/3 conditional poll vs full read (gunicorn, default threads)", bench.conditional),
        ("2/3 held requests: SSE streams and long-polls", bench.held),
        ("3/3 webhook latency from scancel", bench.webhooks),
    ]
    crashed: dict[str, str] = {}
    try:
        for label, part in parts:
            ctx.log(f"  {label}")
            try:
                part()
            except Exception:  # noqa: BLE001 - one part's crash must not lose the others' figures
                crashed[label] = traceback.format_exc()
                ctx.log(crashed[label])
    finally:
        bench.close()
    if crashed:
        bench.details["crashed"] = crashed
        bench.notes.append("crashed: " + "; ".join(f"{label}: {text.strip().splitlines()[-1]}" for label, text in crashed.items()))
    bench.rows.append(row("all parts", "parts that crashed", float(len(crashed)), goal=("<=", 0),
                          note=", ".join(label.split(" ", 1)[0] for label in crashed) or "none"))
    bench.notes.append(
        "Parts 1 and 2 serve with `python -m gateway serve --workers 2` (gunicorn gthread) and the poller off, on a store "
        "written directly (JobStore.insert); the clients run in this process on the same cores. The list takes page_size, "
        "not limit (a query parameter the operation does not take is a 400)."
    )
    return {"rows": bench.rows, "details": bench.details, "notes": bench.notes}
