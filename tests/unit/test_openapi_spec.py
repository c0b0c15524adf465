"""The served OpenAPI spec is one a generator turns into a typed client with no hand edits (issue 17):
valid, an operationId everywhere, enums from their owners, required response fields, the one Error
shape on every error, and the list's summaries with page links."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import jsonschema
import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from gateway.api.docs import COMMON_RESPONSES
from gateway.api.errors import ERROR_REQUIRED
from gateway.api.schemas import IDENTIFIER_MAX, IDENTIFIER_PATTERN, JobSchema, JobSummarySchema
from gateway.jobs.states import JobState
from gateway.relion.modes import MODES
from tests.conftest import valid_request

JOBS = "/v1/relion/jobs"

SPEC = "/v1/relion/openapi.json"
# The blueprints of gateway/api/ built on DocumentedBlueprint (others may join them).
DOCUMENTED_TAGS = {"jobs", "previews", "admin", "service"}


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items() if method != "parameters"]


@pytest.fixture
def spec(client: FlaskClient) -> dict[str, Any]:
    return dict(client.get(SPEC).json)


def test_the_spec_is_valid_openapi(spec: dict[str, Any]) -> None:
    try:
        from openapi_spec_validator import validate  # type: ignore[import-not-found]
    except ImportError:
        # The OpenAPI 3.0 meta-schema schemathesis ships (openapi-spec-validator is not a dependency).
        from schemathesis.specs.openapi.definitions import OPENAPI_30

        jsonschema.Draft4Validator(OPENAPI_30).validate(spec)
    else:
        validate(spec)
    assert spec["openapi"].startswith("3.0")


def test_every_operation_has_a_unique_camel_case_operation_id(spec: dict[str, Any]) -> None:
    ids = [op.get("operationId") for _, _, op in operations(spec)]
    assert all(isinstance(i, str) and re.fullmatch(r"[a-z][A-Za-z]+", i) for i in ids), ids
    assert len(ids) == len(set(ids))
    named = {(path, method): op["operationId"] for path, method, op in operations(spec)}
    assert named[("/jobs", "post")] == "submitJob" and named[("/jobs", "get")] == "listJobs"
    assert named[("/jobs/{job_id}", "get")] == "getJob" and named[("/jobs/{job_id}", "delete")] == "cancelJob"
    assert named[("/jobs/{job_id}/metadata", "get")] == "getJobMetadata"
    assert named[("/jobs/{job_id}/script", "get")] == "getJobScript"


def test_the_base_path_is_the_servers_and_paths_are_relative_to_it(spec: dict[str, Any]) -> None:
    # Server URL + path is what clients call: the base path is said once, so no generated name carries it.
    assert [s["url"] for s in spec["servers"]] == ["/v1/relion"]
    assert all(path.startswith("/") and not path.startswith("/v1/") for path in spec["paths"]) and "/jobs" in spec["paths"]


def test_every_error_response_is_the_one_error_shape(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == list(ERROR_REQUIRED) and set(ERROR_REQUIRED) <= set(error["properties"])
    responses = spec["components"]["responses"]
    for path, method, op in operations(spec):
        for code, response in op["responses"].items():
            if code == "default" or int(code) < 400:
                continue
            if "$ref" in response:
                response = responses[response["$ref"].rsplit("/", 1)[1]]
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (method, path, code)
        if set(op["tags"]) & DOCUMENTED_TAGS:
            assert {str(c) for c in COMMON_RESPONSES} <= set(op["responses"]), (method, path)
        if "{" in path and op.get("security") != []:
            assert {"401", "404"} <= set(op["responses"]), (method, path)


def test_enums_come_from_their_owners(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["JobState"]["enum"] == [s.value for s in JobState] and len(schemas["JobState"]["enum"]) == 14
    assert schemas["Mode"]["enum"] == list(MODES)
    state_ref, mode_ref = [{"$ref": "#/components/schemas/JobState"}], [{"$ref": "#/components/schemas/Mode"}]
    for name in ("Job", "JobSummary"):
        assert schemas[name]["properties"]["status"]["allOf"] == state_ref
        assert schemas[name]["properties"]["mode"]["allOf"] == mode_ref
    assert schemas["JobRequest"]["properties"]["mode"]["allOf"] == mode_ref
    info = schemas["ServiceInfo"]["properties"]
    assert info["states"]["items"]["allOf"] == state_ref and info["modes"]["items"]["allOf"] == mode_ref


def test_response_fields_always_written_are_required(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for name in ("Job", "JobSummary", "JobList", "JobTimes", "JobLinks", "SlurmInfo", "Attempt", "ServiceInfo", "Partition", "Render", "Token"):
        assert set(schemas[name]["required"]) == set(schemas[name]["properties"]), name
    assert set(schemas["OutputLink"]["required"]) == {"url", "expires_in", "bytes", "sha256"}


def test_request_rules_are_the_servers_own(spec: dict[str, Any]) -> None:
    request = spec["components"]["schemas"]["JobRequest"]["properties"]
    assert "maxLength" not in request["flags"] and request["flags"]["maxProperties"] == 200
    for name in ("user_id", "workspace_id"):
        assert (request[name]["pattern"], request[name]["minLength"], request[name]["maxLength"]) == (IDENTIFIER_PATTERN, 1, IDENTIFIER_MAX)
    assert "enum" not in request["partition"]  # no [slurm.partitions] configured: any name
    listing = next(op for path, method, op in operations(spec) if op["operationId"] == "listJobs")
    user = next(p for p in listing["parameters"] if p["name"] == "user_id")
    assert user["schema"]["pattern"] == IDENTIFIER_PATTERN


def test_configured_partitions_are_an_enum(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    app = create_app({
        "TESTING": True, "PATHS_STATE_DIR": str(tmp_path / "state"), "PATHS_WORKSPACE_ROOT": "", "PATHS_LOG_ROOT": "",
        "STORE_DATABASE_URL": "", "AUTH_MODE": "none",
        "SLURM_PARTITION": "cpu", "SLURM_PARTITIONS": {"gpu": {"gpus": 2}, "cpu": {}},
    })
    spec = app.test_client().get(SPEC).json
    assert spec["components"]["schemas"]["JobRequest"]["properties"]["partition"]["enum"] == ["cpu", "gpu"]


def test_metadata_is_its_json_schema(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    metadata = schemas["JobMetadata"]
    assert metadata["title"] == "JobMetadata" and "schema_version" in metadata["required"]
    text = str(metadata)
    assert "$defs" not in text and "$schema" not in text and "'const'" not in text  # OpenAPI 3.0 has none of them
    assert schemas["Job"]["properties"]["metadata"] == {
        "description": "metadata.json once the job has ended", "allOf": [{"$ref": "#/components/schemas/JobMetadata"}], "nullable": True
    }
    op = spec["paths"]["/jobs/{job_id}/metadata"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobMetadata"}


def submit(client: FlaskClient, n: int) -> list[str]:
    ids = []
    for i in range(n):
        response = client.post(JOBS, json=valid_request(workspace_id=f"ws{i}"))
        assert response.status_code == 202, response.json
        ids.append(response.json["job_id"])
    return ids


def test_list_items_are_summaries_with_page_links(client: FlaskClient, app: Flask) -> None:
    ids = submit(client, 5)
    first = client.get(f"{JOBS}?page_size=2&mode=2d")
    body = first.json
    assert body["total"] == 5 and [j["job_id"] for j in body["jobs"]] == ids[::-1][:2]
    assert set(body["jobs"][0]) == set(JobSummarySchema().fields)
    assert not {"metadata", "metadata_b64", "main_script", "flags", "attempts"} & set(body["jobs"][0])
    assert body["prev"] is None and body["next"] == f"{JOBS}?mode=2d&page=2&page_size=2"
    assert first.headers["Link"] == f'<{body["next"]}>; rel="next"'
    second = client.get(body["next"])
    assert [j["job_id"] for j in second.json["jobs"]] == ids[::-1][2:4] and second.json["prev"] == f"{JOBS}?mode=2d&page=1&page_size=2"
    assert second.headers["Link"] == f'<{second.json["next"]}>; rel="next", <{second.json["prev"]}>; rel="prev"'
    last = client.get(second.json["next"])
    assert [j["job_id"] for j in last.json["jobs"]] == ids[:1] and last.json["next"] is None
    assert last.headers["Link"] == f'<{last.json["prev"]}>; rel="prev"'
    only = client.get(f"{JOBS}?page_size=10")
    assert only.json["next"] is None and only.json["prev"] is None and "Link" not in only.headers


def test_jobs_carry_iso_times_beside_the_epoch_fields_and_their_links(client: FlaskClient) -> None:
    job_id = submit(client, 1)[0]
    job = client.get(f"{JOBS}/{job_id}").json
    assert set(job) == set(JobSchema().fields)
    accepted = datetime.fromisoformat(job["times"]["accepted_at"])
    assert accepted.utcoffset() is not None and accepted.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs(accepted.timestamp() - job["accepted_at"]) < 1e-5
    assert job["times"]["ended_at"] is None and datetime.fromisoformat(job["times"]["updated_at"]) >= accepted
    assert job["links"]["self"] == f"{JOBS}/{job_id}" and job["links"]["metadata"] == f"{JOBS}/{job_id}/metadata"
    assert client.get(job["links"]["self"]).status_code == 200
    attempt = job["attempts"][0]
    assert abs(datetime.fromisoformat(attempt["times"]["created_at"]).timestamp() - attempt["created_at"]) < 1e-5


def test_a_malformed_progress_cannot_break_the_list(client: FlaskClient, app: Flask) -> None:
    job_id = submit(client, 1)[0]
    progress = {"iteration": "two", "iterations_planned": True, "resolution_angstrom": 7.5, "converged": False, "extra": 1}
    app.extensions["relion_gateway"].store.update(job_id, progress_json=__import__("json").dumps(progress))
    listed = client.get(JOBS)
    assert listed.status_code == 200 and listed.json["jobs"][0]["progress"] == {"resolution_angstrom": 7.5, "converged": False}
    assert client.get(f"{JOBS}/{job_id}").json["progress"] == progress  # the whole job keeps every key as reported
