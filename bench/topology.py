"""Issue 14, "multi-node": what spreading a job over nodes costs, and what the stack costs to bring up.

1. The tiny 2D end to end (POST to `succeeded`, as bench/overhead.py measures it) with the SAME
   request (TINY_FLAGS["2d"], 3 ranks x 1 thread) placed on one node and spread over two. Two
   gateways are served in-process, identical but for `[slurm] extra_directives`
   (SLURM_EXTRA_DIRECTIVES): ["--nodes=1"] and ["--nodes=2"]; runs alternate 1, 2, 2, 1, 1, 2
   (--quick: 1, 2). Medians of each and the ratio 2-node / 1-node; metadata.json's
   resources.hosts / rank_hosts say where the ranks really ran.
2. The poller's Slurm RPCs per cycle on the multi-node stack with 1 and 20 live jobs: held gateway
   jobs (the packaged templates plus `#SBATCH --hold`) whose ranks need both nodes (3 ranks x 4
   threads, so the gateway plans --nodes=2), measured with bench.common's sdiag counters as in
   bench/tracking.py, against per-job polling.
3. `relion-gateway stack up` on the running stack (warm, a no-op): median wall of 3 runs. Cold
   (`stack down`, then `stack up`) stops the whole stack and only runs with RG_BENCH_COLD_STACK=1.

Every Slurm job submitted here is cancelled at the end (also on a crash), and the dataset and the
results under s3://relion-local/{datasets/bench-topology-<id>.tar.gz, results/bench/topology-<id>/}
are deleted.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from bench.common import (
    MEASURE_USER,
    Context,
    CountingRunner,
    bench_gateway_config,
    follow_job,
    held_templates,
    measure,
    restore_environment,
    row,
)
from bench.overhead import CpuWindow, median, slurm_cpu_seconds
from bench.tracking import _ctld_note, naive_read
from gateway import create_app
from gateway.auth import create_token
from gateway.database import JobStore, make_engine
from gateway.jobs.poller import Poller
from gateway.jobs.service import JobService
from gateway.relion.dataset import make_dataset
from gateway.relion.presets import TINY_FLAGS
from gateway.slurm.cli import SlurmCliBackend
from gateway.stack.nodes import HEAD_NAME
from gateway.storage.s3 import S3Location, S3Storage, make_s3_client

NAME = "topology"
TITLE = "Multi-node topology: 1 node vs 2 nodes end to end, poller RPCs, stack up"

COLD_ENV = "RG_BENCH_COLD_STACK"  # "1": also time `stack down` + `stack up` (stops the whole stack)
PLACEMENTS = {"1 node": ["--nodes=1"], "2 nodes": ["--nodes=2"]}
RANKS = 3
POLL_SIZES = (1, 20)
STACK_LINE = re.compile(r"^(\S+)\s+(\S+)\s+pid\s+(\S+)\s+(.*?)\s+\((\d+\.\d+) s\)$")
STACK_TOTAL = re.compile(r"^stack up in (\d+\.\d+) s$", re.MULTILINE)


@dataclass
class Served:
    app: Any
    server: Any
    url: str
    http: requests.Session
    log_root: Path


def free_head_port() -> int:
    """A free port on the head's bridge address, where the nodes reach the gateway."""
    import socket

    with socket.socket() as probe:
        probe.bind((HEAD_NAME, 0))
        return int(probe.getsockname()[1])


def relion_gateway_cli() -> str:
    beside = Path(sys.executable).parent / "relion-gateway"
    return str(beside) if beside.exists() else (shutil.which("relion-gateway") or "relion-gateway")


