"""GET /usage: what jobs cost, per user, Slurm account, mode and period, and the budgets that apply.

Admins see everyone's (or filter); a user sees their own jobs only. Sums come from the store's
costed jobs (gateway/jobs/usage.py): no Slurm call per request. ``relion-gateway usage --csv`` is
the same report as CSV.
"""
from __future__ import annotations

import calendar
import time
from datetime import date, datetime, timezone
from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest.error_handler import ErrorSchema
from marshmallow import Schema, ValidationError, fields, validate

from gateway.api.docs import DocumentedBlueprint
from gateway.api.parser import StrictJSONParser
from gateway.api.schemas import IDENTIFIER, IDENTIFIER_DOC
from gateway.auth import authorize_user, current_principal
from gateway.jobs.budgets import period_start
from gateway.jobs.service import JobService
from gateway.jobs.usage import GROUPS
from gateway.jobs.webhooks import iso8601

blp = DocumentedBlueprint("usage", __name__, description="What jobs cost")
blp.ARGUMENTS_PARSER = StrictJSONParser()


def _moment(value: str) -> float:
    """A date (its midnight, UTC) or an ISO 8601 date-time (UTC unless it says otherwise)."""
    try:
        if len(value) == 10:
            return float(calendar.timegm(date.fromisoformat(value).timetuple()))
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValidationError("must be a date (2026-12-01) or an ISO 8601 date-time") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


class Moment(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        return _moment(super()._deserialize(value, attr, data, **kwargs))


class UsageArgsSchema(Schema):
    user_id = fields.String(validate=IDENTIFIER, metadata={"description": "one user's jobs (admins; a user sees their own)", **IDENTIFIER_DOC})
    account = fields.String(validate=validate.Length(min=1, max=64), metadata={"description": "one Slurm account's jobs"})
    from_ = Moment(data_key="from", metadata={"description": "jobs that ended at or after (date or date-time, UTC); default: this month's start"})
    to = Moment(metadata={"description": "jobs that ended before (default: now)"})
    group_by = fields.List(fields.String(validate=validate.OneOf(GROUPS)), load_default=lambda: ["user", "account"],
                           validate=validate.Length(min=0, max=len(GROUPS)), metadata={"description": "repeat the parameter"})


class UsageRowSchema(Schema):
    user = fields.String()
    account = fields.String()
    mode = fields.String()
    year = fields.String()
    month = fields.String()
    day = fields.String()
    jobs = fields.Integer(required=True, metadata={"description": "jobs that ended in the period"})
    costed_jobs = fields.Integer(required=True, metadata={"description": "of which Slurm's accounting has costed"})
    cpu_hours = fields.Float(required=True, metadata={"description": "allocated: CPUs x elapsed (what a facility charges)"})
    cpu_hours_used = fields.Float(required=True)
    gpu_hours = fields.Float(required=True)
    elapsed_hours = fields.Float(required=True)
    cpu_efficiency = fields.Float(required=True, allow_none=True, metadata={"description": "used / allocated CPU time"})


class BudgetSchema(Schema):
    scope = fields.String(required=True, validate=validate.OneOf(["user", "account"]))
    name = fields.String(required=True)
    kind = fields.String(required=True, validate=validate.OneOf(["cpu_hours", "gpu_hours"]))
    period = fields.String(required=True)
    limit = fields.Float(required=True)
    used = fields.Float(required=True)
    held = fields.Float(required=True, metadata={"description": "what unfinished (or not yet costed) jobs may still use"})
    left = fields.Float(required=True)


class UsageSchema(Schema):
    from_ = fields.String(data_key="from", required=True, metadata={"format": "date-time"})
    to = fields.String(required=True, metadata={"format": "date-time"})
    group_by = fields.List(fields.String(), required=True)
    rows = fields.List(fields.Nested(UsageRowSchema), required=True)
    total = fields.Nested(UsageRowSchema, required=True)
    budgets = fields.List(fields.Nested(BudgetSchema), required=True, metadata={"description": "the budgets of the users and accounts shown"})


@blp.route("/usage")
class Usage(MethodView):
    @blp.arguments(UsageArgsSchema, location="query")
    @blp.response(200, UsageSchema)
    @blp.alt_response(400, schema=ErrorSchema, description="A query parameter this operation does not take")
    @blp.alt_response(401, schema=ErrorSchema, description="No valid bearer token")
    @blp.alt_response(403, schema=ErrorSchema, description="user_id names another user (admins only)")
    @blp.alt_response(422, schema=ErrorSchema, description="A parameter breaks its rule (the message names it)")
    @blp.doc(operationId="getUsage")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """CPU- and GPU-hours of the jobs that ended in a period, summed per user, account, mode or period."""
        service: JobService = current_app.extensions["relion_gateway"]
        principal = current_principal()
        user_id = args.get("user_id")
        if user_id is not None:
            authorize_user(principal, user_id)
        elif not principal.admin:
            user_id = principal.user
        now = time.time()
        since = args.get("from_", period_start("month", now))
        until = args.get("to", now)
        summary = service.usage(since=since, until=until, user_id=user_id, account=args.get("account"), group_by=args["group_by"])
        return {"from_": iso8601(since), "to": iso8601(until), "group_by": args["group_by"], **summary}
