"""slurmrestd's JWTs: minted by ``scontrol token``, reused until they near expiry.

The REST backend (gateway.slurm.rest) sends them as ``X-SLURM-USER-TOKEN``; the local stack's
slurmrestd readiness probe (gateway.stack.slurmrestd) mints its own the same way.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

from gateway.process import CommandError, Runner, run_command
from gateway.slurm.backend import TRANSIENT_TEXT, SchedulerError

log = logging.getLogger(__name__)

_JWT_LINE = re.compile(r"^SLURM_JWT=(\S+)\s*$", re.MULTILINE)


def parse_scontrol_token(stdout: str) -> str:
    """`scontrol token` prints `SLURM_JWT=<token>`."""
    match = _JWT_LINE.search(stdout)
    if not match:
        raise SchedulerError(f"scontrol token printed no SLURM_JWT= line: {stdout.strip()[:200]!r}")
    return match.group(1)


class TokenProvider:
    """Mint slurmrestd JWTs with `scontrol token` and reuse one until it nears expiry.

    A new token is minted when less than ``refresh_fraction`` of the lifespan remains, so a
    request never goes out with a token about to expire (22.05 answers an expired token with an
    opaque HTTP 500). `scontrol token username=<u>` for a user other than the caller needs root or
    SlurmUser, and slurm.conf must list `AuthAltTypes=auth/jwt`.
    """

    def __init__(
        self,
        user: str,
        *,
        lifespan: int = 3600,
        runner: Runner = run_command,
        clock: Callable[[], float] = time.monotonic,
        refresh_fraction: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        if lifespan <= 0:
            raise ValueError("token lifespan must be positive")
        if not 0.0 <= refresh_fraction < 1.0:
            raise ValueError("refresh_fraction must be in [0, 1)")
        self.user = user
        self.lifespan = int(lifespan)
        self._run = runner
        self._clock = clock
        self._refresh_fraction = refresh_fraction
        self._timeout = timeout
        self._token: str | None = None
        self._expires = 0.0
        # The poller thread and request threads share one provider: mint once, not per thread.
        self._lock = threading.Lock()

    def for_user(self, user: str) -> TokenProvider:
        """A provider minting tokens for ``user`` with this one's lifespan, runner and timeout."""
        return TokenProvider(user, lifespan=self.lifespan, runner=self._run, timeout=self._timeout)

    def token(self) -> str:
        """Return a token with at least ``refresh_fraction`` of its lifespan left."""
        with self._lock:
            now = self._clock()
            if self._token is None or self._expires - now < self.lifespan * self._refresh_fraction:
                self._token = self._mint()
                # Counted from before the call: slurmctld sets the token's exp during it.
                self._expires = now + self.lifespan
            return self._token

    def invalidate(self) -> None:
        """Forget the token (slurmrestd rejected it, e.g. after the JWT key changed)."""
        with self._lock:
            self._token = None

    def _mint(self) -> str:
        argv = ["scontrol", "token", f"username={self.user}", f"lifespan={self.lifespan}"]
        try:
            out = self._run(argv, timeout=self._timeout)
        except CommandError as exc:
            raise SchedulerError(
                f"scontrol token failed ({exc.reason}): {exc.stderr.strip() or exc.stdout.strip()}",
                argv=exc.argv,
                stderr=exc.stderr,
                transient=exc.returncode is None or bool(TRANSIENT_TEXT.search(exc.stderr)),
            ) from exc
        log.debug("minted a slurmrestd token for %s (lifespan %d s)", self.user, self.lifespan)
        return parse_scontrol_token(out)
