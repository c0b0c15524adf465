"""Issue "Tracking that never floods slurmctld": what status reads and poll cycles cost Slurm.

1. Slurm RPCs per 1000 status reads (GET /v1/relion/jobs/<id>, poller off) against a naive portal
   that runs one `squeue -j <id>` per read.
2. Slurm RPCs per poll cycle with 1, 10 and 100 live jobs against per-job polling (one squeue per
   job per cycle).
3. Status reads/s and latency with 8 client threads, Werkzeug's threaded server and gunicorn.

The jobs are real: the gateway's own submit path (JobService.submit) with site templates that
hold every job (`#SBATCH --hold`), so 100 gateway jobs are 200 pending Slurm jobs that never run.
They are cancelled at the end, whatever happens.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from bench.common import (
    wait_serving,
    MEASURE_USER,
    ROOT,
    Context,
    CountingRunner,
    Measured,
    free_port,
    machine_cpu_seconds,
    measure,
    percentile,
    row,
    run_attributed,
    session_cpu_seconds,
)
from gateway import create_app
from gateway.auth import create_token

BENCH_TOKEN = ""  # an admin token in the store of the served gateway (throughput phase)
from gateway.config import build_config
from gateway.database import JobRecord, JobStore, make_engine
from gateway.jobs.poller import Poller
from gateway.jobs.service import JobService
from gateway.sbatch.render import ScriptRenderer
from gateway.slurm.cli import SlurmCliBackend

NAME = "tracking"
TITLE = "Tracking that never floods slurmctld"

# Site templates: the gateway's names and comment, but held, so nothing ever runs.
MAIN_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={{ job_name | q }}
#SBATCH --comment={{ comment | q }}
#SBATCH --hold
#SBATCH --ntasks=1
#SBATCH --time=00:05:00
#SBATCH --output=/dev/null
true
"""
ARCHIVE_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={{ archive_job_name | q }}
#SBATCH --comment={{ comment | q }}
#SBATCH --dependency=afterany:{{ main_slurm_id }}
#SBATCH --hold
#SBATCH --ntasks=1
#SBATCH --time=00:05:00
#SBATCH --output=/dev/null
true
"""

REQUEST = {
    "user_id": "bench",
    "workspace_id": "bench",
    "dataset_s3_url": "s3://relion-local/datasets/bench.tar.gz",
    "output_s3_prefix": "s3://relion-local/bench",
    "mode": "2d",
    "num_mpi": 1,
    "flags": {"i": "particles.star", "o": "Class2D/run", "K": 3, "iter": 2, "ctf": True, "particle-diameter": 100, "tau2_fudge": 2, "j": 1},
}


def naive_read(slurm_id: str) -> str:
    """What a naive portal does on every status read: ask squeue (attributed like the gateway's)."""
    return run_attributed(["squeue", "-j", slurm_id, "--noheader", "--format=%T"], timeout=30).strip()


class Bench:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.quick = ctx.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="relion-gateway-bench-"))
        self.tmp.chmod(0o711)  # jobs run as another account ([job] run_as) and must reach their dirs below
        templates = self.tmp / "templates"
        templates.mkdir()
        (templates / "main.sbatch.j2").write_text(MAIN_TEMPLATE)
        (templates / "archive.sbatch.j2").write_text(ARCHIVE_TEMPLATE)
        self.config = build_config(environ={"GATEWAY_CONFIG": str(ROOT / "config" / "local.toml")})
        self.config.update(
            {
                "PATHS_STATE_DIR": str(self.tmp),
                "PATHS_WORKSPACE_ROOT": str(self.tmp / "workspaces"),
                "PATHS_LOG_ROOT": str(self.tmp / "logs"),
                "PATHS_TEMPLATE_DIR": str(templates),
                "STORE_DATABASE_URL": f"sqlite:///{self.tmp / 'master.sqlite'}",
                "POLLER_ENABLED": False,
            }
        )
        self.slurm_ids: list[str] = []
        self.records: list[JobRecord] = []
        self.details: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    # -- set-up -------------------------------------------------------------------------------

    def service(self, store: JobStore, runner: CountingRunner) -> JobService:
        return JobService(
            config=self.config,
            store=store,
            scheduler=SlurmCliBackend(runner=runner, timeout=float(self.config["SLURM_COMMAND_TIMEOUT"])),
            renderer=ScriptRenderer(self.config["PATHS_TEMPLATE_DIR"]),
        )

    def submit_jobs(self, count: int) -> None:
        store = JobStore(make_engine(self.config["STORE_DATABASE_URL"]))
        service = self.service(store, CountingRunner())
        started = time.perf_counter()
        for _ in range(count):
            record = service.submit(dict(REQUEST))
            self.slurm_ids += [i for i in (record.main_slurm_id, record.archive_slurm_id) if i]
            if record.state != "queued" or not record.archive_slurm_id:
                raise RuntimeError(f"set-up submit failed: {record.job_id} {record.state}: {record.message}")
            self.records.append(record)
        self.ctx.log(f"  submitted {count} held gateway jobs ({len(self.slurm_ids)} Slurm jobs) in {time.perf_counter() - started:.1f} s")

    def cancel_jobs(self) -> None:
        if self.slurm_ids:
            subprocess.run(["scancel", *self.slurm_ids], capture_output=True, timeout=60)
            self.ctx.log(f"  cancelled {len(self.slurm_ids)} held Slurm jobs")
            self.slurm_ids = []

    def fresh_store(self, name: str, records: list[JobRecord]) -> JobStore:
        store = JobStore(make_engine(f"sqlite:///{self.tmp / name}"))
        for record in records:
            store.insert(record)
        return store

    # -- 1. RPCs per 1000 status reads --------------------------------------------------------

    def reads(self) -> None:
        reads = 200 if self.quick else 1000
        record = self.records[0]
        runner = CountingRunner()
        store = self.fresh_store("reads.sqlite", [record])
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per read
        app = create_app(self.config, scheduler=self.service(store, runner).scheduler, store=store)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_port}/v1/relion/jobs/{record.job_id}"
        try:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {create_token(store, 'bench', admin=True)[1]}"

            def gateway_reads() -> dict[str, int]:
                for _ in range(reads):
                    response = session.get(url, timeout=30)
                    if response.status_code != 200 or response.json()["job_id"] != record.job_id:
                        raise RuntimeError(f"bad read: {response.status_code} {response.text[:200]}")
                return runner.snapshot()  # the Slurm commands the gateway ran meanwhile

            gateway_reads()  # warm-up (imports, connections), not counted
            gateway = measure(gateway_reads, repeats=3, before=runner.reset)
            gateway_commands = gateway.phase.result
        finally:
            server.shutdown()

        main_id = record.main_slurm_id or ""
        if naive_read(main_id) != "PENDING":
            raise RuntimeError(f"squeue does not show held job {main_id} as PENDING")
        naive = measure(lambda: [naive_read(main_id) for _ in range(reads)])

        per = 1000.0 / reads
        sacct = gateway_commands.get("sacct", 0)
        self.details["reads"] = {
            "reads": reads,
            "gateway": {**gateway.as_dict(), "slurm_commands": gateway_commands},
            "naive_squeue_per_read": {**naive.as_dict(), "slurm_commands": {"squeue": reads}},
        }
        self.rows.append(
            row(
                "1000 status reads",
                "slurmctld RPCs / 1000 reads (sdiag)",
                gateway.ctld_figure() * per,
                goal=("<=", 1),
                baseline=naive.ctld_figure() * per,
                baseline_label="squeue -j per read",
                note=_net_note(gateway, gateway_commands) + f"; {reads / gateway.phase.seconds:,.0f} reads/s vs {reads / naive.phase.seconds:,.0f}/s",
            )
        )
        self.rows.append(
            row(
                "1000 status reads",
                "slurmdbd queries (sacct) / 1000 reads",
                sacct * per,
                goal=("<=", 1),
                baseline=0.0,
                baseline_label="squeue -j per read",
                note=f"slurmdbd RPCs net {gateway.dbd_net:+.0f} (sacctmgr show stats)",
            )
        )

    # -- 2. RPCs per poll cycle ---------------------------------------------------------------

    def cycles(self) -> None:
        sizes = (1, 10, 100) if not self.quick else (1, 10)
        gateway_cycles, naive_cycles = (20, 3) if not self.quick else (5, 2)
        self.details["poll_cycles"] = {}
        for n in sizes:
            records = self.records[:n]
            runner = CountingRunner()
            service = self.service(self.fresh_store(f"poll-{n}.sqlite", records), runner)
            poller = Poller(service, self.config, holder=f"bench-{n}")
            poller.cycle()  # warm-up: the first cycle takes the lease and applies every state
            looked_at = service.poll()
            if looked_at != n:
                raise RuntimeError(f"poll looked at {looked_at} live jobs, expected {n}")

            def gateway_cycles_fn() -> dict[str, int]:
                for _ in range(gateway_cycles):
                    poller.cycle()
                return runner.snapshot()

            gateway = measure(gateway_cycles_fn, repeats=3, before=runner.reset)
            commands = gateway.phase.result
            if poller.stats.errors:
                raise RuntimeError(f"poller errors: {poller.stats.last_error}")
            live = service.store.live(set())
            if any(r.state != "queued" for r in live):
                raise RuntimeError(f"unexpected states after polling: {sorted({r.state for r in live})}")
            poller.stop()

            def naive_cycles_fn() -> None:
                for _ in range(naive_cycles):
                    for record in records:
                        naive_read(record.main_slurm_id or "")

            naive = measure(naive_cycles_fn, repeats=3)
            sacct_per_cycle = commands.get("sacct", 0) / gateway_cycles
            ctld_per_cycle = gateway.ctld_figure() / gateway_cycles
            naive_per_cycle = naive.ctld_figure() / naive_cycles
            gateway_ms = gateway.phase.seconds / gateway_cycles * 1000
            naive_ms = naive.phase.seconds / naive_cycles * 1000
            self.details["poll_cycles"][str(n)] = {
                "live_jobs": n,
                "slurm_jobs": 2 * n,
                "gateway": {**gateway.as_dict(), "cycles": gateway_cycles, "slurm_commands": commands, "cycle_ms": round(gateway_ms, 1)},
                "naive_squeue_per_job": {**naive.as_dict(), "cycles": naive_cycles, "cycle_ms": round(naive_ms, 1)},
            }
            per_cycle_commands = ", ".join(f"{k} {v / gateway_cycles:g}" for k, v in sorted(commands.items())) or "none"
            self.rows.append(
                row(
                    "poll cycle",
                    f"Slurm RPCs / cycle, {n} live job{'s' if n > 1 else ''} (sdiag + sacct calls)",
                    ctld_per_cycle + sacct_per_cycle,
                    goal=("<=", 2),
                    baseline=naive_per_cycle,
                    baseline_label="squeue -j per job",
                    note=f"slurmctld {ctld_per_cycle:.2f} + sacct {sacct_per_cycle:g}; {_ctld_note(gateway, gateway_cycles, 'cycle')}; "
                    f"commands/cycle: {per_cycle_commands}; "
                    f"cycle {gateway_ms:.0f} ms vs {naive_ms:.0f} ms",
                )
            )

    # -- 3. Status reads/s and latency --------------------------------------------------------

    def throughput(self) -> None:
        total = 1000 if self.quick else 5000
        threads = 8
        state = self.tmp / "serve-state"
        state.mkdir()
        store = JobStore(make_engine(f"sqlite:///{state / 'gateway.sqlite'}"))
        for record in self.records:
            store.insert(record)
        global BENCH_TOKEN
        BENCH_TOKEN = create_token(store, "bench", admin=True)[1]
        store.engine.dispose()
        job_ids = [r.job_id for r in self.records]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            {
                "GATEWAY_CONFIG": str(ROOT / "config" / "local.toml"),
                "GATEWAY_PATHS_STATE_DIR": str(state),
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            }
        )
        self.details["throughput"] = {"requests": total, "client_threads": threads, "jobs_in_store": len(job_ids)}
        servers = {
            "werkzeug (threaded, serve --dev)": ["--dev"],
            "gunicorn (serve --workers 2)": ["--workers", "2"],
        }
        for label, extra in servers.items():
            port = free_port()
            log_path = self.tmp / f"serve-{port}.log"
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port), *extra],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,  # gunicorn's access log: written, not read
                    stderr=log_file,
                    start_new_session=True,
                )
            base = f"http://127.0.0.1:{port}"
            try:
                wait_serving(base, proc, log_path)
                status_urls = [f"{base}/v1/relion/jobs/{j}" for j in job_ids]
                _load(status_urls, 200, threads)  # warm-up
                status = _load(status_urls, total, threads, server_sid=proc.pid)
                health = _load([f"{base}/healthz"], total, threads, server_sid=proc.pid)
            finally:
                _stop(proc)
            self.details["throughput"][label] = {"status": status, "healthz": health}
            cores = os.cpu_count() or 1
            self.rows.append(
                row(
                    "status reads (8 client threads)",
                    f"reads/s, {label}",
                    status["per_second"],
                    unit="/s",
                    goal=(">=", 1000),
                    note=f"{status['errors']} errors; CPU per read: server {status['server_cpu_ms_per_request']:.2f} ms, "
                    f"client {status['client_cpu_ms_per_request']:.2f} ms, so {cores} cores allow "
                    f"{cores * 1000 / (status['server_cpu_ms_per_request'] + status['client_cpu_ms_per_request']):,.0f} reads/s "
                    f"with this client, {cores * 1000 / status['server_cpu_ms_per_request']:,.0f}/s with the client elsewhere; "
                    f"/healthz (no store, same server and client) {health['per_second']:,.0f}/s",
                )
            )
            self.rows.append(
                row(
                    "status reads (8 client threads)",
                    f"p99 latency, {label}",
                    status["p99_ms"],
                    unit="ms",
                    goal=("<", 25),
                    note=f"p50 {status['p50_ms']:.1f} ms, max {status['max_ms']:.1f} ms; other processes used "
                    f"{status['others_cpu_share']:.0%} of the machine's CPU meanwhile",
                )
            )

    def close(self) -> None:
        self.cancel_jobs()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _ctld_note(measured: Measured, per: int, unit: str) -> str:
    """How the slurmctld figure was obtained, and the by-type cross-check."""
    by_type = f"by message type {measured.ctld_net / per:.2f}/{unit} net of background ({measured.phase.ctld_total} in the phase, " \
        f"{measured.ctld_background:.1f} background)"
    if measured.ctld_attributed is None:
        return f"sdiag {by_type}"
    return f"sdiag per-user (runner's squeue as {MEASURE_USER[0] if MEASURE_USER else '?'}) {measured.ctld_attributed / per:.2f}/{unit}; {by_type}"


