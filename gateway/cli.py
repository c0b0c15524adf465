"""The `relion-gateway` command: one click group, each subcommand defined next to what it drives."""
from __future__ import annotations

import logging

import click

from gateway.maintenance import archive_retry_command, janitor_command
from gateway.auth import token_group
from gateway.client_cli import CLIENT_COMMANDS
from gateway.client_usage import usage_command
from gateway.demo import demo_command
from gateway.jobside.program import job_group
from gateway.relion.dataset import make_dataset_command
from gateway.dry_run import render_command
from gateway.serve import serve_command
from gateway.stack.control import stack_group
from gateway.stack.image import image_group


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def cli(verbose: bool) -> None:
    """Run RELION jobs on Slurm through a REST gateway."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


cli.add_command(stack_group)
cli.add_command(image_group)
cli.add_command(make_dataset_command)
cli.add_command(serve_command)
cli.add_command(demo_command)
cli.add_command(render_command)
cli.add_command(job_group)
cli.add_command(archive_retry_command)
cli.add_command(janitor_command)
cli.add_command(token_group)
cli.add_command(usage_command)
for _command in CLIENT_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="relion-gateway")
