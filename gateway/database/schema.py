"""Engines and the schema: create what is missing, bring an older database's tables up to date."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from gateway.database.tables import metadata_obj

log = logging.getLogger(__name__)

SCHEMA_ATTEMPTS = 5


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


def _add_missing_columns(engine: Engine) -> None:
    """Bring a database written by an older gateway up to date (nullable columns only).

    A state directory outlives upgrades; create_all() makes missing tables but never alters one.
    """
    inspector = sa.inspect(engine)
    for table in metadata_obj.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl_type = column.type.compile(dialect=engine.dialect)
            default = ""
            if not column.nullable:
                default = " DEFAULT ''" if isinstance(column.type, (sa.String, sa.Text)) else " DEFAULT 0"
            with engine.begin() as conn:
                conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {ddl_type}{default}'))
            log.info("store: added column %s.%s", table.name, column.name)
        _add_missing_indexes(engine, table)


def _add_missing_indexes(engine: Engine, table: sa.Table) -> None:
    """Indexes and unique constraints an older table lacks (ALTER ... ADD COLUMN adds neither).

    Without uq_jobs_user_idempotency_key on an upgraded database, two retries with one
    Idempotency-Key would both be stored and submitted.
    """
    inspector = sa.inspect(engine)  # a fresh one: the columns just changed
    unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table.name)}
    unique |= {tuple(i["column_names"]) for i in inspector.get_indexes(table.name) if i.get("unique")}
    for constraint in table.constraints:
        columns = tuple(c.name for c in constraint.columns)
        if isinstance(constraint, sa.UniqueConstraint) and columns not in unique:
            with engine.begin() as conn:
                conn.execute(sa.text(f"CREATE UNIQUE INDEX {constraint.name} ON {table.name} ({', '.join(columns)})"))
            log.info("store: added unique index %s on %s%s", constraint.name, table.name, columns)
    for index in table.indexes:
        index.create(engine, checkfirst=True)


def create_schema(engine: Engine) -> None:
    """Create missing tables, columns and indexes.

    Gunicorn workers and replicas start together: on a fresh database all but one lose the race to
    CREATE TABLE (or ALTER TABLE) and see "already exists". Looking again finds the winner's
    tables, so a short retry converges.
    """
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            metadata_obj.create_all(engine)
            _add_missing_columns(engine)
            return
        except DBAPIError as exc:
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            log.info("store: schema set-up raced another process (%s); retrying", str(exc).splitlines()[0])
            time.sleep(0.05 * (attempt + 1))
