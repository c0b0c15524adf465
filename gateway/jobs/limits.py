"""Per-user quotas checked at submit: active jobs and submissions per minute.

Both are counted in the job store (active records; ``accepted_at`` of the last minute), so every
gateway worker and replica sharing the store enforces the same numbers with no shared memory.
``insert_within_limits`` counts and inserts in one transaction under a per-user lock (the store's
``insert_within_limits``): simultaneous submissions from one user never overshoot a limit, and a
replay of a stored Idempotency-Key is found under the same lock, so it never counts.
"""
from __future__ import annotations

import math
import time
from typing import Any

from gateway.errors import LimitExceeded  # noqa: F401  (raised here; defined with the other domain errors)
from gateway.jobs.states import TERMINAL_VALUES
from gateway.database import JobRecord, JobStore

WINDOW_S = 60.0
# When a user at the active-jobs limit may try again: jobs end on the poller's schedule, so a
# client polling faster than this learns nothing new.
ACTIVE_RETRY_AFTER_S = 30


def judge_submission(config: dict[str, Any], user_id: str, active: int, recent: list[float], now: float) -> None:
    """The rule itself: raise LimitExceeded if a user with ``active`` jobs not ended, and jobs accepted
    at the times ``recent`` (oldest first, the last WINDOW_S seconds), may not submit another."""
    max_active = int(config["LIMITS_MAX_ACTIVE_JOBS"])
    if max_active > 0 and active >= max_active:
        raise LimitExceeded(
            "max_active_jobs",
            f"user {user_id} has {active} jobs that have not ended; the limit ([limits] max_active_jobs) is {max_active}",
            ACTIVE_RETRY_AFTER_S,
        )
    per_minute = int(config["LIMITS_SUBMISSIONS_PER_MINUTE"])
    if per_minute > 0 and len(recent) >= per_minute:
        # The window frees a slot when the oldest submission that still counts turns a minute old.
        frees_at = recent[len(recent) - per_minute] + WINDOW_S
        raise LimitExceeded(
            "submissions_per_minute",
            f"user {user_id} submitted {len(recent)} jobs in the last minute; "
            f"the limit ([limits] submissions_per_minute) is {per_minute}",
            math.ceil(frees_at - now),
        )


def _limited(config: dict[str, Any]) -> bool:
    return int(config["LIMITS_MAX_ACTIVE_JOBS"]) > 0 or int(config["LIMITS_SUBMISSIONS_PER_MINUTE"]) > 0


def insert_within_limits(store: JobStore, config: dict[str, Any], record: JobRecord) -> None:
    """Store ``record`` if its user is within the limits, atomically (LimitExceeded otherwise).

    A record whose Idempotency-Key is already stored raises DuplicateIdempotencyKey, uncounted.
    """
    if not _limited(config):
        store.insert(record)
        return

    def check(active: int, recent: list[float]) -> None:
        # The clock is read under the lock: a submission stored while this one waited for the lock
        # was accepted before now, so Retry-After never exceeds the window.
        now = time.time()
        judge_submission(config, record.user_id, active, [t for t in recent if t >= now - WINDOW_S], now)

    store.insert_within_limits(record, check, terminal=TERMINAL_VALUES, since=time.time() - WINDOW_S)