def _net_note(measured: Measured, commands: dict[str, int]) -> str:
    ran = ", ".join(f"{k} {v}" for k, v in sorted(commands.items())) or "0"
    return f"gateway ran Slurm commands: {ran}; " + _ctld_note(measured, 1, "phase")




def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started (its own session: the gunicorn master and its workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _load(urls: list[str], total: int, threads: int, server_sid: int | None = None) -> dict[str, Any]:
    """``total`` GETs spread over ``threads`` client threads, one requests.Session each.

    Also the CPU time the client (this process) and the server (its session) spent on them: client
    and server share this machine's cores, so the sum bounds what any server could reach here.
    """
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]

    def worker() -> None:
        session = requests.Session()
        if BENCH_TOKEN:
            session.headers["Authorization"] = f"Bearer {BENCH_TOKEN}"
        mine: list[float] = []
        while True:
            with lock:
                index = next(counter)
            if index >= total:
                break
            url = urls[index % len(urls)]
            started = time.perf_counter()
            try:
                ok = session.get(url, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            mine.append(time.perf_counter() - started)
            if not ok:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    server_cpu0 = session_cpu_seconds(server_sid) if server_sid else 0.0
    client_cpu0 = time.process_time()
    busy0, all0 = machine_cpu_seconds()
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu0
    server_cpu = session_cpu_seconds(server_sid) - server_cpu0 if server_sid else 0.0
    busy1, all1 = machine_cpu_seconds()
    others = max(0.0, (busy1 - busy0) - client_cpu - server_cpu)
    return {
        "requests": total,
        "seconds": round(wall, 3),
        "per_second": total / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "errors": errors[0],
        "client_cpu_ms_per_request": client_cpu / total * 1000,
        "server_cpu_ms_per_request": server_cpu / total * 1000,
        "others_cpu_share": others / (all1 - all0) if all1 > all0 else 0.0,
    }


def run(ctx: Context) -> dict[str, Any]:
    bench = Bench(ctx)
    try:
        bench.submit_jobs(10 if ctx.quick else 100)
        ctx.log("  1/3 Slurm RPCs per 1000 status reads")
        bench.reads()
        ctx.log("  2/3 Slurm RPCs per poll cycle")
        bench.cycles()
        ctx.log("  3/3 status reads/s and latency")
        bench.throughput()
    finally:
        bench.close()
    bench.notes.append(
        "slurmctld figures: the gateway's and the baseline's squeue run as user "
        f"{MEASURE_USER[0] if MEASURE_USER else '(none: not root)'}, and sdiag's per-user counter for it is the figure "
        "(exact, whatever else the shared stack does); the notes add the by-message-type sdiag deltas net of an idle "
        "control's background rate, which also sees RPCs made outside the runner. sacct goes to slurmdbd, which sdiag "
        "does not cover: it is counted as calls made through the gateway's runner (sacctmgr show stats deltas are in "
        "tracking.json)."
    )
    return {"rows": bench.rows, "details": bench.details, "notes": bench.notes}
