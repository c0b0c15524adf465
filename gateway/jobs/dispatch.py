"""The webhook dispatcher: fans job events out to subscriptions and delivers them, at least once.

One per deployment (a lease in the store, as the poller has), in a thread of its own with its
own pool of senders, so a slow or dead endpoint costs that pool one slot per subscription and never
the poller's cycle or an API request. Everything it must not forget is a row: an event is turned
into deliveries and marked fanned out in one transaction; a delivery stays ``pending`` until an
endpoint answers 2xx, so a gateway killed mid-send sends it again on its next start (same
``webhook-id``: receivers de-duplicate on it).
"""
from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import requests
from standardwebhooks.webhooks import Webhook as Signer

from gateway import __version__
from gateway.database import JobNotFound, JobRecord, JobStore
from gateway.database.events import DELIVERED, FAILED, Delivery, EventStore, WebhookStore
from gateway.jobs.webhooks import Resolver, deliveries_for, resolve, target_problem, webhook_secret

log = logging.getLogger(__name__)

LEASE_NAME = "webhooks"
TICK_S = 0.5  # how often the leader looks for new events and due deliveries (two indexed reads)
PRUNE_EVERY_S = 3600.0
BURST = 100  # deliveries one sender makes in a row to a subscription that keeps answering 2xx
RESPONSE_SAMPLE = 300  # characters of a failed answer kept in the delivery log


