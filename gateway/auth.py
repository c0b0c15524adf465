"""Authentication (bearer tokens, a trusted proxy header) and authorization (owners, admins).

A token reads ``rg_<id>_<secret>``: the id (12 hex digits, public, shown by ``token list``) finds
its row in the store in one lookup; only a salted scrypt hash of the secret is stored, and the
token is printed once, when it is created. Every request needs a principal unless its view is
marked ``@public`` (health, API docs) or authenticates itself (the HMAC-signed job events); so a
new endpoint is closed until someone opens it.

``[auth] mode = "none"`` switches all of this off (every caller is an anonymous admin): for
development only, and logged as a WARNING each time an app is built.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from flask import Flask, g, request

from gateway.audit import Actor, Auditor
from gateway.errors import LimitExceeded
from gateway.database import JobStore, TokenRecord

log = logging.getLogger(__name__)

AUTH_KEY = "relion_gateway_auth"
MODES = ("token", "none")
REALM = "relion-gateway"
_TOKEN = re.compile(r"rg_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SCRYPT_R, SCRYPT_P = 8, 1
# last_used_at is written at most this often per token, not on every request.
TOUCH_INTERVAL_S = 60.0
# Views anyone may call: health and the API's own documentation (spec, Swagger UI and its assets).
PUBLIC_BLUEPRINTS = frozenset({"api-docs", "docs_assets"})
PUBLIC_ENDPOINTS = frozenset({"healthz", "static"})

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, whether an admin, and how that was established."""

    user: str
    admin: bool = False
    via: str = "token"  # token, proxy or none
    token_id: str | None = None


class Unauthenticated(Exception):
    """No acceptable credentials: a 401 with WWW-Authenticate: Bearer."""

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.invalid_token = invalid_token

    @property
    def challenge(self) -> str:
        if self.invalid_token:
            return f'Bearer realm="{REALM}", error="invalid_token", error_description="{self.message}"'
        return f'Bearer realm="{REALM}"'


