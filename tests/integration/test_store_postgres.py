"""The job store on the stack's real PostgreSQL (`stack up --with-postgres`).

The behaviour checks are the same functions the SQLite unit tests run (tests/store_contract.py);
on top of them, what only a shared server shows: two gateway replicas (two JobStores, two engines)
racing on one Idempotency-Key, and two pollers on one lease.

Every test gets a schema of its own (search_path in the URL), dropped afterwards, so reruns never
see stale tables and concurrent runs by other people never see each other's rows.
"""
from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.config import build_config
from gateway.jobs.poller import LEASE_NAME, Poller
from gateway.sbatch.render import ScriptRenderer
from gateway.jobs.service import JobService
from gateway.database import DuplicateIdempotencyKey, JobStore, leases_table, make_engine
from tests.conftest import valid_request
from tests.fakes import FakeScheduler
from tests.store_contract import contract_params, make_record
from tests.unit.test_limits_concurrency import (
    check_counts_seen_under_the_lock,
    check_locked_section_is_serialised,
    limited_service,
    parallel_replays_never_count,
    parallel_submissions_keep_max_active,
    parallel_submissions_keep_per_minute,
)

pytestmark = pytest.mark.integration

SCHEMA_PREFIX = "store_test_"
STALE_SCHEMA_S = 3600  # a schema left by a run killed mid-test is swept after an hour


@pytest.fixture(scope="session")
def postgres_url() -> str:
    from gateway.stack import stack_status, stack_up

    # A stack whose PostgreSQL is up is used as it is: `up` would also (re)start any other daemon
    # that is down at this moment, perhaps on purpose (a fault-injection run beside this one).
    status = stack_status()
    if status["daemons"].get("postgres", {}).get("state") != "up":
        status = stack_up(with_postgres=True)
    assert status["daemons"]["postgres"]["state"] == "up", status["daemons"]
    url = status["postgres"]["url"]
    assert url and url.startswith("postgresql+psycopg://gateway:")
    return str(url)


@pytest.fixture(scope="session")
def admin_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url, pool_pre_ping=True)  # survives the SIGKILL test
    with engine.begin() as conn:
        names = conn.execute(
            sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :prefix"), {"prefix": SCHEMA_PREFIX + "%"}
        ).scalars()
        for name in list(names):
            try:
                stamp = int(name.removeprefix(SCHEMA_PREFIX).split("_")[0])
            except ValueError:
                continue
            if stamp < time.time() - STALE_SCHEMA_S:
                conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    yield engine
    engine.dispose()


@pytest.fixture
def schema_url(postgres_url: str, admin_engine: sa.Engine) -> Iterator[str]:
    """A URL whose connections work in a new, empty schema of their own."""
    schema = f"{SCHEMA_PREFIX}{int(time.time())}_{secrets.token_hex(4)}"
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with admin_engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def replicas(schema_url: str) -> Iterator[tuple[JobStore, JobStore]]:
    """Two JobStores with their own engines (connection pools) on one database: two replicas."""
    stores = (JobStore(make_engine(schema_url)), JobStore(make_engine(schema_url)))
    yield stores
    for store in stores:
        store.engine.dispose()


@pytest.mark.parametrize("check", contract_params())
def test_store_contract(replicas: tuple[JobStore, JobStore], check: Callable[[JobStore], None]) -> None:
    store = replicas[0]
    with store.engine.connect() as conn:
        assert conn.dialect.name == "postgresql"
        assert conn.exec_driver_sql("SELECT current_schema()").scalar().startswith(SCHEMA_PREFIX)
    check(store)


def test_one_idempotency_key_from_two_replicas_makes_one_row(replicas: tuple[JobStore, JobStore]) -> None:
    barrier = threading.Barrier(8)
    stored: list[str] = []
    duplicates: list[str] = []
    errors: list[BaseException] = []

    def insert(n: int) -> None:
        store = replicas[n % 2]
        record = make_record(f"job_race_{n}", idempotency_key="portal-race")
        barrier.wait()
        try:
            store.insert(record)
            stored.append(record.job_id)
        except DuplicateIdempotencyKey:
            duplicates.append(record.job_id)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(stored) == 1 and len(duplicates) == 7
    for store in replicas:
        rows, total = store.list()
        assert total == 1 and [r.job_id for r in rows] == stored
        found = store.find_by_idempotency_key("alice", "portal-race")
        assert found is not None and found.job_id == stored[0]


def test_parallel_submissions_on_two_replicas_keep_max_active(replicas: tuple[JobStore, JobStore], tmp_path: Path) -> None:
    # 16 at once, spread over two replicas (two engines): pg_advisory_xact_lock per user decides.
    scheduler = FakeScheduler()
    services = [limited_service(store, scheduler, tmp_path / f"r{n}", LIMITS_MAX_ACTIVE_JOBS=2) for n, store in enumerate(replicas)]
    parallel_submissions_keep_max_active(services, scheduler)


