"""Scheduler backend that talks to slurmrestd (Slurm's REST API, openapi v0.0.38 of Slurm 22.05).

Split like the CLI backend: ``SlurmRestBackend`` does HTTP through a ``requests.Session`` passed in
(a fake in unit tests) and gateway.slurm.rest_json turns JSON into ``SlurmJobInfo`` objects by
field name; the #SBATCH lines are read by gateway.slurm.directives, shared with the pyslurm
backend. Authentication is slurmrestd's JWT pass-through: the ``X-SLURM-USER-NAME`` and
``X-SLURM-USER-TOKEN`` headers, with tokens minted by ``scontrol token`` (gateway.slurm.tokens).

What slurmrestd 22.05.8 does, measured on the local stack (tests/fixtures/slurmrestd/ holds the
recorded answers):

- ``POST /slurm/v0.0.38/job/submit`` IGNORES the ``#SBATCH`` lines of ``script``: a script asking
  for ``--job-name``, ``--ntasks=2``, ``--partition=long`` ran as an unnamed 1-task job in the
  default partition. So ``job_description`` maps the directives into the ``job`` object (see
  ``directives.SBATCH_OPTIONS`` for the mapping). ``job.environment`` is required (else HTTP 400
  "environment must be set"); like sbatch's default ``--export=ALL`` we send the gateway's
  environment, plus what sbatch adds itself (SLURM_CPUS_PER_TASK, SLURM_SUBMIT_DIR,
  SLURM_SUBMIT_HOST).
- ``GET /slurm/v0.0.38/jobs`` has no id filter: it returns every job in slurmctld's memory. Its
  ``exit_code`` is a raw wait status (exit 3 -> 768, SIGKILL -> 9): ``rest_json.decode_wait_status``.
  ``?update_time=T`` answers ``304 Not Modified`` (no body) when no job changed after T.
- ``GET /slurmdb/v0.0.38/jobs?step=<id>,<id>`` is the batch form for accounting (``step`` is
  sacct's ``-j`` list; ``/slurmdb/v0.0.38/job/<a>,<b>`` is a 400). One call, ~0.35 s here.
  Its exit codes are WRONG for normal exits: the 22.05 dumper writes ``{"status": "SUCCESS",
  "return_code": 0}`` for every WIFEXITED status (exit 3 included); only signals are right.
- Unknown job id: ``GET``/``DELETE /slurm/v0.0.38/job/<id>`` -> HTTP 500, error 2017.
- A bad or expired token is HTTP 500 with error -1 ("Unspecified error"), not 401; a missing one
  is 401. Errors say ``error_number`` in most answers but ``error_code`` in the submit answer.
- No test-only endpoint exists; ``test_only`` runs ``sbatch --test-only`` through the runner.
- ``GET /slurmdb/v0.0.38/jobs?step=...`` without ``skip_steps`` carries each step's TRES and CPU
  time: ``usage()`` reads sacct's figures from it (``rest_json.parse_slurmdb_usage``), no sacct.

``status()`` costs one GET /slurm/<ver>/jobs, plus one GET /slurmdb/<ver>/jobs?step= only when
some ids are unknown to slurmctld and were not seen ending by this backend.

Exit codes we trust, in order: slurmctld's wait status (live jobs and jobs that ended less than
MinJobAge ago), the final record this backend remembered when it last saw the job in slurmctld,
then slurmdbd's record for signals and for COMPLETED (exit 0); a FAILED job known only to slurmdbd
gets ``exit_code=None`` (unknown) rather than the wrong 0.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import requests

from gateway.config import default_config
from gateway.process import Runner, run_command
from gateway.slurm.backend import (
    TRANSIENT_ERRNOS,
    TRANSIENT_TEXT,
    SchedulerError,
    SlurmJobInfo,
)
from gateway.slurm.accounting import SlurmUsage
from gateway.slurm.cli import release_with_scontrol, sbatch_test_only
from gateway.slurm.directives import (
    SBATCH_FLAGS,
    SBATCH_OPTIONS,
    job_environment,
    map_directives,
    submit_user,
)
from gateway.slurm.rest_json import parse_slurm_jobs, parse_slurmdb_jobs, parse_slurmdb_usage
from gateway.slurm.states import SlurmState
from gateway.slurm.times import NO_VAL
from gateway.slurm.tokens import TokenProvider

log = logging.getLogger(__name__)

# The API version slurmrestd is asked for unless [slurm] rest_api_version says otherwise (config owns it).
DEFAULT_API_VERSION = str(default_config()["SLURM_REST_API_VERSION"])

_INVALID_JOB_ID = 2017  # ESLURM_INVALID_JOB_ID
_ALREADY_DONE = 2021  # ESLURM_ALREADY_DONE
_UNSPECIFIED = -1  # what 22.05 answers for a rejected (bad or expired) token


class SlurmRestError(SchedulerError):
    """slurmrestd refused or failed a request (or could not be reached)."""

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        status: int | None,
        errors: list[dict[str, Any]] | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message, argv=[method, url], stderr=_error_text(errors or []), transient=transient)
        self.method = method
        self.url = url
        self.status = status
        self.errors = errors or []

    def has_errno(self, *numbers: int) -> bool:
        return any(_errno(error) in numbers for error in self.errors)


def _errno(error: Mapping[str, Any]) -> int | None:
    # Most answers say "error_number"; the 22.05 job submit answer says "error_code".
    value = error.get("error_number", error.get("error_code"))
    return value if isinstance(value, int) else None


def _error_text(errors: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        text = error.get("description") or error.get("error") or ""
        if error.get("description") and error.get("error") and error["error"] not in text:
            text = f"{error['error']}: {text}"
        if text:
            parts.append(str(text))
    return "; ".join(parts)


# --- #SBATCH lines -> job description (read by gateway.slurm.directives) ----------------------------


def job_description(
    script: str,
    *,
    environment: Mapping[str, str],
    cwd: str,
    after_any: str | None = None,
    submit_host: str | None = None,
) -> dict[str, Any]:
    """The ``job`` object of ``POST /slurm/<ver>/job/submit`` for a script with #SBATCH lines.

    Later directives override earlier ones, as with sbatch; ``after_any`` overrides the script's
    --dependency, as sbatch's command line does. ``cwd`` is the submit directory (and the job's
    working directory unless --chdir says otherwise).
    """
    # --uid/--gid are no job description fields: slurmrestd runs a job as the user whose token
    # submits it (submit_user), with that user's primary group.
    job, export = map_directives(script, SBATCH_OPTIONS, SBATCH_FLAGS)
    if after_any:
        job["dependency"] = f"afterany:{after_any}"
    job.setdefault("current_working_directory", cwd)
    job["environment"] = job_environment(
        export, environment, cpus_per_task=job.get("cpus_per_task"), submit_dir=cwd, submit_host=submit_host
    )
    return job


# --- the backend ----------------------------------------------------------------------------------


class SlurmRestBackend:
    """Talk to Slurm through slurmrestd (JWT auth)."""

    def __init__(
        self,
        base_url: str,
        user: str,
        token_provider: TokenProvider,
        session: requests.Session | None = None,
        api_version: str = DEFAULT_API_VERSION,
        timeout: float = 30.0,
        *,
        environment: Mapping[str, str] | None = None,
        cwd: str | None = None,
        runner: Runner = run_command,
        remember: int = 10000,
        use_update_time: bool = False,
        max_cache_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``environment``/``cwd``: what jobs get (default: this process's, as sbatch does).
        ``runner`` runs `sbatch --test-only`. ``remember``: how many final job records to keep.
        ``use_update_time``: send ``?update_time`` and reuse the last answer on 304, for at most
        ``max_cache_age`` seconds (see ``_live_jobs`` for why it is off by default)."""
        self.base_url = base_url.rstrip("/")
        self.user = user
        self.tokens = token_provider
        self.session = session or requests.Session()
        self.api_version = api_version
        self.timeout = timeout
        self._environment = environment
        self._cwd = cwd
        self._run = runner
        # Final records seen in slurmctld, kept after the job leaves its memory (MinJobAge):
        # their exit codes are right, slurmdbd's are not (22.05).
        self._final: OrderedDict[str, SlurmJobInfo] = OrderedDict()
        self._remember = remember
        # The last full /jobs answer, the slurmctld-clock time it is current from and when we got it.
        self._use_update_time = use_update_time
        self._max_cache_age = max_cache_age
        self._clock = clock
        self._live: dict[str, SlurmJobInfo] | None = None
        self._live_stamp = 0
        self._live_fetched = 0.0
        # The poller thread and request threads share the backend and its caches.
        self._lock = threading.Lock()
        # Tokens of the accounts jobs run as (#SBATCH --uid), minted like the backend's own.
        self._user_tokens: dict[str, TokenProvider] = {}

    # -- HTTP ---------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _tokens_for(self, user: str) -> TokenProvider:
        with self._lock:
            if user not in self._user_tokens:
                self._user_tokens[user] = self.tokens.for_user(user)
            return self._user_tokens[user]

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200,),
        as_user: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one request (as ``as_user``, default this backend's user); return (status, JSON).

        Every failure becomes one SlurmRestError.
        """
        url = self._url(path)
        user, tokens = (self.user, self.tokens) if as_user in (None, self.user) else (as_user, self._tokens_for(as_user))
        # GET and DELETE are safe to repeat once with a fresh token; a submit is not.
        attempts = 2 if method in ("GET", "DELETE") else 1
        for attempt in range(attempts):
            headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": tokens.token()}
            try:
                response = self.session.request(
                    method, url, params=params, json=body, headers=headers, timeout=self.timeout
                )
            except requests.RequestException as exc:
                raise SlurmRestError(
                    f"slurmrestd {method} {url} failed: {exc}", method=method, url=url, status=None, transient=True
                ) from exc
            status = response.status_code
            payload = _json(response)
            errors = [dict(e) for e in payload.get("errors") or [] if isinstance(e, Mapping)]
            if status in ok:
                return status, payload
            rejected_token = status == 401 or (status == 500 and errors and all(_errno(e) == _UNSPECIFIED for e in errors))
            if rejected_token:
                # 401: no/unknown token; 22.05 answers an expired or bad one with 500 and error -1.
                tokens.invalidate()
                if attempt + 1 < attempts:
                    log.info("slurmrestd %s %s: HTTP %d, retrying with a fresh token", method, url, status)
                    continue
            detail = _error_text(errors) or (response.text or "").strip()[:300]
            transient = status in (502, 503, 504) or any(_errno(e) in TRANSIENT_ERRNOS for e in errors) or bool(
                TRANSIENT_TEXT.search(detail)
            )
            raise SlurmRestError(
                f"slurmrestd {method} {url}: HTTP {status}" + (f": {detail}" if detail else ""),
                method=method,
                url=url,
                status=status,
                errors=errors,
                transient=transient,
            )
        raise AssertionError("unreachable")

    # -- SchedulerBackend -------------------------------------------------------------------------

    def submit(
        self, script: str, *, environment: Mapping[str, str] | None = None, after_any: str | None = None
    ) -> str:
        """Submit with the script's #SBATCH options mapped into the job description.

        The job inherits this backend's environment (default: the gateway's, like sbatch's
        --export=ALL) plus ``environment``. ``after_any`` (not in the Protocol) overrides the
        script's --dependency with ``afterany:<id>``.
        """
        base = dict(os.environ) if self._environment is None else dict(self._environment)
        base.update(environment or {})
        job = job_description(script, environment=base, cwd=self._cwd or os.getcwd(), after_any=after_any)
        # A job runs as the user whose token submits it: --uid becomes a token minted for that user.
        _, payload = self._request(
            "POST", f"slurm/{self.api_version}/job/submit", body={"script": script, "job": job}, as_user=submit_user(script)
        )
        job_id = payload.get("job_id")
        if not isinstance(job_id, int):
            raise SchedulerError(f"slurmrestd accepted the job but returned no job id: {str(payload)[:300]}")
        message = payload.get("job_submit_user_msg")
        if message:
            log.info("job %s: job_submit says %s", job_id, message)
        return str(job_id)

    def status(self, job_ids: Iterable[str]) -> dict[str, SlurmJobInfo]:
        """One GET /slurm/<ver>/jobs for all; one GET /slurmdb/<ver>/jobs?step= for ids that
        slurmctld no longer knows and this backend did not see end."""
        ids = sorted({str(i) for i in job_ids if i}, key=int)
        if not ids:
            return {}
        live = self._live_jobs()
        found: dict[str, SlurmJobInfo] = {}
        for job_id in ids:
            info = live.get(job_id)
            if info is not None:
                found[job_id] = info
                if info.state.is_terminal:
                    self._keep_final(info)
            elif (remembered := self._remembered(job_id)) is not None:
                found[job_id] = remembered
        missing = [i for i in ids if i not in found]
        if missing:
            accounted = self._accounting(missing)
            found.update({i: accounted[i] for i in missing if i in accounted})
        return found

    def find_by_name(self, name: str, *, since: float) -> list[str]:
        ids = sorted((i for i, info in self._live_jobs().items() if info.name == name), key=int)
        if ids:
            return ids
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
        _, payload = self._request(
            "GET",
            f"slurmdb/{self.api_version}/jobs",
            params={"job_name": name, "submit_time": start, "skip_steps": "true"},
        )
        return sorted(parse_slurmdb_jobs(payload), key=int)

    def cancel(self, job_id: str) -> None:
        try:
            self._request("DELETE", f"slurm/{self.api_version}/job/{job_id}")
        except SlurmRestError as exc:
            # Unlike scancel (exit 0), slurmrestd answers 500 for an unknown or purged id.
            if exc.has_errno(_INVALID_JOB_ID, _ALREADY_DONE):
                log.info("cancel %s: Slurm no longer knows the job", job_id)
                return
            raise

    def release(self, job_id: str) -> None:
        # A rare admin action (a held job after a failed launch): scontrol on this host, as test_only asks sbatch.
        release_with_scontrol(self._run, self.timeout, job_id)

    def usage(self, job_ids: Iterable[str]) -> dict[str, SlurmUsage]:
        """What the jobs used, from slurmdbd through slurmrestd: one GET, steps included, so a
        gateway with this backend needs no Slurm client for usage (the container image has none)."""
        ids = sorted({str(i) for i in job_ids if i}, key=lambda i: int(i) if i.isdigit() else 0)
        if not ids:
            return {}
        _, payload = self._request("GET", f"slurmdb/{self.api_version}/jobs", params={"step": ",".join(ids)})
        return parse_slurmdb_usage(payload)

    def test_only(self, script: str) -> str:
        # slurmrestd 22.05 has no test-only endpoint (job/submit always submits), so ask sbatch on
        # this host; without the Slurm client installed this is a clear SchedulerError.
        return sbatch_test_only(self._run, script, self.timeout, backend="REST")

    def ping(self) -> bool:
        try:
            _, payload = self._request("GET", f"slurm/{self.api_version}/ping")
        except SchedulerError as exc:
            log.info("slurmrestd ping failed: %s", exc.message)
            return False
        pings = payload.get("pings") or []
        return any(isinstance(p, Mapping) and p.get("ping") == "UP" for p in pings)

    # -- helpers ----------------------------------------------------------------------------------

    def _live_jobs(self) -> dict[str, SlurmJobInfo]:
        """All jobs slurmctld knows, from one GET (one RPC to slurmctld either way).

        With ``use_update_time`` the GET carries ``?update_time=<stamp>`` and a 304 reuses the last
        answer, which spares slurmctld packing every job. The stamp must be on slurmctld's clock
        (the answer has no Date header), so it is the newest past event in the last answer; a
        change in that same second but after our GET would hide behind a 304 until the next
        change, so a cached answer is never reused for longer than ``max_cache_age``.
        """
        with self._lock:
            cached = self._live
            params = None
            if (
                self._use_update_time
                and cached is not None
                and self._live_stamp > 0
                and self._clock() - self._live_fetched < self._max_cache_age
            ):
                params = {"update_time": self._live_stamp}
        status, payload = self._request("GET", f"slurm/{self.api_version}/jobs", params=params, ok=(200, 304))
        if status == 304 and cached is not None:
            return cached
        live = parse_slurm_jobs(payload)
        with self._lock:
            self._live = live
            self._live_stamp = _server_stamp(payload)
            self._live_fetched = self._clock()
        return live

    def _accounting(self, ids: list[str]) -> dict[str, SlurmJobInfo]:
        _, payload = self._request(
            "GET",
            f"slurmdb/{self.api_version}/jobs",
            params={"step": ",".join(ids), "skip_steps": "true"},
        )
        return parse_slurmdb_jobs(payload)

    def _keep_final(self, info: SlurmJobInfo) -> None:
        with self._lock:
            self._final[info.job_id] = info
            self._final.move_to_end(info.job_id)
            while len(self._final) > self._remember:
                self._final.popitem(last=False)

    def _remembered(self, job_id: str) -> SlurmJobInfo | None:
        with self._lock:
            return self._final.get(job_id)


def _json(response: requests.Response) -> dict[str, Any]:
    if response.status_code == 304 or not response.content:
        return {}
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _server_stamp(payload: Mapping[str, Any]) -> int:
    """The newest past event in a /jobs answer, on slurmctld's clock (the answer has no Date).

    ``update_time`` is compared with slurmctld's last job change, so a stamp from the gateway's
    clock could hide changes when the clocks differ. Only past events count: a pending job's
    start_time and a running job's end_time are estimates in the future. 0 disables update_time.
    """
    stamp = 0
    for job in payload.get("jobs") or []:
        if not isinstance(job, Mapping):
            continue
        state = SlurmState.parse(str(job.get("job_state") or ""))
        candidates = [job.get("submit_time")]
        if state != SlurmState.PENDING:
            candidates.append(job.get("start_time"))
        if state.is_terminal:
            candidates.append(job.get("end_time"))
        for value in candidates:
            if isinstance(value, int) and 0 < value < NO_VAL:
                stamp = max(stamp, value)
    return stamp
