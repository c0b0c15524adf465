"""The slurmrestd backend against answers recorded from slurmrestd 22.05.8 (tests/fixtures/slurmrestd),
its token refresh, #SBATCH mapping and wait-status decoding; the factory; the --with-rest stack bits."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.process import CommandError
from gateway.slurm.backend import SchedulerError
from gateway.slurm.cli import SlurmCliBackend
from gateway.slurm.directives import SBATCH_OPTIONS, parse_memory_mb, sbatch_directives
from gateway.slurm.factory import BACKENDS, DEFAULTS, make_scheduler
from gateway.stack.nodes import plan_topology
from gateway.slurm.pyslurm_backend import PyslurmBackend
from gateway.slurm.rest import SlurmRestBackend, SlurmRestError, job_description
from gateway.slurm.rest_json import (
    decode_db_exit_code,
    decode_wait_status,
    parse_slurm_jobs,
    parse_slurmdb_jobs,
)
from gateway.slurm.states import SlurmState
from gateway.slurm.times import parse_time_limit
from gateway.slurm.tokens import TokenProvider, parse_scontrol_token

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "slurmrestd"
IDS = {key: str(value) for key, value in json.loads((FIXTURES / "ids.json").read_text()).items()}
URL = "http://127.0.0.1:6820"


def fixture(name: str) -> tuple[int, Any]:
    data = json.loads((FIXTURES / name).read_text())
    return data["status"], data["body"]


# --- fakes ----------------------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        if isinstance(body, dict) and set(body) == {"text"}:
            self.text = body["text"]  # slurmrestd's plain-text answers (401, some 400s)
        else:
            self.text = "" if body is None else json.dumps(body)
        self.content = self.text.encode()

    def json(self) -> Any:
        return json.loads(self.text)


Route = Callable[[str, str, Mapping[str, Any] | None, Any], tuple[int, Any]]


class FakeSession:
    """Stands in for requests.Session: records each request, answers from a route function."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.calls: list[dict[str, Any]] = []

    def request(self, method: str, url: str, *, params: Any = None, json: Any = None, headers: Any = None,
                timeout: float | None = None) -> FakeResponse:
        self.calls.append({"method": method, "url": url, "params": params, "json": json, "headers": headers,
                           "timeout": timeout})
        status, body = self.route(method, url.removeprefix(URL), params, json)
        return FakeResponse(status, body)

    def paths(self) -> list[str]:
        return [f"{c['method']} {c['url'].removeprefix(URL)}" for c in self.calls]


class FakeTokens(TokenProvider):
    def __init__(self) -> None:
        super().__init__("root", runner=self._mint_fake)
        self.minted = 0

    def _mint_fake(self, argv: Sequence[str], **_: Any) -> str:
        self.minted += 1
        return f"SLURM_JWT=token{self.minted}\n"


