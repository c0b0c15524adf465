"""Push instead of poll: webhook subscriptions and their delivery log, and a job's server-sent events.

Webhooks (Standard Webhooks, from the durable outbox: gateway/jobs/dispatch.py) are for portals'
servers; the event stream (``text/event-stream``, resumable with ``Last-Event-ID``) is for
browsers. A stream holds a request open, so it takes one of the process's wait slots
(``[server] max_waiters``); when none is free it is a 503 with Retry-After and reads go on.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, request, stream_with_context
from flask.views import MethodView
from flask_smorest.error_handler import ErrorSchema
from marshmallow import Schema, fields, validate

from gateway.api.docs import DocumentedBlueprint
from gateway.api.parser import StrictJSONParser
from gateway.api.schemas import IDENTIFIER, IDENTIFIER_DOC
from gateway.auth import current_principal
from gateway.database.events import DELIVERY_STATES, EVENT_TYPES, PENDING, STATE_CHANGED, Delivery, JobEvent, Webhook
from gateway.jobs.feed import EventFeed, WaitSlots
from gateway.jobs.service import JobService
from gateway.jobs.states import TERMINAL_VALUES
from gateway.jobs.webhooks import MAX_URL_LENGTH, WebhookService, iso8601

log = logging.getLogger(__name__)

blp = DocumentedBlueprint("push", __name__, description="Webhooks and event streams")
blp.ARGUMENTS_PARSER = StrictJSONParser()

FEED_KEY = "relion_gateway_feed"
SLOTS_KEY = "relion_gateway_wait_slots"
WEBHOOKS_KEY = "relion_gateway_webhooks"
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
STREAM_MAX_S = 3600.0  # a stream ends after this; EventSource reconnects with Last-Event-ID

UNAUTHORIZED = {"schema": ErrorSchema, "description": "No valid bearer token (WWW-Authenticate: Bearer)"}
NOT_FOUND = {"schema": ErrorSchema, "description": "No such webhook (or job), or not the caller's"}
INVALID = {"schema": ErrorSchema, "description": "The request breaks a validation rule (the message names the field)"}


def job_service() -> JobService:
    return current_app.extensions["relion_gateway"]  # type: ignore[no-any-return]


def webhooks() -> WebhookService:
    return current_app.extensions[WEBHOOKS_KEY]  # type: ignore[no-any-return]


def feed() -> EventFeed:
    return current_app.extensions[FEED_KEY]  # type: ignore[no-any-return]


def wait_slots() -> WaitSlots:
    return current_app.extensions[SLOTS_KEY]  # type: ignore[no-any-return]


class WebhookRequestSchema(Schema):
    url = fields.String(required=True, validate=validate.Length(min=1, max=MAX_URL_LENGTH),
                        metadata={"description": "http(s) URL the gateway POSTs each event to"})
    user_id = fields.String(validate=IDENTIFIER, metadata={**IDENTIFIER_DOC, "description": "whose jobs (admins only for others; default: the caller)"})
    job_id = fields.String(validate=validate.Length(min=1, max=128), metadata={"description": "only this job's events (default: all the user's jobs)"})
    event_types = fields.List(fields.String(validate=validate.OneOf(EVENT_TYPES)), validate=validate.Length(min=1),
                              load_default=lambda: [STATE_CHANGED],
                              metadata={"description": "job.state_changed (default; the final one carries the result) and job.progress"})
    description = fields.String(load_default="", validate=validate.Length(max=200))


class WebhookSchema(Schema):
    id = fields.String(required=True)
    user_id = fields.String(required=True)
    job_id = fields.String(allow_none=True, required=True)
    url = fields.String(required=True)
    event_types = fields.List(fields.String(validate=validate.OneOf(EVENT_TYPES)), required=True)
    description = fields.String(required=True)
    created_at = fields.String(required=True, metadata={"format": "date-time"})


class WebhookCreatedSchema(WebhookSchema):
    secret = fields.String(required=True, metadata={"description": "whsec_...: verify webhook-signature with it (shown only here)"})


class WebhookListSchema(Schema):
    webhooks = fields.List(fields.Nested(WebhookSchema), required=True)


class WebhookListArgsSchema(Schema):
    user_id = fields.String(validate=IDENTIFIER, metadata=IDENTIFIER_DOC)
    job_id = fields.String(validate=validate.Length(min=1, max=128))


class DeliverySchema(Schema):
    id = fields.String(required=True, metadata={"description": "the webhook-id header (the same on every retry)"})
    webhook_id = fields.String(required=True)
    event_id = fields.Integer(required=True)
    job_id = fields.String(required=True)
    type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    status = fields.String(required=True, validate=validate.OneOf(DELIVERY_STATES))
    attempts = fields.Integer(required=True)
    created_at = fields.String(required=True, metadata={"format": "date-time"})
    next_attempt_at = fields.String(allow_none=True, required=True, metadata={"format": "date-time"})
    last_attempt_at = fields.String(allow_none=True, required=True, metadata={"format": "date-time"})
    last_status_code = fields.Integer(allow_none=True, required=True)
    last_error = fields.String(required=True)
    delivered_at = fields.String(allow_none=True, required=True, metadata={"format": "date-time"})
    payload = fields.Dict(required=True, metadata={"description": "the body sent"})


class DeliveryListArgsSchema(Schema):
    job_id = fields.String(validate=validate.Length(min=1, max=128))
    status = fields.String(validate=validate.OneOf(DELIVERY_STATES))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=500))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))


class DeliveryListSchema(Schema):
    deliveries = fields.List(fields.Nested(DeliverySchema), required=True)
    total = fields.Integer(required=True)


def _hook_view(hook: Webhook) -> dict[str, Any]:
    return {"id": hook.id, "user_id": hook.user_id, "job_id": hook.job_id, "url": hook.url, "event_types": hook.types,
            "description": hook.description, "created_at": iso8601(hook.created_at)}


def _when(ts: float | None) -> str | None:
    return iso8601(ts) if ts is not None else None


def _delivery_view(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "webhook_id": d.webhook_id, "event_id": d.event_seq, "job_id": d.job_id, "type": d.type, "status": d.status,
            "attempts": d.attempts, "created_at": iso8601(d.created_at), "next_attempt_at": _when(d.next_attempt_at if d.status == PENDING else None),
            "last_attempt_at": _when(d.last_attempt_at), "last_status_code": d.last_status_code, "last_error": d.last_error,
            "delivered_at": _when(d.delivered_at), "payload": json.loads(d.body)}


@blp.route("/webhooks")
class Webhooks(MethodView):
    @blp.arguments(WebhookRequestSchema)
    @blp.response(201, WebhookCreatedSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(403, schema=ErrorSchema, description="user_id is not the caller's own (only admins act for other users)")
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(422, **INVALID)
    @blp.alt_response(429, schema=ErrorSchema, description="The user has [webhooks] max_per_user subscriptions")
    @blp.doc(operationId="createWebhook")
    def post(self, args: dict[str, Any]) -> dict[str, Any]:
        """Subscribe a URL to the state changes of the user's jobs (or of one job), signed as Standard Webhooks define."""
        hook, secret = webhooks().create(current_principal(), **args)
        return {**_hook_view(hook), "secret": secret}

    @blp.arguments(WebhookListArgsSchema, location="query")
    @blp.response(200, WebhookListSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(403, schema=ErrorSchema, description="user_id names another user (admins only)")
    @blp.doc(operationId="listWebhooks")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """The caller's live webhooks (an admin's: everyone's, or one user's)."""
        return {"webhooks": [_hook_view(h) for h in webhooks().list(current_principal(), **args)]}


@blp.route("/webhooks/<webhook_id>")
class WebhookById(MethodView):
    @blp.response(200, WebhookSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.doc(operationId="getWebhook")
    def get(self, webhook_id: str) -> dict[str, Any]:
        """One webhook (never its secret)."""
        return _hook_view(webhooks().get(current_principal(), webhook_id))

    @blp.response(204)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.doc(operationId="deleteWebhook")
    def delete(self, webhook_id: str) -> None:
        """Unsubscribe; what it had still to deliver is cancelled (the log keeps it)."""
        webhooks().delete(current_principal(), webhook_id)


@blp.route("/webhooks/<webhook_id>/deliveries")
class WebhookDeliveries(MethodView):
    @blp.arguments(DeliveryListArgsSchema, location="query")
    @blp.response(200, DeliveryListSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.doc(operationId="listWebhookDeliveries")
    def get(self, args: dict[str, Any], webhook_id: str) -> dict[str, Any]:
        """The delivery log, newest first: each message, its attempts and the endpoint's last answer."""
        rows, total = webhooks().deliveries(current_principal(), webhook_id, **args)
        return {"deliveries": [_delivery_view(d) for d in rows], "total": total}


def sse_event(event: JobEvent) -> str:
    """One event in the text/event-stream format: id (the event's seq, for Last-Event-ID), type, data."""
    from gateway.jobs.webhooks import message

    return f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(message(event, None)['data'], separators=(',', ':'))}\n\n"


@blp.route("/jobs/<job_id>/events")
class JobEvents(MethodView):
    @blp.doc(operationId="streamJobEvents", parameters=[
        {"in": "header", "name": "Last-Event-ID", "schema": {"type": "integer"}, "description": "resume after this event"}],
        responses={"200": {"description": "Server-sent events: job.state_changed and job.progress, history first; "
                                          "the stream ends after the job's end", "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, schema=ErrorSchema, description="No such job, or not the caller's")
    @blp.alt_response(503, schema=ErrorSchema, description="This process holds as many open requests as [server] max_waiters allows",
                      headers={"Retry-After": {"schema": {"type": "integer"}}})
    def get(self, job_id: str) -> Response:
        """A job's events as a stream of server-sent events, for browsers (EventSource)."""
        service = job_service()
        record = service.get(job_id, principal=current_principal())
        try:
            after = int(request.headers.get("Last-Event-ID", "0") or 0)
        except ValueError:
            after = 0
        slots = wait_slots()
        if not slots.take():
            from gateway.api.errors import error_response

            response, status = error_response(503, "Service Unavailable", "too many open event streams and long-polls in this process; retry")
            response.status_code = status
            response.headers["Retry-After"] = "5"
            return response  # type: ignore[no-any-return]
        events = feed()
        store = events.events

        def stream() -> Iterator[str]:
            last, ended_at, started, beat = after, None, time.monotonic(), time.monotonic()
            try:
                yield "retry: 3000\n\n"
                while time.monotonic() - started < STREAM_MAX_S:
                    for event in store.for_job(record.job_id, after=last):
                        last = event.seq
                        yield sse_event(event)
                        if event.type == STATE_CHANGED and event.state in TERMINAL_VALUES:
                            ended_at = time.monotonic()
                    # After an end, linger briefly: a continuation may follow it (auto_continue).
                    if ended_at is not None and time.monotonic() - ended_at > 2:
                        return
                    if not events.wait(record.job_id, last, EVENT_TYPES, timeout=1.0 if ended_at else HEARTBEAT_S):
                        if time.monotonic() - beat >= HEARTBEAT_S:
                            beat = time.monotonic()
                            yield ": keep-alive\n\n"
            finally:
                slots.give()

        return Response(stream_with_context(stream()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- long-polls (RFC 7240 Prefer: wait) -----------------------------------------------------------


def wait_preference(header: str | None, ceiling: float) -> float | None:
    """The seconds of a ``Prefer: wait=N`` header (among other preferences), capped; None without one."""
    for preference in (header or "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            return max(0.0, min(seconds, ceiling)) if seconds == seconds else None  # NaN: none
    return None


def requested_wait() -> float | None:
    return wait_preference(request.headers.get("Prefer"), float(current_app.config["SERVER_MAX_WAIT_SECONDS"]))


def hold_for_change(job_id: str, seen_state: str, seconds: float, *, until_end: bool = False) -> bool:
    """Hold the request until the job's state is no longer ``seen_state`` (or, ``until_end``, until it
    has ended) or ``seconds`` pass. False if no wait slot was free (the caller answers at once, and
    says no Preference-Applied)."""
    slots = wait_slots()
    if not slots.take():
        return False
    try:
        service = job_service()
        events = feed()
        deadline = time.monotonic() + seconds
        # The seq first, then the state: a change committed in between is then seen either as a
        # changed state now or as an event newer than this seq, never lost between the two reads.
        after = events.events.latest_seq(job_id, types=(STATE_CHANGED,))
        while True:
            state = service.get(job_id).state
            if (state in TERMINAL_VALUES) if until_end else (state != seen_state):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not events.wait(job_id, after, (STATE_CHANGED,), remaining):
                return True
            # From the feed's memory, not the store: hundreds of waiters wake together, and each
            # costing one read (the state, above) instead of two keeps the pool from queueing.
            after = events.newest(job_id, (STATE_CHANGED,))
    finally:
        slots.give()
