"""Per-user quotas checked at submit: active jobs and submissions per minute.

Both are counted in the job store (active records; ``accepted_at`` of the last minute), so every
gateway worker and replica sharing the store enforces the same numbers with no shared memory.
The check and the insert are not one transaction: a burst of simultaneous submissions from one
user may overshoot a limit by the number of requests in flight, never more.
"""
from __future__ import annotations

import math
import time
from typing import Any

from gateway.slurm.states import TERMINAL_STATES
from gateway.store import JobStore

WINDOW_S = 60.0
# When a user at the active-jobs limit may try again: jobs end on the poller's schedule, so a
# client polling faster than this learns nothing new.
ACTIVE_RETRY_AFTER_S = 30


class LimitExceeded(Exception):
    """A per-user limit is reached: a 429 with Retry-After; ``limit`` names the config key."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = max(1, int(retry_after))


def check_submission_limits(store: JobStore, config: dict[str, Any], user_id: str, now: float | None = None) -> None:
    """Raise LimitExceeded if ``user_id`` may not submit another job now."""
    now = time.time() if now is None else now
    max_active = int(config["LIMITS_MAX_ACTIVE_JOBS"])
    if max_active > 0:
        active = store.count_active(user_id, {s.value for s in TERMINAL_STATES})
        if active >= max_active:
            raise LimitExceeded(
                "max_active_jobs",
                f"user {user_id} has {active} jobs that have not ended; the limit ([limits] max_active_jobs) is {max_active}",
                ACTIVE_RETRY_AFTER_S,
            )
    per_minute = int(config["LIMITS_SUBMISSIONS_PER_MINUTE"])
    if per_minute > 0:
        recent = store.accepted_since(user_id, now - WINDOW_S)
        if len(recent) >= per_minute:
            # The window frees a slot when the oldest submission that still counts turns a minute old.
            frees_at = recent[len(recent) - per_minute] + WINDOW_S
            raise LimitExceeded(
                "submissions_per_minute",
                f"user {user_id} submitted {len(recent)} jobs in the last minute; "
                f"the limit ([limits] submissions_per_minute) is {per_minute}",
                math.ceil(frees_at - now),
            )
