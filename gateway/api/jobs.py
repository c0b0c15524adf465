"""The jobs blueprint: thin views, schema in, schema out."""
from __future__ import annotations

from typing import Any

import shlex

from flask import Response, current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from gateway.api.schemas import (
    JobRequestSchema,
    JobSchema,
    RenderArgsSchema,
    RenderSchema,
    ScriptArgsSchema,
    job_to_dict,
)
from gateway.service import DRY_RUN_MAIN_ID, JobService

blp = Blueprint("jobs", __name__, description="Submit and follow RELION jobs")


def service() -> JobService:
    return current_app.extensions["relion_gateway"]  # type: ignore[no-any-return]


@blp.route("/jobs")
class Jobs(MethodView):
    @blp.arguments(JobRequestSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(422, description="The request breaks a validation rule (the message names the field)")
    def post(self, request: dict[str, Any]) -> dict[str, Any]:
        """Submit a RELION job: it is stored, then its main and archive Slurm jobs are submitted."""
        return job_to_dict(service().submit(request))


@blp.route("/jobs/<job_id>")
class JobById(MethodView):
    @blp.response(200, JobSchema)
    @blp.alt_response(404, description="No such job")
    def get(self, job_id: str) -> dict[str, Any]:
        """Get a job's state, Slurm's view of it and, once it has ended, its metadata."""
        return job_to_dict(service().get(job_id))


@blp.route("/jobs/<job_id>/cancel")
class JobCancel(MethodView):
    @blp.response(202, JobSchema)
    @blp.alt_response(404, description="No such job")
    @blp.alt_response(409, description="The job has already ended")
    def post(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; its archive hook still runs and saves whatever was produced."""
        return job_to_dict(service().cancel(job_id))


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


@blp.route("/render")
class Render(MethodView):
    @blp.arguments(JobRequestSchema)
    @blp.arguments(RenderArgsSchema, location="query")
    @blp.response(200, RenderSchema)
    @blp.alt_response(422, description="The request breaks a validation rule")
    def post(self, request: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Validate and render a job without submitting it (optionally asking sbatch --test-only)."""
        jobs = service()
        prepared = jobs.prepare(request)
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
