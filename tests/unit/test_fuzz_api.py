"""schemathesis against the served OpenAPI spec: no 5xx, and every response as the spec documents it.

The app is the unit tests' (fake scheduler, fake S3 reads, a fresh store); requests carry an admin
token, so generated submissions get past authorization and reach validation, rendering and the
fake Slurm; ``ignored_auth`` sends each request again without credentials and expects a refusal.
A bounded number of cases per operation (derandomized, so a run is repeatable) keeps it short.
"""
from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

OPENAPI = "/v1/relion/openapi.json"


@pytest.fixture
def api_schema(app: Flask) -> Any:
    return schemathesis.openapi.from_wsgi(OPENAPI, app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_responses_conform_to_the_spec(case: Any, app: Flask) -> None:
    token = app.config["TEST_TOKENS"]["admin"]
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, ignored_auth],
    )
