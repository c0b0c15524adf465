"""A client generated from the served spec with openapi-python-client, no hand edits (issue 17):
a portal's script using it passes ``mypy --strict`` (status is the JobState enum, required fields
are not Optional) and runs against the app.

The generator runs once per test session, offline, on the spec as the app serves it;
tests/integration/test_generated_client.py uses the same helpers against the real stack.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import httpx
import pytest
from flask import Flask

from gateway import create_app
from tests.conftest import TEST_SCRYPT_N, valid_request

PACKAGE = "relion_gateway_client"
BIN = Path(sys.executable).parent
# No post hooks (they would run ruff), and the preview PNGs as bytes: the generator reads only JSON,
# text and application/octet-stream bodies.
CONFIG = f"""project_name_override: relion-gateway-client
package_name_override: {PACKAGE}
post_hooks: []
content_type_overrides:
  image/png: application/octet-stream
"""

# What a portal developer writes: every line type-checked against the generated client.
PORTAL = '''"""A portal's use of the generated client."""
from __future__ import annotations

from typing import Any

import httpx

from relion_gateway_client import AuthenticatedClient
from relion_gateway_client.types import UNSET
from relion_gateway_client.api.jobs import cancel_job, get_job, get_job_metadata, list_jobs, submit_job
from relion_gateway_client.models import Error, Job, JobList, JobMetadata, JobRequest, JobRequestFlags, JobState, JobSummary, Mode


def connect(base_url: str, token: str, transport: httpx.BaseTransport | None = None) -> AuthenticatedClient:
    return AuthenticatedClient(base_url=base_url, token=token, httpx_args={"transport": transport} if transport else {})


def submit(client: AuthenticatedClient, request: dict[str, Any]) -> Job:
    body = JobRequest(
        user_id=request["user_id"],
        workspace_id=request["workspace_id"],
        output_s3_prefix=request["output_s3_prefix"],
        mode=Mode(request["mode"]),
        dataset_s3_url=request["dataset_s3_url"],
        num_mpi=request.get("num_mpi", 1),
        flags=JobRequestFlags.from_dict(request["flags"]),
    )
    job = submit_job.sync(client=client, body=body)
    if not isinstance(job, Job):
        raise RuntimeError(f"refused: {job.message if isinstance(job, Error) else job}")
    return job


def status(client: AuthenticatedClient, job_id: str) -> JobState:
    job = get_job.sync(client=client, job_id=job_id)
    if not isinstance(job, Job):
        raise RuntimeError(f"no job {job_id}")
    # Required fields, no None checks: a str, a float, a datetime.
    seen: str = job.job_id + job.user_id + job.workspace_id + job.links.self_
    accepted: float = job.accepted_at
    year: int = job.times.accepted_at.year + job.times.updated_at.year
    assert seen and accepted > 0 and year > 0 and job.mode in Mode
    return job.status


def cancel(client: AuthenticatedClient, job_id: str) -> JobState | None:
    """The job's state after DELETE; None when refused (a 409: it had already ended)."""
    job = cancel_job.sync(client=client, job_id=job_id)
    return job.status if isinstance(job, Job) else None


def ended(state: JobState) -> bool:
    return state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.OUT_OF_MEMORY,
                     JobState.NODE_FAIL, JobState.SUBMIT_FAILED, JobState.ARCHIVE_FAILED, JobState.LOST)


def metadata(client: AuthenticatedClient, job_id: str) -> JobMetadata | None:
    """metadata.json as its typed model; None while there is none (a 404)."""
    got = get_job_metadata.sync(client=client, job_id=job_id)
    return got if isinstance(got, JobMetadata) else None


def jobs(client: AuthenticatedClient, page_size: int = 50, user_id: str | None = None) -> tuple[list[JobSummary], int, str | None]:
    states = [JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED]
    page = list_jobs.sync(client=client, page_size=page_size, state=states, mode=Mode.MODE_2D, user_id=user_id or UNSET)
    if not isinstance(page, JobList):
        raise RuntimeError("no list")
    summaries: list[JobSummary] = page.jobs
    total: int = page.total
    return summaries, total, page.next_
'''


def generate_client(spec: dict[str, Any], where: Path) -> Path:
    """The generated package (and portal.py) under ``where``, from ``spec``; raises on any generator warning."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "openapi.json").write_text(json.dumps(spec))
    (where / "config.yaml").write_text(CONFIG)
    argv = [str(BIN / "openapi-python-client"), "generate", "--path", str(where / "openapi.json"), "--output-path",
            str(where / PACKAGE), "--meta", "none", "--config", str(where / "config.yaml"), "--overwrite"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=where, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "warning" not in said.lower(), said
    (where / "portal.py").write_text(PORTAL)
    return where


def mypy_strict(where: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "mypy"), "--strict", "--no-error-summary", "--cache-dir", str(where / ".mypy_cache"), "portal.py", PACKAGE]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=where, check=False)


def load_portal(where: Path) -> ModuleType:
    """portal.py and the generated package, imported from ``where``."""
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    for name in [n for n in sys.modules if n == "portal" or n.split(".")[0] == PACKAGE]:
        del sys.modules[name]  # another session's (or the other test file's) generated copy
    return importlib.import_module("portal")


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One generation per session, from the spec of an app configured as the unit tests' are."""
    root = tmp_path_factory.mktemp("generated-client")
    app = create_app({"TESTING": True, "PATHS_STATE_DIR": str(root / "state"), "PATHS_WORKSPACE_ROOT": "", "PATHS_LOG_ROOT": "",
                      "STORE_DATABASE_URL": "", "AUTH_SCRYPT_N": TEST_SCRYPT_N})
    spec = app.test_client().get("/v1/relion/openapi.json").json
    yield generate_client(spec, root / "client")


def test_the_generated_client_type_checks_strictly(generated: Path) -> None:
    result = mypy_strict(generated)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_generated_client_types_the_job(generated: Path) -> None:
    job = (generated / PACKAGE / "models" / "job.py").read_text()
    for line in ("    status: JobState", "    job_id: str", "    times: JobTimes", "    links: JobLinks", "    accepted_at: float",
                 "    metadata: JobMetadata | None", "    attempts: list[Attempt]"):
        assert f"\n{line}\n" in job, line
    summary = (generated / PACKAGE / "models" / "job_summary.py").read_text()
    assert "\n    status: JobState\n" in summary and "metadata" not in summary
    assert "accepted_at: datetime.datetime" in (generated / PACKAGE / "models" / "job_times.py").read_text()
    assert '    code: int\n    status: str\n    message: str\n' in (generated / PACKAGE / "models" / "error.py").read_text()


def test_the_generated_client_submits_reads_and_lists(generated: Path, app: Flask) -> None:
    portal = load_portal(generated)
    client = portal.connect("http://gateway.test/v1/relion", app.config["TEST_TOKENS"]["alice"], httpx.WSGITransport(app=app))
    ids = [portal.submit(client, valid_request(workspace_id=f"gen{i}")).job_id for i in range(3)]
    assert portal.status(client, ids[0]) is portal.JobState.QUEUED
    summaries, total, following = portal.jobs(client, page_size=2)
    assert total == 3 and [s.job_id for s in summaries] == ids[::-1][:2] and following is not None and "page=2" in following
    assert portal.metadata(client, ids[0]) is None  # a 404 (the Error model) until it is archived
    assert portal.cancel(client, ids[0]) in (portal.JobState.CANCELLED, portal.JobState.QUEUED)