def backend(route: Route, **kwargs: Any) -> tuple[SlurmRestBackend, FakeSession, FakeTokens]:
    session = FakeSession(route)
    tokens = FakeTokens()
    rest = SlurmRestBackend(URL, "root", tokens, session=session,  # type: ignore[arg-type]
                            environment={"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "AK"}, cwd="/srv/gw", **kwargs)
    return rest, session, tokens


def recorded(method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> tuple[int, Any]:
    """Route to the recorded answers."""
    if path == "/slurm/v0.0.38/ping":
        return fixture("ping.json")
    if path == "/slurm/v0.0.38/jobs":
        return fixture("slurm_jobs.json")
    if path == "/slurmdb/v0.0.38/jobs":
        return fixture("slurmdb_jobs.json")
    if path == "/slurm/v0.0.38/job/submit":
        return fixture("submit_ok.json")
    if method == "DELETE" and path == "/slurm/v0.0.38/job/999999":
        return fixture("cancel_invalid.json")
    if method == "DELETE":
        return fixture("cancel_ended.json")
    raise AssertionError(f"unexpected {method} {path}")


# --- tokens ---------------------------------------------------------------------------------------


def test_parse_scontrol_token() -> None:
    assert parse_scontrol_token("SLURM_JWT=eyJhbGciOi.x.y\n") == "eyJhbGciOi.x.y"
    with pytest.raises(SchedulerError, match="no SLURM_JWT"):
        parse_scontrol_token("scontrol: error: JWT authentication not configured\n")


def test_token_is_reused_then_refreshed_when_less_than_a_fifth_of_its_life_remains() -> None:
    now = [1000.0]
    argvs: list[list[str]] = []

    def runner(argv: Sequence[str], **_: Any) -> str:
        argvs.append(list(argv))
        return f"SLURM_JWT=t{len(argvs)}\n"

    tokens = TokenProvider("alice", lifespan=100, runner=runner, clock=lambda: now[0])
    assert tokens.token() == "t1"
    assert argvs == [["scontrol", "token", "username=alice", "lifespan=100"]]
    now[0] += 79  # 21 s left: still more than 20 %
    assert tokens.token() == "t1"
    now[0] += 2  # 19 s left
    assert tokens.token() == "t2"
    tokens.invalidate()
    assert tokens.token() == "t3" and len(argvs) == 3


def test_token_failure_is_a_scheduler_error() -> None:
    def runner(argv: Sequence[str], **_: Any) -> str:
        raise CommandError(argv, 1, "", "scontrol: error: JWT authentication not configured")

    with pytest.raises(SchedulerError, match="JWT authentication not configured") as info:
        TokenProvider("root", runner=runner).token()
    assert not info.value.transient


def test_token_lifespan_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenProvider("root", lifespan=0)


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, (0, 0)),
        (256, (1, 0)),  # exit 1, as the 22.05 JSON shows it
        (768, (3, 0)),
        (255 << 8, (255, 0)),
        (9, (0, 9)),  # SIGKILL
        (15, (0, 15)),
        (0x80 | 11, (0, 11)),  # SIGSEGV with core dump
        (0x7F | (19 << 8), (None, None)),  # stopped, not ended
        (4294967294, (None, None)),  # NO_VAL
        (None, (None, None)),
    ],
)
def test_decode_wait_status(raw: int | None, expected: tuple[int | None, int | None]) -> None:
    assert decode_wait_status(raw) == expected


def test_parse_recorded_slurmctld_jobs() -> None:
    jobs = parse_slurm_jobs(fixture("slurm_jobs.json")[1])
    assert set(jobs) == set(IDS.values())
    done, failed, killed = jobs[IDS["completed"]], jobs[IDS["exit3"]], jobs[IDS["signal9"]]
    assert (done.state, done.exit_code, done.signal, done.source) == (SlurmState.COMPLETED, 0, 0, "squeue")
    assert (failed.state, failed.exit_code, failed.signal) == (SlurmState.FAILED, 3, 0)  # raw 768
    assert failed.reason == "NonZeroExitCode" and failed.name == "rec_exit3" and failed.comment == "rec:rec_exit3"
    assert (killed.exit_code, killed.signal) == (0, 9)
    assert jobs[IDS["cancelled"]].state == SlurmState.CANCELLED
    running = jobs[IDS["running"]]
    assert running.state == SlurmState.RUNNING and running.exit_code is None and running.end == "Unknown"
    pending = jobs[IDS["pending"]]
    assert pending.describe() == "PENDING (Dependency)" and pending.start == "Unknown"
    assert failed.start.count("T") == 1 and failed.elapsed == "00:00:01"


def test_parse_recorded_slurmdbd_jobs_trusts_only_what_22_05_gets_right() -> None:
    jobs = parse_slurmdb_jobs(fixture("slurmdb_jobs.json")[1])
    assert {i: j.source for i, j in jobs.items()} == {IDS[k]: "sacct" for k in ("completed", "exit3", "signal9", "cancelled")}
    assert (jobs[IDS["completed"]].exit_code, jobs[IDS["completed"]].signal) == (0, 0)
    # Recorded: {"status": "SUCCESS", "return_code": 0} for a job that ran `exit 3`.
    assert jobs[IDS["exit3"]].state == SlurmState.FAILED and jobs[IDS["exit3"]].exit_code is None
    assert (jobs[IDS["signal9"]].exit_code, jobs[IDS["signal9"]].signal) == (0, 9)
    assert jobs[IDS["cancelled"]].comment == "rec:rec_cancel"


def test_db_exit_code_error_status_carries_the_code() -> None:
    assert decode_db_exit_code({"status": "ERROR", "return_code": 2}, SlurmState.FAILED) == (2, 0)
    assert decode_db_exit_code({"status": "PENDING"}, SlurmState.PENDING) == (None, None)
    assert decode_db_exit_code(None, SlurmState.FAILED) == (None, None)


