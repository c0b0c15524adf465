"""Job events (the outbox, written with the change it records) and webhook subscriptions and deliveries.

``record_change`` runs inside the job store's own update transaction: the event exists if and only
if the change was committed, whatever happens to the process after. Everything else here reads
events or keeps the webhook tables; what a message says and where it goes is gateway/jobs/webhooks.py.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from gateway.database.tables import job_events_table, jobs_table, webhook_deliveries_table, webhooks_table

STATE_CHANGED = "job.state_changed"
PROGRESS = "job.progress"
EVENT_TYPES = (STATE_CHANGED, PROGRESS)

# Delivery states: pending until a 2xx (delivered) or the last attempt (failed); cancelled when
# its subscription is deleted first.
PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"
DELIVERY_STATES = (PENDING, DELIVERED, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobEvent:
    seq: int
    job_id: str
    user_id: str
    type: str
    state: str
    previous_state: str | None
    message: str
    progress_json: str | None
    at: float
    fanned_out: bool = False

    @property
    def progress(self) -> dict[str, Any] | None:
        return json.loads(self.progress_json) if self.progress_json else None


@dataclass(frozen=True)
class Webhook:
    id: str
    user_id: str
    job_id: str | None
    url: str
    event_types: str  # JSON list
    from_seq: int
    created_at: float
    description: str = ""
    deleted_at: float | None = None

    @property
    def types(self) -> list[str]:
        return list(json.loads(self.event_types))


@dataclass(frozen=True)
class Delivery:
    id: str
    webhook_id: str
    event_seq: int
    job_id: str
    user_id: str
    type: str
    body: str
    status: str
    attempts: int
    next_attempt_at: float
    created_at: float
    last_attempt_at: float | None = None
    last_status_code: int | None = None
    last_error: str = ""
    delivered_at: float | None = None


def _lock_job(conn: sa.Connection, job_id: str) -> None:
    # PostgreSQL: hold the job's row from here to COMMIT, so two writers of one job record their
    # events in commit order with the right previous state. SQLite needs nothing: the INSERT below
    # is the transaction's first write and takes the database's write lock before it reads.
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(jobs_table.c.job_id).where(jobs_table.c.job_id == job_id).with_for_update())


def record_change(conn: sa.Connection, job_id: str, changes: dict[str, Any], *, where: list[Any] | None = None) -> None:
    """Inside the store's update transaction, before the UPDATE: the events the change makes.

    Read and written in one statement (INSERT ... SELECT from the row as it still is), so the
    previous state is the committed one. ``where`` narrows it as the UPDATE is narrowed (a
    compare-and-set that does not match records nothing).
    """
    if "state" not in changes and "progress_json" not in changes:
        return
    _lock_job(conn, job_id)
    now = changes.get("updated_at") or time.time()
    base = [jobs_table.c.job_id == job_id, *(where or [])]
    message = sa.literal(changes["message"], sa.Text) if "message" in changes else jobs_table.c.message
    columns = ["job_id", "user_id", "type", "state", "previous_state", "message", "progress_json", "at", "fanned_out"]
    if "state" in changes:
        new_state = changes["state"]
        select = sa.select(
            jobs_table.c.job_id, jobs_table.c.user_id, sa.literal(STATE_CHANGED), sa.literal(new_state), jobs_table.c.state,
            message, sa.literal(changes.get("progress_json"), sa.Text), sa.literal(now), sa.literal(False),
        ).where(*base, jobs_table.c.state != new_state)
        conn.execute(job_events_table.insert().from_select(columns, select))
    if changes.get("progress_json"):
        state = sa.literal(changes["state"]) if "state" in changes else jobs_table.c.state
        select = sa.select(
            jobs_table.c.job_id, jobs_table.c.user_id, sa.literal(PROGRESS), state, sa.null(), message,
            sa.literal(changes["progress_json"], sa.Text), sa.literal(now), sa.literal(False),
        ).where(*base, sa.func.coalesce(jobs_table.c.progress_json, "") != changes["progress_json"])
        conn.execute(job_events_table.insert().from_select(columns, select))


def record_new_job(conn: sa.Connection, job_id: str, user_id: str, state: str, message: str, at: float) -> None:
    """A job's first event: its state when it was stored."""
    conn.execute(job_events_table.insert().values(
        job_id=job_id, user_id=user_id, type=STATE_CHANGED, state=state, previous_state=None, message=message, at=at,
        fanned_out=False,
    ))


def _event(row: Any) -> JobEvent:
    return JobEvent(**{f.name: row[f.name] for f in fields(JobEvent)})


