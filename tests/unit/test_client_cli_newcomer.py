"""The client CLI as a newcomer meets it (issue 17, point 6): typos of gateway options, --url as
pasted, a checked download, "N of M" in list, what cancel did, and where a token goes."""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from werkzeug.serving import make_server

from gateway import create_app
from gateway.cli import cli
from gateway.client import GatewayClient, normalise_base_url
from gateway.client_cli import gateway_option_typo, submit_command
from gateway.relion.catalogue import CATALOGUE, GATEWAY_OWNED
from tests.conftest import TEST_SCRYPT_N, valid_request
from tests.fakes import FakeScheduler, FakeStorage
from tests.unit.test_client_cli import SEED, run, served  # noqa: F401 (served: a fixture, the app on a real port)

JOBS = "/v1/relion/jobs"


def serve_wsgi(wsgi: Any) -> tuple[str, Callable[[], None]]:
    server = make_server("127.0.0.1", 0, wsgi, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server.shutdown


def submit_job(app: Flask, **changes: Any) -> str:
    """A job submitted through the API (alice's), its id."""
    return str(app.test_client().post(JOBS, json=valid_request(**changes)).get_json()["job_id"])


def with_option(args: list[str], name: str, spelt: str) -> list[str]:
    """SEED with one of its gateway options spelt differently."""
    return [spelt if arg == name else arg for arg in args]


# --- 1. a misspelt gateway option is a usage error, a RELION option passes ---------------------


@pytest.mark.parametrize(
    "args, suggestion",
    [
        ([*SEED, "--num-mpii", "3"], "--num-mpi"),
        (with_option(SEED, "--num-mpi", "--num-mpii"), "--num-mpi"),
        (with_option(SEED, "--user-id", "--user-idd"), "--user-id"),  # not click's "Missing option"
        (with_option(SEED, "--dataset-s3-url", "--dataset-s3-ur"), "--dataset-s3-url"),
        (with_option(SEED, "--workspace-id", "--workspace_id"), "--workspace-id"),
        ([*SEED, "--hots", "127.0.0.1"], "--host"),
        ([*SEED, "--save-metadat", "m.json"], "--save-metadata"),
    ],
)
def test_a_misspelt_gateway_option_is_a_usage_error_with_a_suggestion(
    served: str, app: Flask, scheduler: FakeScheduler, args: list[str], suggestion: str
) -> None:
    code, _, err = run(served, app.config["TEST_TOKENS"]["alice"], "submit", *args)
    assert code == 2 and f"did you mean {suggestion}?" in err, err
    assert scheduler.submitted == []  # never sent on as a RELION flag


def test_relion_options_in_any_spelling_still_pass(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    extra = ["--tau2_fudge", "2", "--flatten_solvent", "--zero-mask", "--offset", "3", "--norm", "--scale"]
    code, out, err = run(served, app.config["TEST_TOKENS"]["alice"], "submit", "--json", *SEED, *extra)
    assert code == 0, err
    flags = json.loads(out)["flags"]
    assert flags["flatten_solvent"] is True and flags["zero_mask"] is True and flags["tau2_fudge"] == 2
    assert "--flatten_solvent" in scheduler.submitted[0] and "--particle_diameter 100" in scheduler.submitted[0]


def test_no_relion_option_is_ever_taken_for_a_typo() -> None:
    options = [opt for param in submit_command.params for opt in getattr(param, "opts", []) if opt.startswith("--")]
    assert "--num-mpi" in options and "--token" in options
    for name in [*CATALOGUE, *GATEWAY_OWNED]:
        for spelt in (f"--{name}", f"--{name.replace('_', '-')}"):
            assert gateway_option_typo(spelt, options) is None, spelt


def test_an_unknown_option_far_from_the_gateways_goes_to_the_gateway(served: str, app: Flask) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    code, _, err = run(served, token, "submit", *SEED, "--particle-diamter", "100")  # closer to RELION's
    assert code == 3 and "did you mean --particle_diameter?" in err, err
    code, _, err = run(served, token, "submit", *SEED, "--frobnicate", "1")
    assert code == 3 and "not a relion_refine option" in err, err


def test_render_says_did_you_mean_too() -> None:
    result = CliRunner().invoke(cli, ["render", "--mode", "2d", "--num-mpii", "3", "--i", "p.star", "--o", "C/run"])
    assert result.exit_code == 2 and "did you mean --num-mpi?" in result.stderr


# --- 2. --url as people paste it ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["{url}/v1/relion", "{url}/v1/relion/", "{url}/", "{bare}", "{bare}/v1/relion/jobs"])
def test_url_with_the_base_path_or_without_a_scheme_is_understood(served: str, app: Flask, form: str) -> None:
    url = form.format(url=served, bare=served.removeprefix("http://"))
    code, out, err = run(served, app.config["TEST_TOKENS"]["alice"], "list", "--json", "--url", url)
    assert code == 0 and json.loads(out) == [], err


@pytest.mark.parametrize(
    "typed, base",
    [
        ("localhost", "http://localhost:9012"),
        ("gw:9012", "http://gw:9012"),
        ("https://gw.example.org/v1/relion/", "https://gw.example.org"),
        ("HTTP://GW:80/", "http://gw:80"),
        ("[::1]:9012", "http://[::1]:9012"),
        ("https://portal.example.org/relion/v1/relion", "https://portal.example.org/relion"),  # a proxy's prefix
    ],
)
def test_base_urls_are_normalised(typed: str, base: str) -> None:
    assert normalise_base_url(typed) == base
    assert GatewayClient(typed).api == f"{base}/v1/relion"


@pytest.mark.parametrize("bad", ["ftp://x", "http://", "http:/host", "gw:port", "gw:99999", "http://u:p@gw", "http://gw/?a=1"])
def test_an_unusable_url_is_a_usage_error_saying_what_is_expected(app: Flask, bad: str) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    code, _, err = run("http://127.0.0.1:9", token, "list", "--url", bad)
    assert code == 2 and "--url" in err, err
    if "@" not in bad:
        assert "http(s)://HOST[:PORT]" in err
    code, _, err = run(bad, token, "list")  # from the environment: the message names the variable
    assert code == 2 and "RELION_GATEWAY_URL" in err, err


# --- 3. download checks bytes and sha256 --------------------------------------------------------


@pytest.fixture
def archived(served: str, app: Flask, storage: FakeStorage) -> Iterator[Callable[..., str]]:
    """A job whose archived output S3 serves as ``body``; the gateway records ``recorded`` for it."""
    body = {"data": b""}

    def s3(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/gzip"), ("Content-Length", str(len(body["data"])))])
        return [body["data"]]

    s3_url, stop = serve_wsgi(s3)
    storage.presigned_get = lambda location, expires: f"{s3_url}/{location.key}?X-Amz-Signature=x"  # type: ignore[attr-defined]

    def make(data: bytes, **recorded: Any) -> str:
        body["data"] = data
        job_id = submit_job(app)
        output = {"files": [], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **recorded}
        app.extensions["relion_gateway"].store.update(job_id, metadata_json=json.dumps({"output": output}))
        return job_id

    yield make
    stop()


def test_download_checks_the_sha256_while_streaming(served: str, app: Flask, archived: Callable[..., str], tmp_path: Path) -> None:
    data = b"\x1f\x8b" + bytes(range(256)) * 5000
    job_id = archived(data)
    target = tmp_path / "out.tar.gz"
    code, out, err = run(served, app.config["TEST_TOKENS"]["alice"], "download", "--json", job_id, "-o", str(target))
    assert code == 0, err
    assert json.loads(out) == {"job_id": job_id, "path": str(target), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "verified": True}
    assert target.read_bytes() == data and not (tmp_path / "out.tar.gz.part").exists()


def test_a_sha256_mismatch_removes_the_partial_file_and_names_both_digests(
    served: str, app: Flask, archived: Callable[..., str], tmp_path: Path
) -> None:
    recorded = "0" * 64
    job_id = archived(b"not what was archived", sha256=recorded)
    (downloads := tmp_path / "downloads").mkdir()
    code, _, err = run(served, app.config["TEST_TOKENS"]["alice"], "download", job_id, "-o", str(downloads / "out.tar.gz"))
    assert code == 3 and recorded in err and hashlib.sha256(b"not what was archived").hexdigest() in err, err
    assert list(downloads.iterdir()) == []  # neither the file nor its .part


def test_a_size_mismatch_fails_too(served: str, app: Flask, archived: Callable[..., str], tmp_path: Path) -> None:
    job_id = archived(b"short", bytes=1000, sha256=None)
    (downloads := tmp_path / "downloads").mkdir()
    code, _, err = run(served, app.config["TEST_TOKENS"]["alice"], "download", job_id, "-o", str(downloads / "o.tgz"))
    assert code == 3 and "5 bytes, the gateway recorded 1000" in err, err
    assert list(downloads.iterdir()) == []


def test_without_a_recorded_sha256_the_download_says_it_could_not_be_verified(
    served: str, app: Flask, archived: Callable[..., str], tmp_path: Path
) -> None:
    job_id = archived(b"data", sha256=None)
    target = tmp_path / "o.tgz"
    code, out, err = run(served, app.config["TEST_TOKENS"]["alice"], "download", "--json", job_id, "-o", str(target))
    assert code == 0 and "could not be verified" in err and json.loads(out)["verified"] is False
    assert target.read_bytes() == b"data"


# --- 4. list says N of M --------------------------------------------------------------------------


def test_list_says_how_many_of_how_many(served: str, app: Flask) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    ids = [submit_job(app, workspace_id=f"ws{i}") for i in range(3)]
    code, out, err = run(served, token, "list", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 2 and "2 of 3 jobs" in err and "--limit 3" in err, (out, err)
    code, out, err = run(served, token, "list")
    assert code == 0 and "3 of 3 jobs" in err and "--limit" not in err
    code, out, err = run(served, token, "list", "--state", "running")
    assert code == 0 and out == "" and "0 of 0 matching jobs" in err
    code, out, _ = run(served, token, "list", "--json", "--limit", "2")
    assert [job["job_id"] for job in json.loads(out)] == ids[::-1][:2]  # still a plain list, newest first


def test_first_jobs_pages_up_to_the_limit() -> None:
    everything = [{"job_id": f"j{i}"} for i in range(250)]
    asked: list[int] = []

    def listing(page: int, page_size: int, **filters: Any) -> dict[str, Any]:
        asked.append(page)
        return {"jobs": everything[(page - 1) * page_size : page * page_size], "total": len(everything)}

    client = GatewayClient("localhost")
    client.list = listing  # type: ignore[method-assign,assignment]
    jobs, total = client.first_jobs(230)
    assert (len(jobs), total, asked) == (230, 250, [1, 2, 3])
    asked.clear()
    assert client.first_jobs(5) == (everything[:5], 250) and asked == [1]


# --- 5. cancel says what it did -------------------------------------------------------------------


def test_cancel_says_what_it_did_and_that_an_ended_job_had_nothing_to_cancel(served: str, app: Flask, scheduler: FakeScheduler) -> None:
    token = app.config["TEST_TOKENS"]["alice"]
    job_id = submit_job(app)
    code, out, err = run(served, token, "cancel", job_id)
    assert code == 0 and out.startswith(f"cancel sent for {job_id} (Slurm job 1001): state queued"), (out, err)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)  # the archive hook (afterany) has run
    app.extensions["relion_gateway"].poll()
    code, out, err = run(served, token, "cancel", job_id)
    assert code == 3 and "nothing to cancel" in err and "already ended (cancelled)" in err, (out, err)


def test_cancel_json_stays_the_job(served: str, app: Flask) -> None:
    job_id = submit_job(app)
    code, out, _ = run(served, app.config["TEST_TOKENS"]["alice"], "cancel", "--json", job_id)
    assert code == 0 and json.loads(out)["job_id"] == job_id


# --- 6. where a token goes ----------------------------------------------------------------------


def test_a_missing_token_says_where_to_put_one_before_any_request() -> None:
    code, _, err = run("http://127.0.0.1:9", None, "status", "job_2d_x_00000000")  # nothing listens there
    assert code == 2 and "--token" in err and "RELION_GATEWAY_TOKEN" in err and "cannot reach" not in err, err


def test_a_refused_token_says_where_it_came_from(served: str) -> None:
    code, _, err = run(served, "rg_wrong", "list")
    assert code == 3 and "401" in err and "token from RELION_GATEWAY_TOKEN" in err, err
    code, _, err = run(served, None, "list", "--token", "rg_wrong")
    assert code == 3 and "token from --token" in err, err
    code, _, err = run(served, None, "list", "--no-token")
    assert code == 3 and "this gateway needs a token" in err, err


def test_no_token_reaches_a_gateway_without_authentication(tmp_path: Path, scheduler: FakeScheduler, storage: FakeStorage) -> None:
    config = {"TESTING": True, "PATHS_STATE_DIR": str(tmp_path / "state"), "S3_ALLOWED_BUCKETS": ["relion-local"],
              "AUTH_MODE": "none", "AUTH_SCRYPT_N": TEST_SCRYPT_N}
    url, stop = serve_wsgi(create_app(config, scheduler=scheduler, storage=storage))
    try:
        code, out, err = run(url, None, "list", "--json", "--no-token")
        assert code == 0 and json.loads(out) == [], err
    finally:
        stop()


def test_render_says_did_you_mean_for_its_required_options_too() -> None:
    from click.testing import CliRunner

    from gateway.cli import cli

    result = CliRunner().invoke(cli, ["render", "--mdoe", "2d", "--user-id", "alice"])
    assert result.exit_code == 2 and "did you mean --mode?" in result.output
