"""The job store: SQLAlchemy Core over SQLite (embedded default) or PostgreSQL (shared by replicas).

Besides the jobs it holds leases: a row per named role (the poller) that one process renews, so
several gateway workers or replicas sharing a database run one poller between them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Set as AbstractSet
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from gateway.database.events import record_change, record_new_job
from gateway.database.schema import create_schema
from gateway.database.tables import job_requests_seen_table, jobs_table, leases_table, tokens_table

log = logging.getLogger(__name__)

# Built once: the two reads behind every status request (the job, and the bearer token's row for
# revocation) are the API's hot path, and building a select per call was a fifth of its CPU.
_GET_JOB = sa.select(jobs_table).where(jobs_table.c.job_id == sa.bindparam("job_id"))
_GET_TOKEN = sa.select(tokens_table).where(tokens_table.c.id == sa.bindparam("token_id"))
# A job read lists the job's children (its ETag depends on them): one indexed select of their ids.
_CHILD_IDS = (
    sa.select(jobs_table.c.job_id)
    .where(jobs_table.c.parent_job_id == sa.bindparam("job_id"))
    .order_by(jobs_table.c.accepted_at, jobs_table.c.job_id)
)


@dataclass
class TokenRecord:
    """One bearer token as stored: never its secret."""

    id: str
    user: str
    admin: bool
    salt: str
    hash: str
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None


@dataclass
class JobRecord:
    """One gateway job as stored."""

    job_id: str
    user_id: str
    workspace_id: str
    mode: str
    state: str
    request_json: str
    job_json: str
    output_url: str
    accepted_at: float
    updated_at: float
    request_sha256: str = ""
    idempotency_key: str | None = None
    slurm_state: str = ""
    main_slurm_id: str | None = None
    archive_slurm_id: str | None = None
    exit_code: int | None = None
    message: str = ""
    main_script: str = ""
    archive_script: str = ""
    metadata_json: str | None = None
    progress_json: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    checked_at: float | None = None
    submit_claim_until: float | None = None
    parent_job_id: str | None = None
    pending_reason: str | None = None
    estimated_start_at: float | None = None
    estimate_source: str | None = None
    slurm_account: str | None = None
    usage_json: str | None = None
    usage_cpu_hours: float | None = None
    usage_gpu_hours: float | None = None
    usage_at: float | None = None

    @property
    def usage(self) -> dict[str, Any] | None:
        return json.loads(self.usage_json) if self.usage_json else None

    @property
    def request(self) -> dict[str, Any]:
        return dict(json.loads(self.request_json))

    @property
    def job(self) -> dict[str, Any]:
        return dict(json.loads(self.job_json))

    @property
    def metadata(self) -> dict[str, Any] | None:
        return json.loads(self.metadata_json) if self.metadata_json else None

    @property
    def progress(self) -> dict[str, Any] | None:
        return json.loads(self.progress_json) if self.progress_json else None


_COLUMNS = [f.name for f in fields(JobRecord)]


def _insert_job(conn: sa.Connection, record: JobRecord) -> None:
    """A new job and its first event, in the caller's transaction."""
    conn.execute(jobs_table.insert().values(**{c: getattr(record, c) for c in _COLUMNS}))
    record_new_job(conn, record.job_id, record.user_id, record.state, record.message, record.updated_at)


class JobNotFound(KeyError):
    pass


class DuplicateIdempotencyKey(Exception):
    """Another request with the same user and Idempotency-Key got there first."""


# What a per-user limit check sees inside insert_within_limits' transaction: the user's number of
# jobs that have not ended, and the accepted_at of their jobs accepted since the given time.
LimitCheck = Callable[[int, list[float]], None]


