"""Client commands: submit, status, list, wait, cancel, script, metadata, logs, download.

`submit` takes the seed client's options (``--host --port --user-id --workspace-id
--dataset-s3-url --output-s3-prefix --mode --num-mpi --save-metadata``) and any relion_refine
option as typed on RELION's command line, with dashes or underscores. A misspelt gateway option
(``--num-mpii``) is a usage error with a suggestion, not a RELION flag (see gateway_option_typo).

Exit codes: 0 success; 1 the job ended but did not succeed; 2 usage error (also: no token, an
unusable --url); 3 the gateway refused the request or could not be reached, or a download failed
or did not match its recorded size and sha256; 4 gave up waiting.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from gateway.client import DEFAULT_PORT, TERMINAL, TOKEN_ENV, URL_ENV, GatewayClient, GatewayError, normalise_base_url
from gateway.relion.catalogue import CATALOGUE, GATEWAY_OWNED, closest_names
from gateway.relion.flags import FlagError, parse_command_line
from gateway.relion.modes import MODES

logger = logging.getLogger(__name__)

EXIT_JOB_FAILED = 1
EXIT_GATEWAY = 3
EXIT_TIMEOUT = 4
F = TypeVar("F", bound=Callable[..., Any])
# How alike (difflib ratio) an unknown option must be to a gateway option to count as its typo:
# one wrong, missing or extra letter in a name of four or more (--hots, --num-mpii, --user-idd).
TYPO_CUTOFF = 0.75
MAKE_TOKEN = "an admin makes one: relion-gateway token create --user USER"


def _option_key(name: str) -> str:
    """``--User-Id`` / ``--user_id`` -> ``user_id``: RELION takes both spellings, so typos are compared in one."""
    return name.lstrip("-").replace("-", "_").lower()


def gateway_option_typo(name: str, gateway_options: Sequence[str]) -> str | None:
    """The gateway option ``name`` (an option the command does not know) is a typo of, or None.

    The rule: an unknown option is a typo of a gateway option when difflib finds that option
    close to it (TYPO_CUTOFF) and it is neither a relion_refine option RELION knows (the catalogue,
    GATEWAY_OWNED included: the gateway refuses those with its own reason) nor closer to one of
    them than to the gateway option. Everything else passes on as a RELION flag, and the gateway
    checks it against the catalogue (refusing an unknown one with its own "did you mean").
    No catalogue name is that close to a gateway option today (the closest, --helix to --help,
    is 0.67), so every genuine RELION option passes.
    """
    key = name.lstrip("-").replace("-", "_")
    if key in CATALOGUE or key in GATEWAY_OWNED:
        return None
    by_key = {_option_key(option): option for option in gateway_options}
    matches = difflib.get_close_matches(key.lower(), list(by_key), n=1, cutoff=TYPO_CUTOFF)
    if not matches:
        return None
    relion = closest_names(key, n=1)
    if relion and _ratio(key, relion[0]) > _ratio(key, matches[0]):
        return None
    return by_key[matches[0]]


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


def _unknown_options(ctx: click.Context, command: click.Command, args: Sequence[str]) -> Iterator[str]:
    """The option names in ``args`` that ``command`` does not know, stepping over known options' values."""
    takes_value: dict[str, bool] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                takes_value[opt] = not (param.is_flag or param.count)
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--":
            return
        if not token.startswith("-") or _is_number(token):
            continue
        name = token.split("=", 1)[0]
        if name in takes_value:
            if takes_value[name] and "=" not in token:
                index += 1  # its value, whatever it looks like
            continue
        yield name


def _is_number(token: str) -> bool:
    try:
        float(token)  # "--offset -2": a negative number is a value
        return True
    except ValueError:
        return False


def check_option_typos(ctx: click.Context, command: click.Command, args: Sequence[str]) -> None:
    """Raise a usage error (exit 2) for the first unknown option that is a gateway option misspelt."""
    options = [opt for param in command.get_params(ctx) if isinstance(param, click.Option) for opt in param.opts if opt.startswith("--")]
    for name in _unknown_options(ctx, command, args):
        suggestion = gateway_option_typo(name, options)
        if suggestion is not None:
            logger.debug("%s is taken as a typo of %s", name, suggestion)
            raise click.UsageError(
                f"no such option: {name}; did you mean {suggestion}? "
                "(relion_refine options pass through; this one is closer to a gateway option)",
                ctx=ctx,
            )