class Dispatcher:
    """Fan out and deliver; ``run_once`` is one round (tests call it), ``start`` runs rounds in a thread."""

    def __init__(
        self,
        config: dict[str, Any],
        store: JobStore,
        key: bytes,
        *,
        session: requests.Session | None = None,
        resolver: Resolver = resolve,
        holder: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.events = EventStore(store.engine)
        self.hooks = WebhookStore(store.engine)
        self.key = key
        self.session = session or requests.Session()
        self.resolver = resolver
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(max(1, int(config["WEBHOOKS_CONCURRENCY"])), thread_name_prefix="relion-gateway-webhook")
        self._in_flight: dict[str, Future[None]] = {}  # by webhook id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease_until = 0.0
        self._pruned_at = 0.0

    # -- one round --------------------------------------------------------------------------------

    def run_once(self, *, wait: bool = False) -> tuple[int, int]:
        """Fan out new events, start due deliveries; (events fanned out, deliveries started).
        ``wait``: return once the deliveries started have ended (tests)."""
        fanned = self.fan_out()
        started = self.deliver_due(time.time())
        if wait:
            self.drain()
        return fanned, len(started)

    def fan_out(self) -> int:
        events = self.events.not_fanned_out()
        for event in events:
            self.events.fan_out(event, lambda hooks, event=event: deliveries_for(event, hooks, self._record(event.job_id)))  # type: ignore[misc]
        return len(events)

    def _record(self, job_id: str) -> JobRecord | None:
        try:
            return self.store.get(job_id)
        except JobNotFound:
            return None

    def deliver_due(self, now: float) -> list[str]:
        with self._lock:
            self._in_flight = {k: f for k, f in self._in_flight.items() if not f.done()}
            room = max(0, int(self.config["WEBHOOKS_CONCURRENCY"]) * 2 - len(self._in_flight))
            if room == 0:
                return []
            # Keyed by subscription: its sender works through its queue in order, and a second
            # sender for it would send the same message twice.
            due = [d for d in self.hooks.due(now, room + len(self._in_flight)) if d.webhook_id not in self._in_flight][:room]
            for delivery in due:
                self._in_flight[delivery.webhook_id] = self._pool.submit(self._attempt, delivery)
        return [d.id for d in due]

    def drain(self) -> None:
        with self._lock:
            futures = list(self._in_flight.values())
        for future in futures:
            future.result()

    # -- one attempt ------------------------------------------------------------------------------

    def _attempt(self, delivery: Delivery) -> None:
        """Send one delivery and, while its endpoint takes them, that subscription's next due ones
        (in order, on this sender: a burst of events reaches a live endpoint without waiting a tick
        per message)."""
        for _ in range(BURST):
            try:
                if not self._send(delivery):
                    return
            except Exception:  # a bug here must not kill the pool's thread or lose the delivery
                log.exception("webhook delivery %s crashed; it stays pending", delivery.id)
                return
            following = self.hooks.due(time.time(), 1, webhook_id=delivery.webhook_id)
            if not following:
                return
            delivery = following[0]

    def _send(self, delivery: Delivery) -> bool:
        """One attempt; true if the endpoint took it."""
        hook = self.hooks.get(delivery.webhook_id)
        if hook is None or hook.deleted_at is not None:
            return False  # deleting the subscription cancelled it
        attempt = delivery.attempts + 1
        started = time.time()
        code: int | None = None
        problem = target_problem(hook.url, self.config["WEBHOOKS_ALLOW_NETWORKS"], self.resolver)
        if problem is None:
            stamp = datetime.fromtimestamp(int(started), tz=timezone.utc)
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"relion-gateway/{__version__}",
                "webhook-id": delivery.id,
                "webhook-timestamp": str(int(started)),
                "webhook-signature": Signer(webhook_secret(self.key, hook.id)).sign(delivery.id, stamp, delivery.body),
            }
            timeout = float(self.config["WEBHOOKS_TIMEOUT_SECONDS"])
            try:
                # No redirects: a 3xx pointing at an internal address would get around target_problem.
                answer = self.session.post(hook.url, data=delivery.body.encode(), headers=headers, timeout=(timeout, timeout),
                                           allow_redirects=False)
                code = answer.status_code
                problem = None if 200 <= code < 300 else f"HTTP {code}: {answer.text[:RESPONSE_SAMPLE]}"
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:RESPONSE_SAMPLE]}"
        else:
            problem = f"url {problem}"
        changes: dict[str, Any] = {"attempts": attempt, "last_attempt_at": started, "last_status_code": code, "last_error": problem or ""}
        if problem is None:
            changes.update(status=DELIVERED, delivered_at=time.time())
        elif attempt >= int(self.config["WEBHOOKS_MAX_ATTEMPTS"]):
            changes.update(status=FAILED)
            log.warning("webhook delivery %s to %s failed for good after %d attempts: %s", delivery.id, hook.id, attempt, problem)
        else:
            changes.update(next_attempt_at=time.time() + self.retry_after(attempt))
            log.info("webhook delivery %s to %s: attempt %d failed (%s)", delivery.id, hook.id, attempt, problem)
        self.hooks.attempted(delivery.id, **changes)
        return problem is None

    def retry_after(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones: the configured ladder,
        with +-10 % jitter so subscribers that failed together are not retried together."""
        ladder = [float(s) for s in self.config["WEBHOOKS_RETRY_SECONDS"]] or [60.0]
        return ladder[min(attempts, len(ladder)) - 1] * random.uniform(0.9, 1.1)

    # -- the thread -------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        now = time.monotonic()
        lease = float(self.config["POLLER_LEASE_SECONDS"])
        if now >= self._lease_until - lease * 2 / 3:  # renew a third into the lease, not every tick
            held = self.store.acquire_lease(LEASE_NAME, self.holder, lease)
            self._lease_until = now + lease if held else 0.0
        return self._lease_until > now

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.is_leader():
                    self.run_once()
                    if time.time() - self._pruned_at > PRUNE_EVERY_S:
                        self._pruned_at = time.time()
                        self.hooks.forget_before(time.time() - float(self.config["WEBHOOKS_LOG_DAYS"]) * 86400)
            except Exception:  # a locked database or a bug: log, and try again next tick
                log.exception("webhook dispatcher round crashed")
            self._stop.wait(TICK_S)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="relion-gateway-webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.store.release_lease(LEASE_NAME, self.holder)
        except Exception as exc:  # at interpreter exit the store may already be gone
            log.debug("could not release the webhooks lease: %s", exc)