def user_lock_key(user_id: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock: the same user, the same lock, in every
    process and replica (Python's hash() is salted per process, so it cannot serve)."""
    digest = hashlib.sha256(b"relion-gateway:user-limits\0" + user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _active_count_query(user_id: str, terminal: AbstractSet[str]) -> sa.Select[Any]:
    return sa.select(sa.func.count()).select_from(jobs_table).where(
        jobs_table.c.user_id == user_id, jobs_table.c.state.not_in(sorted(terminal))
    )


def _accepted_since_query(user_id: str, since: float) -> sa.Select[Any]:
    return (
        sa.select(jobs_table.c.accepted_at)
        .where(jobs_table.c.user_id == user_id, jobs_table.c.accepted_at >= since)
        .order_by(jobs_table.c.accepted_at)
    )


class JobStore:
    """CRUD for job records, and leases."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        create_schema(engine)

    # -- jobs ---------------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> None:
        try:
            with self.engine.begin() as conn:
                _insert_job(conn, record)
        except IntegrityError as exc:
            if record.idempotency_key is not None and self.find_by_idempotency_key(record.user_id, record.idempotency_key):
                raise DuplicateIdempotencyKey(record.idempotency_key) from exc
            raise

    def update(self, job_id: str, **changes: Any) -> None:
        changes.setdefault("updated_at", time.time())
        with self.engine.begin() as conn:
            record_change(conn, job_id, changes)
            result = conn.execute(jobs_table.update().where(jobs_table.c.job_id == job_id).values(**changes))
            if result.rowcount == 0:
                raise JobNotFound(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(_GET_JOB, {"job_id": job_id}).mappings().first()
        if row is None:
            raise JobNotFound(job_id)
        return JobRecord(**dict(row))

    def child_ids(self, job_id: str) -> list[str]:
        """The ids of the jobs chained on ``job_id``, oldest first."""
        with self.engine.connect() as conn:
            return [str(i) for i in conn.execute(_CHILD_IDS, {"job_id": job_id}).scalars()]

    def find_by_idempotency_key(self, user_id: str, key: str) -> JobRecord | None:
        query = sa.select(jobs_table).where(jobs_table.c.user_id == user_id, jobs_table.c.idempotency_key == key)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return JobRecord(**dict(row)) if row else None

    def list(
        self,
        *,
        user_id: str | None = None,
        states: list[str] | None = None,
        mode: str | None = None,
        limit: int = 100,
        offset: int = 0,
        parent_job_id: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        """Jobs newest first, and how many match in all."""
        conditions = [] if parent_job_id is None else [jobs_table.c.parent_job_id == parent_job_id]
        if user_id is not None:
            conditions.append(jobs_table.c.user_id == user_id)
        if states:
            conditions.append(jobs_table.c.state.in_(states))
        if mode is not None:
            conditions.append(jobs_table.c.mode == mode)
        query = sa.select(jobs_table).where(*conditions).order_by(jobs_table.c.accepted_at.desc(), jobs_table.c.job_id)
        count = sa.select(sa.func.count()).select_from(jobs_table).where(*conditions)
        with self.engine.connect() as conn:
            rows = [JobRecord(**dict(row)) for row in conn.execute(query.limit(limit).offset(offset)).mappings()]
            total = int(conn.execute(count).scalar_one())
        return rows, total

    def insert_within_limits(self, record: JobRecord, check: LimitCheck, *, terminal: AbstractSet[str], since: float) -> None:
        """Insert ``record`` unless ``check`` raises, counting and inserting as one step per user.

        ``check`` gets ``record.user_id``'s count of jobs not in ``terminal`` and the accepted_at of
        their jobs accepted at or after ``since``, read under a per-user lock that is held until the
        insert commits; so N simultaneous submissions against a limit of L store exactly L, in every
        worker and replica sharing the database. A record whose Idempotency-Key is already stored
        raises DuplicateIdempotencyKey before ``check`` runs: a replay never counts.
        """
        dialect = self.engine.dialect.name
        try:
            if dialect == "sqlite":
                self._insert_within_limits_sqlite(record, check, terminal, since)
            else:
                with self.engine.begin() as conn:
                    if dialect == "postgresql":
                        # Transaction-scoped: released by COMMIT or ROLLBACK, never leaked by a crash.
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": user_lock_key(record.user_id)})
                    else:
                        log.warning("store: %s has no per-user lock here; limits may overshoot under concurrency", dialect)
                    self._count_check_insert(conn, record, check, terminal, since)
        except IntegrityError as exc:
            # A racing insert that took no lock (a submission without limits) can still collide.
            if record.idempotency_key is not None and self.find_by_idempotency_key(record.user_id, record.idempotency_key):
                raise DuplicateIdempotencyKey(record.idempotency_key) from exc
            raise

    def _insert_within_limits_sqlite(self, record: JobRecord, check: LimitCheck, terminal: AbstractSet[str], since: float) -> None:
        # pysqlite opens transactions itself, lazily and DEFERRED, right before the first write:
        # two connections could both count, then both insert. In AUTOCOMMIT the driver stays out of
        # the way and BEGIN IMMEDIATE takes SQLite's write lock before counting; others wait for it
        # (busy_timeout), readers do not (WAL). The lock is database-wide, held for one insert.
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                self._count_check_insert(conn, record, check, terminal, since)
            except BaseException:
                # SQLite may already have rolled back (a full disk, an interrupt): then there is none.
                if conn.connection.dbapi_connection is not None and conn.connection.dbapi_connection.in_transaction:
                    conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

    @staticmethod
    def _count_check_insert(
        conn: sa.Connection, record: JobRecord, check: LimitCheck, terminal: AbstractSet[str], since: float
    ) -> None:
        if record.idempotency_key is not None:
            same_key = sa.select(jobs_table.c.job_id).where(
                jobs_table.c.user_id == record.user_id, jobs_table.c.idempotency_key == record.idempotency_key
            )
            if conn.execute(same_key).first() is not None:
                raise DuplicateIdempotencyKey(record.idempotency_key)
        active = int(conn.execute(_active_count_query(record.user_id, terminal)).scalar_one())
        recent = [float(v) for v in conn.execute(_accepted_since_query(record.user_id, since)).scalars()]
        check(active, recent)
        _insert_job(conn, record)

    def count_active(self, user_id: str, terminal: AbstractSet[str]) -> int:
        """How many of ``user_id``'s jobs have not ended."""
        with self.engine.connect() as conn:
            return int(conn.execute(_active_count_query(user_id, terminal)).scalar_one())

    def live(self, terminal: AbstractSet[str]) -> list[JobRecord]:
        query = sa.select(jobs_table).where(jobs_table.c.state.not_in(sorted(terminal)))
        with self.engine.connect() as conn:
            return [JobRecord(**dict(row)) for row in conn.execute(query).mappings()]

    def budget_records(self, column: str, value: str, *, since: float, terminal: AbstractSet[str]) -> list[JobRecord]:
        """A user's (``column`` user_id) or an account's (slurm_account) jobs that count against a
        budget period starting at ``since``: those not ended, and those that ended in it."""
        query = sa.select(jobs_table).where(
            jobs_table.c[column] == value,
            sa.or_(jobs_table.c.state.not_in(sorted(terminal)), jobs_table.c.ended_at >= since),
        )
        with self.engine.connect() as conn:
            return [JobRecord(**dict(row)) for row in conn.execute(query).mappings()]

    def ended_between(self, since: float, until: float, *, user_id: str | None = None, account: str | None = None) -> list[JobRecord]:
        """Jobs that ended in [since, until), for a usage report."""
        conditions = [jobs_table.c.ended_at >= since, jobs_table.c.ended_at < until]
        if user_id is not None:
            conditions.append(jobs_table.c.user_id == user_id)
        if account is not None:
            conditions.append(jobs_table.c.slurm_account == account)
        with self.engine.connect() as conn:
            return [JobRecord(**dict(row)) for row in conn.execute(sa.select(jobs_table).where(*conditions).order_by(jobs_table.c.ended_at)).mappings()]

    def needing_usage(self, terminal: AbstractSet[str], *, since: float, limit: int) -> list[JobRecord]:
        """Ended jobs not costed yet that ended after ``since``, oldest end first."""
        query = (
            sa.select(jobs_table)
            .where(jobs_table.c.state.in_(sorted(terminal)), jobs_table.c.usage_at.is_(None), jobs_table.c.ended_at >= since)
            .order_by(jobs_table.c.ended_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [JobRecord(**dict(row)) for row in conn.execute(query).mappings()]

    def claim_submission(self, job_id: str, seconds: float) -> bool:
        """Take the right to (re)submit a job for a while; only one process gets it."""
        now = time.time()
        claimable = sa.or_(jobs_table.c.submit_claim_until.is_(None), jobs_table.c.submit_claim_until < now)
        with self.engine.begin() as conn:
            result = conn.execute(
                jobs_table.update().where(jobs_table.c.job_id == job_id, claimable).values(submit_claim_until=now + seconds)
            )
        return bool(result.rowcount)

    def update_if(self, job_id: str, *, expect_state: str, expect_job_json: str, **changes: Any) -> bool:
        """``update`` only if the job is still in ``expect_state`` with this record (compare and set):
        of two processes continuing one ended job, exactly one wins; the other gets False."""
        changes.setdefault("updated_at", time.time())
        matches = [jobs_table.c.state == expect_state, jobs_table.c.job_json == expect_job_json]
        with self.engine.begin() as conn:
            record_change(conn, job_id, changes, where=matches)
            result = conn.execute(jobs_table.update().where(jobs_table.c.job_id == job_id, *matches).values(**changes))
        return bool(result.rowcount)

    def extend_claim(self, job_id: str, seconds: float) -> None:
        """Renew a submission claim this process holds."""
        with self.engine.begin() as conn:
            conn.execute(jobs_table.update().where(jobs_table.c.job_id == job_id).values(submit_claim_until=time.time() + seconds))

    # -- leases -------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew a lease; true if ``holder`` holds it now."""
        now = time.time()
        with self.engine.begin() as conn:
            result = conn.execute(
                leases_table.update()
                .where(leases_table.c.name == name, sa.or_(leases_table.c.holder == holder, leases_table.c.expires_at < now))
                .values(holder=holder, expires_at=now + seconds)
            )
            if result.rowcount:
                return True
        try:
            with self.engine.begin() as conn:
                conn.execute(leases_table.insert().values(name=name, holder=holder, expires_at=now + seconds))
            return True
        except IntegrityError:
            return False  # someone else holds it

    def release_lease(self, name: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(leases_table.delete().where(leases_table.c.name == name, leases_table.c.holder == holder))

    # -- tokens -------------------------------------------------------------------------------

    def insert_token(self, token: TokenRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(tokens_table.insert().values(**{f.name: getattr(token, f.name) for f in fields(TokenRecord)}))

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_GET_TOKEN, {"token_id": token_id}).mappings().first()
        return TokenRecord(**dict(row)) if row else None

    def list_tokens(self, *, user: str | None = None) -> list[TokenRecord]:
        query = sa.select(tokens_table).order_by(tokens_table.c.created_at, tokens_table.c.id)
        if user is not None:
            query = query.where(tokens_table.c.user == user)
        with self.engine.connect() as conn:
            return [TokenRecord(**dict(row)) for row in conn.execute(query).mappings()]

    def revoke_token(self, token_id: str, when: float) -> bool:
        """Revoke a token; false if there is no such token or it was already revoked."""
        with self.engine.begin() as conn:
            result = conn.execute(
                tokens_table.update()
                .where(tokens_table.c.id == token_id, tokens_table.c.revoked_at.is_(None))
                .values(revoked_at=when)
            )
        return bool(result.rowcount)

    def touch_token(self, token_id: str, when: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(tokens_table.update().where(tokens_table.c.id == token_id).values(last_used_at=when))

    # -- signed job requests ------------------------------------------------------------------

    def first_sighting(self, job_id: str, body_sha256: str, now: float, forget_before: float) -> bool:
        """Remember a signed request body; false if it was taken before (a replay)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(job_requests_seen_table.delete().where(job_requests_seen_table.c.seen_at < forget_before))
                conn.execute(job_requests_seen_table.insert().values(job_id=job_id, body_sha256=body_sha256, seen_at=now))
        except IntegrityError:
            return False
        return True
