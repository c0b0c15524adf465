"""Client commands: submit, status, list, wait, cancel, script, metadata, logs, download.

`submit` takes the seed client's options (``--host --port --user-id --workspace-id
--dataset-s3-url --output-s3-prefix --mode --num-mpi --save-metadata``) and any relion_refine
option as typed on RELION's command line, with dashes or underscores.

Exit codes: 0 success; 1 the job ended but did not succeed; 2 usage error; 3 the gateway refused
the request or could not be reached; 4 gave up waiting.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import requests

from gateway.client import TERMINAL, TOKEN_ENV, URL_ENV, GatewayClient, GatewayError
from gateway.relion.flags import FlagError, parse_command_line
from gateway.relion.modes import MODES

EXIT_JOB_FAILED = 1
EXIT_GATEWAY = 3
EXIT_TIMEOUT = 4
F = TypeVar("F", bound=Callable[..., Any])


def connection_options(command: F) -> F:
    """--url or --host/--port, --token, --json: shared by every client command."""

    @click.option("--url", envvar=URL_ENV, default=None, help=f"gateway URL (env {URL_ENV}); overrides --host/--port")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=int, default=9012, show_default=True)
    @click.option("--token", envvar=TOKEN_ENV, default=None, help=f"bearer token (env {TOKEN_ENV})")
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    @functools.wraps(command)
    def wrapper(*args: Any, url: str | None, host: str, port: int, token: str | None, as_json: bool, **kwargs: Any) -> Any:
        client = GatewayClient(url or f"http://{host}:{port}", token)
        try:
            return command(*args, client=client, as_json=as_json, **kwargs)
        except GatewayError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_GATEWAY)

    return wrapper  # type: ignore[return-value]


def describe(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    parts = [f"{job['job_id']}  {job['status']}"]
    if job.get("slurm", {}).get("state"):
        parts.append(f"Slurm {job['slurm']['main_job_id']}: {job['slurm']['state']}")
    if progress.get("iteration") is not None:
        planned = progress.get("iterations_planned")
        parts.append(f"iteration {progress['iteration']}" + (f"/{planned}" if planned else ""))
    if progress.get("resolution_angstrom"):
        parts.append(f"{progress['resolution_angstrom']:.2f} A")
    if job["status"] in TERMINAL and job.get("message"):
        parts.append(job["message"])
    return "  ".join(parts)


def progress_line(job: dict[str, Any], width: int = 20) -> str:
    """`running  [######......] iteration 3/10  21.33 A`."""
    progress = job.get("progress") or {}
    iteration, planned = progress.get("iteration"), progress.get("iterations_planned")
    bar = ""
    if iteration is not None and planned:
        done = min(width, int(width * iteration / planned))
        bar = f"[{'#' * done}{'.' * (width - done)}] "
    text = f"{job['status']:<10} {bar}"
    if iteration is not None:
        text += f"iteration {iteration}" + (f"/{planned}" if planned else "")
    if progress.get("resolution_angstrom"):
        text += f"  {progress['resolution_angstrom']:.2f} A"
    return text


def follow(client: GatewayClient, job_id: str, timeout: float | None, quiet: bool) -> dict[str, Any]:
    last = ""

    def show(job: dict[str, Any]) -> None:
        nonlocal last
        line = progress_line(job)
        if not quiet and line != last:
            # One updating line on a terminal; one line per change in a log file.
            click.echo(f"\r{line:<70}" if sys.stderr.isatty() else line, err=True, nl=not sys.stderr.isatty())
            last = line

    try:
        job = client.wait(job_id, timeout=timeout, on_update=show)
    except TimeoutError as exc:
        click.echo(f"\nerror: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    if not quiet and sys.stderr.isatty():
        click.echo("", err=True)
    return job


def finish(job: dict[str, Any], as_json: bool, save_metadata: Path | None) -> None:
    if save_metadata is not None and job.get("metadata") is not None:
        save_metadata.write_text(json.dumps(job["metadata"], indent=2, sort_keys=True) + "\n")
    show(job, as_json)
    if job["status"] in TERMINAL and job["status"] != "succeeded":
        sys.exit(EXIT_JOB_FAILED)


def request_from_command_line(
    ctx: click.Context, user_id: str, workspace_id: str, dataset_s3_url: str, output_s3_prefix: str, mode: str, num_mpi: int
) -> dict[str, Any]:
    """A job request from a command's options, relion_refine's own options following them (submit and render)."""
    try:
        flags = parse_command_line(list(ctx.args))
    except FlagError as exc:
        raise click.UsageError(exc.message) from exc
    return {
        "user_id": user_id,
        "workspace_id": workspace_id,
        "dataset_s3_url": dataset_s3_url,
        "output_s3_prefix": output_s3_prefix,
        "mode": mode,
        "num_mpi": num_mpi,
        "flags": flags,
    }


@click.command("submit", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@connection_options
@click.option("--user-id", required=True)
@click.option("--workspace-id", required=True)
@click.option("--dataset-s3-url", required=True, help="s3://bucket/key.tar.gz")
@click.option("--output-s3-prefix", required=True, help="s3://bucket/prefix (results go to <prefix>/<job_id>/)")
@click.option("--mode", type=click.Choice(MODES), required=True)
@click.option("--num-mpi", type=int, default=1, show_default=True)
@click.option("--partition", default=None)
@click.option("--time-limit", default=None, help="Slurm --time for the main job")
@click.option("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
@click.option("--dry-run", is_flag=True, help="validate and show the scripts (POST /render); submit nothing")
@click.option("--wait", "wait_", is_flag=True, help="follow the job to its end with a progress line")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after this many seconds (exit 4)")
@click.option("--save-metadata", type=click.Path(path_type=Path), default=None, help="with --wait: write metadata.json here")
@click.pass_context
def submit_command(
    ctx: click.Context,
    client: GatewayClient,
    as_json: bool,
    user_id: str,
    workspace_id: str,
    dataset_s3_url: str,
    output_s3_prefix: str,
    mode: str,
    num_mpi: int,
    partition: str | None,
    time_limit: str | None,
    idempotency_key: str | None,
    dry_run: bool,
    wait_: bool,
    timeout: float | None,
    save_metadata: Path | None,
) -> None:
    """Submit a RELION job; relion_refine options follow, e.g. --i particles.star --o Class2D/run --K 50 --ctf."""
    request = request_from_command_line(ctx, user_id, workspace_id, dataset_s3_url, output_s3_prefix, mode, num_mpi)
    if partition:
        request["partition"] = partition
    if time_limit:
        request["time_limit"] = time_limit
    if dry_run:
        rendered = client.render(request, slurm_test=True)
        if as_json:
            click.echo(json.dumps(rendered, indent=2))
        else:
            click.echo(rendered["main_script"], nl=False)
            click.echo(f"# RELION: {rendered['command_line']}\n# Slurm: {rendered['slurm_test']}")
            for warning in rendered.get("warnings") or []:
                click.echo(f"# warning: {warning}")
        return
    job = client.submit(request, idempotency_key=idempotency_key)
    if not wait_:
        show(job, as_json)
        if job["status"] == "submit_failed":
            sys.exit(EXIT_JOB_FAILED)
        return
    click.echo(f"submitted {job['job_id']} (Slurm {job['slurm']['main_job_id']})", err=True)
    finish(follow(client, job["job_id"], timeout, quiet=as_json), as_json, save_metadata)


def show(job: dict[str, Any], as_json: bool) -> None:
    """One job: its JSON (--json), else the one-line description."""
    click.echo(json.dumps(job, indent=2, sort_keys=True) if as_json else describe(job))


@click.command("status")
@connection_options
@click.argument("job_id")
def status_command(client: GatewayClient, as_json: bool, job_id: str) -> None:
    """Show a job's state."""
    job = client.get(job_id)
    show(job, as_json)


