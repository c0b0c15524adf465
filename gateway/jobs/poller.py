"""The poller: one per deployment, one batched Slurm query per cycle, an interval that adapts.

Status reads in the API only read the store; this loop is the only thing that asks Slurm. Every
gateway process starts one, and a lease in the shared store lets exactly one of them poll
(gunicorn workers on one host, or replicas sharing PostgreSQL).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.observability import POLL_CYCLE, POLL_ERRORS
from gateway.jobs.service import JobService
from gateway.slurm.backend import SchedulerError
from gateway.jobs.states import TERMINAL_VALUES, JobState

log = logging.getLogger(__name__)

LEASE_NAME = "poller"
ACTIVE_STATES = {JobState.STAGING.value, JobState.RUNNING.value, JobState.ARCHIVING.value, JobState.UNKNOWN.value}


@dataclass
class PollerStats:
    cycles: int = 0
    errors: int = 0
    last_duration_s: float = 0.0
    last_live_jobs: int = 0
    last_error: str = ""
    durations: list[float] = field(default_factory=list)


class Poller:
    """Keep job records fresh from Slurm."""

    def __init__(self, service: JobService, config: dict[str, Any], *, holder: str | None = None) -> None:
        self.service = service
        self.config = config
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = PollerStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = 0.0

    def is_leader(self) -> bool:
        return self.service.store.acquire_lease(LEASE_NAME, self.holder, float(self.config["POLLER_LEASE_SECONDS"]))

    def next_interval(self) -> float:
        """Fast while anything stages, runs or archives; slower while all jobs queue; slow when idle."""
        states = {r.state for r in self.service.store.live(TERMINAL_VALUES)}
        if states & ACTIVE_STATES:
            return float(self.config["POLLER_INTERVAL_ACTIVE"])
        if states:
            return float(self.config["POLLER_INTERVAL_QUEUED"])
        return float(self.config["POLLER_INTERVAL_IDLE"])

    def cycle(self) -> float:
        """Run one cycle if this process holds the lease; return seconds to wait before the next."""
        if not self.is_leader():
            return float(self.config["POLLER_LEASE_SECONDS"]) / 3
        started = time.monotonic()
        try:
            self.stats.last_live_jobs = self.service.poll()
        except SchedulerError as exc:
            # Slurm unreachable: change nothing, back off, try again.
            POLL_ERRORS.inc()
            self.stats.errors += 1
            self.stats.last_error = exc.message
            active = float(self.config["POLLER_INTERVAL_ACTIVE"])
            self._backoff = min(max(self._backoff * 2, active), float(self.config["POLLER_MAX_BACKOFF"]))
            log.warning("poll failed, next try in %.0f s: %s", self._backoff, exc.message)
            return self._backoff
        finally:
            self.stats.cycles += 1
            self.stats.last_duration_s = time.monotonic() - started
            POLL_CYCLE.observe(self.stats.last_duration_s)
            self.stats.durations = (self.stats.durations + [self.stats.last_duration_s])[-100:]
        self._backoff = 0.0
        return self.next_interval()

    def wake(self) -> None:
        """Poll soon (after a submit or cancel) instead of waiting out the interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.cycle()
            except Exception:  # the loop must survive anything (a locked database, a bug)
                log.exception("poller cycle crashed")
                wait = float(self.config["POLLER_INTERVAL_ACTIVE"])
            self._wake.wait(wait)
            self._wake.clear()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="relion-gateway-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.service.store.release_lease(LEASE_NAME, self.holder)
        except Exception as exc:  # at interpreter exit the store may already be gone
            log.debug("could not release the poller lease: %s", exc)