class Forbidden(Exception):
    """Authenticated, but not allowed: a 403 whose message names the rule."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# -- token hashing --------------------------------------------------------------------------------


def hash_secret(secret: str, salt: bytes, n: int) -> str:
    """scrypt of the secret; the parameters travel with the hash so the cost can change later."""
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=32, maxmem=256 * 1024 * 1024)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${digest.hex()}"


def check_secret(secret: str, salt_hex: str, stored: str) -> bool:
    try:
        scheme, n, r, p, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            secret.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p), dklen=32, maxmem=256 * 1024 * 1024
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), expected)


def check_user_name(user: str) -> str:
    if not _USER.fullmatch(user) or user in (".", ".."):
        raise ValueError(f"user {user!r} must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit")
    return user


def create_token(
    store: JobStore, user: str, *, admin: bool = False, n: int = 2**14, auditor: Auditor | None = None
) -> tuple[TokenRecord, str]:
    """Store a new token for ``user`` and return it with its plain text (shown once, never stored)."""
    check_user_name(user)
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = TokenRecord(
        id=token_id, user=user, admin=admin, salt=salt.hex(), hash=hash_secret(secret, salt, n), created_at=time.time()
    )
    store.insert_token(record)
    if auditor is not None:
        auditor.record("token.create", "ok", token_id=token_id, user=user, token_admin=admin)
    return record, f"rg_{token_id}_{secret}"


def revoke_token(store: JobStore, token_id: str, *, auditor: Auditor | None = None) -> bool:
    """Revoke a token; false if there is no such live token."""
    done = store.revoke_token(token_id, time.time())
    if auditor is not None:
        auditor.record("token.revoke", "ok" if done else "not_found", token_id=token_id)
    return done


def token_summary(record: TokenRecord) -> dict[str, Any]:
    """What `token list` and GET /admin/tokens show: never the salt, hash or secret."""
    return {
        "id": record.id,
        "user": record.user,
        "admin": bool(record.admin),
        "created_at": record.created_at,
        "last_used_at": record.last_used_at,
        "revoked_at": record.revoked_at,
    }


# -- throttling failed checks -----------------------------------------------------------------------


class AuthThrottled(LimitExceeded):
    """Too many failed token checks from one client: a 429 with Retry-After, and no check at all."""


class FailureThrottle:
    """Failed bearer-token checks per client address in a sliding window, in this process.

    Per process, like the token cache: N gunicorn workers allow up to N x ``limit`` guesses per
    window from one address, still about a million times too few to find a 256-bit secret. A
    success never resets the count (a guesser holding one valid token could otherwise clear it).
    """

    # Addresses remembered at most: a spray from many addresses evicts the stalest first.
    MAX_CLIENTS = 10_000

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        times = self._failures.get(client)
        while times and times[0] <= now - self.window:
            times.popleft()
        if times is not None and not times:
            del self._failures[client]
            return None
        return times

    def check(self, client: str) -> None:
        """Raise AuthThrottled if ``client`` has used up its failures for now; O(1) otherwise."""
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if times is None or len(times) < self.limit:
                return
            # The window frees a failure when the oldest that still counts turns window seconds old.
            frees_in = times[len(times) - self.limit] + self.window - now
        raise AuthThrottled(
            "failure_limit",
            f"too many failed authentications from {client}: the limit ([auth] failure_limit) is {self.limit} "
            f"per {self.window:g} s ([auth] failure_window); try again in {math.ceil(frees_in)} s",
            math.ceil(frees_in),
        )

    def record_failure(self, client: str) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if times is None:
                if len(self._failures) >= self.MAX_CLIENTS:
                    self._failures.pop(next(iter(self._failures)))  # insertion order: the stalest
                times = self._failures[client] = deque(maxlen=self.limit)
            times.append(now)


# -- the authenticator ----------------------------------------------------------------------------


class Authenticator:
    """Turn a request's credentials into a Principal, or raise Unauthenticated."""

    def __init__(self, config: Mapping[str, Any], store: JobStore, auditor: Auditor) -> None:
        self.mode = str(config["AUTH_MODE"])
        if self.mode not in MODES:
            raise ValueError(f"[auth] mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.store = store
        self.auditor = auditor
        self.proxy_header = str(config["AUTH_PROXY_HEADER"] or "")
        self.trusted_proxies = [ipaddress.ip_network(str(a), strict=False) for a in config["AUTH_TRUSTED_PROXIES"]]
        self.proxy_admins = frozenset(str(u) for u in config["AUTH_PROXY_ADMINS"])
        if self.proxy_header and not self.trusted_proxies:
            raise ValueError("[auth] proxy_header is set but trusted_proxies is empty: no proxy could be trusted")
        # token id -> sha256 of (presented token, stored hash) already checked with scrypt, so one
        # process pays scrypt's cost once per token, not per request. Revocation is read each time.
        self._verified: dict[str, str] = {}
        # Checked against when the id is unknown, so that costs the same scrypt as a wrong secret
        # (no timing oracle for which ids exist). It matches nothing: no digest is all zeros.
        self._dummy_salt = secrets.token_hex(16)
        self._dummy_hash = f"scrypt${int(config['AUTH_SCRYPT_N'])}${SCRYPT_R}${SCRYPT_P}${'0' * 64}"
        limit, window = int(config["AUTH_FAILURE_LIMIT"]), float(config["AUTH_FAILURE_WINDOW"])
        if limit < 0 or not window > 0:
            raise ValueError(f"[auth] failure_limit must be >= 0 and failure_window > 0, not {limit} and {window:g}")
        self.throttle = FailureThrottle(limit, window)

    def client_address(self, headers: Mapping[str, str], remote_addr: str | None) -> str:
        """Whom failures are counted against: the peer, unless the peer is one of [auth]
        trusted_proxies; then the nearest X-Forwarded-For hop that is not (entries further left are
        whatever the client wrote)."""
        address = remote_addr or "-"
        if not self._trusted(remote_addr):
            return address
        for hop in reversed(headers.get("X-Forwarded-For", "").split(",")):
            hop = hop.strip()
            if not hop:
                break
            address = hop
            if not self._trusted(hop):
                break
        return address

    def authenticate(self, headers: Mapping[str, str], remote_addr: str | None) -> Principal:
        if self.mode == "none":
            return Principal("anonymous", admin=True, via="none")
        authorization = headers.get("Authorization")
        if authorization is not None:
            client = self.client_address(headers, remote_addr)
            self.throttle.check(client)
            try:
                scheme, _, credentials = authorization.partition(" ")
                if scheme.lower() != "bearer" or not credentials.strip():
                    raise Unauthenticated("the Authorization header must be 'Bearer <token>'", invalid_token=True)
                return self.verify_token(credentials.strip())
            except Unauthenticated:
                self.throttle.record_failure(client)
                raise
        if self.proxy_header and self.proxy_header in headers:
            if self._trusted(remote_addr):
                return self._proxy_principal(headers[self.proxy_header])
            log.warning("ignoring %s from %s: not one of [auth] trusted_proxies", self.proxy_header, remote_addr)
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")

    def verify_token(self, presented: str) -> Principal:
        refused = Unauthenticated("invalid or revoked token", invalid_token=True)
        match = _TOKEN.fullmatch(presented)
        if match is None:
            raise refused  # the format is public: failing fast here tells nothing about the store
        record = self.store.get_token(match.group("id"))
        if record is None or record.revoked_at is not None:
            # The same scrypt as for a wrong secret, so an unknown or revoked id takes as long.
            salt, stored = (self._dummy_salt, self._dummy_hash) if record is None else (record.salt, record.hash)
            check_secret(match.group("secret"), salt, stored)
            raise refused
        fingerprint = hashlib.sha256(f"{presented}\0{record.hash}".encode()).hexdigest()
        if not hmac.compare_digest(self._verified.get(record.id, ""), fingerprint):
            if not check_secret(match.group("secret"), record.salt, record.hash):
                raise refused
            if len(self._verified) > 4096:
                self._verified.clear()
            self._verified[record.id] = fingerprint
        now = time.time()
        if record.last_used_at is None or now - record.last_used_at > TOUCH_INTERVAL_S:
            self.store.touch_token(record.id, now)
        return Principal(record.user, admin=bool(record.admin), via="token", token_id=record.id)

    def _trusted(self, remote_addr: str | None) -> bool:
        try:
            address = ipaddress.ip_address(remote_addr or "")
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def _proxy_principal(self, value: str) -> Principal:
        try:
            user = check_user_name(value.strip())
        except ValueError as exc:
            raise Unauthenticated(f"{self.proxy_header}: {exc}") from exc
        return Principal(user, admin=user in self.proxy_admins, via="proxy")


def list_tokens(app: Flask) -> list[dict[str, Any]]:
    """Every token's summary (never a secret or hash), from the store the app authenticates against."""
    authenticator: Authenticator = app.extensions[AUTH_KEY]
    return [token_summary(t) for t in authenticator.store.list_tokens()]


def init_app(app: Flask, store: JobStore, auditor: Auditor) -> Authenticator:
    """Authenticate every request whose view is not public; keep the principal in ``g``."""
    authenticator = Authenticator(app.config, store, auditor)
    app.extensions[AUTH_KEY] = authenticator
    if authenticator.mode == "none":
        log.warning(
            "AUTHENTICATION IS OFF ([auth] mode = \"none\"): anyone who reaches this gateway acts as an admin. "
            "Use it for development only."
        )

    @app.before_request
    def _authenticate() -> None:
        if _is_public(app):
            return
        try:
            g.principal = authenticator.authenticate(request.headers, request.remote_addr)
        except Unauthenticated as exc:
            auditor.record(
                "authenticate", "denied", actor=_Anonymous(), reason=exc.message,
                method=request.method, path=request.path, remote_addr=request.remote_addr,
            )
            raise
        except AuthThrottled as exc:
            auditor.record(
                "authenticate", "refused", actor=_Anonymous(), reason=exc.message, limit=exc.limit,
                retry_after=exc.retry_after, method=request.method, path=request.path, remote_addr=request.remote_addr,
                client=authenticator.client_address(request.headers, request.remote_addr),
            )
            raise

    return authenticator


@dataclass(frozen=True)
class _Anonymous:
    user: str = "-"
    admin: bool = False
    via: str = "unauthenticated"
    token_id: str | None = None


def _is_public(app: Flask) -> bool:
    if _is_cors_preflight(app):
        return True
    endpoint = request.endpoint
    if endpoint is None:
        return False  # unknown URL: no hint about what exists without credentials
    if endpoint in PUBLIC_ENDPOINTS or endpoint.split(".", 1)[0] in PUBLIC_BLUEPRINTS:
        return True
    view = app.view_functions.get(endpoint)
    view_class = getattr(view, "view_class", None)
    return bool(getattr(view, "auth_public", False) or getattr(view_class, "auth_public", False))


def _is_cors_preflight(app: Flask) -> bool:
    """A browser's CORS preflight from a configured origin: it carries no credentials by design
    (Fetch standard), so it is answered (by flask-cors) without a token; the request it asks
    about is authenticated as any other."""
    return (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and request.headers.get("Origin", "") in app.config.get("SERVER_CORS_ORIGINS", ())
    )


def public(view: F) -> F:
    """Mark a view function or MethodView class as callable without credentials."""
    view.auth_public = True  # type: ignore[attr-defined]
    return view


def current_principal() -> Principal:
    principal = g.get("principal")
    if principal is None:  # a public view asked: treat its caller as nobody in particular
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")
    return principal  # type: ignore[no-any-return]


def admin_required(func: F) -> F:
    """Let only admins call a view (403 otherwise)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not current_principal().admin:
            raise Forbidden("admin", "this endpoint is for admins")
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def authorize_user(principal: Actor, user_id: str) -> None:
    """A request may name only its caller's own user_id, unless the caller is an admin (the one owner of this rule)."""
    if not principal.admin and user_id != principal.user:
        raise Forbidden(
            "user_id", f"user_id {user_id!r} is not the authenticated user {principal.user!r}; only admins act for other users"
        )


# -- `relion-gateway token ...` ---------------------------------------------------------------------


def _store_and_auditor() -> tuple[JobStore, Auditor, dict[str, Any]]:
    from gateway.config import build_config
    from gateway.database import make_engine

    config = build_config()
    return JobStore(make_engine(config["STORE_DATABASE_URL"])), Auditor(config["AUDIT_FILE"]), config


@click.group("token")
def token_group() -> None:
    """Create, list and revoke API bearer tokens (in the gateway's store)."""


@token_group.command("create")
@click.option("--user", required=True, help="the user the token acts as")
@click.option("--admin", is_flag=True, help="an admin token: acts for any user, sees every job")
def token_create_command(user: str, admin: bool) -> None:
    """Create a token and print it, once: only its hash is kept."""
    store, auditor, config = _store_and_auditor()
    try:
        record, token = create_token(store, user, admin=admin, n=int(config["AUTH_SCRYPT_N"]), auditor=auditor)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user") from exc
    click.echo(token)
    click.echo(f"token {record.id} for {user}{' (admin)' if admin else ''}: store it now, it is not shown again", err=True)


@token_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON document")
@click.option("--user", default=None, help="only this user's tokens")
def token_list_command(as_json: bool, user: str | None) -> None:
    """List tokens (ids, users, dates; never secrets)."""
    store, _, _ = _store_and_auditor()
    rows = [token_summary(t) for t in store.list_tokens(user=user)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return

    def when(value: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else "-"

    click.echo(f"{'ID':<13} {'USER':<20} {'ADMIN':<6} {'CREATED':<20} {'LAST USED':<20} REVOKED")
    for row in rows:
        click.echo(
            f"{row['id']:<13} {row['user']:<20} {'yes' if row['admin'] else 'no':<6} {when(row['created_at']):<20} "
            f"{when(row['last_used_at']):<20} {when(row['revoked_at'])}"
        )


@token_group.command("revoke")
@click.argument("token_id")
def token_revoke_command(token_id: str) -> None:
    """Revoke a token by id (the part after 'rg_'); it stops working at once."""
    store, auditor, _ = _store_and_auditor()
    if not revoke_token(store, token_id, auditor=auditor):
        raise click.ClickException(f"no live token {token_id!r}")
    click.echo(f"revoked {token_id}")
