"""The job store on SQLite (a file, WAL, as the gateway runs it): the shared contract in tests/store_contract.py.

The same checks run against PostgreSQL in tests/integration/test_store_postgres.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.database import JobStore, make_engine
from tests.store_contract import contract_params


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    # A subdirectory that does not exist yet: make_engine creates it, as for a fresh state dir.
    engine = make_engine(f"sqlite:///{tmp_path / 'state' / 'gateway.sqlite'}")
    yield JobStore(engine)
    engine.dispose()


@pytest.mark.parametrize("check", contract_params())
def test_store_contract(store: JobStore, check: Callable[[JobStore], None]) -> None:
    check(store)


def test_sqlite_runs_in_wal_mode(store: JobStore) -> None:
    # The API threads and the poller share the file: readers must not block the writer.
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