class GatewayOptionsCommand(click.Command):
    """A command whose unknown options become RELION flags, except misspelt gateway options.

    The check runs on the raw arguments, before click's own parsing: ``--user-idd alice`` must say
    "did you mean --user-id?" rather than click's "Missing option '--user-id'".
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        check_option_typos(ctx, self, args)
        return super().parse_args(ctx, args)


def _base_url(ctx: click.Context, url: str | None, host: str, port: int) -> str:
    """The base URL from --url (or its variable), else --host/--port; a usage error names where a bad one came from."""
    if url:
        raw, hint = url, URL_ENV if ctx.get_parameter_source("url") == ParameterSource.ENVIRONMENT else "--url"
    else:
        bare_ipv6 = ":" in host and not host.startswith("[") and "://" not in host  # --host ::1
        raw, hint = (f"[{host}]:{port}" if bare_ipv6 else f"{host}:{port}"), "--host/--port"
    try:
        return normalise_base_url(raw)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint=hint) from exc


def _token_hint(ctx: click.Context, sent: bool) -> str:
    """What to do after a 401, naming where the refused token came from."""
    if not sent:
        return f"hint: this gateway needs a token: pass --token TOKEN or set {TOKEN_ENV} ({MAKE_TOKEN})"
    where = TOKEN_ENV if ctx.get_parameter_source("token") == ParameterSource.ENVIRONMENT else "--token"
    return f"hint: the gateway did not accept the token from {where} (mistyped, revoked or expired?): set --token or {TOKEN_ENV} to a valid one ({MAKE_TOKEN})"


def connection_options(command: F) -> F:
    """--url or --host/--port, --token, --json: shared by every client command."""

    @click.option(
        "--url", envvar=URL_ENV, default=None,
        help=f"gateway URL, e.g. http://127.0.0.1:9012 or host:9012 (env {URL_ENV}); overrides --host/--port",
    )
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
    @click.option("--token", envvar=TOKEN_ENV, default=None, help=f"bearer token (env {TOKEN_ENV})")
    @click.option("--no-token", is_flag=True, help='send no token: a gateway with [auth] mode = "none" (development)')
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    @functools.wraps(command)
    def wrapper(
        *args: Any, url: str | None, host: str, port: int, token: str | None, no_token: bool, as_json: bool, **kwargs: Any
    ) -> Any:
        ctx = click.get_current_context()
        base_url = _base_url(ctx, url, host, port)
        if no_token:
            token = None
        elif not token:
            # Said here, before a request: the gateway's 401 alone does not say where a token goes.
            raise click.UsageError(
                f"no token: pass --token TOKEN or set {TOKEN_ENV} ({MAKE_TOKEN}); "
                'a gateway with [auth] mode = "none" takes --no-token instead',
                ctx=ctx,
            )
        client = GatewayClient(base_url, token)
        try:
            return command(*args, client=client, as_json=as_json, **kwargs)
        except GatewayError as exc:
            click.echo(f"error: {exc}", err=True)
            if exc.status == 401:
                click.echo(_token_hint(ctx, sent=token is not None), err=True)
            sys.exit(EXIT_GATEWAY)

    return wrapper  # type: ignore[return-value]


def describe(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    parts = [f"{job['job_id']}  {job['status']}"]
    if (job.get("slurm") or {}).get("state"):
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
    # submit has checked its raw arguments already (GatewayOptionsCommand); render's are checked here.
    check_option_typos(ctx, ctx.command, ctx.args)
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


@click.command("submit", cls=GatewayOptionsCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def list_command(client: GatewayClient, as_json: bool, state: tuple[str, ...], mode: str | None, user_id: str | None, limit: int) -> None:
    """List jobs, newest first; "N of M jobs" on stderr (stdout stays one job per line)."""
    jobs, total = client.first_jobs(limit, state=list(state), mode=mode, user_id=user_id)
    if as_json:
        click.echo(json.dumps(jobs, indent=2, sort_keys=True))  # a list, as before: the total is the API's
        return
    for job in jobs:
        click.echo(describe(job))
    matching = "matching " if state or mode or user_id else ""
    more = f" (newest first; --limit {total} shows all)" if len(jobs) < total else ""
    click.echo(f"{len(jobs)} of {total} {matching}jobs{more}", err=True)


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
    try:
        job = client.cancel(job_id)
    except GatewayError as exc:
        if exc.status != 409:
            raise
        # The gateway's 409: the job has already ended, so there was nothing to cancel.
        click.echo(f"error: nothing to cancel: {exc.message}", err=True)
        sys.exit(EXIT_GATEWAY)
    if as_json:
        show(job, as_json)
        return
    click.echo(cancel_summary(job))


def cancel_summary(job: dict[str, Any]) -> str:
    """What a cancel did: the answer is the job right after scancel, usually before Slurm has ended it."""
    slurm_id = (job.get("slurm") or {}).get("main_job_id")
    which = f"{job['job_id']} (Slurm job {slurm_id})" if slurm_id else f"{job['job_id']} (not in Slurm yet)"
    if job["status"] in TERMINAL:
        return f"cancelled {which}: state {job['status']}"
    return (
        f"cancel sent for {which}: state {job['status']} for now; it ends once Slurm has stopped it and its "
        f"archive hook has saved what was produced (relion-gateway wait {job['job_id']} follows it)"
    )


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
    """Download a job's output.tar.gz through a presigned URL the gateway issues; check its size and sha256."""
    target = output or Path(f"{job_id}.tar.gz")
    done = client.download_output(job_id, target)  # a mismatch removes the partial file: GatewayError, exit 3
    if not done["verified"]:
        click.echo(f"warning: the gateway has no sha256 for {job_id}'s output: {target} could not be verified", err=True)
    click.echo(json.dumps({"job_id": job_id, **done}) if as_json else str(target))


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
