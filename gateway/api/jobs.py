"""The jobs blueprint: thin views, schema in, schema out."""
from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from gateway.api.schemas import JobRequestSchema, JobSchema, job_to_dict
from gateway.service import JobService

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
