"""What every JobStore backend must do: one check per function, each taking a fresh, empty store.

tests/unit/test_store.py runs them on SQLite and tests/integration/test_store_postgres.py on the
stack's PostgreSQL, so the two databases are held to exactly the same behaviour.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.database import (
    DuplicateIdempotencyKey,
    JobNotFound,
    JobRecord,
    JobStore,
    jobs_table,
    leases_table,
    make_engine,
)
from gateway.database.events import Delivery, EventStore, Webhook, WebhookStore

NOW = 1_700_000_000.0


def make_record(job_id: str, **changes: Any) -> JobRecord:
    values: dict[str, Any] = {
        "job_id": job_id,
        "user_id": "alice",
        "workspace_id": "ws1",
        "mode": "2d",
        "state": "queued",
        "request_json": json.dumps({"mode": "2d", "num_mpi": 3}),
        "job_json": json.dumps({"job_id": job_id, "log_dir": "/nonexistent"}),
        "output_url": f"s3://relion-local/results/{job_id}/",
        "accepted_at": NOW,
        "updated_at": NOW,
    }
    values.update(changes)
    return JobRecord(**values)


def check_insert_get_update(store: JobStore) -> None:
    record = make_record("job_a", idempotency_key="k1", request_sha256="f" * 64, main_script="#!/bin/bash\n")
    store.insert(record)
    assert store.get("job_a") == record
    before = time.time()
    store.update("job_a", state="running", main_slurm_id="41", exit_code=0, started_at=NOW + 5, message="ok ü")
    got = store.get("job_a")
    assert (got.state, got.main_slurm_id, got.exit_code, got.started_at, got.message) == ("running", "41", 0, NOW + 5, "ok ü")
    assert got.updated_at >= before  # set by update() unless given
    assert got.request == {"mode": "2d", "num_mpi": 3} and got.job["job_id"] == "job_a"
    store.update("job_a", metadata_json=json.dumps({"iterations": 2}), updated_at=NOW + 9)
    got = store.get("job_a")
    assert got.metadata == {"iterations": 2} and got.updated_at == NOW + 9 and got.progress is None
    # Floats keep their sub-second part (timestamps are compared against time.time()).
    store.update("job_a", checked_at=NOW + 0.125)
    assert store.get("job_a").checked_at == NOW + 0.125


def check_unknown_job(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get("job_missing")
    with pytest.raises(JobNotFound):
        store.update("job_missing", state="failed")
    with pytest.raises(KeyError):  # JobNotFound is a KeyError for callers that expect one
        store.get("job_missing")
    store.insert(make_record("job_a"))
    with pytest.raises(sa.exc.IntegrityError):  # a job id is never stored twice
        store.insert(make_record("job_a"))


def check_list_filters_paging_total(store: JobStore) -> None:
    specs = [
        # job_id, user, mode, state, accepted_at offset
        ("job_1", "alice", "2d", "queued", 1),
        ("job_2", "alice", "3d", "running", 2),
        ("job_3", "bob", "2d", "succeeded", 3),
        ("job_4", "alice", "2d", "running", 4),
        ("job_5", "bob", "autorefine", "queued", 5),
        ("job_6", "alice", "2d", "failed", 6),
        ("job_7b", "alice", "3d", "queued", 7),
        ("job_7a", "alice", "2d", "queued", 7),  # same time: ties go by job id
    ]
    for job_id, user, mode, state, offset in specs:
        store.insert(make_record(job_id, user_id=user, mode=mode, state=state, accepted_at=NOW + offset))

    def ids(**kwargs: Any) -> tuple[list[str], int]:
        rows, total = store.list(**kwargs)
        return [r.job_id for r in rows], total

    assert ids() == (["job_7a", "job_7b", "job_6", "job_5", "job_4", "job_3", "job_2", "job_1"], 8)
    assert ids(user_id="bob") == (["job_5", "job_3"], 2)
    assert ids(mode="2d") == (["job_7a", "job_6", "job_4", "job_3", "job_1"], 5)
    assert ids(states=["running", "queued"]) == (["job_7a", "job_7b", "job_5", "job_4", "job_2", "job_1"], 6)
    assert ids(states=[]) == ids()
    assert ids(user_id="alice", states=["queued"], mode="2d") == (["job_7a", "job_1"], 2)
    # Paging: the total counts every match, the page holds limit rows from offset.
    assert ids(limit=3) == (["job_7a", "job_7b", "job_6"], 8)
    assert ids(limit=3, offset=3) == (["job_5", "job_4", "job_3"], 8)
    assert ids(limit=3, offset=6) == (["job_2", "job_1"], 8)
    assert ids(limit=3, offset=9) == ([], 8)
    assert ids(user_id="alice", limit=2, offset=2) == (["job_6", "job_4"], 6)
    assert ids(user_id="carol") == ([], 0)
    assert sorted(r.job_id for r in store.live({"succeeded", "failed"})) == ["job_1", "job_2", "job_4", "job_5", "job_7a", "job_7b"]


def check_idempotency_key(store: JobStore) -> None:
    store.insert(make_record("job_a", idempotency_key="portal-42"))
    with pytest.raises(DuplicateIdempotencyKey):
        store.insert(make_record("job_b", idempotency_key="portal-42"))
    # The same key from another user is another job.
    store.insert(make_record("job_c", user_id="bob", idempotency_key="portal-42"))
    # Jobs without a key never collide.
    store.insert(make_record("job_d"))
    store.insert(make_record("job_e"))
    found = store.find_by_idempotency_key("alice", "portal-42")
    assert found is not None and found.job_id == "job_a"
    found = store.find_by_idempotency_key("bob", "portal-42")
    assert found is not None and found.job_id == "job_c"
    assert store.find_by_idempotency_key("carol", "portal-42") is None
    assert store.find_by_idempotency_key("alice", "other") is None
    assert store.list()[1] == 4
    with pytest.raises(JobNotFound):
        store.get("job_b")


def check_claim_submission(store: JobStore) -> None:
    store.insert(make_record("job_a"))
    store.insert(make_record("job_b"))
    assert store.claim_submission("job_a", 0.3)
    assert not store.claim_submission("job_a", 10)  # held by the first claim
    assert store.claim_submission("job_b", 10)  # claims are per job
    assert not store.claim_submission("job_missing", 10)
    time.sleep(0.4)
    assert store.claim_submission("job_a", 10)  # the first claim expired
    assert not store.claim_submission("job_a", 10)
    store.update("job_a", submit_claim_until=None)  # a finished submission gives it back
    assert store.claim_submission("job_a", 10)


def check_leases(store: JobStore) -> None:
    assert store.acquire_lease("poller", "a", 0.3)
    assert not store.acquire_lease("poller", "b", 10)
    assert store.acquire_lease("poller", "a", 0.3)  # renewed by its holder
    assert store.acquire_lease("other", "b", 10)  # leases are per name
    time.sleep(0.4)
    assert store.acquire_lease("poller", "b", 10)  # expired: taken over
    assert not store.acquire_lease("poller", "a", 10)
    store.release_lease("poller", "a")  # not the holder: nothing happens
    assert not store.acquire_lease("poller", "a", 10)
    store.release_lease("poller", "b")
    assert store.acquire_lease("poller", "a", 10)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(leases_table.c.name, leases_table.c.holder).order_by(leases_table.c.name)).all()
    assert [tuple(r) for r in rows] == [("other", "b"), ("poller", "a")]


# The jobs table as an early gateway wrote it: no idempotency, scripts, progress or claims.
OLD_JOBS_DDL = """
CREATE TABLE jobs (
    job_id VARCHAR(128) NOT NULL PRIMARY KEY,
    user_id VARCHAR(64) NOT NULL,
    workspace_id VARCHAR(64) NOT NULL,
    mode VARCHAR(16) NOT NULL,
    state VARCHAR(32) NOT NULL,
    slurm_state VARCHAR(128) NOT NULL,
    main_slurm_id VARCHAR(32),
    archive_slurm_id VARCHAR(32),
    exit_code INTEGER,
    message TEXT NOT NULL,
    request_json TEXT NOT NULL,
    job_json TEXT NOT NULL,
    output_url TEXT NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
)
"""


def check_add_missing_columns(store: JobStore) -> None:
    engine = store.engine
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE leases"))
        conn.execute(sa.text("DROP TABLE jobs"))
        conn.execute(sa.text(OLD_JOBS_DDL))
        conn.execute(
            sa.text(
                "INSERT INTO jobs (job_id, user_id, workspace_id, mode, state, slurm_state, main_slurm_id, archive_slurm_id,"
                " exit_code, message, request_json, job_json, output_url, accepted_at, updated_at) VALUES"
                " ('job_old', 'alice', 'ws1', '2d', 'succeeded', 'COMPLETED', '7', '8', 0, 'done', '{}', '{}',"
                " 's3://relion-local/results/job_old/', :t, :t)"
            ),
            {"t": NOW},
        )
    migrated = JobStore(engine)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    assert columns == {c.name for c in jobs_table.columns}
    old = migrated.get("job_old")
    assert (old.state, old.slurm_state, old.main_slurm_id, old.exit_code, old.message) == ("succeeded", "COMPLETED", "7", 0, "done")
    # Added NOT NULL text columns read as "", nullable ones as None.
    assert (old.request_sha256, old.main_script, old.archive_script) == ("", "", "")
    assert (old.idempotency_key, old.metadata_json, old.submit_claim_until, old.checked_at) == (None, None, None, None)
    # The migrated table does everything a new one does, idempotency included.
    migrated.update("job_old", metadata_json="{}", checked_at=NOW + 1)
    migrated.insert(make_record("job_new", idempotency_key="k"))
    with pytest.raises(DuplicateIdempotencyKey):
        migrated.insert(make_record("job_twin", idempotency_key="k"))
    assert [r.job_id for r in migrated.list()[0]] == ["job_new", "job_old"]
    assert migrated.acquire_lease("poller", "a", 10)
    # Running the migration again (another worker starting) changes nothing.
    again = JobStore(engine)
    assert again.get("job_old").checked_at == NOW + 1 and again.list()[1] == 2


def check_concurrent_schema_setup(store: JobStore) -> None:
    """Gunicorn workers and replicas start together on a fresh database: every one must come up."""
    url = store.engine.url.render_as_string(hide_password=False)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE leases"))
        conn.execute(sa.text("DROP TABLE jobs"))
    errors: list[BaseException] = []
    stores: list[JobStore] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        engine = make_engine(url)
        barrier.wait()
        try:
            stores.append(JobStore(engine))
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        stores[0].insert(make_record("job_a"))
        assert all(s.list()[1] == 1 for s in stores)
    finally:
        for s in stores:
            s.engine.dispose()


def check_job_events(store: JobStore) -> None:
    """Every committed change of state or progress is an event, recorded with the change; nothing else is."""
    events = EventStore(store.engine)
    store.insert(make_record("job_a"))
    store.update("job_a", message="noise only")
    store.update("job_a", state="queued", message="same state")
    store.update("job_a", state="running", message="started")
    progress = json.dumps({"iteration": 1})
    store.update("job_a", progress_json=progress)
    store.update("job_a", progress_json=progress)  # unchanged: no event
    assert not store.update_if("job_a", expect_state="queued", expect_job_json="{}", state="cancelled")
    assert store.update_if("job_a", expect_state="running", expect_job_json=store.get("job_a").job_json, state="timeout")
    got = [(e.type, e.state, e.previous_state, e.message) for e in events.for_job("job_a")]
    assert got == [
        ("job.state_changed", "queued", None, ""),
        ("job.state_changed", "running", "queued", "started"),
        ("job.progress", "running", None, "started"),
        ("job.state_changed", "timeout", "running", "started"),
    ]
    assert events.for_job("job_a", types=("job.progress",))[0].progress == {"iteration": 1}
    seqs = [e.seq for e in events.for_job("job_a")]
    assert seqs == sorted(seqs) and events.latest_seq("job_a") == seqs[-1] == events.max_seq()
    assert events.latest_seq("job_a", types=("job.progress",)) == seqs[2]
    assert events.for_job("job_a", after=seqs[1]) == events.for_job("job_a")[2:]
    assert ("job_a", "job.state_changed", seqs[-1]) in events.recent(0)


def check_concurrent_state_changes(store: JobStore) -> None:
    """Writers racing on one job: the events chain, each previous state the state before it."""
    store.insert(make_record("job_a"))
    barrier = threading.Barrier(4)

    def writer(name: str) -> None:
        barrier.wait()
        for i in range(10):
            store.update("job_a", state=f"{name}{i % 2}")

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b", "c", "d")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    chain = EventStore(store.engine).for_job("job_a")
    assert all(later.previous_state == earlier.state for earlier, later in zip(chain, chain[1:]))
    assert chain[-1].state == store.get("job_a").state


def check_webhook_outbox(store: JobStore) -> None:
    """Subscriptions match their user's events from their creation on; fan-out is done once; one due
    delivery per subscription at a time; deleting one cancels what it still had to send."""
    events, hooks = EventStore(store.engine), WebhookStore(store.engine)
    store.insert(make_record("job_old"))
    made = events.max_seq()
    for hook_id, job in (("wh_all", None), ("wh_job", "job_a"), ("wh_other", None)):
        hooks.insert(Webhook(id=hook_id, user_id="bob" if hook_id == "wh_other" else "alice", job_id=job,
                             url="https://portal.example/hook", event_types=json.dumps(["job.state_changed"]),
                             from_seq=made, created_at=NOW))
    store.insert(make_record("job_a"))
    store.update("job_a", state="running")
    store.insert(make_record("job_b"))
    pending = events.not_fanned_out()
    assert [e.job_id for e in pending] == ["job_old", "job_a", "job_a", "job_b"]
    assert [h.id for h in hooks.matching(pending[0])] == []  # made before the subscriptions
    assert sorted(h.id for h in hooks.matching(pending[1])) == ["wh_all", "wh_job"]
    assert [h.id for h in hooks.matching(pending[3])] == ["wh_all"]
    def deliveries(event: Any) -> Callable[[list[Webhook]], list[Delivery]]:
        return lambda matched: [
            Delivery(id=f"msg_{event.seq}_{h.id}", webhook_id=h.id, event_seq=event.seq, job_id=event.job_id, user_id=event.user_id,
                     type=event.type, body="{}", status="pending", attempts=0, next_attempt_at=NOW, created_at=NOW)
            for h in matched
        ]

    for event in pending:
        events.fan_out(event, deliveries(event))
        events.fan_out(event, deliveries(event))  # a second dispatcher: a no-op, not a duplicate key
    assert events.not_fanned_out() == []
    due = hooks.due(NOW, 10)
    assert sorted((d.webhook_id, d.event_seq) for d in due) == [("wh_all", pending[1].seq), ("wh_job", pending[1].seq)]
    hooks.attempted(due[0].id, status="delivered", attempts=1, delivered_at=NOW)
    log, total = hooks.deliveries("wh_all")
    assert total == 3 and [d.event_seq for d in log] == sorted((e.seq for e in pending[1:]), reverse=True)
    late = Webhook(id="wh_late", user_id="alice", job_id="job_a", url="https://portal.example/late",
                   event_types=json.dumps(["job.state_changed"]), from_seq=0, created_at=NOW)
    assert hooks.insert(late, backfill=lambda done: deliveries(done[0])([late]) + deliveries(done[1])([late]))
    assert not hooks.insert(late)  # the same id again: already there
    assert sorted(d.event_seq for d in hooks.deliveries("wh_late")[0]) == [pending[1].seq, pending[2].seq]
    assert hooks.delete("wh_job", NOW) and not hooks.delete("wh_job", NOW)
    assert {d.status for d in hooks.deliveries("wh_job")[0]} <= {"cancelled", "delivered"}
    assert [h.id for h in hooks.list(user_id="alice")] == ["wh_all", "wh_late"] and hooks.count_live("alice") == 2


CHECKS: list[Callable[[JobStore], None]] = [
    check_insert_get_update,
    check_unknown_job,
    check_list_filters_paging_total,
    check_idempotency_key,
    check_claim_submission,
    check_leases,
    check_add_missing_columns,
    check_concurrent_schema_setup,
    check_job_events,
    check_concurrent_state_changes,
    check_webhook_outbox,
]


def contract_params() -> list[Any]:
    """pytest params for CHECKS, named after the check (`-k idempotency` picks one)."""
    return [pytest.param(check, id=check.__name__.removeprefix("check_")) for check in CHECKS]
