"""`relion-gateway demo`: one real 2D classification through the REST API on the local stack."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import requests

from gateway.client import retrying_session
from gateway.config import CONFIG_FILE_ENV, DEFAULT_STATE_DIR, build_config
from gateway.jobs.states import TERMINAL_VALUES
from gateway.relion.presets import TINY_FLAGS
from gateway.stack.nodes import HEAD_NAME
from gateway.storage.s3 import S3Location, S3Storage, make_s3_client, parse_s3_url

log = logging.getLogger(__name__)

# Fast settings measured on the tiny dataset (shared notes): about 5-8 s of RELION with 3 ranks.
DEMO_FLAGS: dict[str, Any] = TINY_FLAGS["2d"]
# 3 ranks x 4 threads is more than one node of the local 2-node stack (8 CPUs each): the gateway
# plans --nodes=2 and the demo shows RELION's ranks on both nodes.
DEMO_THREADS = 4


def local_config_file() -> Path | None:
    """config/local.toml of a source checkout (the local stack's profile)."""
    path = Path(__file__).resolve().parents[1] / "config" / "local.toml"
    return path if path.exists() else None


def gateway_environment(stack: dict[str, Any]) -> dict[str, str]:
    """The environment a gateway (and the jobs it submits) needs on the local stack."""
    env = dict(os.environ)
    env.update(stack["environment"])
    if CONFIG_FILE_ENV not in env and local_config_file():
        env[CONFIG_FILE_ENV] = str(local_config_file())
    return env


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_gateway(state_dir: Path, env: dict[str, str], port: int = 9012) -> str:
    """(Re)start `relion-gateway serve` detached, recorded by pid file like the stack's daemons.

    A gateway left running by an earlier demo may be another checkout's code: replace it.
    """
    # The head's name, where `serve` listens with config/local.toml: jobs on the nodes post here too.
    url = f"http://{HEAD_NAME}:{port}"
    run_dir = state_dir / "stack" / "run"
    log_dir = state_dir / "stack" / "log"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    pid_file = run_dir / "gateway.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 15
        while healthy(url) and time.monotonic() < deadline:
            time.sleep(0.2)
    if healthy(url):
        raise click.ClickException(f"port {port} is taken by a gateway this demo did not start; stop it first")
    with open(log_dir / "gateway.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # outlives this command, like a daemon
        )
    pid_file.write_text(f"{proc.pid}\n")
    (run_dir / "gateway.url").write_text(url + "\n")
    deadline = time.monotonic() + 30
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"the gateway did not start; see {log_dir / 'gateway.log'}")
        time.sleep(0.3)
    return url


def demo_token(env: dict[str, str]) -> tuple[str, str]:
    """A fresh bearer token for user `demo` in the store the gateway uses (`token create --user demo`)."""
    from gateway.audit import Auditor
    from gateway.auth import create_token
    from gateway.database import JobStore, make_engine

    config = build_config(environ=env)
    record, token = create_token(
        JobStore(make_engine(config["STORE_DATABASE_URL"])), "demo", n=int(config["AUTH_SCRYPT_N"]), auditor=Auditor(config["AUDIT_FILE"])
    )
    return record.id, token


def revoke_demo_token(env: dict[str, str], token_id: str) -> None:
    from gateway.audit import Auditor
    from gateway.auth import revoke_token
    from gateway.database import JobStore, make_engine

    config = build_config(environ=env)
    revoke_token(JobStore(make_engine(config["STORE_DATABASE_URL"])), token_id, auditor=Auditor(config["AUDIT_FILE"]))


def follow(
    url: str, job_id: str, *, timeout: float = 600, interval: float = 2.0, session: requests.Session | None = None
) -> dict[str, Any]:
    """Poll GET /jobs/<id> until the job ends; print each state change."""
    http = session or retrying_session()
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        job: dict[str, Any] = http.get(f"{url}/v1/relion/jobs/{job_id}", timeout=30).json()
        line = f"{job['status']}  (Slurm: {job['slurm']['state'] or '-'})"
        if line != last:
            click.echo(f"  {time.strftime('%H:%M:%S')}  {line}")
            last = line
        if job["status"] in TERMINAL_VALUES:
            return job
        if time.monotonic() > deadline:
            raise click.ClickException(f"job {job_id} did not end within {timeout:.0f} s")
        time.sleep(interval)


