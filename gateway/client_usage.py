"""`relion-gateway usage`: the usage report (GET /v1/relion/usage) as a table, CSV or JSON.

For facility managers (an admin token sees everyone; a user's token their own jobs): CPU- and
GPU-hours of the jobs that ended in a period, per user, Slurm account, mode, year, month or day.
"""
from __future__ import annotations

import csv
import json
import sys
from typing import Any

import click

from gateway.client import GatewayClient
from gateway.client_cli import connection_options

COLUMNS = ("jobs", "costed_jobs", "cpu_hours", "cpu_hours_used", "gpu_hours", "elapsed_hours", "cpu_efficiency")
GROUPS = ("user", "account", "mode", "year", "month", "day")


@click.command("usage")
@connection_options
@click.option("--from", "since", default=None, help="jobs that ended at or after (date or ISO date-time, UTC; default: this month)")
@click.option("--to", "until", default=None, help="jobs that ended before (default: now)")
@click.option("--group-by", default="user,account", show_default=True, help=f"comma-separated, of {', '.join(GROUPS)}; empty: totals only")
@click.option("--user-id", default=None, help="one user's jobs (admins)")
@click.option("--account", default=None, help="one Slurm account's jobs")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout: one row a group, then the total")
def usage_command(client: GatewayClient, as_json: bool, since: str | None, until: str | None, group_by: str,
                  user_id: str | None, account: str | None, as_csv: bool) -> None:
    """What jobs cost: CPU- and GPU-hours per user, account and period, and the budgets left."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise click.UsageError(f"--group-by: {', '.join(unknown)} is not one of {', '.join(GROUPS)}")
    report = client.usage(**{"from": since, "to": until, "group_by": groups, "user_id": user_id, "account": account})
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    rows: list[dict[str, Any]] = report["rows"] + [{**{g: "total" if i == 0 else "" for i, g in enumerate(groups)}, **report["total"]}]
    header = [*groups, *COLUMNS]
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        return
    click.echo(f"jobs that ended from {report['from']} to {report['to']}")
    widths = {h: max(len(h), *(len(str(row.get(h, ""))) for row in rows)) for h in header}
    click.echo("  ".join(h.ljust(widths[h]) for h in header))
    for row in rows:
        click.echo("  ".join(str("" if row.get(h) is None else row.get(h, "")).ljust(widths[h]) for h in header))
    for budget in report["budgets"]:
        click.echo(f"budget {budget['scope']} {budget['name']}: {budget['kind']} {budget['left']:g} left of {budget['limit']:g} "
                   f"this {budget['period']} ({budget['used']:g} used, {budget['held']:g} held by unfinished jobs)")