class Bench:
    def __init__(self, ctx: Context) -> None:
        from gateway.stack import stack_status

        self.ctx = ctx
        self.quick = ctx.quick
        self.tag = secrets.token_hex(4)
        self.status = stack_status()
        if not self.status.get("all_up"):
            raise RuntimeError("the stack is not up: run `relion-gateway stack up` first")
        self.node_names = [str(n["name"]) for n in self.status.get("nodes", [])]
        if not self.status.get("multinode") or len(self.node_names) < 2:
            raise RuntimeError(f"the stack has one node ({self.node_names}): `relion-gateway stack up --nodes 2` first")
        self.tmp = Path(tempfile.mkdtemp(prefix="relion-gateway-bench-topology-", dir="/var/tmp"))
        self.tmp.chmod(0o711)  # jobs run as another account ([job] run_as) and must reach their dirs below
        self.bucket = str(self.status["s3"]["bucket"])
        self.endpoint = str(self.status["s3"]["endpoint_url"])
        # Inside local.toml's per-user boundaries: datasets/ is readable, results/<user>/ writable.
        self.dataset_key = f"datasets/bench-topology-{self.tag}.tar.gz"
        self.output_prefix = f"results/bench/topology-{self.tag}"
        env = {k: v for k, v in self.status["environment"].items() if not k.startswith("GATEWAY_")}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the gateway's own S3 keys (it presigns for the jobs)
        self.storage = S3Storage(make_s3_client(self.endpoint, str(self.status["s3"]["region"])))
        self._ids_lock = threading.Lock()
        self.slurm_ids: list[str] = []
        self.all_ids = 0
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {"stack": {"nodes": self.node_names, "head": HEAD_NAME}}
        self.notes: list[str] = []
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # -- shared --------------------------------------------------------------------------------

    def config(self, state: Path, **extra: Any) -> dict[str, Any]:
        config = bench_gateway_config(state, self.endpoint, **{"SERVER_PUBLIC_URL": "", **extra})
        return config

    def request(self, threads: int = 1) -> dict[str, Any]:
        return {
            "user_id": "bench",
            "workspace_id": "topology",
            "dataset_s3_url": f"s3://{self.bucket}/{self.dataset_key}",
            "output_s3_prefix": f"s3://{self.bucket}/{self.output_prefix}",
            "mode": "2d",
            "num_mpi": RANKS,
            "flags": {**TINY_FLAGS["2d"], "j": threads},
        }

    def serve(self, config: dict[str, Any], **services: Any) -> Served:
        """An in-process gateway on the head's bridge address (jobs on the nodes post events to it)."""
        port = free_head_port()
        url = f"http://{HEAD_NAME}:{port}"
        config["SERVER_PUBLIC_URL"] = url
        app = create_app(config, **services)
        server = make_server(HEAD_NAME, port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        store = app.extensions["relion_gateway"].store
        token = create_token(store, "bench-topology", admin=True, n=int(config["AUTH_SCRYPT_N"]))[1]
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        return Served(app, server, url, http, Path(config["PATHS_LOG_ROOT"]))

    def track(self, *slurm_ids: str | None) -> None:
        with self._ids_lock:
            for slurm_id in slurm_ids:
                if slurm_id:
                    self.slurm_ids.append(slurm_id)
                    self.all_ids += 1

    def cancel_all(self) -> None:
        with self._ids_lock:
            ids, self.slurm_ids = self.slurm_ids, []
        for start in range(0, len(ids), 200):
            subprocess.run(["scancel", *ids[start:start + 200]], capture_output=True, check=False, timeout=120)

    def close(self) -> None:
        self.cancel_all()
        try:
            self.storage.client.delete_object(Bucket=self.bucket, Key=self.dataset_key)
            paginator = self.storage.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.output_prefix + "/"):
                for item in page.get("Contents", []):
                    self.storage.client.delete_object(Bucket=self.bucket, Key=item["Key"])
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
            self.notes.append(f"could not remove the benchmark's S3 objects: {exc}")
        restore_environment(self._saved_env)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- 1. one node vs two nodes ------------------------------------------------------------------

    def placements(self) -> None:
        data = self.tmp / "data" / "tiny"
        data.parent.mkdir()
        tarball = make_dataset(data)
        self.storage.upload_file(str(tarball), S3Location(self.bucket, self.dataset_key))
        gateways: dict[str, Served] = {}
        try:
            for index, (placement, directives) in enumerate(PLACEMENTS.items()):
                config = self.config(
                    self.tmp / f"e2e-{index + 1}node",
                    SLURM_EXTRA_DIRECTIVES=list(directives),
                    POLLER_INTERVAL_ACTIVE=1.0,
                    POLLER_INTERVAL_QUEUED=1.0,
                    POLLER_INTERVAL_IDLE=2.0,
                )
                gateways[placement] = self.serve(config, storage=self.storage)
            one, two = PLACEMENTS
            order = [one, two] if self.quick else [one, two, two, one, one, two]
            runs: list[dict[str, Any]] = []
            scripts: dict[str, list[str]] = {}
            for placement in order:
                with CpuWindow() as window:
                    result = self.gateway_run(gateways[placement], placement)
                result.update(window.figures(extra_s=result.get("jobs_cpu_s", 0.0)))
                scripts.setdefault(placement, result.pop("sbatch_lines"))
                runs.append(result)
                self.ctx.log(f"    {placement:7s} tiny 2D: {result['wall_s']:.1f} s on {', '.join(result['hosts']) or '?'}")
        finally:
            for served in gateways.values():
                served.app.extensions["relion_gateway_poller"].stop()
                served.server.shutdown()
        self.e2e_runs = runs
        lines = {p: set(s) for p, s in scripts.items()}
        self.details["end_to_end"] = {
            "order": order,
            "request": {**self.request(), "dataset_s3_url": "<benchmark dataset>", "output_s3_prefix": "<benchmark prefix>"},
            "extra_directives": PLACEMENTS,
            # The main scripts' #SBATCH lines (job id replaced): only the placement should differ.
            "main_sbatch_lines": scripts,
            "main_sbatch_difference": {p: sorted(lines[p] - lines[q]) for p, q in ((one, two), (two, one)) if p in lines and q in lines},
            "runs": runs,
        }

    def gateway_run(self, served: Served, placement: str) -> dict[str, Any]:
        http, url = served.http, served.url
        t_post = time.time()
        started = time.perf_counter()
        response = http.post(f"{url}/v1/relion/jobs", json=self.request(), headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=120)
        submit_s = time.perf_counter() - started
        if response.status_code != 202:
            raise RuntimeError(f"submit failed: {response.status_code} {response.text[:300]}")
        job = response.json()
        job_id = job["job_id"]
        main_id, archive_id = job["slurm"].get("main_job_id"), job["slurm"].get("archive_job_id")
        self.track(main_id, archive_id)
        current, seen, wall = follow_job(http, url, job_id, started, placement)
        log_dir = served.log_root / "bench" / job_id
        stamps = {name: float(stamp) for name, stamp in (line.split() for line in (log_dir / "phases").read_text().splitlines() if line.strip())}
        metadata_path = log_dir / "metadata.json"
        metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else (current.get("metadata") or {})
        resources = metadata.get("resources") or {}
        script = http.get(f"{url}/v1/relion/jobs/{job_id}/script", params={"which": "main"}, timeout=30).text
        state = str(served.log_root.parent)
        sbatch_lines = [line.replace(job_id, "<job_id>").replace(state, "<state_dir>") for line in script.splitlines() if line.startswith("#SBATCH")]
        sacct = subprocess.run(
            ["sacct", "-n", "-P", "-j", f"{main_id},{archive_id}", "-o", "JobID,JobName,Start,End,Elapsed,State,TotalCPU,NNodes,NodeList"],
            capture_output=True, text=True, check=False, timeout=30,
        ).stdout.strip().splitlines()
        fields = [line.split("|") for line in sacct if line.count("|") == 8]
        jobs_cpu = sum(slurm_cpu_seconds(f[6]) for f in fields if "." in f[0])  # the steps carry the CPU in 22.05
        main_alloc = next((f for f in fields if f[0] == main_id), None)
        hosts = sorted(resources.get("hosts") or [])
        return {
            "placement": placement,
            "wall_s": wall,
            "job_id": job_id,
            "slurm": job["slurm"],
            "submit_s": round(submit_s, 3),
            "relion_s": round(stamps["finished"] - stamps["running"], 3) if {"running", "finished"} <= set(stamps) else None,
            "post_to_running_s": round(stamps["running"] - t_post, 3) if "running" in stamps else None,
            "hosts": hosts,
            "rank_hosts": resources.get("rank_hosts"),
            "planned_nodes": resources.get("planned_nodes"),  # the gateway's own plan (1 here: 3 CPUs fit a node)
            "allocated_nodes": resources.get("nodes"),
            "node_list": resources.get("node_list"),
            "spanned_hosts": len(hosts),
            "slurm_nodes": {"nnodes": main_alloc[7], "nodelist": main_alloc[8]} if main_alloc else None,
            "metadata_timings": metadata.get("timings"),
            "status_changes_s": seen,
            "sacct": sacct,
            "jobs_cpu_s": round(jobs_cpu, 2),
            "sbatch_lines": sbatch_lines,
        }

    # -- 2. poller RPCs per cycle ------------------------------------------------------------------

    def poll_rpcs(self) -> None:
        templates = held_templates(self.tmp / "held-templates")
        config = self.config(
            self.tmp / "poll-state",
            PATHS_TEMPLATE_DIR=str(templates),
            POLLER_ENABLED=False,
            SERVER_PUBLIC_URL=f"http://{HEAD_NAME}:9",  # nothing runs: the jobs are held
            LIMITS_SUBMISSIONS_PER_MINUTE=1_000_000,
            LIMITS_MAX_ACTIVE_JOBS=1_000_000,
        )
        runner = CountingRunner()
        scheduler = SlurmCliBackend(runner=runner, timeout=float(config["SLURM_COMMAND_TIMEOUT"]))
        app = create_app(config, scheduler=scheduler, storage=self.storage)
        service: JobService = app.extensions["relion_gateway"]
        # 3 ranks x 4 threads: more than one 8-CPU node, so the gateway itself plans --nodes=2.
        request = self.request(threads=4)
        records = []
        started = time.perf_counter()
        for _ in range(max(POLL_SIZES)):
            record = service.submit(dict(request))
            self.track(record.main_slurm_id, record.archive_slurm_id)
            if record.state != "queued" or not record.archive_slurm_id:
                raise RuntimeError(f"set-up submit failed: {record.job_id} {record.state}: {record.message}")
            records.append(record)
        nodes_line = re.search(r"^#SBATCH --nodes=(\d+)$", records[0].main_script, re.MULTILINE)
        planned = int(nodes_line.group(1)) if nodes_line else 1
        self.ctx.log(f"    submitted {len(records)} held gateway jobs ({2 * len(records)} Slurm jobs, planned nodes {planned}) "
                     f"in {time.perf_counter() - started:.1f} s")
        squeue = subprocess.run(["squeue", "-h", "-j", records[0].main_slurm_id or "", "-o", "%T|%r|%D"],
                                capture_output=True, text=True, check=False, timeout=30).stdout.strip()
        cycles, naive_cycles = (5, 2) if self.quick else (20, 3)
        self.details["poll_cycles"] = {"planned_nodes": planned, "squeue_of_one_main_job (state|reason|nodes)": squeue}
        self.poll_results: dict[int, dict[str, Any]] = {}
        for n in POLL_SIZES:
            subset = records[:n]
            store = JobStore(make_engine(f"sqlite:///{self.tmp / f'poll-{n}.sqlite'}"))
            for record in subset:
                store.insert(record)
            svc = JobService(
                config=service.config, store=store, scheduler=scheduler, renderer=service.renderer,
                storage=self.storage, callback_secret=service.callback_secret,
            )
            poller = Poller(svc, service.config, holder=f"bench-topology-{n}")
            poller.cycle()  # warm-up: takes the lease, applies every state
            if svc.poll() != n:
                raise RuntimeError(f"poll did not look at {n} live jobs")

            def gateway_cycles(poller: Poller = poller) -> dict[str, int]:
                for _ in range(cycles):
                    poller.cycle()
                return runner.snapshot()

            gateway = measure(gateway_cycles, repeats=3, before=runner.reset)
            commands = gateway.phase.result
            if poller.stats.errors:
                raise RuntimeError(f"poller errors: {poller.stats.last_error}")
            states = sorted({r.state for r in store.live(set())})
            if states != ["queued"]:
                raise RuntimeError(f"unexpected states after polling held jobs: {states}")
            poller.stop()

            def naive(subset: list[Any] = subset) -> None:
                for _ in range(naive_cycles):
                    for record in subset:
                        naive_read(record.main_slurm_id or "")

            baseline = measure(naive, repeats=3)
            store.engine.dispose()
            sacct_per = commands.get("sacct", 0) / cycles
            ctld_per = gateway.ctld_figure() / cycles
            self.poll_results[n] = {
                "per_cycle": ctld_per + sacct_per,
                "ctld_per_cycle": ctld_per,
                "sacct_per_cycle": sacct_per,
                "naive_per_cycle": baseline.ctld_figure() / naive_cycles,
                "commands": commands,
                "cycles": cycles,
                "note": _ctld_note(gateway, cycles, "cycle"),
                "cycle_ms": gateway.phase.seconds / cycles * 1000,
                "naive_cycle_ms": baseline.phase.seconds / naive_cycles * 1000,
            }
            self.details["poll_cycles"][str(n)] = {
                "live_jobs": n,
                "slurm_jobs": 2 * n,
                "gateway": {**gateway.as_dict(), "cycles": cycles, "slurm_commands": commands},
                "naive_squeue_per_job": {**baseline.as_dict(), "cycles": naive_cycles},
            }
            self.ctx.log(f"    {n:3d} live jobs: {ctld_per + sacct_per:.2f} Slurm RPCs/cycle "
                         f"(per-job squeue: {baseline.ctld_figure() / naive_cycles:.1f})")
        self.cancel_all()

    # -- 3. stack up -------------------------------------------------------------------------------

    def stack_up_once(self) -> dict[str, Any]:
        started = time.perf_counter()
        completed = subprocess.run([relion_gateway_cli(), "stack", "up"], capture_output=True, text=True, check=False, timeout=600)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise RuntimeError(f"stack up failed ({completed.returncode}): {(completed.stderr or completed.stdout)[-1500:]}")
        actions = {}
        for line in completed.stdout.splitlines():
            if match := STACK_LINE.match(line.strip()):
                actions[match.group(1)] = {"state": match.group(2), "action": match.group(4), "seconds": float(match.group(5))}
        total = STACK_TOTAL.search(completed.stdout)
        return {
            "wall_s": round(wall, 3),
            "reported_s": float(total.group(1)) if total else None,
            "actions": actions,
            "other_lines": [line for line in completed.stdout.splitlines()
                            if line.strip() and not STACK_LINE.match(line.strip()) and not STACK_TOTAL.match(line.strip())],
        }

    def stack_up_warm(self) -> None:
        runs = [self.stack_up_once() for _ in range(3)]
        self.details["stack_up_warm"] = runs
        self.warm_runs = runs
        self.ctx.log("    warm stack up: " + ", ".join(f"{r['wall_s']:.2f} s" for r in runs))

    def stack_up_cold(self) -> None:
        """`stack down` then `stack up`: stops every daemon of the stack (and a gateway it started)."""
        started = time.perf_counter()
        down = subprocess.run([relion_gateway_cli(), "stack", "down"], capture_output=True, text=True, check=False, timeout=600)
        down_s = time.perf_counter() - started
        up = self.stack_up_once()
        self.cold = {"down_s": round(down_s, 3), "down_rc": down.returncode, "down_output": down.stdout.splitlines(), "up": up}
        self.details["stack_up_cold"] = self.cold
        self.ctx.log(f"    cold stack up: {up['wall_s']:.2f} s (stack down {down_s:.2f} s)")

    # -- the report --------------------------------------------------------------------------------

    def report(self) -> None:
        one, two = PLACEMENTS
        runs = self.e2e_runs
        by = {p: [r for r in runs if r["placement"] == p] for p in PLACEMENTS}
        wall = {p: median([r["wall_s"] for r in by[p]]) for p in PLACEMENTS}
        relion = {p: median([r["relion_s"] for r in by[p] if r["relion_s"] is not None]) for p in PLACEMENTS}
        spans = {p: sorted({len(r["hosts"]) for r in by[p]}) for p in PLACEMENTS}
        spanned_ok = all(len(r["hosts"]) == 2 for r in by[two]) and all(len(r["hosts"]) == 1 for r in by[one])
        self.details["end_to_end"]["summary"] = {
            "median_wall_s": wall,
            "median_relion_s": relion,
            "ratio_2_over_1": wall[two] / wall[one],
            "relion_ratio_2_over_1": relion[two] / relion[one],
            "hosts_per_run": {p: [r["hosts"] for r in by[p]] for p in PLACEMENTS},
            "two_node_runs_spanned_two_hosts": all(len(r["hosts"]) == 2 for r in by[two]),
            "one_node_runs_on_one_host": all(len(r["hosts"]) == 1 for r in by[one]),
        }
        n = len(by[two])
        group = f"1 tiny 2D end to end, {RANKS} ranks x 1 thread ({n} run{'s' if n > 1 else ''} each, medians)"
        diff = self.details["end_to_end"]["main_sbatch_difference"]
        self.rows += [
            row(group, "wall, POST -> succeeded, spread over 2 nodes", wall[two], unit="s", baseline=wall[one],
                baseline_label="the same request on 1 node",
                note="runs " + ", ".join(
                    f"{r['placement']} {r['wall_s']:.1f} s on {'+'.join(r['hosts']) or '?'} (RELION {r['relion_s']:.1f} s, other "
                    f"processes {r['others_cpu_share']:.0%} of the CPU)" for r in runs)
                + f"; the main scripts differ only in {diff.get(two, [])} vs {diff.get(one, [])}"),
            row(group, "2 nodes / 1 node, wall", wall[two] / wall[one], unit="x", goal=("<=", 1.3),
                note="goal: within noise; hosts per run (metadata.json resources.hosts): "
                + "; ".join(f"{p}: {', '.join('+'.join(r['hosts']) or '?' for r in by[p])}" for p in PLACEMENTS)
                + "; Slurm's NNodes per run (sacct): " + "; ".join(
                    f"{p}: {', '.join(str((r['slurm_nodes'] or {}).get('nnodes', '?')) for r in by[p])}" for p in PLACEMENTS)
                + ("" if spanned_ok else " — **a run did not have the placement it asked for**")),
            row(group, "RELION in the job (running -> finished), 2 nodes", relion[two], unit="s", baseline=relion[one],
                baseline_label="1 node",
                note=f"2 nodes / 1 node {relion[two] / relion[one]:.2f}; the ranks' traffic goes over TCP on the bridge when "
                "spread, over shared memory on one node"),
            row(group, "hosts the 2-node runs' ranks ran on (min over runs)", float(min(len(r["hosts"]) for r in by[two])),
                goal=(">=", 2), note=f"distinct hosts per run: {spans[two]} (2 nodes), {spans[one]} (1 node); rank_hosts in topology.json"),
        ]

        group = "2 poll cycle, multi-node stack"
        for n_jobs, result in self.poll_results.items():
            per_cycle_commands = ", ".join(f"{k} {v / result['cycles']:g}" for k, v in sorted(result["commands"].items())) or "none"
            self.rows.append(
                row(group, f"Slurm RPCs / cycle, {n_jobs} live job{'s' if n_jobs > 1 else ''} (sdiag + sacct calls)",
                    result["per_cycle"], goal=("<=", 2), baseline=result["naive_per_cycle"], baseline_label="squeue -j per job",
                    note=f"slurmctld {result['ctld_per_cycle']:.2f} + sacct {result['sacct_per_cycle']:g}; {result['note']}; "
                    f"commands/cycle: {per_cycle_commands}; cycle {result['cycle_ms']:.0f} ms vs {result['naive_cycle_ms']:.0f} ms")
            )

        self.notes += [
            ("Placement: two in-process gateways (Werkzeug threaded server on the head's bridge address "
            f"{HEAD_NAME}, which the nodes reach; config/local.toml, a temp state dir each, poller at 1 s, client polling every "
            "0.2 s), identical but for `[slurm] extra_directives` (`--nodes=1` / `--nodes=2`); the request is the same "
            f"(TINY_FLAGS['2d'], num_mpi {RANKS}, j 1: 3 CPUs, which one 8-CPU node holds, so the gateway plans no --nodes "
            "itself). The directive also lands in the archive hook's script, where sbatch turns --nodes=2 with one task into "
            "one node (`can't run 1 processes on 2 nodes, setting nnodes to 1`). Order "
            f"{', '.join(self.details['end_to_end']['order'])}. Every node is a network namespace on this one "
            f"{os.cpu_count()}-CPU machine: the nodes' 8 CPUs each are declared, not real, so both placements share the same "
            "cores and the 2-node runs differ in the MPI transport (TCP over the bridge instead of shared memory) and in "
            "Slurm starting the step on two slurmds."),
            (f"Poll cycles: {max(POLL_SIZES)} held gateway jobs (packaged templates plus `#SBATCH --hold`, 3 ranks x 4 threads "
            f"so each plans --nodes={self.details['poll_cycles'].get('planned_nodes')}), {2 * max(POLL_SIZES)} pending Slurm jobs; "
            "a fresh SQLite store with the first N records, Poller.cycle() repeated, counted as in the tracking benchmark "
            f"(slurmctld queries run as {MEASURE_USER[0] if MEASURE_USER else '(not root: by-type figure)'}; sdiag's per-user "
            "counter; sacct calls counted by the runner)."),
            "Stack up: the `relion-gateway stack up` command next to this Python, run as a subprocess on the running stack; the "
            "wall time includes the interpreter's start-up and imports. Cold mode (`" + COLD_ENV + "=1 python bench/run.py "
            "--only topology`) runs `stack down` then `stack up` at the end: it stops every daemon (and the gateway the stack "
            "started, which `up` does not restart) and Slurm's counters restart.",
            f"{self.all_ids} Slurm jobs were submitted in all and every one that was still live was scancelled.",
        ]

    def stack_rows(self) -> None:
        group = "3 relion-gateway stack up"
        warm = self.warm_runs
        noop = all(a["action"] == "already up" for r in warm for a in r["actions"].values())
        self.rows.append(
            row(group, "warm (stack running), wall, median of 3", median([r["wall_s"] for r in warm]), unit="s",
                note="runs " + ", ".join(f"{r['wall_s']:.2f} s" for r in warm)
                + "; its own `stack up in` figure (after Python start-up and imports) "
                + ", ".join(f"{r['reported_s']:.2f} s" for r in warm if r["reported_s"] is not None)
                + ("; every daemon `already up` (a no-op)" if noop else "; **not a no-op**: see topology.json stack_up_warm"))
        )
        if getattr(self, "cold", None):
            cold = self.cold
            self.rows.append(
                row(group, "cold (after `stack down`), wall", cold["up"]["wall_s"], unit="s",
                    note=f"warm median {median([r['wall_s'] for r in warm]):.2f} s; `stack down` took {cold['down_s']:.2f} s (rc {cold['down_rc']}); its own figure "
                    f"{cold['up']['reported_s']} s; per daemon: " + ", ".join(f"{k} {v['action']} {v['seconds']:.2f} s"
                                                                              for k, v in cold["up"]["actions"].items()))
            )
        else:
            self.rows.append(
                row(group, f"cold (`stack down` + `stack up`): not measured (opt-in: {COLD_ENV}=1, stops the whole stack)",
                    float("nan"))
            )


def run(ctx: Context) -> dict[str, Any]:
    cold = os.environ.get(COLD_ENV) == "1"
    bench = Bench(ctx)
    try:
        ctx.log("  1/3 tiny 2D end to end: the same request on 1 node vs over 2 nodes")
        bench.placements()
        ctx.log("  2/3 Slurm RPCs per poll cycle, held multi-node jobs")
        bench.poll_rpcs()
        ctx.log("  3/3 relion-gateway stack up, warm" + (" then cold (stack down + up)" if cold else ""))
        bench.stack_up_warm()
    finally:
        bench.close()
    if cold:  # last, after every job is cancelled: it stops the whole stack
        bench.stack_up_cold()
    bench.report()
    bench.stack_rows()
    return {"rows": bench.rows, "details": bench.details, "notes": bench.notes}
