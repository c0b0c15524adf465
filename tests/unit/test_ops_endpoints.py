"""Readiness, metrics, the docs page, logs and presigned output links."""
from __future__ import annotations

import json
from pathlib import Path

from flask.testing import FlaskClient

from tests.conftest import valid_request


def test_readyz_reports_each_dependency(anonymous_client: FlaskClient, app) -> None:
    app.extensions["relion_gateway"].config["S3_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    response = anonymous_client.get("/readyz")
    assert response.status_code == 503
    checks = response.json["checks"]
    assert checks["store"]["ok"] and checks["slurm"]["ok"]  # the fake scheduler answers
    assert not checks["s3"]["ok"] and checks["s3"]["seconds"] < 10


def test_metrics_need_an_admin_and_count_jobs_by_state(client: FlaskClient, admin_client: FlaskClient) -> None:
    client.post("/v1/relion/jobs", json=valid_request())
    assert client.get("/metrics").status_code == 403
    text = admin_client.get("/metrics").get_data(as_text=True)
    assert 'relion_gateway_jobs{state="queued"} 1.0' in text
    assert "relion_gateway_submits_total" in text and "relion_gateway_poll_cycle_seconds" in text


def test_docs_page_and_assets_are_local_and_public(anonymous_client: FlaskClient) -> None:
    page = anonymous_client.get("/v1/relion/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/v1/relion/docs/assets/swagger-ui-bundle.js" in html and "//cdn" not in html and "unpkg" not in html
    assert anonymous_client.get("/v1/relion/docs/assets/swagger-ui-bundle.js").status_code == 200


def test_logs_endpoint_tails_the_slurm_output(client: FlaskClient, app, scheduler) -> None:
    job = client.post("/v1/relion/jobs", json=valid_request()).json
    log_dir = Path(app.config["PATHS_LOG_ROOT"]) / "alice" / job["job_id"]
    (log_dir / "main-1001.out").write_text("".join(f"line {n}\n" for n in range(10)))
    response = client.get(f"/v1/relion/jobs/{job['job_id']}/logs?tail=2")
    assert response.status_code == 200 and response.get_data(as_text=True) == "line 8\nline 9\n"
    missing = client.get(f"/v1/relion/jobs/{job['job_id']}/logs?stream=archive-err")
    assert missing.status_code == 404 and "no archive-err log yet" in missing.json["message"]


def test_output_link_is_presigned(client: FlaskClient, app) -> None:
    class Presigner:
        def presigned_get(self, location, expires_s):  # type: ignore[no-untyped-def]
            return f"https://s3.example/{location.bucket}/{location.key}?X-Amz-Signature=abc&X-Amz-Expires={expires_s}"

    service = app.extensions["relion_gateway"]
    job = client.post("/v1/relion/jobs", json=valid_request()).json
    assert client.get(f"/v1/relion/jobs/{job['job_id']}/output").status_code == 404  # not archived yet
    output = {"url": "s3://relion-local/results/x/output.tar.gz", "bytes": 10, "sha256": "0" * 64}
    service.store.update(job["job_id"], metadata_json=json.dumps({"output": output}))
    service.storage = Presigner()
    body = client.get(f"/v1/relion/jobs/{job['job_id']}/output").json
    # The link is for the location recorded at submit, never the URL a job's metadata names.
    assert body["url"].startswith(f"https://s3.example/relion-local/results/{job['job_id']}/output.tar.gz?") and body["expires_in"] == 3600
