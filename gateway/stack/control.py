"""`relion-gateway stack up|down|status [--json]`."""
from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click

from gateway.process import CommandError
from gateway.stack.daemons import DaemonError
from gateway.stack.layout import STATE_DIR_ENV, resolve_state_dir
from gateway.stack.manager import stack_down, stack_status, stack_up

_STATE_DIR_HELP = f"State directory (default: ${STATE_DIR_ENV}, else /var/tmp/relion-gateway)."


def _state_dir_option(func: Any) -> Any:
    # Accepted both before and after the subcommand (`stack --state-dir X up` and `stack up --state-dir X`).
    return click.option("--state-dir", type=click.Path(file_okay=False), default=None, help=_STATE_DIR_HELP)(func)


def _resolve(ctx: click.Context, state_dir: str | None) -> str:
    chosen = state_dir or (ctx.obj or {}).get("state_dir")
    return str(resolve_state_dir(chosen))


@click.group("stack")
@_state_dir_option
@click.pass_context
def stack_group(ctx: click.Context, state_dir: str | None) -> None:
    """Run the local Slurm + MariaDB + S3 stack the gateway uses on one machine."""
    ctx.ensure_object(dict)
    ctx.obj["state_dir"] = state_dir


@stack_group.command("up")
@_state_dir_option
@click.option(
    "--with-rest", is_flag=True,
    help="Also run slurmrestd on 127.0.0.1:6820 with JWT auth (kept by later `up` runs once enabled).",
)
@click.option(
    "--with-postgres", is_flag=True,
    help="Also run PostgreSQL on 127.0.0.1:5433 for the job store (kept by later `up` runs once enabled).",
)
@click.option(
    "--nodes", "node_count", type=click.IntRange(1, 8), default=None,
    help="Compute nodes, each a slurmd in its own network namespace (default: as the last `up` left them, "
    "else 2); 1 keeps slurmd on this host (the layout for machines without network namespaces).",
)
@click.pass_context
def up_command(ctx: click.Context, state_dir: str | None, with_rest: bool, with_postgres: bool, node_count: int | None) -> None:
    """Start whatever is not running (installs missing packages first); a no-op when all is up."""
    try:
        stack_up(
            _resolve(ctx, state_dir), report=click.echo, with_rest=with_rest, with_postgres=with_postgres, node_count=node_count
        )
    except (DaemonError, CommandError, RuntimeError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@stack_group.command("down")
@_state_dir_option
@click.pass_context
def down_command(ctx: click.Context, state_dir: str | None) -> None:
    """Stop the gateway and every daemon started by `up` (data is kept)."""
    try:
        stack_down(_resolve(ctx, state_dir), report=click.echo)
    except (DaemonError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@stack_group.command("status")
@_state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (credentials unmasked).")
@click.pass_context
def status_command(ctx: click.Context, state_dir: str | None, as_json: bool) -> None:
    """Show each daemon's state and the environment a client needs; exit 1 unless all are up."""
    status = stack_status(_resolve(ctx, state_dir))
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(format_status(status))
    sys.exit(0 if status["all_up"] else 1)


def format_status(status: dict[str, Any]) -> str:
    """Human form of stack_status(): a table, then `export K=V` lines a shell can eval."""
    rows = [("DAEMON", "STATE", "PID")]
    for name, info in status["daemons"].items():
        rows.append((name, info["state"], str(info["pid"] or "-")))
    gateway = status["gateway"]
    rows.append(("gateway", gateway["state"], str(gateway["pid"] or "-")))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    # Every line but the exports is a shell comment, so `eval "$(relion-gateway stack status)"` works.
    lines = ["# " + "  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    s3 = status["s3"]
    head = status.get("head") or {}
    lines += ["#", f"# head: {head.get('name')} = {head.get('address')}" + ("" if status.get("multinode") else "  (one-node layout)")]
    if status.get("fallback_reason"):
        lines.append(f"# one node only: {status['fallback_reason']}")
    for node in status.get("nodes") or []:
        gpus = f"  gpus {node['gpus']}" if node["gpus"] else ""
        lines.append(f"# node {node['name']:<10} {node['address']:<12} {node['state'] or '-':<8} cpus {node['cpus']}  mem {node['memory_mb']} MB{gpus}")
    lines += [
        "#",
        f"# S3 endpoint: {s3['endpoint_url']}  bucket: {s3['bucket']}  region: {s3['region']}",
        f"# Slurm config: {status['slurm_conf']}",
        f"# gateway: {status['gateway_url'] or 'not running'}",
    ]
    rest = status.get("slurmrestd") or {}
    if rest.get("enabled"):
        lines.append(f"# slurmrestd: {rest['url']}  api: {rest['api_version']}")
    pg = status.get("postgres") or {}
    if pg.get("enabled"):
        masked = (pg["url"] or "").replace(f":{pg['password']}@", ":***@") if pg.get("password") else pg["url"]
        lines.append(f"# postgres: {masked}  (password: stack status --json)")
    lines += [
        f"# all up: {'yes' if status['all_up'] else 'no'}",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in status["environment"].items()]
    return "\n".join(lines)
