"""Hostile input: every value is refused with a clear message or reaches RELION intact, executing nothing.

The table test renders real scripts and runs them in bash, with stand-ins for python (stage-in,
watcher) and RELION that record their argv; then checks that every accepted value arrived as one
argument, unchanged, and that no hostile command ran.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from gateway.errors import RequestError
from gateway.relion.catalogue import CATALOGUE, catalogue_for
from tests.conftest import valid_request
from tests.fakes import FakeScheduler, FakeStorage

JOBS = "/v1/relion/jobs"
VERSION = "5.0"  # the newest RELION knows every option the older ones do (and more)
MODES = ("2d", "3d", "autorefine")

HOSTILE = {
    "space": "a b",
    "single_quote": "it's",
    "double_quote": 'say "hi"',
    "dollar_paren": "$(touch PWNED_dollar)",
    "backtick": "`touch PWNED_backtick`",
    "semicolon": "x; touch PWNED_semicolon",
    "and": "x && touch PWNED_and",
    "pipe": "x | touch PWNED_pipe",
    "redirect": "x > PWNED_redirect",
    "glob": "*",
    "variable": "$HOME${IFS}x",
    "backslash": "a\\b",
    "ansi_c": "$'\\x41'",
    "leading_dash": "-rf",
    "leading_double_dash": "--o /etc",
    "unicode": "naïve/ünïcödé ☃ \u202e\u2028",
    "unicode_letters": "naïve/ünïcödé ☃ ∂",  # letters and symbols in any script are fine
    "bidi_override": "run\u202e\u2066rats.star",
    "zero_width": "a\u200bb",
    "bom": "\ufeffparticles.star",
    "line_separator": "a\u2028b",
    "paragraph_separator": "a\u2029b",
    "long_ok": "l" * 1000,  # a string option; a path component this long is refused (NAME_MAX)
    "long_path": "/".join(["p" * 250] * 4),
    "too_long": "l" * 1025,
    "newline": "a\nb",
    "nul": "a\x00b",
    "c1_control": "a\x85b",
    "absolute": "/etc/passwd",
    "parent": "../secret.star",
}
# Values that must never be accepted anywhere, with the words the refusal must contain.
ALWAYS_REFUSED = {
    "leading_dash": "must not start with '-'",
    "leading_double_dash": "must not start with '-'",
    "too_long": "longer than",
    "newline": "control characters",
    "nul": "control characters",
    "c1_control": "control characters",
    "bidi_override": "Unicode format characters (U+202E RIGHT-TO-LEFT OVERRIDE)",
    "zero_width": "Unicode format characters (U+200B ZERO WIDTH SPACE)",
    "bom": "Unicode format characters (U+FEFF ZERO WIDTH NO-BREAK SPACE)",
    "line_separator": "line or paragraph separators (U+2028 LINE SEPARATOR)",
    "paragraph_separator": "line or paragraph separators (U+2029 PARAGRAPH SEPARATOR)",
}
SAFE = {"i": "particles.star", "o": "Out/run", "ref": "ref.mrc"}


def hostile_app(tmp_path: Path, **overrides: Any) -> Flask:
    calls = tmp_path / "calls.jsonl"
    fake_relion = recorder(tmp_path / "relion_refine", calls)
    fake_python = recorder(tmp_path / "python", calls)
    return create_app(
        {
            "TESTING": True,
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "JOB_PYTHON": str(fake_python),
            "RELION_REFINE": str(fake_relion),
            "RELION_REFINE_MPI": str(fake_relion),
            "RELION_LAUNCHER": "",
            "RELION_VERSION": VERSION,
            # A GPU partition, so that --gpu is judged on its value rather than refused outright.
            "SLURM_PARTITION": "gpu",
            "SLURM_PARTITIONS": {"gpu": {"gpus": 1}},
            "S3_ALLOWED_BUCKETS": ["relion-local"],
            **overrides,
        },
        scheduler=FakeScheduler(),
        storage=FakeStorage(),  # type: ignore[arg-type]
    )


def recorder(path: Path, out: Path) -> Path:
    """A stand-in executable that appends its argv (as JSON) to ``out``."""
    # The interpreter by its real path: a pyenv shim in the shebang costs a shell per call.
    path.write_text(f"#!{sys.executable} -SE\nimport json, sys\nopen({str(out)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def request_for(mode: str, flags: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {"i": SAFE["i"], "o": SAFE["o"]}
    if mode != "2d":
        base["ref"] = SAFE["ref"]
    return valid_request(mode=mode, num_mpi=3 if mode == "autorefine" else 1, flags={**base, **flags})


def option_value(option: str, value: str) -> str:
    return f"{value}/run" if option == "o" else value


def string_options(mode: str) -> list[str]:
    return [spec.name for spec in catalogue_for(mode, VERSION) if spec.kind in ("string", "path")]


@pytest.mark.parametrize("mode", MODES)
def test_every_string_and_path_option_with_hostile_values_in_real_bash(tmp_path: Path, mode: str) -> None:
    app = hostile_app(tmp_path)
    service = app.extensions["relion_gateway"]
    calls = tmp_path / "calls.jsonl"
    options = string_options(mode)
    assert {"i", "o", "tau", "fourier_mask", "gpu"} <= set(options)
    accepted_somewhere = 0
    for label, value in HOSTILE.items():
        accepted: dict[str, str] = {}
        for option in options:
            given = option_value(option, value)
            try:
                service.prepare(request_for(mode, {option: given}))
            except RequestError as exc:
                # Refused: the message names the option and says why, in words.
                assert exc.field == f"flags.{option}", (label, option, exc.field)
                assert f"--{option}" in exc.message, exc.message
                if label in ALWAYS_REFUSED and option != "gpu":  # --gpu takes only device ids: its own message
                    assert ALWAYS_REFUSED[label] in exc.message, (label, option, exc.message)
                continue
            assert label not in ALWAYS_REFUSED, f"{option} accepted {label}"
            accepted[option] = given
        if not accepted:
            continue
        accepted_somewhere += 1
        prepared = service.prepare(request_for(mode, accepted))
        job = prepared.job
        Path(job["log_dir"]).mkdir(parents=True)
        (Path(job["workspace_dir"]) / "dataset").mkdir(parents=True)
        script = tmp_path / f"{mode}-{label}.sh"
        script.write_text(prepared.main_script)
        calls.unlink(missing_ok=True)
        run_dir = tmp_path / "run" / label
        run_dir.mkdir(parents=True)
        subprocess.run(["bash", str(script)], cwd=run_dir, check=True, timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})

        made = [json.loads(line) for line in calls.read_text().splitlines()]
        relion = next(c for c in made if c[:1] == ["--i"])
        assert relion == prepared.job["relion_command"][1:]
        for option, given in accepted.items():
            assert relion[relion.index(f"--{option}") + 1] == given, (label, option)
        stage_in = next(c for c in made if c[:4] == ["-I", "-m", "gateway.jobside", "stage-in"])
        assert stage_in[stage_in.index("--star") + 1] == accepted.get("i", SAFE["i"])
        required = [stage_in[n + 1] for n, arg in enumerate(stage_in) if arg == "--require"]
        # Path options are checked to exist after stage-in: their values reach it intact too.
        assert [accepted[o] for o in accepted if o not in ("i", "o") and CATALOGUE[o].kind == "path"] == [
            r for r in required if r != SAFE["ref"] or "ref" in accepted
        ]
        assert not list(tmp_path.rglob("PWNED*")), f"{label}: a hostile value was executed"
        assert Path(job["log_dir"], "phases").read_text().split()[::2] == ["staging", "running", "finished"]
    assert accepted_somewhere >= 10  # the table really exercised the quoting


def test_hostile_strings_in_string_options_are_refused_or_neutralised_via_the_api(client: FlaskClient) -> None:
    for value, fragment in [("-C1", "must not start with '-'"), ("C1\n", "control characters"), ("C" * 1025, "longer than")]:
        response = client.post(JOBS, json=valid_request(mode="3d", flags={**SAFE, "sym": value}))
        assert response.status_code == 422 and fragment in response.json["message"], response.json
        assert response.json["errors"]["json"].keys() == {"flags.sym"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_id", "alice\n"),
        ("user_id", "../root"),
        ("user_id", "a/b"),
        ("user_id", "."),
        ("user_id", "-alice"),
        ("user_id", "a" * 65),
        ("user_id", "ålice"),
        ("user_id", "a b"),
        ("user_id", "$(id)"),
        ("user_id", ""),
        ("workspace_id", "ws1\n"),
        ("workspace_id", ".."),
        ("workspace_id", "ws/../../x"),
        ("workspace_id", "ws1;rm"),
        ("partition", "debug\n"),
        ("partition", "debug --gres=gpu"),
        ("time_limit", "01:00:00\n"),
        ("time_limit", "1" * 40),
    ],
)
def test_identifiers_are_strict(app: Flask, field: str, value: str) -> None:
    # An admin, so that the user_id rule is the schema's and not the authorization's.
    client = app.test_client(token=app.config["TEST_TOKENS"]["admin"])
    response = client.post(JOBS, json=valid_request(**{field: value}))
    assert response.status_code == 422, response.json
    assert field in response.json["errors"]["json"] and field in response.json["message"]


INVISIBLE = ["\u202a", "\u202e", "\u2066", "\u2069", "\u200b", "\u200c", "\u200d", "\ufeff", "\u2028", "\u2029", "\x85"]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
@pytest.mark.parametrize("field", ["user_id", "workspace_id", "partition", "time_limit"])
def test_ids_refuse_format_and_separator_characters_by_name(app: Flask, field: str, char: str) -> None:
    from gateway.textrules import character_name

    client = app.test_client(token=app.config["TEST_TOKENS"]["admin"])
    value = {"user_id": "alice", "workspace_id": "ws1", "partition": "debug", "time_limit": "01:00:00"}[field]
    response = client.post(JOBS, json=valid_request(**{field: value[:2] + char + value[2:]}))
    assert_error_shape(response, 422)
    name = character_name(char)
    assert response.json["message"] == response.json["message"].strip() and f"{field}: must not contain" in response.json["message"]
    assert name in response.json["message"] and name in response.json["errors"]["json"][field][0]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_flag_values_and_names_refuse_format_and_separator_characters_by_name(client: FlaskClient, char: str) -> None:
    from gateway.textrules import character_name

    for flags, field in (({"tau": "a" + char}, "flags.tau"), ({"o": f"Class2D{char}/run"}, "flags.o"), ({"K" + char: 3}, "flags.K" + char)):
        response = client.post(JOBS, json=valid_request(flags={**valid_request()["flags"], **flags}))
        assert_error_shape(response, 422)
        assert field in response.json["errors"]["json"], response.json
        assert character_name(char) in response.json["message"], response.json["message"]


def test_idempotency_keys_and_job_ids_in_paths_name_the_character(client: FlaskClient) -> None:
    response = client.post(JOBS, json=valid_request(), headers={"Idempotency-Key": "key\x85"})
    assert_error_shape(response, 422)
    assert "Idempotency-Key" in response.json["errors"]["json"] and "U+0085 NEXT LINE" in response.json["message"]
    job_id = client.post(JOBS, json=valid_request()).json["job_id"]
    for path in ("", "/script", "/metadata", "/logs", "/output"):
        # A job id cannot hold such a character: a 404 that says which one (it cannot be seen).
        response = client.get(f"{JOBS}/{job_id}\u202e{path}")
        assert_error_shape(response, 404)
        assert "job_id must not contain Unicode format characters (U+202E RIGHT-TO-LEFT OVERRIDE)" in response.json["message"]
    assert_error_shape(client.delete(f"{JOBS}/{job_id}%E2%80%8B"), 404)
    assert client.get(f"{JOBS}/{job_id}").status_code == 200


def test_job_directories_are_checked_to_stay_inside_their_roots(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    app = hostile_app(tmp_path)
    service = app.extensions["relion_gateway"]
    root = Path(app.config["PATHS_WORKSPACE_ROOT"])
    root.mkdir(parents=True)
    (root / "alice").symlink_to(elsewhere)  # e.g. planted on shared storage
    with pytest.raises(RequestError, match="would leave") as caught:
        service.prepare(request_for("2d", {}))
    assert caught.value.field == "workspace_id"
    (root / "alice").unlink()
    assert Path(service.prepare(request_for("2d", {})).job["workspace_dir"]).parent == root / "alice"


S3_REFUSED = [
    ("s3://relion-local/../x.tar.gz", "'..' segments"),
    ("s3://relion-local/a/../../other-bucket/x.tar.gz", "'..' segments"),
    ("s3://relion-local/./x.tar.gz", "'..' segments"),
    ("s3://relion-local//x.tar.gz", "empty"),
    ("s3://relion-local/%2e%2e/x.tar.gz", "percent-encoding"),
    ("s3://relion-local/a%20b.tar.gz", "percent-encoding"),
    ("s3://relion-local/a\\..\\x.tar.gz", "'\\'"),
    ("s3://relion-local/a\nb.tar.gz", "control characters"),
    ("s3://relion-local/a\rb.tar.gz", "control characters"),
    ("s3://relion-local/a\x00b.tar.gz", "control characters"),
    ("s3://relion-local/a\tb.tar.gz", "control characters"),
    ("s3://Relion-Local/x.tar.gz", "not a valid S3 bucket name"),
    ("s3://RELION-LOCAL/x.tar.gz", "not a valid S3 bucket name"),
    ("s3://192.168.1.10/x.tar.gz", "IP address"),
    ("s3://relion..local/x.tar.gz", "no '..'"),
    ("s3://xn--relion/x.tar.gz", "reserves"),
    ("s3://ab/x.tar.gz", "not a valid S3 bucket name"),
    ("s3:///x.tar.gz", "not a valid S3 bucket name"),
    ("s3://relion-local@evil/x.tar.gz", "not a valid S3 bucket name"),
    ("s3://relion-local:9000/x.tar.gz", "not a valid S3 bucket name"),
    ("s3://other-bucket/x.tar.gz", "not one of the allowed buckets"),
    ("S3://relion-local/x.tar.gz", "s3:// URL"),
    ("https://relion-local.s3.amazonaws.com/x.tar.gz", "s3:// URL"),
    ("file:///etc/passwd", "s3:// URL"),
    ("s3:/relion-local/x.tar.gz", "s3:// URL"),
    ("s3://relion-local/" + "k" * 1100 + ".tar.gz", "onger than"),
    ("s3://relion-local/a\x85b.tar.gz", "control characters (U+0085 NEXT LINE)"),
    ("s3://relion-local/zg.rat\u202e.tar.gz", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("s3://relion-local/a\u2067b.tar.gz", "U+2067 RIGHT-TO-LEFT ISOLATE"),
    ("s3://relion-local/a\u200db.tar.gz", "U+200D ZERO WIDTH JOINER"),
    ("s3://relion-local/\ufeffx.tar.gz", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ("s3://relion-local/a\u2028b.tar.gz", "U+2028 LINE SEPARATOR"),
]


@pytest.mark.parametrize(("url", "fragment"), S3_REFUSED, ids=[repr(url[:48]) for url, _ in S3_REFUSED])
@pytest.mark.parametrize("field", ["dataset_s3_url", "output_s3_prefix"])
def test_hostile_s3_urls_are_refused(client: FlaskClient, scheduler: FakeScheduler, field: str, url: str, fragment: str) -> None:
    response = client.post(JOBS, json=valid_request(**{field: url}))
    assert response.status_code == 422, response.json
    assert field in response.json["errors"]["json"]
    assert fragment in response.json["message"], response.json["message"]
    assert scheduler.submitted == []


@pytest.mark.parametrize(
    "url",
    ["s3://relion-local/data sets/it's $(x);.tar.gz", "s3://relion-local/ünï/cödé.tar.gz", "s3://relion.local-1/a/b+c=d@e,f~g.tar.gz"],
)
def test_unusual_but_valid_keys_are_accepted_and_quoted(tmp_path: Path, url: str) -> None:
    app = hostile_app(tmp_path, S3_ALLOWED_BUCKETS=[])
    prepared = app.extensions["relion_gateway"].prepare(request_for("2d", {}) | {"dataset_s3_url": url})
    assert prepared.job["dataset_s3_url"] == url


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_are_refused(client: FlaskClient, scheduler: FakeScheduler, constant: str) -> None:
    body = json.dumps(valid_request(flags={**valid_request()["flags"], "tau2_fudge": 1.5})).replace("1.5", constant)
    response = client.post(JOBS, data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json["code"] == 400 and response.json["status"] == "Bad Request"
    assert f"{constant} is not a valid JSON number" in response.json["message"]
    assert scheduler.submitted == []


@pytest.mark.parametrize(
    ("flags", "field", "fragment"),
    [
        ({"K": 10**12}, "flags.K", "between"),
        ({"K": -(10**12)}, "flags.K", "at least"),
        ({"iter": 10**40}, "flags.iter", "between"),
        ({"tau2_fudge": 1e300}, "flags.tau2_fudge", "between"),
        ({"offset": 1e10}, "flags.offset", "between"),
        ({"j": 10**10}, "flags.j", "between"),
        ({"K": 2.5}, "flags.K", "whole number"),
        ({"K": "3"}, "flags.K", "whole number"),
        ({"K": [3]}, "flags.K", "switch"),
        ({"K": {"x": 1}}, "flags.K", "switch"),
        ({"K": None}, "flags.K", "Field may not be null"),
    ],
)
def test_numbers_are_bounded(client: FlaskClient, flags: dict[str, Any], field: str, fragment: str) -> None:
    response = client.post(JOBS, json=valid_request(flags={**valid_request()["flags"], **flags}))
    assert response.status_code == 422, response.json
    assert fragment in response.json["message"], response.json["message"]
    assert any(key.startswith(field) for key in response.json["errors"]["json"]) or field.split(".")[0] in response.json["errors"]["json"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"num_mpi": 10**9}, "num_mpi"), ({"num_mpi": 3.0}, "num_mpi"), ({"num_mpi": True}, "num_mpi"), ({"num_mpi": -1}, "num_mpi")],
)
def test_num_mpi_is_a_bounded_integer(client: FlaskClient, changes: dict[str, Any], field: str) -> None:
    response = client.post(JOBS, json=valid_request(**changes))
    assert response.status_code == 422 and field in response.json["errors"]["json"]


def assert_error_shape(response: Any, code: int) -> None:
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.json
    assert set(body) <= {"code", "status", "message", "errors"} and {"code", "status", "message"} <= set(body)
    assert body["code"] == code and isinstance(body["message"], str) and body["message"]


@pytest.mark.parametrize(
    ("data", "content_type", "code", "fragment"),
    [
        ("{not json", "application/json", 400, "Invalid JSON body"),
        ('{"user_id": "alice",}', "application/json", 400, "Invalid JSON body"),
        ('{"user_id": "\\ud800"}', "application/json", 400, "unpaired surrogate"),
        (b'{"user_id": "\xff"}', "application/json", 400, "not UTF-8"),
        ("[1, 2]", "application/json", 422, "Invalid input type"),
        ('"a string"', "application/json", 422, "Invalid input type"),
        ("null", "application/json", 422, ""),
        ("", "application/json", 422, "Missing data"),
        # A body in another media type is a 415 (it was read as no body at all: a 422 "Missing data").
        ("user_id=alice", "application/x-www-form-urlencoded", 415, "must be application/json"),
        ('{"user_id": "alice"}', "text/plain", 415, "must be application/json"),
    ],
)
def test_malformed_bodies_get_the_one_error_shape(client: FlaskClient, data: Any, content_type: str, code: int, fragment: str) -> None:
    response = client.post(JOBS, data=data, content_type=content_type)
    assert_error_shape(response, code)
    assert fragment in response.json["message"]


def _body_with(field_json: str, old: str) -> str:
    """A valid request's JSON with one fragment replaced verbatim (for what json.dumps cannot write)."""
    body = json.dumps(valid_request())
    assert old in body
    return body.replace(old, field_json, 1)