class EventStore:
    """Reads of the job events, and the dispatcher's fan-out bookkeeping."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def for_job(self, job_id: str, *, after: int = 0, types: tuple[str, ...] = EVENT_TYPES, limit: int = 1000) -> list[JobEvent]:
        query = (
            sa.select(job_events_table)
            .where(job_events_table.c.job_id == job_id, job_events_table.c.seq > after, job_events_table.c.type.in_(types))
            .order_by(job_events_table.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_event(row) for row in conn.execute(query).mappings()]

    def latest_seq(self, job_id: str, *, types: tuple[str, ...] = EVENT_TYPES) -> int:
        """The job's newest event of these types (0: none)."""
        query = sa.select(sa.func.max(job_events_table.c.seq)).where(
            job_events_table.c.job_id == job_id, job_events_table.c.type.in_(types)
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one() or 0)

    def max_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(job_events_table.c.seq))).scalar_one() or 0)

    def recent(self, since: float) -> list[tuple[str, str, int]]:
        """(job_id, type, newest seq) of every job with an event at or after ``since``: one grouped read."""
        query = (
            sa.select(job_events_table.c.job_id, job_events_table.c.type, sa.func.max(job_events_table.c.seq))
            .where(job_events_table.c.at >= since)
            .group_by(job_events_table.c.job_id, job_events_table.c.type)
        )
        with self.engine.connect() as conn:
            return [(str(j), str(t), int(s)) for j, t, s in conn.execute(query)]

    def not_fanned_out(self, limit: int = 500) -> list[JobEvent]:
        query = (
            sa.select(job_events_table)
            .where(job_events_table.c.fanned_out.is_(False))
            .order_by(job_events_table.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_event(row) for row in conn.execute(query).mappings()]

    def fan_out(self, event: JobEvent, deliveries_for: Callable[[list[Webhook]], list[Delivery]]) -> None:
        """Mark an event fanned out and store its deliveries to the subscriptions it matches, as one
        step: a crash repeats neither half, and a job's subscription made meanwhile either is
        matched here or finds the event fanned out and backfills it (WebhookStore.insert)."""
        with self.engine.begin() as conn:
            done = conn.execute(  # first, so the event's row is this transaction's until COMMIT
                job_events_table.update()
                .where(job_events_table.c.seq == event.seq, job_events_table.c.fanned_out.is_(False))
                .values(fanned_out=True)
            )
            if done.rowcount == 0:
                return  # another dispatcher got there first
            for delivery in deliveries_for(matching(conn, event)):
                conn.execute(webhook_deliveries_table.insert().values(**_row(delivery)))


def matching(conn: sa.Connection, event: JobEvent) -> list[Webhook]:
    """The live subscriptions an event goes to: its user's, for all jobs or for this one, made before it."""
    query = sa.select(webhooks_table).where(
        webhooks_table.c.user_id == event.user_id,
        webhooks_table.c.deleted_at.is_(None),
        webhooks_table.c.from_seq < event.seq,
        sa.or_(webhooks_table.c.job_id.is_(None), webhooks_table.c.job_id == event.job_id),
    )
    hooks = [Webhook(**dict(row)) for row in conn.execute(query).mappings()]
    return [hook for hook in hooks if event.type in hook.types]


def _row(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


class WebhookStore:
    """Subscriptions and the delivery log."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert(self, webhook: Webhook, backfill: Callable[[list[JobEvent]], list[Delivery]] | None = None) -> bool:
        """Store a subscription; false if one with its id exists (an idempotent replay).

        A job's subscription (``job_id``) with ``backfill`` also gets deliveries for that job's
        events after ``from_seq`` that the dispatcher has already fanned out: it locks the job's
        event rows first, so an event being fanned out right now is either seen fanned out here
        or, once this commits, matched there; never neither."""
        try:
            with self.engine.begin() as conn:
                conn.execute(webhooks_table.insert().values(**_row(webhook)))
                if webhook.job_id is None or backfill is None:
                    return True
                query = sa.select(job_events_table).where(job_events_table.c.job_id == webhook.job_id).order_by(job_events_table.c.seq)
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update()
                events = [_event(row) for row in conn.execute(query).mappings()]
                done = [e for e in events if e.fanned_out and e.seq > webhook.from_seq and e.type in webhook.types]
                for delivery in backfill(done):
                    conn.execute(webhook_deliveries_table.insert().values(**_row(delivery)))
        except IntegrityError:
            if self.get(webhook.id) is not None:
                return False
            raise
        return True

    def get(self, webhook_id: str) -> Webhook | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(webhooks_table).where(webhooks_table.c.id == webhook_id)).mappings().first()
        return Webhook(**dict(row)) if row else None

    def list(self, *, user_id: str | None = None, job_id: str | None = None, include_deleted: bool = False) -> list[Webhook]:
        query = sa.select(webhooks_table).order_by(webhooks_table.c.created_at, webhooks_table.c.id)
        if user_id is not None:
            query = query.where(webhooks_table.c.user_id == user_id)
        if job_id is not None:
            query = query.where(webhooks_table.c.job_id == job_id)
        if not include_deleted:
            query = query.where(webhooks_table.c.deleted_at.is_(None))
        with self.engine.connect() as conn:
            return [Webhook(**dict(row)) for row in conn.execute(query).mappings()]

    def matching(self, event: JobEvent) -> list[Webhook]:
        with self.engine.connect() as conn:
            return matching(conn, event)

    def count_live(self, user_id: str) -> int:
        query = sa.select(sa.func.count()).select_from(webhooks_table).where(
            webhooks_table.c.user_id == user_id, webhooks_table.c.deleted_at.is_(None)
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def delete(self, webhook_id: str, when: float) -> bool:
        """Delete a subscription and cancel what it still had to deliver; false if already gone."""
        with self.engine.begin() as conn:
            done = conn.execute(
                webhooks_table.update()
                .where(webhooks_table.c.id == webhook_id, webhooks_table.c.deleted_at.is_(None))
                .values(deleted_at=when)
            )
            conn.execute(
                webhook_deliveries_table.update()
                .where(webhook_deliveries_table.c.webhook_id == webhook_id, webhook_deliveries_table.c.status == PENDING)
                .values(status=CANCELLED, last_error="the webhook was deleted")
            )
        return bool(done.rowcount)

    # -- deliveries -----------------------------------------------------------------------------

    def due(self, now: float, limit: int, *, webhook_id: str | None = None) -> list[Delivery]:
        """Pending deliveries whose time has come, at most one per subscription (its oldest), so a
        dead endpoint holds one delivery slot, never the queue, and each subscriber gets its
        messages in order."""
        pending = [webhook_deliveries_table.c.status == PENDING]
        if webhook_id is not None:
            pending.append(webhook_deliveries_table.c.webhook_id == webhook_id)
        oldest = (
            sa.select(sa.func.min(webhook_deliveries_table.c.event_seq).label("seq"), webhook_deliveries_table.c.webhook_id)
            .where(*pending)
            .group_by(webhook_deliveries_table.c.webhook_id)
            .subquery()
        )
        query = (
            sa.select(webhook_deliveries_table)
            .join(oldest, sa.and_(oldest.c.webhook_id == webhook_deliveries_table.c.webhook_id,
                                  oldest.c.seq == webhook_deliveries_table.c.event_seq))
            .where(webhook_deliveries_table.c.next_attempt_at <= now)
            .order_by(webhook_deliveries_table.c.next_attempt_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [Delivery(**dict(row)) for row in conn.execute(query).mappings()]

    def attempted(self, delivery_id: str, **changes: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(webhook_deliveries_table.update().where(webhook_deliveries_table.c.id == delivery_id).values(**changes))

    def deliveries(
        self, webhook_id: str, *, job_id: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[Delivery], int]:
        """A subscription's delivery log, newest first, and how many match."""
        conditions = [webhook_deliveries_table.c.webhook_id == webhook_id]
        if job_id is not None:
            conditions.append(webhook_deliveries_table.c.job_id == job_id)
        if status is not None:
            conditions.append(webhook_deliveries_table.c.status == status)
        query = (
            sa.select(webhook_deliveries_table).where(*conditions)
            .order_by(webhook_deliveries_table.c.event_seq.desc()).limit(limit).offset(offset)
        )
        count = sa.select(sa.func.count()).select_from(webhook_deliveries_table).where(*conditions)
        with self.engine.connect() as conn:
            rows = [Delivery(**dict(row)) for row in conn.execute(query).mappings()]
            return rows, int(conn.execute(count).scalar_one())

    def forget_before(self, when: float) -> int:
        """Drop log rows of deliveries that ended before ``when``."""
        with self.engine.begin() as conn:
            done = conn.execute(
                webhook_deliveries_table.delete().where(
                    webhook_deliveries_table.c.status != PENDING, webhook_deliveries_table.c.created_at < when
                )
            )
        return int(done.rowcount)


__all__ = [
    "CANCELLED", "DELIVERED", "DELIVERY_STATES", "Delivery", "EVENT_TYPES", "EventStore", "FAILED",
    "JobEvent", "PENDING", "PROGRESS", "STATE_CHANGED", "Webhook", "WebhookStore", "record_change", "record_new_job",
]