def test_requeued_job_keeps_its_latest_accounting_record() -> None:
    def record(submitted: int, state: str) -> dict[str, Any]:
        return {"job_id": 7, "name": "j", "state": {"current": state, "reason": "None"},
                "exit_code": {"status": "SUCCESS", "return_code": 0}, "time": {"submission": submitted}}

    jobs = parse_slurmdb_jobs({"jobs": [record(20, "COMPLETED"), record(10, "NODE_FAIL")]})
    assert jobs["7"].state == SlurmState.COMPLETED


# --- #SBATCH lines ---------------------------------------------------------------------------------

GOLDEN = (ROOT / "tests" / "golden" / "2d.main.sbatch").read_text()


def test_golden_script_maps_every_directive() -> None:
    job = job_description(GOLDEN, environment={"PATH": "/bin", "AWS_ACCESS_KEY_ID": "AK"}, cwd="/srv/gw", submit_host="gw")
    assert job["name"] == "job_2d_ws1_0123abcd"
    assert job["comment"] == "relion-gateway:job_2d_ws1_0123abcd"
    assert (job["tasks"], job["cpus_per_task"], job["memory_per_cpu"], job["time_limit"]) == (3, 1, 1000, 60)
    assert job["partition"] == "debug"
    assert job["standard_output"] == "/scratch/relion-gateway/logs/alice/job_2d_ws1_0123abcd/main-%j.out"
    assert job["standard_error"].endswith("/main-%j.err")
    assert job["current_working_directory"] == "/srv/gw"
    # --export names what a job gets: the S3 key of the gateway's environment stays behind.
    assert job["environment"] == {"PATH": "/bin", "SLURM_CPUS_PER_TASK": "1",
                                  "SLURM_SUBMIT_DIR": "/srv/gw", "SLURM_SUBMIT_HOST": "gw"}
    assert "dependency" not in job


def test_directives_are_read_like_sbatch_reads_them() -> None:
    script = (
        "#!/bin/bash\n"
        "# a comment line does not end the directives\n"
        "#SBATCH --job-name='a b#c' --comment=\"x y\"  # trailing comment\n"
        "#SBATCH -n 4 -c2 -p long -t 1-02:03:04 --mem=2G\n"
        "#SBATCH --dependency afterok:5 --no-requeue -D /work --export=NONE,A=1\n"
        "#SBATCHED is not a directive\n"
        "\n"
        "echo hi\n"
        "#SBATCH --partition=ignored-after-the-first-command\n"
    )
    assert sbatch_directives(script)[:2] == ["--job-name=a b#c", "--comment=x y"]
    job = job_description(script, environment={"PATH": "/p", "SECRET": "s"}, cwd="/srv", after_any="9", submit_host="h")
    assert (job["name"], job["comment"], job["tasks"], job["cpus_per_task"]) == ("a b#c", "x y", 4, 2)
    assert job["partition"] == "long" and job["time_limit"] == 1 * 1440 + 2 * 60 + 3 + 1
    assert job["memory_per_node"] == 2048 and job["requeue"] is False
    assert job["dependency"] == "afterany:9"  # the caller's after_any wins, as on sbatch's command line
    assert job["current_working_directory"] == "/work"
    assert job["environment"] == {"A": "1", "PATH": "/p", "SLURM_CPUS_PER_TASK": "2", "SLURM_SUBMIT_DIR": "/srv",
                                  "SLURM_SUBMIT_HOST": "h"}


@pytest.mark.parametrize("line", ["#SBATCH --array=1-3", "#SBATCH --wrap=hostname", "#SBATCH -w node1", "#SBATCH --time"])
def test_unmapped_or_broken_directive_is_refused_loudly(line: str) -> None:
    with pytest.raises(SchedulerError, match="#SBATCH"):
        job_description(f"#!/bin/bash\n{line}\ntrue\n", environment={}, cwd="/")


@pytest.mark.parametrize(
    ("spec", "minutes"),
    [("30", 30), ("0:30", 1), ("1:30", 2), ("01:00:00", 60), ("2-0", 2880), ("1-1:1", 1501), ("0:0:1", 1)],
)
def test_time_limit(spec: str, minutes: int) -> None:
    assert parse_time_limit(spec) == minutes


@pytest.mark.parametrize(("spec", "mb"), [("1000", 1000), ("1000M", 1000), ("2G", 2048), ("1536K", 2), ("1T", 1048576)])
def test_memory(spec: str, mb: int) -> None:
    assert parse_memory_mb(spec) == mb


