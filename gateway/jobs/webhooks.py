"""Webhooks a portal registers: the rules for a target, the signing secret, and what a message says.

Messages follow the Standard Webhooks specification (standardwebhooks.com): a JSON body
``{"type", "timestamp", "data"}`` POSTed with ``webhook-id`` (the same on every retry, for
de-duplication), ``webhook-timestamp`` (the attempt's, in Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``), signed with the library of the
specification's authors. A subscription's secret is not stored: it is an HMAC of its id under the
gateway's key (the one job tokens come from), so a leaked database holds no secret and an
idempotent replay of a submit answers the same secret again.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from gateway.audit import Actor
from gateway.auth import authorize_user
from gateway.database import JobNotFound, JobRecord, JobStore
from gateway.database.events import EVENT_TYPES, PENDING, STATE_CHANGED, Delivery, EventStore, JobEvent, Webhook, WebhookStore
from gateway.errors import LimitExceeded, RequestError
from gateway.jobs.states import TERMINAL_VALUES

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048
Resolver = Callable[[str, int], Sequence[str]]


def iso8601(ts: float) -> str:
    """A Unix time as ISO 8601 in UTC with milliseconds (``2026-12-02T06:30:00.123Z``)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_secret(key: bytes, webhook_id: str) -> str:
    """The subscription's signing secret, ``whsec_<base64 of 32 bytes>`` as Standard Webhooks write it."""
    digest = hmac.new(key, b"relion-gateway:webhook\0" + webhook_id.encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def target_problem(url: str, allow_networks: Sequence[str], resolver: Resolver = resolve) -> str | None:
    """Why the gateway must not POST to ``url``, or None.

    The gateway sits next to services a portal must never reach through it (slurmrestd, the S3
    server, the database, a cloud's metadata address): a target that resolves to loopback,
    link-local, multicast or reserved space is refused unless ``allow_networks`` names it. Checked
    at registration and again before each delivery (DNS may have changed in between).
    """
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    if parts.username or parts.password:
        return "must not carry a user name or password (the signature authenticates the gateway)"
    if parts.fragment:
        return "must not have a #fragment"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "has an invalid port"
    try:
        addresses = resolver(parts.hostname, port)
    except (OSError, UnicodeError) as exc:
        return f"host {parts.hostname!r} does not resolve ({exc})"
    allowed = [ipaddress.ip_network(net, strict=False) for net in allow_networks]
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if any(address in net for net in allowed):
            continue
        if address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved:
            return f"resolves to {address}, an address webhooks may not target (see [webhooks] allow_networks)"
    return None


def message(event: JobEvent, record: JobRecord | None) -> dict[str, Any]:
    """What one event says to a subscriber: the change, and with a job's end its result."""
    data: dict[str, Any] = {
        "event_id": event.seq,
        "job_id": event.job_id,
        "user_id": event.user_id,
        "status": event.state,
        "previous_status": event.previous_state,
        "message": event.message,
        "occurred_at": iso8601(event.at),
    }
    if record is not None:
        data.update(workspace_id=record.workspace_id, mode=record.mode, slurm_job_id=record.main_slurm_id)
    if event.type != STATE_CHANGED:
        data["progress"] = event.progress
    elif event.state in TERMINAL_VALUES and record is not None:
        data["metadata"] = record.metadata  # the final result (null when nothing was archived)
        data["exit_code"] = record.exit_code
    return {"type": event.type, "timestamp": iso8601(event.at), "data": data}


def deliveries_for(event: JobEvent, hooks: list[Webhook], record: JobRecord | None) -> list[Delivery]:
    """One pending delivery of ``event`` per subscription, each with its own webhook-id and the
    same body (fixed now: every retry sends these bytes)."""
    if not hooks:
        return []
    body = json.dumps(message(event, record), separators=(",", ":"), sort_keys=True)
    now = time.time()
    return [
        Delivery(id=f"msg_{secrets.token_hex(12)}", webhook_id=hook.id, event_seq=event.seq, job_id=event.job_id,
                 user_id=event.user_id, type=event.type, body=body, status=PENDING, attempts=0, next_attempt_at=now, created_at=now)
        for hook in hooks
    ]


class WebhookService:
    """Subscriptions as the API and the submit path manage them, each checked against the caller."""

    def __init__(self, config: dict[str, Any], store: JobStore, key: bytes, resolver: Resolver = resolve) -> None:
        self.config = config
        self.jobs = store
        self.hooks = WebhookStore(store.engine)
        self.events = EventStore(store.engine)
        self.key = key
        self.resolver = resolver

    def check_url(self, url: str, field: str = "url") -> None:
        if not self.config["WEBHOOKS_ENABLED"] or not self.key:
            raise RequestError(field, "webhooks are turned off on this gateway ([webhooks] enabled)")
        problem = target_problem(url, self.config["WEBHOOKS_ALLOW_NETWORKS"], self.resolver)
        if problem:
            raise RequestError(field, problem)

    def create(
        self,
        principal: Actor,
        *,
        url: str,
        user_id: str | None = None,
        job_id: str | None = None,
        event_types: Sequence[str] = (STATE_CHANGED,),
        description: str = "",
        webhook_id: str | None = None,
        field: str = "url",
    ) -> tuple[Webhook, str]:
        """Register a subscription; returns it and its secret (which no later read shows)."""
        owner = user_id or principal.user
        authorize_user(principal, owner)
        if webhook_id is not None and (known := self.hooks.get(webhook_id)) is not None and known.deleted_at is None:
            return known, webhook_secret(self.key, known.id)  # the same request again: the same subscription
        self.check_url(url, field)
        unknown = sorted(set(event_types) - set(EVENT_TYPES))
        if unknown or not event_types:
            raise RequestError("event_types", f"must be a non-empty list of {list(EVENT_TYPES)}, not {unknown or []}")
        if job_id is not None and webhook_id is None:
            try:
                record = self.jobs.get(job_id)
            except JobNotFound:
                record = None
            if record is None or record.user_id != owner:
                raise RequestError("job_id", f"no job {job_id!r} of user {owner!r}", status=404)
        limit = int(self.config["WEBHOOKS_MAX_PER_USER"])
        if limit and self.hooks.count_live(owner) >= limit:
            raise LimitExceeded("[webhooks] max_per_user", f"user {owner!r} has {limit} webhooks ([webhooks] max_per_user); delete one first", 60)
        hook = Webhook(
            id=webhook_id or f"wh_{secrets.token_hex(12)}",
            user_id=owner,
            job_id=job_id,
            url=url,
            event_types=json.dumps(list(dict.fromkeys(event_types))),
            # A user's subscription hears what happens from now on; a job's hears all of the job,
            # from its first state (the events already sent out to others are backfilled).
            from_seq=self.events.max_seq() if job_id is None else 0,
            created_at=time.time(),
            description=description,
        )
        record = self.jobs.get(job_id) if job_id is not None else None
        if not self.hooks.insert(hook, backfill=lambda events: [d for e in events for d in deliveries_for(e, [hook], record)]):
            existing = self.hooks.get(hook.id)
            assert existing is not None
            return existing, webhook_secret(self.key, hook.id)  # the same request again: the same subscription
        log.info("webhook %s registered for user %s%s", hook.id, owner, f" job {job_id}" if job_id else "")
        return hook, webhook_secret(self.key, hook.id)

    def for_submitted_job(self, principal: Actor, record: JobRecord, url: str, event_types: Sequence[str]) -> tuple[Webhook, str]:
        """The subscription a submit request's ``webhook`` asks for: one per job and URL, so a
        replay of the request (Idempotency-Key) answers the same id and secret."""
        digest = hashlib.sha256(f"{record.job_id}\0{url}".encode()).hexdigest()[:24]
        return self.create(principal, url=url, user_id=record.user_id, job_id=record.job_id, event_types=event_types,
                           webhook_id=f"wh_{digest}", field="webhook.url", description="from the job's request")

    def secret(self, hook: Webhook) -> str:
        return webhook_secret(self.key, hook.id)

    def get(self, principal: Actor, webhook_id: str) -> Webhook:
        hook = self.hooks.get(webhook_id)
        # Another user's webhook does not exist for the caller, as another user's job does not.
        if hook is None or hook.deleted_at is not None or (not principal.admin and hook.user_id != principal.user):
            raise JobNotFound(f"no webhook {webhook_id!r}")
        return hook

    def list(self, principal: Actor, *, user_id: str | None = None, job_id: str | None = None) -> list[Webhook]:
        if user_id is not None:
            authorize_user(principal, user_id)
        return self.hooks.list(user_id=user_id if user_id is not None else (None if principal.admin else principal.user), job_id=job_id)

    def delete(self, principal: Actor, webhook_id: str) -> None:
        hook = self.get(principal, webhook_id)
        self.hooks.delete(hook.id, time.time())
        log.info("webhook %s deleted", hook.id)

    def deliveries(self, principal: Actor, webhook_id: str, **filters: Any) -> tuple[list[Delivery], int]:
        return self.hooks.deliveries(self.get(principal, webhook_id).id, **filters)
