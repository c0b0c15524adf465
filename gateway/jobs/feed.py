"""What waiting requests wait on: one reader of the job events per process, however many wait.

A long-poll (``Prefer: wait``) or an event stream must learn of a change made by any process of
the deployment (the poller may run in another worker or replica), so it comes from the store. One
thread per process reads the events of the last few seconds every ``interval`` (one grouped,
indexed query) and wakes the waiters whose job moved; a thousand waiters cost what one does. The
thread starts with the first waiter, so apps that never hold one (tests, the CLI) start none.

Why a time window and not "seq > the last one seen": in PostgreSQL a lower seq can commit after a
higher one; within one job the row lock orders them (gateway/database/events.py), so a waiter that
compares its own job's seqs never misses one, and a window far longer than a write transaction
sees every commit.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from gateway.database.events import EventStore

log = logging.getLogger(__name__)

WINDOW_S = 30.0
# One grouped read this often per process: a held request hears of a change within about this.
INTERVAL_S = 0.25


@dataclass
class WaitSlots:
    """A per-process count of held requests, so waiters never take the threads reads need."""

    limit: int
    held: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.held -= 1


class EventFeed:
    def __init__(self, events: EventStore, *, interval: float = INTERVAL_S) -> None:
        self.events = events
        self.interval = interval
        self._newest: dict[tuple[str, str], tuple[int, float]] = {}  # (job, type) -> (seq, seen at)
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self.reads = 0  # store reads so far (the benchmark counts them)

    def newest(self, job_id: str, types: tuple[str, ...]) -> int:
        """The newest seq of the job's events of ``types`` the feed has seen (0: none lately)."""
        with self._changed:
            return self.newest_locked(job_id, types)

    def wait(self, job_id: str, after: int, types: tuple[str, ...], timeout: float) -> bool:
        """Block until ``job_id`` has an event of ``types`` newer than seq ``after``, or ``timeout``
        seconds pass; true if it has."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.newest_locked(job_id, types) <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._changed.wait(remaining)
            return True

    def newest_locked(self, job_id: str, types: tuple[str, ...]) -> int:
        return max((self._newest.get((job_id, t), (0, 0.0))[0] for t in types), default=0)

    def read_once(self) -> None:
        now = time.time()
        rows = self.events.recent(now - WINDOW_S)
        self.reads += 1
        with self._changed:
            moved = False
            for job_id, kind, seq in rows:
                if seq > self._newest.get((job_id, kind), (0, 0.0))[0]:
                    self._newest[(job_id, kind)] = (seq, now)
                    moved = True
            # Forget jobs quiet for longer than the window: a waiter arriving later reads its
            # starting seq from the store, not from here.
            for key in [k for k, (_, seen) in self._newest.items() if seen < now - 4 * WINDOW_S]:
                del self._newest[key]
            if moved:
                self._changed.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.read_once()
            except Exception:  # a locked or unreachable store: waiters time out, the feed goes on
                log.exception("event feed read failed")
            self._stop.wait(self.interval)

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                # The first read happens before any waiter compares, so a change committed just
                # before the thread started is still seen as news (it is newer than the waiter's seq).
                self.read_once()
                self._thread = threading.Thread(target=self._run, name="relion-gateway-event-feed", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
