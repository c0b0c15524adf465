"""A small HTTP client for the gateway's REST API (used by the CLI; importable by portals)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

TERMINAL = frozenset(
    {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "submit_failed", "archive_failed", "lost"}
)
TOKEN_ENV = "RELION_GATEWAY_TOKEN"
URL_ENV = "RELION_GATEWAY_URL"


class GatewayError(Exception):
    """The gateway answered with an error (or did not answer); ``message`` is its one-line reason."""

    def __init__(self, status: int | None, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status or 'no answer'}: {message}")
        self.status = status
        self.message = message
        self.body = body or {}


class GatewayClient:
    """Talk to one gateway: ``GatewayClient("http://host:9012", token)``."""

    def __init__(self, base_url: str, token: str | None = None, *, session: requests.Session | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api = f"{self.base_url}/v1/relion"
        self.session = session or requests.Session()
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

    def output_url(self, job_id: str) -> str:
        """A presigned URL for the job's output.tar.gz (the gateway signs it; no S3 credentials needed here)."""
        return str(self._request("GET", f"/jobs/{job_id}/output").json()["url"])

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