def test_parallel_submissions_keep_per_minute(replicas: tuple[JobStore, JobStore], tmp_path: Path) -> None:
    service = limited_service(replicas[0], FakeScheduler(), tmp_path, LIMITS_MAX_ACTIVE_JOBS=0, LIMITS_SUBMISSIONS_PER_MINUTE=3)
    parallel_submissions_keep_per_minute(service)


def test_parallel_replays_never_count(replicas: tuple[JobStore, JobStore], tmp_path: Path) -> None:
    parallel_replays_never_count(limited_service(replicas[0], FakeScheduler(), tmp_path, LIMITS_MAX_ACTIVE_JOBS=1))


def test_locked_section_is_serialised_across_replicas(replicas: tuple[JobStore, JobStore]) -> None:
    check_locked_section_is_serialised(*replicas)


def test_counts_seen_under_the_lock(replicas: tuple[JobStore, JobStore]) -> None:
    check_counts_seen_under_the_lock(replicas[0])


def _service(store: JobStore, scheduler: FakeScheduler, tmp_path: Path) -> JobService:
    config = build_config(
        {
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "S3_ALLOWED_BUCKETS": ["relion-local"],
            "POLLER_LEASE_SECONDS": 30.0,
        },
        environ={},  # not the developer's GATEWAY_* settings
    )
    return JobService(config=config, store=store, scheduler=scheduler, renderer=ScriptRenderer(None))


def test_one_of_two_pollers_polls_each_cycle(replicas: tuple[JobStore, JobStore], tmp_path: Path) -> None:
    scheduler = FakeScheduler()  # one Slurm cluster behind both replicas
    services = [_service(store, scheduler, tmp_path / f"replica{n}") for n, store in enumerate(replicas)]
    job = services[0].submit(valid_request())
    assert services[1].get(job.job_id).main_slurm_id == job.main_slurm_id  # one database
    scheduler.set_state(job.main_slurm_id or "", "RUNNING")
    pollers = [Poller(service, service.config, holder=f"replica{n}") for n, service in enumerate(services)]
    scheduler.status_calls.clear()

    def cycle_both() -> None:
        barrier = threading.Barrier(2)

        def run(poller: Poller) -> None:
            barrier.wait()
            poller.cycle()

        threads = [threading.Thread(target=run, args=(p,)) for p in pollers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    for n in range(1, 11):
        cycle_both()
        assert len(scheduler.status_calls) == n  # one batched status query per cycle, not two
        assert sorted(p.stats.cycles for p in pollers) == [0, n]  # always the same replica
    leader, other = sorted(pollers, key=lambda p: -p.stats.cycles)
    assert services[1].get(job.job_id).state == "staging"  # the leader's poll reached both replicas (RUNNING, no phase stamped yet)

    leader.stop()  # a replica shutting down hands the lease over (and cycles no more)
    other.cycle()
    assert len(scheduler.status_calls) == 11 and other.stats.cycles == 1
    with replicas[0].engine.connect() as conn:
        holder = conn.execute(sa.select(leases_table.c.holder).where(leases_table.c.name == LEASE_NAME)).scalar()
    assert holder == other.holder

    # A replica that dies without releasing: once its lease runs out, a restarted one takes over.
    assert replicas[1].acquire_lease(LEASE_NAME, other.holder, 0.2)  # its last renewal, then it dies
    restarted = Poller(services[0], services[0].config, holder="replica0-restarted")
    restarted.cycle()
    assert restarted.stats.cycles == 0  # the lease is still live
    time.sleep(0.3)
    restarted.cycle()
    assert restarted.stats.cycles == 1 and len(scheduler.status_calls) == 12


def test_stack_status_names_the_database(postgres_url: str) -> None:
    from gateway.stack import stack_status

    status = stack_status()
    assert status["postgres"]["enabled"] and status["postgres"]["url"] == postgres_url
    assert status["daemons"]["postgres"]["state"] == "up"
    assert status["postgres"]["port"] == 5433 and status["postgres"]["database"] == "relion_gateway"



def test_up_recovers_postgres_killed_with_sigkill(replicas: tuple[JobStore, JobStore]) -> None:
    """kill -9 leaves our pid file, postmaster.pid and the socket lock naming a (zombie) pid, and
    a backend serving an open transaction; the next `up` clears them and the gateway reconnects."""
    from gateway.stack import stack_dir, stack_up
    from gateway.stack.daemons import is_alive, read_pid_file

    store = replicas[0]
    store.insert(make_record("job_before"))
    pid = read_pid_file(stack_dir() / "run" / "postgres.pid")
    assert pid is not None and is_alive(pid, names=("postgres",))
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")  # a backend in an open transaction
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (stack_dir() / "postgres" / "postmaster.pid").exists()
        conn.invalidate()  # its server is gone: nothing to roll back
    status = stack_up(with_postgres=True)
    assert status["actions"]["postgres"] == "started" and status["daemons"]["postgres"]["pid"] != pid
    # pool_pre_ping replaces the pooled connections that died with the old server.
    assert store.get("job_before").job_id == "job_before"
    store.insert(make_record("job_after"))
    assert replicas[1].list()[1] == 2