@click.command("demo")
@click.option("--state-dir", type=click.Path(path_type=Path), default=lambda: os.environ.get("GATEWAY_PATHS_STATE_DIR", DEFAULT_STATE_DIR))
@click.option("--num-mpi", type=int, default=3, show_default=True)
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait for the job")
def demo_command(state_dir: Path, num_mpi: int, timeout: float) -> None:
    """Make a tiny dataset, submit a 2D classification over REST and follow it to the end."""
    from gateway.relion.dataset import make_dataset
    from gateway.stack import stack_status, stack_up

    started = time.monotonic()
    stack = stack_status(state_dir)
    if not stack["all_up"]:
        click.echo("stack is not up; starting it")
        stack = stack_up(state_dir)
    env = gateway_environment(stack)
    os.environ.update(stack["environment"])

    bucket = stack["s3"]["bucket"]
    storage = S3Storage(make_s3_client(stack["s3"]["endpoint_url"], stack["s3"]["region"]))
    dataset_dir = state_dir / "demo" / "tiny"
    click.echo(f"making the synthetic dataset in {dataset_dir}")
    tarball = make_dataset(dataset_dir)
    dataset = S3Location(bucket, "datasets/tiny.tar.gz")
    storage.upload_file(str(tarball), dataset)
    click.echo(f"uploaded {tarball.stat().st_size} bytes to {dataset.url}")

    url = start_gateway(state_dir, env)
    click.echo(f"gateway at {url}")
    # Authentication is on, as in production: the demo makes its own token, and revokes it at the end.
    token_id, token = demo_token(env)
    click.echo(f"created bearer token {token_id} for user demo (relion-gateway token create --user demo)")
    session = retrying_session()
    session.headers["Authorization"] = f"Bearer {token}"
    try:
        job = submit_and_follow(session, url, bucket, dataset, num_mpi, timeout)
    finally:
        revoke_demo_token(env, token_id)
    print_summary(job, storage)
    click.echo(f"demo took {time.monotonic() - started:.0f} s")
    if job["status"] != "succeeded":
        sys.exit(1)


def submit_and_follow(
    session: requests.Session, url: str, bucket: str, dataset: S3Location, num_mpi: int, timeout: float
) -> dict[str, Any]:
    request = {
        "user_id": "demo",
        "workspace_id": "tiny",
        "dataset_s3_url": dataset.url,
        "output_s3_prefix": f"s3://{bucket}/results/demo",  # the user's own prefix ([s3] output_prefixes)
        "mode": "2d",
        "num_mpi": num_mpi,
        "flags": {**DEMO_FLAGS, "j": DEMO_THREADS},
    }
    response = session.post(f"{url}/v1/relion/jobs", json=request, timeout=60)
    if response.status_code != 202:
        raise click.ClickException(f"submit refused ({response.status_code}): {response.text}")
    job = response.json()
    click.echo(f"submitted {job['job_id']}: Slurm main job {job['slurm']['main_job_id']}, archive job {job['slurm']['archive_job_id']}")
    return follow(url, job["job_id"], timeout=timeout, session=session)


def print_summary(job: dict[str, Any], storage: S3Storage) -> None:
    metadata = job.get("metadata") or {}
    results = (metadata.get("relion") or {}).get("results") or {}
    output = metadata.get("output") or {}
    click.echo("")
    click.echo(f"job id        {job['job_id']}")
    click.echo(f"state         {job['status']}  ({job['message']})")
    click.echo(f"Slurm jobs    main {job['slurm']['main_job_id']} ({job['slurm']['state']}), archive {job['slurm']['archive_job_id']}")
    click.echo(f"output        {output.get('url', '-')}  ({output.get('bytes', 0)} bytes, sha256 {str(output.get('sha256', ''))[:16]}...)")
    metadata_location = parse_s3_url(job["output_url"]).child("metadata.json")
    stored = "present" if _exists(storage, metadata_location) else "MISSING"
    click.echo(f"metadata      {metadata_location.url} ({stored})")
    if results:
        distribution = ", ".join(f"{x:.3f}" for x in results.get("class_distribution") or [])
        click.echo(f"RELION        iterations {results.get('iterations_run')}, resolution {results.get('resolution_angstrom')} A, classes [{distribution}]")
    resources = metadata.get("resources") or {}
    ranks = resources.get("rank_hosts") or []
    if ranks:
        where = ", ".join(f"rank {r['rank']} on {r['host']}" for r in ranks)
        click.echo(f"ranks         {where}  ({len(resources.get('hosts') or [])} nodes, as RELION reported)")
    timings = metadata.get("timings") or {}
    if timings:
        click.echo("timings (s)   " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    click.echo(json.dumps({"job_id": job["job_id"], "status": job["status"]}))


def _exists(storage: S3Storage, location: S3Location) -> bool:
    from gateway.storage.s3 import StorageError

    try:
        storage.head(location)
        return True
    except StorageError:
        return False
