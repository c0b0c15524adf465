"""Issue 18, "container image": what the image weighs, what building it costs, and what running the
gateway in it costs a job.

1. `image build` (gateway.stack.image.ImageBuilder) three ways, in this order: reused (an image of
   this commit exists: the warm case, what `make test` pays on a second run), rebuilt on the
   existing base (``force``: the wheels and `podman build`, what a new commit pays), and cold (the
   debootstrap base removed first; skipped with --quick). Each step's seconds come from the
   builder's own report; the image's size from `podman image inspect`.
2. The demo 2D job (gateway.demo's request: 3 ranks, DEMO_FLAGS) from POST to `succeeded`, through a
   gateway on the host and through the image's gateway on the local stack (gateway/stack/container.py),
   alternating host, container, container, host (--quick: host, container). Both use the `rest`
   backend with self-signed tokens, so the difference is the container, not the backend. Medians
   and the ratio container / host.

Needs the stack with slurmrestd and root (podman, the job account's directories). The dataset and
every result under s3://relion-local/{datasets/bench-image-<id>.tar.gz, results/demo/} it made are
deleted at the end.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

from bench.common import Context, bench_gateway_config, remove_s3_prefix, restore_environment, row
from bench.overhead import median
from bench.topology import free_head_port
from gateway import create_app
from gateway.auth import create_token
from gateway.client import retrying_session
from gateway.demo import submit_and_follow
from gateway.process import CommandError
from gateway.relion.dataset import make_dataset
from gateway.stack import stack_status
from gateway.stack.container import job_dirs, pod, run_on_stack
from gateway.stack.image import BASE_IMAGE, BuildReport, ImageBuilder
from gateway.stack.nodes import HEAD_NAME
from gateway.storage.s3 import S3Location, S3Storage, make_s3_client

NAME = "image"
TITLE = "Container image: size, build cold / new commit / reused, the demo job through it vs the host"

ROOT = Path(__file__).resolve().parents[1]
JOB_ACCOUNT = "rgjob"  # the stack's job account: the container runs as it (see tests/container)


def _build_rows(label: str, report: BuildReport) -> list[dict[str, Any]]:
    steps = ", ".join(f"{s.name} {s.seconds:.1f} s" for s in report.steps if s.outcome != "skipped")
    return [row("build", f"image build, {label}", round(report.seconds, 2), unit="s", note=steps)]


def builds(ctx: Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    builder = ImageBuilder()
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    first = builder.build()  # makes sure one exists; whatever it cost is not a figure
    reused = builder.build()
    rows += _build_rows("reused (this commit's image exists)", reused)
    rebuilt = builder.build(force=True)
    rows += _build_rows("new commit (base exists: wheels + podman build)", rebuilt)
    details["first"] = first.lines()
    if not ctx.quick:
        try:
            pod("rmi", BASE_IMAGE, timeout=120)  # untags it; the images built on it keep their layers
        except CommandError as exc:
            ctx.log(f"  could not remove the base: {exc}")
        cold = builder.build(force=True)
        rows += _build_rows("cold (debootstrap base too)", cold)
        rebuilt = cold
    rows.append(row("size", "image size (podman image inspect)", round((rebuilt.size_bytes or 0) / 1e6), unit="MB"))
    details["tag"] = rebuilt.tag
    return rows, details


class Demo:
    """One dataset, the demo request, through the host's gateway and through the container's."""

    def __init__(self, ctx: Context, stack: dict[str, Any], image: str) -> None:
        self.ctx, self.stack, self.image = ctx, stack, image
        env = {k: v for k, v in stack["environment"].items() if not k.startswith("GATEWAY_")}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the host gateway's (and this process's) S3 keys
        self.storage = S3Storage(make_s3_client(stack["s3"]["endpoint_url"], stack["s3"]["region"]))
        self.bucket = stack["s3"]["bucket"]
        self.work = Path(tempfile.mkdtemp(prefix="bench-image-", dir="/var/tmp"))
        self.work.chmod(0o711)
        self.dataset = S3Location(self.bucket, f"datasets/bench-image-{secrets.token_hex(4)}.tar.gz")
        self.storage.upload_file(str(make_dataset(self.work / "tiny")), self.dataset)
        account = pwd.getpwnam(JOB_ACCOUNT)
        self.owner = (account.pw_uid, account.pw_gid)
        self.outputs: list[str] = []

    def _rest_settings(self) -> dict[str, Any]:
        rest = self.stack["slurmrestd"]
        return {"SLURM_BACKEND": "rest", "SLURM_REST_URL": rest["url"], "SLURM_REST_JWT_KEY_FILE": rest["jwt_key"]}

    def host(self) -> float:
        state = self.work / f"host-{secrets.token_hex(3)}"
        state.mkdir(mode=0o711)
        config = bench_gateway_config(state, self.stack["s3"]["endpoint_url"], **self._rest_settings())
        port = free_head_port()
        config["SERVER_PUBLIC_URL"] = url = f"http://{HEAD_NAME}:{port}"
        app = create_app(config)
        server = make_server(HEAD_NAME, port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            token = create_token(app.extensions["relion_gateway"].store, "demo", n=int(config["AUTH_SCRYPT_N"]))[1]
            return self._follow(url, token)
        finally:
            app.extensions["relion_gateway_poller"].stop()
            server.shutdown()

    def container(self) -> float:
        shared = job_dirs(self.owner)
        ctr = run_on_stack(self.image, self.stack, self.work, ROOT / "config", user=self.owner, state=str(shared.state),
                           extra_env=shared.env(JOB_ACCOUNT, sys.executable), mounts=shared.mounts)
        try:
            ctr.wait_healthy()
            return self._follow(ctr.url, ctr.create_token("demo"))
        finally:
            ctr.remove()
            shutil.rmtree(shared.root, ignore_errors=True)

    def _follow(self, url: str, token: str) -> float:
        session = retrying_session()
        session.headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        job = submit_and_follow(session, url, self.bucket, self.dataset, 3, 600)
        wall = time.perf_counter() - started
        if job["status"] != "succeeded":
            raise RuntimeError(f"demo job ended {job['status']}: {job['message']}")
        self.outputs.append(job["output_url"])
        return wall

    def close(self) -> None:
        from gateway.storage.s3 import parse_s3_url

        for location in [self.dataset, *(parse_s3_url(u) for u in self.outputs)]:
            remove_s3_prefix(self.storage, location.bucket, location.key)
        shutil.rmtree(self.work, ignore_errors=True)
        restore_environment(self._saved_env)


def run(ctx: Context) -> dict[str, Any]:
    stack = stack_status()
    if not stack.get("all_up") or not (stack.get("slurmrestd") or {}).get("jwt_key") or os.geteuid() != 0:
        raise RuntimeError("needs root and the stack with slurmrestd (`relion-gateway stack up --with-rest`)")
    ctx.log("  1/2 image build: reused, new commit" + ("" if ctx.quick else ", cold"))
    rows, details = builds(ctx)
    for built in rows:
        ctx.log(f"    {built['metric']}: {built['value']} {built['unit']} ({built['note']})")
    ctx.log("  2/2 the demo 2D job through the host's gateway and the container's")
    demo = Demo(ctx, stack, details["tag"])
    walls: dict[str, list[float]] = {"host": [], "container": []}
    try:
        for where in (["host", "container"] if ctx.quick else ["host", "container", "container", "host"]):
            walls[where].append(getattr(demo, where)())
            ctx.log(f"    {where}: {walls[where][-1]:.1f} s")
    finally:
        demo.close()
    host, container = median(walls["host"]), median(walls["container"])
    rows += [
        row("demo job", "demo 2D, POST to succeeded, host gateway (rest backend)", round(host, 1), unit="s",
            note=f"runs {[round(w, 1) for w in walls['host']]}"),
        row("demo job", "demo 2D, POST to succeeded, the image's gateway", round(container, 1), unit="s",
            baseline=round(host, 1), baseline_label="host",
            note=f"runs {[round(w, 1) for w in walls['container']]}; ratio container/host {container / host:.2f}"),
    ]
    details["walls"] = walls
    return {"rows": rows, "details": details,
            "notes": ["Both gateways use the rest backend with self-signed tokens; the container runs as the job account."]}
