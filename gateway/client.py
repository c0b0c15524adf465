"""A small HTTP client for the gateway's REST API (used by the CLI; importable by portals)."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gateway.jobs.states import TERMINAL_VALUES

logger = logging.getLogger(__name__)

TERMINAL = TERMINAL_VALUES  # the portal's terminal states, from their one owner
TOKEN_ENV = "RELION_GATEWAY_TOKEN"
URL_ENV = "RELION_GATEWAY_URL"
DEFAULT_PORT = 9012
API_PATH = "/v1/relion"
URL_FORM = "http(s)://HOST[:PORT], e.g. http://127.0.0.1:9012 (HOST[:PORT] alone means http, port 9012)"
# "ftp:x", "http:/host": a scheme without "//". A bare "host:9012" is not one: a port is digits.
_SCHEME_WITHOUT_SLASHES = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?![0-9]+(/|$))")


def normalise_base_url(url: str, *, default_port: int = DEFAULT_PORT) -> str:
    """The gateway's base URL (scheme, host, port) from what a user typed; ValueError says the form expected.

    People paste what they see in the API docs (``http://host:9012/v1/relion/``) or only the host
    (``localhost``, ``host:9012``), and the client adds ``/v1/relion`` itself, so both are read
    here. A bare host gets ``--port``'s default, 9012, as ``--host`` would; with a scheme the
    scheme's own port applies (a gateway behind an HTTPS proxy). A path before ``/v1/relion`` is
    kept: it is a proxy's prefix.
    """
    text = url.strip()
    explicit_scheme = "://" in text
    if not explicit_scheme:
        if _SCHEME_WITHOUT_SLASHES.match(text):
            raise ValueError(f"{url!r} is not a gateway URL: expected {URL_FORM}")
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{url!r} is not a gateway URL: the scheme must be http or https; expected {URL_FORM}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has no valid port (1-65535); expected {URL_FORM}") from None
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host; expected {URL_FORM}")
    if parts.username is not None or parts.password is not None:
        # requests would send them as Basic auth in place of the bearer token.
        raise ValueError(f"{url!r} carries credentials; give the token with --token or {TOKEN_ENV}")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r} has a query or fragment; expected {URL_FORM}")
    path = parts.path.rstrip("/")
    if API_PATH in path:
        path = path[: path.index(API_PATH)]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None and not explicit_scheme:
        port = default_port
    return f"{parts.scheme.lower()}://{host}{f':{port}' if port is not None else ''}{path}"


# Aliases: inside GatewayClient, `list` names a method, not the type.
Jobs = list[dict[str, Any]]
JobsAndTotal = tuple[Jobs, int]


class GatewayError(Exception):
    """The gateway answered with an error (or did not answer); ``message`` is its one-line reason."""

    def __init__(self, status: int | None, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status or 'no answer'}: {message}")
        self.status = status
        self.message = message
        self.body = body or {}


# gunicorn closes a keep-alive connection after 2 s idle; a GET sent on it at that moment fails
# with RemoteDisconnected (seen in CI: a job followed with a 2 s poll). urllib3 sends an idempotent
# request again on a fresh connection; a POST is never resent here (submits carry Idempotency-Keys).
IDEMPOTENT_RETRY = Retry(total=3, connect=3, read=3, status=0, other=0, backoff_factor=0.2,
                         allowed_methods=frozenset({"GET", "HEAD", "OPTIONS"}), raise_on_status=False)


def retrying_session() -> requests.Session:
    """A requests.Session that resends GET/HEAD after a dropped connection (IDEMPOTENT_RETRY)."""
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=IDEMPOTENT_RETRY)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class GatewayClient:
    """Talk to one gateway: ``GatewayClient("http://host:9012", token)`` (see normalise_base_url for the forms read)."""

    def __init__(self, base_url: str, token: str | None = None, *, session: requests.Session | None = None, timeout: float = 60.0) -> None:
        self.base_url = normalise_base_url(base_url)
        self.api = f"{self.base_url}{API_PATH}"
        self.session = session or retrying_session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, f"{self.api}{path}", **kwargs)
        except requests.RequestException as exc:
            raise GatewayError(None, f"cannot reach the gateway at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
                message = str(body.get("message") or body)
            except ValueError:
                body, message = {}, response.text.strip()[:500] or response.reason
            raise GatewayError(response.status_code, message, body)
        return response

    def submit(self, request: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._request("POST", "/jobs", json=request, headers=headers).json())

    def render(self, request: dict[str, Any], *, slurm_test: bool = False) -> dict[str, Any]:
        params = {"slurm_test": "true"} if slurm_test else {}
        return dict(self._request("POST", "/render", json=request, params=params).json())

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/jobs/{job_id}").json())

    def get_if_changed(self, job_id: str, etag: str = "") -> tuple[dict[str, Any] | None, str]:
        """The job if it changed since ``etag`` (a conditional GET), else None; and its ETag."""
        response = self._request("GET", f"/jobs/{job_id}", headers={"If-None-Match": etag} if etag else {})
        if response.status_code == 304:
            return None, response.headers.get("ETag", etag)
        return dict(response.json()), response.headers.get("ETag", "")

    def usage(self, **filters: Any) -> dict[str, Any]:
        """The usage report (GET /usage): ``from``/``to``/``group_by``/``user_id``/``account``."""
        params = {k: v for k, v in filters.items() if v not in (None, [], ())}
        return dict(self._request("GET", "/usage", params=params).json())

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v not in (None, [], ())}
        return dict(self._request("GET", "/jobs", params=params).json())

    def iter_jobs(self, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
        page = 1
        while True:
            listing = self.list(page=page, page_size=page_size, **filters)
            yield from listing["jobs"]
            if page * page_size >= listing["total"]:
                return
            page += 1

    def first_jobs(self, limit: int, **filters: Any) -> JobsAndTotal:
        """Up to ``limit`` jobs, newest first, and how many match the filters in all (the listing's total)."""
        jobs: Jobs = []
        page_size = max(1, min(limit, 100))
        page, total = 1, 0
        while len(jobs) < limit:
            listing = self.list(page=page, page_size=page_size, **filters)
            total = int(listing.get("total", len(jobs) + len(listing["jobs"])))
            jobs.extend(listing["jobs"][: limit - len(jobs)])
            if not listing["jobs"] or page * page_size >= total:
                break
            page += 1
        return jobs, total

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/jobs/{job_id}").json())

    def continue_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/jobs/{job_id}/continue").json())

    def script(self, job_id: str, which: str = "main") -> str:
        return self._request("GET", f"/jobs/{job_id}/script", params={"which": which}).text

    def metadata(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/jobs/{job_id}/metadata").json())

    def logs(self, job_id: str, stream: str = "out", tail: int | None = None) -> str:
        params: dict[str, Any] = {"stream": stream}
        if tail:
            params["tail"] = tail
        return self._request("GET", f"/jobs/{job_id}/logs", params=params).text

    def output_link(self, job_id: str) -> dict[str, Any]:
        """``{url, expires_in, bytes, sha256}`` for the job's output.tar.gz (bytes and sha256 may be None)."""
        return dict(self._request("GET", f"/jobs/{job_id}/output").json())

    def output_url(self, job_id: str) -> str:
        """A presigned URL for the job's output.tar.gz (the gateway signs it; no S3 credentials needed here)."""
        return str(self.output_link(job_id)["url"])

    def download_output(self, job_id: str, target: Path) -> dict[str, Any]:
        """Download the job's output.tar.gz to ``target``, checked against the size and sha256 the gateway recorded.

        It is written to ``<target>.part`` and renamed only once it matches; a mismatch or a failed
        transfer removes the partial file and raises GatewayError naming both values. Returns
        ``{path, bytes, sha256, verified}``; ``verified`` is False when the gateway has no sha256.
        """
        link = self.output_link(job_id)
        partial = target.with_name(target.name + ".part")
        size, digest = _fetch(str(link["url"]), partial)
        problems = []
        if link.get("bytes") is not None and size != link["bytes"]:
            problems.append(f"{size} bytes, the gateway recorded {link['bytes']}")
        if link.get("sha256") and digest != link["sha256"]:
            problems.append(f"sha256 {digest}, the gateway recorded {link['sha256']}")
        if problems:
            partial.unlink(missing_ok=True)
            raise GatewayError(None, f"the download of {job_id}'s output is not what was archived: {'; '.join(problems)}; removed {partial}")
        os.replace(partial, target)
        logger.debug("downloaded %s: %d bytes, sha256 %s", target, size, digest)
        return {"path": str(target), "bytes": size, "sha256": digest, "verified": bool(link.get("sha256"))}

    def retry_archive(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/jobs/{job_id}/archive").json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        min_interval: float = 1.0,
        max_interval: float = 30.0,
    ) -> dict[str, Any]:
        """Follow a job until it ends, polling as often as the gateway's ``next_poll_s`` hint says."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job: dict[str, Any] = {}
        etag = ""
        while True:
            # Conditional: while nothing changed the gateway answers 304 with no body.
            fresh, etag = self.get_if_changed(job_id, etag)
            if fresh is not None:
                job = fresh
                if on_update is not None:
                    on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} is still {job['status']} after {timeout:.0f} s")
            hint = job.get("next_poll_s") or min_interval
            time.sleep(min(max(float(hint) / 2, min_interval), max_interval))


def _fetch(url: str, path: Path) -> tuple[int, str]:
    """Stream ``url`` into ``path``; its size and sha256. A failure removes the partial file (GatewayError)."""
    digest, size = hashlib.sha256(), 0
    try:
        with requests.get(url, stream=True, timeout=60) as response:
            response.raise_for_status()
            with open(path, "wb") as handle:
                # The bytes as stored (decode_content=False): the recorded sha256 is of the object,
                # and requests would undo a Content-Encoding: gzip before it is hashed.
                for chunk in response.raw.stream(1024 * 1024, decode_content=False):
                    handle.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        path.unlink(missing_ok=True)
        raise GatewayError(None, f"download from S3 failed: {exc}") from exc
    return size, digest.hexdigest()