@pytest.mark.parametrize("spec", ["UNLIMITED", "1:2:3:4", "abc"])
def test_bad_time_limit(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_time_limit(spec)


def test_pyslurm_maps_the_same_options() -> None:
    from gateway.slurm.directives import SBATCH_FLAGS
    from gateway.slurm.pyslurm_backend import PYSLURM_FLAGS, PYSLURM_OPTIONS

    assert set(PYSLURM_OPTIONS) == set(SBATCH_OPTIONS) and set(PYSLURM_FLAGS) == set(SBATCH_FLAGS)


# --- the backend ----------------------------------------------------------------------------------


def test_submit_sends_script_and_mapped_job_with_jwt_headers() -> None:
    rest, session, _ = backend(recorded)
    job_id = rest.submit(GOLDEN, environment={"RELION_GATEWAY_JOB_TOKEN": "t0k"}, after_any="41")
    assert job_id == str(fixture("submit_ok.json")[1]["job_id"])
    call = session.calls[0]
    assert call["method"] == "POST" and call["url"] == f"{URL}/slurm/v0.0.38/job/submit"
    assert call["headers"] == {"X-SLURM-USER-NAME": "root", "X-SLURM-USER-TOKEN": "token1"}
    assert call["json"]["script"] == GOLDEN
    job = call["json"]["job"]
    assert job["dependency"] == "afterany:41" and job["tasks"] == 3
    # The script's --export lists what a job gets: never the gateway's S3 keys.
    assert "AWS_ACCESS_KEY_ID" not in job["environment"] and job["environment"]["PATH"] == "/usr/bin:/bin"
    assert job["environment"]["RELION_GATEWAY_JOB_TOKEN"] == "t0k"  # the per-job additions
    assert call["timeout"] == 30.0


def test_archive_script_dependency_comes_from_its_directive() -> None:
    archive = (ROOT / "tests" / "golden" / "2d.archive.sbatch").read_text().replace("MAIN_JOB_ID", "77")
    rest, session, _ = backend(recorded)
    rest.submit(archive)
    job = session.calls[0]["json"]["job"]
    assert job["dependency"] == "afterany:77" and job["name"] == "job_2d_ws1_0123abcd.archive"
    assert job["cpus_per_task"] == 2 and job["environment"]["SLURM_CPUS_PER_TASK"] == "2"


@pytest.mark.parametrize(
    ("name", "message", "status"),
    [("submit_too_many_cpus.json", "More processors requested than permitted", 500),
     ("submit_no_environment.json", "environment must be set", 400)],
)
def test_submit_refusal_names_url_status_and_slurm_error(name: str, message: str, status: int) -> None:
    rest, session, tokens = backend(lambda *_: fixture(name))
    with pytest.raises(SlurmRestError, match=message) as info:
        rest.submit("#!/bin/bash\ntrue\n")
    err = info.value
    assert err.status == status and err.url == f"{URL}/slurm/v0.0.38/job/submit" and not err.transient
    assert f"HTTP {status}" in err.message and err.argv == ["POST", err.url]
    assert len(session.calls) == 1 and tokens.minted == 1  # a submit is never repeated


def test_status_is_one_slurmctld_call_when_all_jobs_are_live() -> None:
    rest, session, _ = backend(recorded)
    found = rest.status([IDS["running"], IDS["exit3"], IDS["pending"]])
    assert session.paths() == ["GET /slurm/v0.0.38/jobs"]
    assert session.calls[0]["params"] is None  # update_time is opt-in
    assert found[IDS["exit3"]].exit_code == 3 and found[IDS["running"]].state == SlurmState.RUNNING
    assert rest.status([]) == {} and len(session.calls) == 1


def test_status_asks_accounting_once_for_ids_slurmctld_forgot() -> None:
    def route(method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> tuple[int, Any]:
        if path == "/slurm/v0.0.38/jobs":
            return 200, {"errors": [], "jobs": []}  # all purged after MinJobAge
        return recorded(method, path, params, body)

    rest, session, _ = backend(route)
    ids = [IDS["completed"], IDS["exit3"], IDS["signal9"], "999999"]
    found = rest.status(ids)
    assert session.paths() == ["GET /slurm/v0.0.38/jobs", "GET /slurmdb/v0.0.38/jobs"]
    assert session.calls[1]["params"] == {"step": ",".join(sorted(ids, key=int)), "skip_steps": "true"}
    assert "999999" not in found and found[IDS["signal9"]].signal == 9 and found[IDS["exit3"]].source == "sacct"


def test_final_states_seen_in_slurmctld_are_remembered_with_their_exit_codes() -> None:
    answers = [fixture("slurm_jobs.json"), (200, {"errors": [], "jobs": []})]

    def route(method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> tuple[int, Any]:
        if path == "/slurm/v0.0.38/jobs":
            return answers.pop(0)
        raise AssertionError("accounting must not be asked")

    rest, session, _ = backend(route)
    rest.status([IDS["exit3"]])
    later = rest.status([IDS["exit3"]])  # purged from slurmctld by now
    assert later[IDS["exit3"]].exit_code == 3 and len(session.calls) == 2


def test_update_time_reuses_the_last_answer_on_304() -> None:
    now = [0.0]
    answers = [fixture("slurm_jobs.json"), (304, None), (304, None), fixture("slurm_jobs.json")]

    def route(method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> tuple[int, Any]:
        return answers.pop(0)

    rest, session, _ = backend(route, use_update_time=True, max_cache_age=30.0, clock=lambda: now[0])
    first = rest.status([IDS["running"]])
    assert rest.status([IDS["running"]]) == first
    jobs = {str(j["job_id"]): j for j in fixture("slurm_jobs.json")[1]["jobs"]}
    # slurmctld's clock: the newest past event; never a running job's end_time (start + time
    # limit, in the future) nor a pending job's estimated start.
    past = [j["submit_time"] for j in jobs.values()] + [jobs[IDS[k]]["start_time"] for k in ("running", "exit3")] + [
        jobs[IDS[k]]["end_time"] for k in ("completed", "exit3", "signal9", "cancelled")]
    assert session.calls[1]["params"] == {"update_time": max(past)}
    assert max(past) < jobs[IDS["running"]]["end_time"]
    now[0] = 10.0
    rest.status([IDS["running"]])
    now[0] = 31.0  # too old: a full answer, whatever
    rest.status([IDS["running"]])
    assert session.calls[3]["params"] is None


def test_cancel_of_an_unknown_id_is_fine_but_other_errors_are_not() -> None:
    rest, session, _ = backend(recorded)
    rest.cancel("999999")
    rest.cancel(IDS["exit3"])
    assert session.paths() == ["DELETE /slurm/v0.0.38/job/999999", f"DELETE /slurm/v0.0.38/job/{IDS['exit3']}"]
    rest, _, _ = backend(lambda *_: (503, {"errors": [{"error_number": 1001, "description": "Unable to contact slurm controller"}]}))
    with pytest.raises(SlurmRestError) as info:
        rest.cancel("5")
    assert info.value.transient


def test_rejected_token_is_replaced_and_a_get_retried_once() -> None:
    answers = [fixture("ping_bad_token.json"), fixture("ping.json")]
    rest, session, tokens = backend(lambda *_: answers.pop(0))
    assert rest.ping() is True
    assert [c["headers"]["X-SLURM-USER-TOKEN"] for c in session.calls] == ["token1", "token2"]
    rest, session, tokens = backend(lambda *_: fixture("ping_missing_token.json"))
    assert rest.ping() is False and len(session.calls) == 2 and tokens.minted == 2


def test_transport_errors_become_one_transient_error_with_the_url() -> None:
    def route(*_: Any) -> tuple[int, Any]:
        raise requests.ConnectionError("Connection refused")

    rest, _, _ = backend(route)
    with pytest.raises(SlurmRestError, match=r"GET http://127.0.0.1:6820/slurm/v0.0.38/jobs failed") as info:
        rest.status(["1"])
    assert info.value.transient and info.value.status is None
    assert rest.ping() is False


def test_find_by_name_live_then_accounting() -> None:
    rest, session, _ = backend(recorded)
    assert rest.find_by_name("rec_running", since=0) == [IDS["running"]]
    assert rest.find_by_name("not-there", since=1_700_000_000) == sorted(
        parse_slurmdb_jobs(fixture("slurmdb_jobs.json")[1]), key=int)  # the fake ignores the filter
    params = session.calls[-1]["params"]
    assert params["job_name"] == "not-there" and params["submit_time"].startswith("2023-11-14T")


def test_test_only_asks_sbatch() -> None:
    seen: list[list[str]] = []

    def runner(argv: Sequence[str], *, timeout: float, input: str | None = None, merge_stderr: bool = False, **_: Any) -> str:
        seen.append(list(argv))
        assert input == "#!/bin/bash\ntrue\n" and merge_stderr
        return "sbatch: Job 3 to start at 2026-01-01T00:00:00 using 1 processors on nodes vm in partition debug\n"

    rest, _, _ = backend(recorded, runner=runner)
    assert rest.test_only("#!/bin/bash\ntrue\n").startswith("sbatch: Job 3 to start")
    assert seen == [["sbatch", "--test-only"]]

    def missing(argv: Sequence[str], **_: Any) -> str:
        raise CommandError(argv, None, "", "No such file", "could not be started")

    rest, _, _ = backend(recorded, runner=missing)
    with pytest.raises(SchedulerError, match="needs the Slurm client"):
        rest.test_only("#!/bin/bash\ntrue\n")


# --- factory --------------------------------------------------------------------------------------


def test_factory_builds_each_backend() -> None:
    assert isinstance(make_scheduler({}), SlurmCliBackend)
    assert isinstance(make_scheduler({"SLURM_BACKEND": "CLI", "SLURM_COMMAND_TIMEOUT": 5}), SlurmCliBackend)
    rest = make_scheduler({"SLURM_BACKEND": "rest", "SLURM_REST_URL": "http://h:1/", "SLURM_REST_USER": "gw",
                           "SLURM_REST_TOKEN_LIFESPAN": 600, "SLURM_COMMAND_TIMEOUT": 7})
    assert isinstance(rest, SlurmRestBackend)
    assert (rest.base_url, rest.user, rest.api_version, rest.timeout) == ("http://h:1", "gw", "v0.0.38", 7.0)
    assert rest.tokens.lifespan == 600 and rest.tokens.user == "gw"
    assert isinstance(make_scheduler({"SLURM_BACKEND": "pyslurm"}), PyslurmBackend)
    assert DEFAULTS["SLURM_REST_URL"] == "http://127.0.0.1:6820" and BACKENDS == ("cli", "rest", "pyslurm")


def test_factory_refuses_unknown_backends() -> None:
    with pytest.raises(ValueError, match="cli, rest, pyslurm"):
        make_scheduler({"SLURM_BACKEND": "slurmrestd"})


def test_missing_pyslurm_is_a_clear_scheduler_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyslurm", None)  # makes `import pyslurm` raise ImportError
    with pytest.raises(SchedulerError, match="needs the pyslurm package"):
        make_scheduler({"SLURM_BACKEND": "pyslurm"}).status(["1"])


# --- stack up --with-rest -------------------------------------------------------------------------


def test_jwt_lines_only_when_rest_is_enabled(tmp_path: Path) -> None:
    from gateway.stack.layout import StackPaths
    from gateway.stack.slurm_conf import (
        SlurmSettings,
        render_slurm_conf,
        render_slurmdbd_conf,
    )

    paths = StackPaths.for_state_dir(tmp_path)
    plain = SlurmSettings.for_stack(paths, "vm", plan_topology(1, "vm"), "pw")
    assert "AuthAlt" not in render_slurm_conf(plain) + render_slurmdbd_conf(plain)
    key = tmp_path / "jwt.key"
    with_rest = SlurmSettings.for_stack(paths, "vm", plan_topology(1, "vm"), "pw", jwt_key=key)
    for text in (render_slurm_conf(with_rest), render_slurmdbd_conf(with_rest)):
        lines = text.splitlines()
        assert "AuthType=auth/munge" in lines and "AuthAltTypes=auth/jwt" in lines
        assert f"AuthAltParameters=jwt_key={key}" in lines


def test_rest_is_sticky_once_the_key_exists(tmp_path: Path) -> None:
    from gateway.stack import slurmrestd as stack_rest
    from gateway.stack.layout import StackPaths

    paths = StackPaths.for_state_dir(tmp_path)
    assert not stack_rest.rest_enabled(paths) and stack_rest.rest_daemons(paths, False) == []
    assert stack_rest.rest_status(paths) == {"enabled": False, "url": None, "api_version": "v0.0.38", "user": "root",
                                             "jwt_key": None}
    key = stack_rest.jwt_key_path(paths)
    assert stack_rest.ensure_jwt_key(key, owner="root") is True
    assert stack_rest.ensure_jwt_key(key, owner="root") is False
    assert len(key.read_bytes()) == 32 and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stack_rest.rest_enabled(paths) and stack_rest.rest_status(paths)["url"] == "http://127.0.0.1:6820"
    (daemon,) = stack_rest.rest_daemons(paths, True)
    assert daemon.argv[0] == "/usr/sbin/slurmrestd" and "-u" in daemon.argv and daemon.argv[-1] == "127.0.0.1:6820"
    assert daemon.env == {"SLURM_JWT": "daemon"} and daemon.pid_file == paths.pid_file("slurmrestd")


def test_run_as_directives_pick_the_submitting_user_not_job_fields() -> None:
    from gateway.slurm.directives import submit_user

    script = "#!/bin/bash\n#SBATCH --uid=rgjob\n#SBATCH --gid=rgjob\n#SBATCH --export=PATH\necho\n"
    job = job_description(script, environment={"PATH": "/bin"}, cwd="/srv/gw", submit_host="gw")
    assert submit_user(script) == "rgjob" and submit_user("#!/bin/bash\necho\n") is None
    assert not {"uid", "gid", "user_id", "group_id"} & set(job)


# --- usage (accounting through slurmrestd) ------------------------------------------------------------


def test_usage_from_slurmdbd_through_rest_reads_what_sacct_says_of_the_same_jobs() -> None:
    from gateway.slurm.accounting import parse_usage
    from gateway.slurm.rest_json import parse_slurmdb_usage

    # Recorded side by side (record.py --usage): two tasks holding memory, a stand-in GPU job.
    by_rest = parse_slurmdb_usage(fixture("slurmdb_usage.json")[1])
    by_sacct = parse_usage((FIXTURES / "sacct_usage.txt").read_text())
    assert set(by_rest) == set(by_sacct) and len(by_rest) == 2
    for job_id, expected in by_sacct.items():
        got = by_rest[job_id]
        # sacct rounds each step's TotalCPU to the millisecond before it sums them
        assert math.isclose(got.cpu_seconds_used, expected.cpu_seconds_used, abs_tol=0.005), (got, expected)
        assert dataclasses.replace(got, cpu_seconds_used=expected.cpu_seconds_used) == expected
    busy = max(by_rest.values(), key=lambda u: u.peak_step_rss_bytes)
    assert busy.peak_step_rss_bytes >= 2 * 40 * 2**20 and busy.cpu_seconds_used > 5  # the figures are real ones
    assert any(u.gpus == 1 for u in by_rest.values())


def test_rest_usage_is_one_accounting_get_with_steps_and_no_sacct() -> None:
    def route(method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> tuple[int, Any]:
        assert (method, path) == ("GET", "/slurmdb/v0.0.38/jobs") and params is not None
        assert "skip_steps" not in params  # the steps carry MaxRSS and TotalCPU
        return fixture("slurmdb_usage.json")

    def no_sacct(argv: Sequence[str], **_: Any) -> str:
        raise AssertionError(f"ran {argv}")

    ids = json.loads((FIXTURES / "slurmdb_usage.json").read_text())["body"]["jobs"]
    wanted = [str(job["job_id"]) for job in ids]
    rest, session, _ = backend(route, runner=no_sacct)
    found = rest.usage([wanted[1], wanted[0], wanted[0]])
    assert set(found) == set(wanted) and all(u.complete for u in found.values())
    assert [c["params"]["step"] for c in session.calls] == [",".join(sorted(wanted, key=int))]
    assert rest.usage([]) == {} and len(session.calls) == 1


def test_slurmdb_usage_skips_a_broken_record_and_keeps_a_requeued_jobs_last() -> None:
    from gateway.slurm.rest_json import parse_slurmdb_usage

    def record(submitted: int, state: str, elapsed: int) -> dict[str, Any]:
        return {"job_id": 7, "state": {"current": state}, "time": {"submission": submitted, "elapsed": elapsed, "limit": 2},
                "tres": {"allocated": [{"type": "cpu", "name": None, "count": 4}]}, "steps": []}

    found = parse_slurmdb_usage({"jobs": [record(20, "COMPLETED", 10), {"state": {}}, record(10, "NODE_FAIL", 3)]})
    assert list(found) == ["7"]
    assert (found["7"].state, found["7"].cpu_seconds, found["7"].time_limit_s, found["7"].account) == ("COMPLETED", 40, 120, "")
