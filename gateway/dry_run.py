"""`relion-gateway render`: the full validation and rendering, offline, for admins at a shell."""
from __future__ import annotations

import json

import click

from gateway.client_cli import GatewayOptionsCommand, request_from_command_line
from gateway.errors import RequestError
from gateway.config import build_config
from gateway.relion.modes import MODES
from gateway.jobs.scripts import DRY_RUN_MAIN_ID
from gateway.jobs.service import build_service


@click.command("render", cls=GatewayOptionsCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--mode", type=click.Choice(MODES), required=True)
@click.option("--num-mpi", type=int, default=1, show_default=True)
@click.option("--user-id", default="admin", show_default=True)
@click.option("--workspace-id", default="dryrun", show_default=True)
@click.option("--dataset-s3-url", default="s3://relion-local/datasets/tiny.tar.gz", show_default=True)
@click.option("--output-s3-prefix", default="s3://relion-local/results", show_default=True)
@click.option("--archive", "show_archive", is_flag=True, help="print the archive script too")
@click.option("--json", "as_json", is_flag=True, help="print scripts and command as JSON")
@click.pass_context
def render_command(
    ctx: click.Context,
    mode: str,
    num_mpi: int,
    user_id: str,
    workspace_id: str,
    dataset_s3_url: str,
    output_s3_prefix: str,
    show_archive: bool,
    as_json: bool,
) -> None:
    """Print the sbatch script the gateway would submit; relion_refine options follow, e.g. --i p.star --K 3 --ctf."""
    request = request_from_command_line(ctx, user_id, workspace_id, dataset_s3_url, output_s3_prefix, mode, num_mpi)
    # A dry run: no app, no poller thread, an in-memory store, no key file; nothing is written.
    service = build_service(build_config(), offline=True)
    try:
        prepared = service.prepare(request)
    except RequestError as exc:
        raise click.UsageError(f"{exc.field}: {exc.message}") from exc
    archive = service.render_archive(prepared, DRY_RUN_MAIN_ID)
    if as_json:
        click.echo(json.dumps({"main_script": prepared.main_script, "archive_script": archive, "relion_command": list(prepared.spec.relion_command)}, indent=2))
        return
    click.echo(prepared.main_script, nl=False)
    if show_archive:
        click.echo("\n# ---- archive job ----")
        click.echo(archive, nl=False)
