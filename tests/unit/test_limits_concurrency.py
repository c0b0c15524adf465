"""Per-user limits hold under concurrency: counting and inserting are one step per user.

The ``parallel_*`` and ``check_*`` functions take a store (or a service on one) and are run here on
SQLite and in tests/integration/test_store_postgres.py on the stack's PostgreSQL.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from gateway.config import build_config
from gateway.jobs.limits import LimitExceeded
from gateway.sbatch.render import ScriptRenderer
from gateway.jobs.service import JobService
from gateway.database import DuplicateIdempotencyKey, JobStore, make_engine, user_lock_key
from gateway.jobs.states import TERMINAL_VALUES
from tests.conftest import valid_request
from tests.fakes import FakeScheduler
from tests.store_contract import make_record

PARALLEL = 16
TERMINAL = TERMINAL_VALUES


def limited_service(store: JobStore, scheduler: FakeScheduler, tmp_path: Path, **limits: Any) -> JobService:
    config = build_config(
        {"PATHS_STATE_DIR": str(tmp_path / "state"), "S3_ALLOWED_BUCKETS": ["relion-local"], **limits},
        environ={},  # not the developer's GATEWAY_* settings
    )
    return JobService(config=config, store=store, scheduler=scheduler, renderer=ScriptRenderer(None))


def in_parallel(n: int, work: Callable[[int], Any]) -> tuple[list[Any], list[LimitExceeded], list[BaseException]]:
    """Run ``work(0..n-1)`` on n threads released together; sort results, 429s and anything else."""
    barrier = threading.Barrier(n)
    lock = threading.Lock()
    done: list[Any] = []
    limited: list[LimitExceeded] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            result = work(i)
        except LimitExceeded as exc:
            with lock:
                limited.append(exc)
        except BaseException as exc:  # noqa: B036 - reported by the caller
            with lock:
                errors.append(exc)
        else:
            with lock:
                done.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done, limited, errors


def parallel_submissions_keep_max_active(services: list[JobService], scheduler: FakeScheduler) -> None:
    """16 simultaneous submissions of one user against max_active_jobs = 2, spread over the
    services (replicas sharing one database): exactly 2 stored."""
    service = services[0]
    assert all(int(s.config["LIMITS_MAX_ACTIVE_JOBS"]) == 2 for s in services)
    done, limited, errors = in_parallel(
        PARALLEL, lambda i: services[i % len(services)].submit(valid_request(workspace_id=f"par{i}"), enforce_limits=True)
    )
    assert not errors, errors
    assert len(done) == 2 and len(limited) == PARALLEL - 2
    assert {exc.limit for exc in limited} == {"max_active_jobs"}
    assert service.store.count_active("alice", TERMINAL) == 2
    assert service.store.list(user_id="alice")[1] == 2
    assert len(scheduler.submitted) == 4  # two mains and their hooks: nothing refused reached Slurm


def parallel_submissions_keep_per_minute(service: JobService) -> None:
    assert int(service.config["LIMITS_SUBMISSIONS_PER_MINUTE"]) == 3
    done, limited, errors = in_parallel(
        PARALLEL, lambda i: service.submit(valid_request(workspace_id=f"pm{i}"), enforce_limits=True)
    )
    assert not errors, errors
    assert len(done) == 3 and {exc.limit for exc in limited} == {"submissions_per_minute"} and len(limited) == PARALLEL - 3
    assert all(1 <= exc.retry_after <= 60 for exc in limited)


def parallel_replays_never_count(service: JobService) -> None:
    """One Idempotency-Key sent 16 times at once, limit 1 and room for one: one job, no 429."""
    assert int(service.config["LIMITS_MAX_ACTIVE_JOBS"]) == 1
    done, limited, errors = in_parallel(
        PARALLEL, lambda i: service.submit(valid_request(), idempotency_key="burst-key", enforce_limits=True)
    )
    assert not errors and not limited, (errors, limited)
    assert len({record.job_id for record in done}) == 1 and service.store.list(user_id="alice")[1] == 1
    # At the limit, a replay is still answered with its job, never a 429.
    assert service.submit(valid_request(), idempotency_key="burst-key", enforce_limits=True).job_id == done[0].job_id
    with pytest.raises(LimitExceeded):
        service.submit(valid_request(workspace_id="other"), enforce_limits=True)


def check_locked_section_is_serialised(store: JobStore, other: JobStore | None = None) -> None:
    """The check runs under the lock: never two at once for one user, across engines too."""
    stores = [store, other or store]
    inside = 0
    most = 0
    lock = threading.Lock()

    def slow_check(active: int, recent: list[float]) -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.02)  # long enough for every other thread to reach the lock meanwhile
        with lock:
            inside -= 1

    def insert(i: int) -> None:
        stores[i % 2].insert_within_limits(make_record(f"job_ser_{i}"), slow_check, terminal=TERMINAL, since=0.0)

    done, limited, errors = in_parallel(8, insert)
    assert not errors, errors
    assert len(done) == 8 and most == 1
    assert store.list(user_id="alice")[1] == 8


def check_counts_seen_under_the_lock(store: JobStore) -> None:
    seen: list[tuple[int, int]] = []

    def record_counts(active: int, recent: list[float]) -> None:
        seen.append((active, len(recent)))
        if active >= 3:
            raise LimitExceeded("max_active_jobs", "full", 30)

    store.insert(make_record("job_old", accepted_at=1000.0, state="succeeded"))  # ended, long ago
    for i in range(5):
        try:
            store.insert_within_limits(make_record(f"job_c{i}", accepted_at=2000.0 + i), record_counts, terminal=TERMINAL, since=1500.0)
        except LimitExceeded:
            pass
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3), (3, 3)]
    assert store.list(user_id="alice")[1] == 4  # three within the limit and the ended one
    # A refused insert leaves nothing behind and the lock free: another user is not blocked.
    store.insert_within_limits(make_record("job_bob", user_id="bob"), record_counts, terminal=TERMINAL, since=0.0)
    # A stored key is a duplicate before any counting.
    store.insert(make_record("job_keyed", user_id="carol", idempotency_key="k"))
    with pytest.raises(DuplicateIdempotencyKey):
        store.insert_within_limits(
            make_record("job_keyed2", user_id="carol", idempotency_key="k"),
            lambda a, r: pytest.fail("a replay must not be counted"),
            terminal=TERMINAL,
            since=0.0,
        )


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[JobStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'state' / 'gateway.sqlite'}")
    yield JobStore(engine)
    engine.dispose()


def test_user_lock_key_is_stable_and_64_bit() -> None:
    assert user_lock_key("alice") == user_lock_key("alice") != user_lock_key("bob")
    assert -(2**63) <= user_lock_key("alice") < 2**63
    assert user_lock_key("alice") == 1337487248194820304  # the same in every process and release


def test_sqlite_parallel_submissions_keep_max_active(sqlite_store: JobStore, tmp_path: Path) -> None:
    scheduler = FakeScheduler()
    parallel_submissions_keep_max_active([limited_service(sqlite_store, scheduler, tmp_path, LIMITS_MAX_ACTIVE_JOBS=2)], scheduler)


def test_sqlite_parallel_submissions_keep_per_minute(sqlite_store: JobStore, tmp_path: Path) -> None:
    service = limited_service(sqlite_store, FakeScheduler(), tmp_path, LIMITS_MAX_ACTIVE_JOBS=0, LIMITS_SUBMISSIONS_PER_MINUTE=3)
    parallel_submissions_keep_per_minute(service)


def test_sqlite_parallel_replays_never_count(sqlite_store: JobStore, tmp_path: Path) -> None:
    parallel_replays_never_count(limited_service(sqlite_store, FakeScheduler(), tmp_path, LIMITS_MAX_ACTIVE_JOBS=1))


def test_sqlite_locked_section_is_serialised_across_engines(sqlite_store: JobStore, tmp_path: Path) -> None:
    # A second engine on the same file stands for a second gunicorn worker.
    other = JobStore(make_engine(f"sqlite:///{tmp_path / 'state' / 'gateway.sqlite'}"))
    try:
        check_locked_section_is_serialised(sqlite_store, other)
    finally:
        other.engine.dispose()


def test_sqlite_counts_seen_under_the_lock(sqlite_store: JobStore) -> None:
    check_counts_seen_under_the_lock(sqlite_store)


def test_sqlite_connection_leaves_the_pool_as_it_came(sqlite_store: JobStore) -> None:
    # AUTOCOMMIT is set for the locked insert only: the next borrower gets pysqlite's usual mode.
    sqlite_store.insert_within_limits(make_record("job_pool"), lambda a, r: None, terminal=TERMINAL, since=0.0)
    with sqlite_store.engine.connect() as conn:
        assert conn.get_isolation_level() != "AUTOCOMMIT"
        assert not conn.connection.dbapi_connection.in_transaction  # type: ignore[union-attr]
    sqlite_store.update("job_pool", state="running")
    assert sqlite_store.get("job_pool").state == "running"


def test_api_16_parallel_submissions_limit_2_leave_2_and_fourteen_429s(app: Flask, scheduler: FakeScheduler) -> None:
    app.extensions["relion_gateway"].config["LIMITS_MAX_ACTIVE_JOBS"] = 2

    def post(i: int) -> Any:
        return app.test_client().post("/v1/relion/jobs", json=valid_request(workspace_id=f"api{i}"))

    responses, limited, errors = in_parallel(PARALLEL, post)
    assert not errors and not limited, errors
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * 2 + [429] * (PARALLEL - 2)
    refused = [r for r in responses if r.status_code == 429]
    assert all("max_active_jobs" in r.json["message"] and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all(r.json["errors"] == {"limits": {"max_active_jobs": [r.json["message"]]}} for r in refused)
    store = app.extensions["relion_gateway"].store
    assert store.count_active("alice", TERMINAL) == 2 and len(scheduler.submitted) == 4
