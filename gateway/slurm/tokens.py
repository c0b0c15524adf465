"""slurmrestd's JWTs: minted by ``scontrol token`` or signed here with the HS256 key, reused until they near expiry.

The REST backend (gateway.slurm.rest) sends them as ``X-SLURM-USER-TOKEN``; the local stack's
slurmrestd readiness probe (gateway.stack.slurmrestd) mints its own the same way.

Two sources, one interface (``token()``, ``invalidate()``, ``for_user()``):

- ``TokenProvider``: ``scontrol token username=<u> lifespan=<s>`` (needs Slurm's client and munge).
- ``JwtTokenProvider``: signs the token itself with slurmrestd's key, the file slurm.conf's
  ``AuthAltParameters=jwt_key=`` names (``[slurm] rest_jwt_key_file``), as ``scontrol token`` does
  in slurmctld: HS256 with the claims ``sun`` (the user), ``iat`` and ``exp``. No Slurm binary is
  needed, so a gateway in a container reaches slurmrestd with the key mounted in. Whoever holds the
  key can act as any user, root included: it is a secret of the same weight as munge's key.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

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


def mint_jwt(key: bytes, user: str, lifespan: int, *, now: float | None = None) -> str:
    """An HS256 JWT slurmrestd accepts for ``user``: the claims Slurm's auth/jwt reads (sun, exp) and iat."""
    import jwt  # PyJWT

    issued = int(time.time() if now is None else now)
    return jwt.encode({"sun": user, "iat": issued, "exp": issued + int(lifespan)}, key, algorithm="HS256")


def read_jwt_key(path: str | Path) -> bytes:
    """The key file's bytes, as Slurm uses them (the whole file, no trimming); a clear error if unreadable."""
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        raise SchedulerError(f"cannot read slurmrestd's JWT key [slurm] rest_jwt_key_file={path}: {exc.strerror}") from exc
    if not key:
        raise SchedulerError(f"slurmrestd's JWT key {path} is empty")
    return key


class JwtTokenProvider(TokenProvider):
    """Sign slurmrestd JWTs with its HS256 key instead of running ``scontrol token``.

    The key file is read at each mint (a rotated key is picked up after ``invalidate()``, which the
    REST backend calls when slurmrestd rejects a token), never kept in a log or an error.
    """

    def __init__(
        self,
        user: str,
        key_file: str | Path,
        *,
        lifespan: int = 3600,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        refresh_fraction: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(user, lifespan=lifespan, clock=clock, refresh_fraction=refresh_fraction, timeout=timeout)
        self.key_file = Path(key_file)
        self._wall_clock = wall_clock

    def for_user(self, user: str) -> JwtTokenProvider:
        """A provider signing tokens for ``user`` with the same key and lifespan."""
        return JwtTokenProvider(user, self.key_file, lifespan=self.lifespan, wall_clock=self._wall_clock,
                                timeout=self._timeout)

    def _mint(self) -> str:
        token = mint_jwt(read_jwt_key(self.key_file), self.user, self.lifespan, now=self._wall_clock())
        log.debug("signed a slurmrestd token for %s (lifespan %d s)", self.user, self.lifespan)
        return token
