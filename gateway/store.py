"""The job store: SQLAlchemy Core over SQLite (embedded default) or PostgreSQL (shared by replicas)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

metadata_obj = sa.MetaData()

jobs_table = sa.Table(
    "jobs",
    metadata_obj,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False, index=True),
    sa.Column("workspace_id", sa.String(64), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("slurm_state", sa.String(128), nullable=False, default=""),
    sa.Column("main_slurm_id", sa.String(32)),
    sa.Column("archive_slurm_id", sa.String(32)),
    sa.Column("exit_code", sa.Integer),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("request_json", sa.Text, nullable=False),
    sa.Column("job_json", sa.Text, nullable=False),
    sa.Column("main_script", sa.Text, nullable=False, default=""),
    sa.Column("archive_script", sa.Text, nullable=False, default=""),
    sa.Column("metadata_json", sa.Text),
    sa.Column("output_url", sa.Text, nullable=False),
    sa.Column("accepted_at", sa.Float, nullable=False),
    sa.Column("submitted_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("checked_at", sa.Float),
)


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
    slurm_state: str = ""
    main_slurm_id: str | None = None
    archive_slurm_id: str | None = None
    exit_code: int | None = None
    message: str = ""
    main_script: str = ""
    archive_script: str = ""
    metadata_json: str | None = None
    submitted_at: float | None = None
    ended_at: float | None = None
    checked_at: float | None = None

    @property
    def request(self) -> dict[str, Any]:
        return dict(json.loads(self.request_json))

    @property
    def job(self) -> dict[str, Any]:
        return dict(json.loads(self.job_json))

    @property
    def metadata(self) -> dict[str, Any] | None:
        return json.loads(self.metadata_json) if self.metadata_json else None


_COLUMNS = [f.name for f in fields(JobRecord)]


class JobNotFound(KeyError):
    pass


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so the API and poller can share it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class JobStore:
    """CRUD for job records."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata_obj.create_all(engine)

    def insert(self, record: JobRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs_table.insert().values(**{c: getattr(record, c) for c in _COLUMNS}))

    def update(self, job_id: str, **changes: Any) -> None:
        changes.setdefault("updated_at", time.time())
        with self.engine.begin() as conn:
            result = conn.execute(jobs_table.update().where(jobs_table.c.job_id == job_id).values(**changes))
            if result.rowcount == 0:
                raise JobNotFound(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.job_id == job_id)).mappings().first()
        if row is None:
            raise JobNotFound(job_id)
        return JobRecord(**dict(row))

    def list(self, *, user_id: str | None = None, states: list[str] | None = None, limit: int = 100) -> list[JobRecord]:
        query = sa.select(jobs_table).order_by(jobs_table.c.accepted_at.desc()).limit(limit)
        if user_id is not None:
            query = query.where(jobs_table.c.user_id == user_id)
        if states:
            query = query.where(jobs_table.c.state.in_(states))
        with self.engine.connect() as conn:
            return [JobRecord(**dict(row)) for row in conn.execute(query).mappings()]

    def iter_live(self, terminal: set[str]) -> Iterator[JobRecord]:
        query = sa.select(jobs_table).where(jobs_table.c.state.not_in(sorted(terminal)))
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
        for row in rows:
            yield JobRecord(**dict(row))