@click.command("list")
@connection_options
@click.option("--state", multiple=True, help="only jobs in this state (repeatable)")
@click.option("--mode", type=click.Choice(MODES), default=None)
@click.option("--user-id", default=None, help="(admins) only this user's jobs")
@click.option("--limit", type=int, default=50, show_default=True)
def list_command(client: GatewayClient, as_json: bool, state: tuple[str, ...], mode: str | None, user_id: str | None, limit: int) -> None:
    """List jobs, newest first."""
    jobs = []
    for job in client.iter_jobs(state=list(state), mode=mode, user_id=user_id):
        jobs.append(job)
        if len(jobs) >= limit:
            break
    if as_json:
        click.echo(json.dumps(jobs, indent=2, sort_keys=True))
        return
    for job in jobs:
        click.echo(describe(job))


@click.command("wait")
@connection_options
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="give up after this many seconds (exit 4)")
@click.option("--save-metadata", type=click.Path(path_type=Path), default=None)
def wait_command(client: GatewayClient, as_json: bool, job_id: str, timeout: float | None, save_metadata: Path | None) -> None:
    """Follow a job to its end; exit 0 only if it succeeded."""
    finish(follow(client, job_id, timeout, quiet=as_json), as_json, save_metadata)


@click.command("cancel")
@connection_options
@click.argument("job_id")
def cancel_command(client: GatewayClient, as_json: bool, job_id: str) -> None:
    """Cancel a job (its archive hook still saves what was produced)."""
    job = client.cancel(job_id)
    show(job, as_json)