@pytest.mark.parametrize(
    ("body", "code", "field", "fragment"),
    [
        # Python's int() refuses more than 4300 digits with a ValueError; 1e400 parses as inf.
        (_body_with('"num_mpi": ' + "9" * 5000, '"num_mpi": 3'), 422, "num_mpi", "beyond the range"),
        (_body_with('"K": -' + "9" * 5000, '"K": 3'), 422, "flags.K", "5001 characters"),
        (_body_with('"K": 1e400', '"K": 3'), 422, "flags.K", "the number 1e400 is beyond the range"),
        (_body_with('"num_mpi": -1e400', '"num_mpi": 3'), 422, "num_mpi", "-1e400"),
        (_body_with('"tau2_fudge": 1' + "0" * 400, '"j": 1'), 422, "flags.tau2_fudge", "beyond the range"),
        # Duplicate keys: the last would win silently, so two readers could disagree.
        (_body_with('"mode": "2d", "mode": "3d"', '"mode": "2d"'), 400, "mode", "appears more than once"),
        (_body_with('"K": 3, "K": 4', '"K": 3'), 400, "flags.K", "appears more than once"),
        (_body_with('"extra": [{"a": 1, "a": 1}]', '"mode": "2d"'), 400, "extra.0.a", "appears more than once"),
        # Nesting: within the walk's limit, and far past the interpreter's recursion limit.
        (_body_with('"flags": ' + "[" * 40 + "]" * 40, '"flags": {"i": "particles.star", "o": "Class2D/run", "K": 3, "iter": 2, "ctf": true, "j": 1}'),
         400, "flags.0.0", "more than 32 levels deep"),
        ('{"user_id": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None, "more than 32 levels deep"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, 400, None, "more than 32 levels deep"),
    ],
    ids=["int-5000-digits", "flag-int-5000-digits", "1e400", "-1e400", "int-401-digits", "duplicate-top", "duplicate-flag",
         "duplicate-nested", "nested-40", "nested-100000-arrays", "nested-50000-objects"],
)
def test_hostile_json_is_a_4xx_naming_the_field_never_a_500(
    client: FlaskClient, scheduler: FakeScheduler, body: str, code: int, field: str | None, fragment: str
) -> None:
    for url in (JOBS, "/v1/relion/render"):
        response = client.post(url, data=body, content_type="application/json")
        assert_error_shape(response, code)
        assert fragment in response.json["message"], response.json["message"]
        if field is not None:
            assert response.json["message"].startswith(field), response.json["message"]
            assert any(key.startswith(field) for key in response.json["errors"]["json"]), response.json
    assert scheduler.submitted == []


def test_big_but_representable_numbers_still_reach_the_options_own_bounds(client: FlaskClient) -> None:
    # 10**300 fits a double: the parser lets it through and the flag's own rule names it.
    response = client.post(JOBS, data=_body_with('"K": 1' + "0" * 300, '"K": 3'), content_type="application/json")
    assert_error_shape(response, 422)
    assert response.json["message"].startswith("flags.K: --K must be between")


def test_wrong_types_and_extra_fields_get_the_one_error_shape(client: FlaskClient) -> None:
    for changes in ({"num_mpi": "3"}, {"flags": ["i", "o"]}, {"mode": 2}, {"extra": 1}, {"user_id": None}):
        assert_error_shape(client.post(JOBS, json=valid_request(**changes)), 422)
    too_many = {f"opt{n}": n for n in range(201)}
    response = client.post(JOBS, json=valid_request(flags=too_many))
    assert_error_shape(response, 422)
    assert "at most 200 flags" in response.json["message"]
    response = client.post(JOBS, json=valid_request(flags={"k" * 65: 1, "i": "p.star", "o": "C/run"}))
    assert_error_shape(response, 422)
    assert_error_shape(client.get(f"{JOBS}?page=10000000000"), 422)
    assert_error_shape(client.get(f"{JOBS}?state=bogus"), 422)


def test_an_oversized_body_is_a_413_in_the_error_shape(client: FlaskClient, app: Flask, scheduler: FakeScheduler) -> None:
    big = valid_request(flags={**valid_request()["flags"], "tau": "x" * (app.config["MAX_CONTENT_LENGTH"] + 10)})
    for url in (JOBS, "/v1/relion/render", f"{JOBS}/job_2d_ws1_00000000/events"):
        response = client.post(url, json=big)
        if url.endswith("/events"):
            # Unsigned: refused before its body is read, whatever its size.
            assert response.status_code in (401, 413)
            continue
        assert_error_shape(response, 413)
        assert f"larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes" in response.json["message"]
    assert scheduler.submitted == []


# -- secrets never leak ---------------------------------------------------------------------------

S3_SECRET = "S3SECRETkey/abcdefghijklmnopqrstuvwxyz0123"
CALLBACK_SECRET = "callback-secret-0123456789abcdef"


def test_secrets_never_reach_scripts_logs_metadata_or_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.auth import create_token
    from gateway.callbacks import SIGNATURE_HEADER, TOKEN_ENV, sign

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    scheduler = FakeScheduler()
    app = create_app(
        {
            "TESTING": True,
            "PATHS_STATE_DIR": str(tmp_path / "state"),
            "S3_ALLOWED_BUCKETS": ["relion-local"],
            "SERVER_CALLBACK_SECRET": CALLBACK_SECRET,
            "AUTH_SCRYPT_N": 16,
            "AUDIT_FILE": str(tmp_path / "audit.jsonl"),
        },
        scheduler=scheduler,
        storage=FakeStorage(),  # type: ignore[arg-type]
    )
    service = app.extensions["relion_gateway"]
    _, token = create_token(service.store, "alice", n=16)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    responses = []
    job = client.post(JOBS, json=valid_request(), headers=auth)
    responses.append(job)
    job_id = job.json["job_id"]
    job_token = scheduler.environments[0][TOKEN_ENV]
    # Refusals of every kind, some carrying secrets in what they send.
    responses.append(client.get(JOBS, headers={"Authorization": f"Bearer {token}x"}))
    responses.append(client.get(JOBS, headers={"Authorization": f"Bearer {token[:-3]}abc"}))
    responses.append(client.post(JOBS, json=valid_request(user_id="bob"), headers=auth))
    responses.append(client.post(JOBS, json=valid_request(flags={"i": "p.star", "o": "C/run", "tau": "-x"}), headers=auth))
    responses.append(client.post(JOBS, json=valid_request(dataset_s3_url="s3://other-bucket/x.tar.gz"), headers=auth))
    body = json.dumps({"job_id": job_id, "type": "progress", "sent_at": time.time(), "data": {"iteration": 1}}).encode()
    responses.append(client.post(f"{JOBS}/{job_id}/events", data=body, headers={SIGNATURE_HEADER: sign(job_token + "0", body)}))
    responses.append(client.post(f"{JOBS}/{job_id}/events", data=body, headers={SIGNATURE_HEADER: sign(job_token, body)}))
    metadata = {"schema_version": 1, "relion": {}}
    log_dir = Path(service.get(job_id).job["log_dir"])
    (log_dir / "metadata.json").write_text(json.dumps(metadata))
    scheduler.set_state("1001", "COMPLETED", exit_code=0)
    scheduler.set_state("1002", "COMPLETED", exit_code=0)
    service.poll()
    for path in ("", "/script", "/script?which=archive", "/metadata"):
        responses.append(client.get(f"{JOBS}/{job_id}{path}", headers=auth))
    responses.append(client.post("/v1/relion/render", json=valid_request(), headers=auth))

    record = service.get(job_id)
    haystacks = {
        "scripts": "\n".join(scheduler.submitted),
        "record": json.dumps(record.__dict__, default=str),
        "job.json": (log_dir / "job.json").read_text(),
        "metadata": record.metadata_json or "",
        "responses": "\n".join(r.get_data(as_text=True) + str(dict(r.headers)) for r in responses),
        "logs": "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
        "audit file": (tmp_path / "audit.jsonl").read_text(),
    }
    assert len(haystacks["logs"]) > 200 and "job.submit" in haystacks["audit file"]
    secrets = {"S3 secret key": S3_SECRET, "bearer token": token, "token secret": token.split("_", 2)[2],
               "callback secret": CALLBACK_SECRET, "job token": job_token}
    for where, text in haystacks.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in {where}"
    # The job token reaches the job only through its environment at sbatch time.
    assert scheduler.environments[0] == {TOKEN_ENV: job_token}


def test_the_415_is_in_the_spec_where_the_parser_reads_the_body(client: FlaskClient) -> None:
    spec = client.get("/v1/relion/openapi.json").json
    for path in ("/jobs", "/render"):
        assert "415" in spec["paths"][path]["post"]["responses"], path
    assert "415" not in spec["paths"]["/jobs/{job_id}/events"]["post"]["responses"]  # read by its view, signed
    response = client.post("/v1/relion/render", data=json.dumps(valid_request()), content_type="text/plain")
    assert_error_shape(response, 415)
