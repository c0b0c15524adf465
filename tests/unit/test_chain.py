"""Chained jobs at submit: the parent checked before anything reaches Slurm, its dataset, --i and --ref."""
from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from gateway.jobs.spec import JobSpec
from tests.conftest import valid_request
from tests.fakes import FakeScheduler

JOBS = "/v1/relion/jobs"
OUTPUTS_2D = {
    "mode": "2d", "iteration": 25, "data_star": "Class2D/run_it025_data.star", "model_star": "Class2D/run_it025_model.star",
    "class_maps": {}, "class_particles": {"1": 120, "2": 0, "3": 80},
}
OUTPUTS_3D = {
    "mode": "3d", "iteration": 10, "data_star": "Class3D/run_it010_data.star", "model_star": "Class3D/run_it010_model.star",
    "class_maps": {"1": "Class3D/run_it010_class001.mrc", "2": "Class3D/run_it010_class002.mrc"}, "class_particles": {"1": 150, "2": 50},
}


def finished_parent(app: Any, client: FlaskClient, scheduler: FakeScheduler, outputs: dict[str, Any], **request: Any) -> str:
    """A parent job that succeeded and whose hook recorded its outputs."""
    job_id = client.post(JOBS, json=valid_request(**request)).json["job_id"]
    service = app.extensions["relion_gateway"]
    record = service.get(job_id)
    scheduler.set_state(record.main_slurm_id, "COMPLETED", exit_code=0)
    scheduler.set_state(record.archive_slurm_id, "COMPLETED", exit_code=0)
    metadata = {"outputs": outputs, "output": {"url": record.output_url + "output.tar.gz", "etag": '"abc"', "bytes": 1234}}
    service.store.update(job_id, metadata_json=json.dumps(metadata))
    service.poll()
    assert service.get(job_id).state == "succeeded"
    return job_id


def child(parent: str, **changes: Any) -> dict[str, Any]:
    request = valid_request(input_job_id=parent, **changes)
    del request["dataset_s3_url"]
    request["flags"] = {k: v for k, v in request["flags"].items() if k != "i"}
    return request


def test_a_child_takes_the_parents_dataset_particles_and_chosen_classes(client: FlaskClient, app: Any, scheduler: FakeScheduler) -> None:
    parent = finished_parent(app, client, scheduler, OUTPUTS_2D)
    response = client.post(JOBS, json=child(parent, select_classes=[3, 1]))
    assert response.status_code == 202, response.json
    body = response.json
    assert body["input_job_id"] == parent and body["select_classes"] == [3, 1]
    assert body["flags"]["i"] == "parent/particles.star"
    spec = JobSpec.from_json(app.extensions["relion_gateway"].get(body["job_id"]).job_json)
    assert spec.dataset_s3_url == valid_request()["dataset_s3_url"]  # the parent's
    assert spec.chain is not None and spec.chain.select_classes == (1, 3) and spec.chain.particles == 200
    assert spec.chain.output_url.endswith(f"/{parent}/output.tar.gz") and spec.chain.output_etag == '"abc"'
    assert client.get(f"{JOBS}/{parent}").json["children"] == [body["job_id"]]
    assert client.get(f"{JOBS}/{body['job_id']}").json["children"] == []


def test_a_3d_parents_class_map_becomes_the_childs_reference(client: FlaskClient, app: Any, scheduler: FakeScheduler) -> None:
    flags_3d = {"i": "particles.star", "o": "Class3D/run", "ref": "ref.mrc", "K": 2, "iter": 2, "j": 1}
    parent = finished_parent(app, client, scheduler, OUTPUTS_3D, mode="3d", flags=flags_3d)
    flags = {"o": "Refine3D/run", "j": 1}
    response = client.post(JOBS, json=child(parent, mode="autorefine", flags=flags, select_classes=[1], ref_class=1))
    assert response.status_code == 202, response.json
    assert response.json["flags"]["ref"] == "parent/Class3D/run_it010_class001.mrc"
    assert response.json["flags"]["i"] == "parent/particles.star"


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"select_classes": [7]}, "select_classes", "class 7"),
        ({"select_classes": [2]}, "select_classes", "class 2"),  # a class without particles
        ({"ref_class": 1}, "ref_class", "2D"),
        ({"flags": {"i": "mine.star", "o": "Class2D/run", "K": 2}}, "flags.i", "the gateway sets --i"),
        ({"dataset_s3_url": "s3://relion-local/datasets/other.tar.gz"}, "dataset_s3_url", "parent's dataset"),
    ],
)
def test_a_bad_chain_request_is_a_422_naming_the_field(
    client: FlaskClient, app: Any, scheduler: FakeScheduler, changes: dict[str, Any], field: str, words: str
) -> None:
    parent = finished_parent(app, client, scheduler, OUTPUTS_2D)
    request = child(parent)
    request.update(changes)
    response = client.post(JOBS, json=request)
    assert response.status_code == 422, response.json
    assert field in response.json["errors"]["json"] and words in response.json["message"], response.json
    assert len(scheduler.submitted) == 2  # the parent's two jobs only: nothing of the child reached Slurm


def test_the_parent_must_be_this_users_and_have_succeeded(
    client: FlaskClient, bob_client: FlaskClient, app: Any, scheduler: FakeScheduler
) -> None:
    parent = finished_parent(app, client, scheduler, OUTPUTS_2D)
    stolen = bob_client.post(JOBS, json=child(parent, user_id="bob"))
    unknown = client.post(JOBS, json=child("job_2d_ws1_00000000"))
    assert stolen.status_code == unknown.status_code == 422
    assert stolen.json["message"] == "input_job_id: bob has no job " + repr(parent)  # no hint that the id exists
    running = client.post(JOBS, json=valid_request()).json["job_id"]
    response = client.post(JOBS, json=child(running))
    assert response.status_code == 422 and "only a succeeded job" in response.json["message"]


def test_a_request_needs_a_dataset_or_a_parent(client: FlaskClient) -> None:
    request = valid_request()
    del request["dataset_s3_url"]
    response = client.post(JOBS, json=request)
    assert response.status_code == 422 and "dataset_s3_url" in response.json["errors"]["json"]
    response = client.post(JOBS, json=valid_request(select_classes=[1]))
    assert response.status_code == 422 and "select_classes" in response.json["errors"]["json"]