@click.command("continue")
@connection_options
@click.argument("job_id")
def continue_command(client: GatewayClient, as_json: bool, job_id: str) -> None:
    """Continue an ended job (timeout, cancelled, node_fail, failed) from its last finished iteration."""
    job = client.continue_job(job_id)
    show(job, as_json)


@click.command("script")
@connection_options
@click.argument("job_id")
@click.option("--archive", is_flag=True, help="the archive job's script instead of the main one")
def script_command(client: GatewayClient, as_json: bool, job_id: str, archive: bool) -> None:
    """Print the exact sbatch script submitted for a job."""
    click.echo(client.script(job_id, "archive" if archive else "main"), nl=False)


@click.command("metadata")
@connection_options
@click.argument("job_id")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="write to this file")
def metadata_command(client: GatewayClient, as_json: bool, job_id: str, output: Path | None) -> None:
    """Print (or save) a job's metadata.json."""
    text = json.dumps(client.metadata(job_id), indent=2, sort_keys=True) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


@click.command("logs")
@connection_options
@click.argument("job_id")
@click.option("--stream", type=click.Choice(["out", "err", "archive-out", "archive-err"]), default="out", show_default=True)
@click.option("--tail", type=int, default=None, help="only the last N lines")
def logs_command(client: GatewayClient, as_json: bool, job_id: str, stream: str, tail: int | None) -> None:
    """Print a job's Slurm output (RELION's stdout by default)."""
    click.echo(client.logs(job_id, stream, tail), nl=False)


@click.command("download")
@connection_options
@click.argument("job_id")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="file to write (default: <job_id>.tar.gz)")
def download_command(client: GatewayClient, as_json: bool, job_id: str, output: Path | None) -> None:
    """Download a job's output.tar.gz through a presigned URL the gateway issues."""
    url = client.output_url(job_id)
    target = output or Path(f"{job_id}.tar.gz")
    try:
        with requests.get(url, stream=True, timeout=60) as response:
            response.raise_for_status()
            tmp = target.with_name(target.name + ".part")
            with open(tmp, "wb") as handle:
                for chunk in response.iter_content(chunk_size=1024 * 1024):
                    handle.write(chunk)
            os.replace(tmp, target)
    except requests.RequestException as exc:
        raise GatewayError(None, f"download from S3 failed: {exc}") from exc
    click.echo(json.dumps({"job_id": job_id, "path": str(target), "bytes": target.stat().st_size}) if as_json else str(target))


CLIENT_COMMANDS = [
    submit_command,
    status_command,
    list_command,
    wait_command,
    cancel_command,
    continue_command,
    script_command,
    metadata_command,
    logs_command,
    download_command,
]
