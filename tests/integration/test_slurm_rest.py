"""SlurmRestBackend against the real slurmrestd of the local stack (`stack up --with-rest`)."""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.slurm.backend import SlurmJobInfo
from gateway.slurm.rest import SlurmRestBackend
from gateway.slurm.states import SlurmState
from gateway.slurm.tokens import TokenProvider

pytestmark = pytest.mark.integration


class CountingSession(requests.Session):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.count += 1
        return super().request(*args, **kwargs)


@pytest.fixture(scope="session")
def rest_stack() -> dict[str, Any]:
    from gateway.stack import stack_up

    # Idempotent; the first run on a machine installs slurmrestd and restarts the Slurm daemons once.
    status = stack_up(with_rest=True)
    assert status["all_up"], status
    assert status["slurmrestd"]["enabled"] and status["daemons"]["slurmrestd"]["state"] == "up"
    return status


@pytest.fixture
def session() -> CountingSession:
    return CountingSession()


@pytest.fixture
def rest(rest_stack: dict[str, Any], session: CountingSession) -> SlurmRestBackend:
    url = rest_stack["slurmrestd"]["url"]
    return SlurmRestBackend(url, "root", TokenProvider("root", lifespan=600), session=session, timeout=10.0)


def script(tag: str, body: str, *extra: str) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name=rest-it-{tag}", f"#SBATCH --comment='rest it {tag}'",
             "#SBATCH --output=/dev/null", *(f"#SBATCH {e}" for e in extra), body, ""]
    return "\n".join(lines)


def wait_for(rest: SlurmRestBackend, ids: list[str], done: Callable[[dict[str, SlurmJobInfo]], bool],
              timeout: float = 30.0) -> tuple[dict[str, SlurmJobInfo], list[dict[str, SlurmJobInfo]]]:
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        found = rest.status(ids)
        seen.append(found)
        if done(found) or time.monotonic() > deadline:
            return found, seen
        time.sleep(0.3)


def test_ping(rest: SlurmRestBackend) -> None:
    assert rest.ping() is True


def test_jobs_run_fail_and_cancel(rest: SlurmRestBackend, session: CountingSession, tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    seen_env = tmp_path / "env.txt"
    tmp_path.chmod(0o755)
    ok = rest.submit(
        script(f"{tag}-ok", f'echo "$REST_IT_MARK $SLURM_CPUS_PER_TASK" > {seen_env}; sleep 2', "--ntasks=2",
               "--cpus-per-task=2", "--partition=long", "--time=00:02:00", "--mem-per-cpu=100M"),
        environment={"REST_IT_MARK": tag},
    )
    bad = rest.submit(script(f"{tag}-bad", "exit 3"))
    long = rest.submit(script(f"{tag}-long", "sleep 60"))
    assert rest.find_by_name(f"rest-it-{tag}-ok", since=time.time() - 5) == [ok]

    before = session.count
    found = rest.status([ok, bad, long])
    assert session.count - before == 1  # one GET /slurm/v0.0.38/jobs for all three

    # The #SBATCH lines reached slurmctld (slurmrestd 22.05 ignores them in `script`).
    raw = session.get(f"{rest.base_url}/slurm/v0.0.38/job/{ok}",
                      headers={"X-SLURM-USER-NAME": "root", "X-SLURM-USER-TOKEN": rest.tokens.token()}, timeout=10).json()
    (job,) = raw["jobs"]
    assert (job["name"], job["comment"], job["partition"], job["tasks"], job["time_limit"], job["memory_per_cpu"]) == (
        f"rest-it-{tag}-ok", f"rest it {tag}-ok", "long", 2, 2, 100)

    time.sleep(0.5)
    rest.cancel(long)
    rest.cancel(long)  # twice: still fine
    final, seen = wait_for(rest, [ok, bad, long], lambda f: all(f[i].state.is_terminal for i in (ok, bad, long)))
    assert any(s[ok].state == SlurmState.RUNNING for s in [found, *seen])
    assert (final[ok].state, final[ok].exit_code) == (SlurmState.COMPLETED, 0)
    assert final[ok].name == f"rest-it-{tag}-ok" and final[ok].comment == f"rest it {tag}-ok"
    assert (final[bad].state, final[bad].exit_code, final[bad].signal) == (SlurmState.FAILED, 3, 0)
    assert final[long].state == SlurmState.CANCELLED
    # The job got the per-job environment, and SLURM_CPUS_PER_TASK as sbatch would set it.
    assert seen_env.read_text().split() == [tag, "2"]


def test_unknown_ids_are_absent_and_cancel_is_quiet(rest: SlurmRestBackend) -> None:
    assert rest.status(["987654321"]) == {}
    rest.cancel("987654321")
