"""The jobs blueprint: thin views, schema in, schema out."""
from __future__ import annotations

from typing import Any

import shlex

from flask import Response, current_app, request
from marshmallow import ValidationError
from flask.views import MethodView
from flask_smorest import Blueprint

from gateway.api.schemas import (
    IDEMPOTENCY_KEY,
    JobListArgsSchema,
    JobListSchema,
    JobRequestSchema,
    JobSchema,
    RenderArgsSchema,
    RenderSchema,
    ScriptArgsSchema,
    job_to_dict,
)
from gateway.callbacks import SIGNATURE_HEADER
from gateway.errors import RequestError
from gateway.poller import Poller
from gateway.service import DRY_RUN_MAIN_ID, JobService, next_poll_seconds
from gateway.store import JobNotFound, JobRecord

blp = Blueprint("jobs", __name__, description="Submit and follow RELION jobs")


def service() -> JobService:
    return current_app.extensions["relion_gateway"]  # type: ignore[no-any-return]


def poller() -> Poller:
    return current_app.extensions["relion_gateway_poller"]  # type: ignore[no-any-return]


def shaped(record: JobRecord) -> dict[str, Any]:
    return job_to_dict(record, next_poll_seconds(record, service().config))


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    try:
        IDEMPOTENCY_KEY(key)
    except ValidationError as exc:
        raise RequestError("Idempotency-Key", " ".join(exc.messages)) from exc
    return key


@blp.route("/jobs")
class Jobs(MethodView):
    @blp.arguments(JobRequestSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(422, description="The request breaks a validation rule (the message names the field)")
    @blp.doc(parameters=[{"in": "header", "name": "Idempotency-Key", "schema": {"type": "string", "maxLength": 128},
                          "description": "the same key from the same user always returns the same job"}])
    def post(self, job_request: dict[str, Any]) -> dict[str, Any]:
        """Submit a RELION job: it is stored, then its main and archive Slurm jobs are submitted."""
        record = service().submit(job_request, idempotency_key=idempotency_key())
        poller().wake()
        return shaped(record)

    @blp.arguments(JobListArgsSchema, location="query")
    @blp.response(200, JobListSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List jobs, newest first, with filters and pages."""
        size = args["page_size"]
        records, total = service().store.list(
            user_id=args.get("user_id"),
            states=args.get("state"),
            mode=args.get("mode"),
            limit=size,
            offset=(args["page"] - 1) * size,
        )
        return {"jobs": [shaped(r) for r in records], "total": total, "page": args["page"], "page_size": size}


@blp.route("/jobs/<job_id>")
class JobById(MethodView):
    @blp.response(200, JobSchema)
    @blp.alt_response(404, description="No such job")
    def get(self, job_id: str) -> Any:
        """A job's state, Slurm's view of it and, once it has ended, its metadata. Reads the store only."""
        body = shaped(service().get(job_id))
        headers = {"Retry-After": str(int(body["next_poll_s"]))} if body["next_poll_s"] else {}
        return body, 200, headers

    @blp.response(202, JobSchema)
    @blp.alt_response(404, description="No such job")
    @blp.alt_response(409, description="The job has already ended")
    def delete(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; its archive hook still runs and saves whatever was produced. Repeating is harmless."""
        record = service().cancel(job_id)
        poller().wake()
        return shaped(record)


@blp.route("/jobs/<job_id>/script")
class JobScript(MethodView):
    @blp.arguments(ScriptArgsSchema, location="query")
    @blp.doc(responses={"200": {"description": "The exact script submitted", "content": {"text/x-shellscript": {"schema": {"type": "string"}}}}})
    @blp.alt_response(404, description="No such job")
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """The exact text of the main (or, with which=archive, the archive) script as submitted."""
        record = service().store.get(job_id)
        text = record.main_script if args["which"] == "main" else record.archive_script
        return Response(text, mimetype="text/x-shellscript")


@blp.route("/jobs/<job_id>/metadata")
class JobMetadata(MethodView):
    @blp.response(200, description="metadata.json, as the archive job wrote it (schema: gateway/jobside/metadata.schema.json)")
    @blp.alt_response(404, description="No such job, or no metadata yet (the job has not been archived)")
    def get(self, job_id: str) -> Any:
        """The job's metadata.json."""
        record = service().get(job_id)
        if record.metadata_json is None:
            raise JobNotFound(f"{job_id} has no metadata yet (state {record.state})")
        return Response(record.metadata_json, mimetype="application/json")


@blp.route("/jobs/<job_id>/archive")
class JobArchive(MethodView):
    @blp.response(202, JobSchema)
    @blp.alt_response(404, description="No such job")
    @blp.alt_response(409, description="The job is not archive_failed")
    def post(self, job_id: str) -> dict[str, Any]:
        """Run the completion hook again for a job whose archive failed (its workspace was kept)."""
        record = service().retry_archive(job_id)
        poller().wake()
        return shaped(record)


@blp.route("/jobs/<job_id>/events")
class JobEvents(MethodView):
    @blp.doc(
        parameters=[{"in": "header", "name": SIGNATURE_HEADER, "required": True, "schema": {"type": "string"},
                     "description": "sha256=<HMAC of the body with the job's token>"}],
        requestBody={"content": {"application/json": {"schema": {"type": "object"}}}},
    )
    @blp.response(204)
    @blp.alt_response(401, description="Bad or missing signature")
    @blp.alt_response(404, description="No such job")
    def post(self, job_id: str) -> None:
        """Signed events from a running job (progress) and from its hook (metadata). Not for portals."""
        service().record_event(job_id, request.get_data(), request.headers.get(SIGNATURE_HEADER, ""))


@blp.route("/render")
class Render(MethodView):
    @blp.arguments(JobRequestSchema)
    @blp.arguments(RenderArgsSchema, location="query")
    @blp.response(200, RenderSchema)
    @blp.alt_response(422, description="The request breaks a validation rule")
    def post(self, job_request: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Validate and render a job without submitting it (optionally asking sbatch --test-only)."""
        jobs = service()
        prepared = jobs.prepare(job_request)
        verdict = jobs.scheduler.test_only(prepared.main_script) if args["slurm_test"] else None
        return {
            "job_id": prepared.job_id,
            "main_script": prepared.main_script,
            "archive_script": jobs.render_archive(prepared, DRY_RUN_MAIN_ID),
            "relion_command": prepared.job["relion_command"],
            "command_line": shlex.join(prepared.job["relion_command"]),
            "resources": prepared.job["resources"],
            "warnings": prepared.warnings,
            "slurm_test": verdict,
        }
