"""Preview images of a job (issue 15): the listing and each PNG, for the owner and admins.

The images are immutable per name (a name is one iteration's one kind), so each carries its
sha256 as a strong ETag and may be cached privately; a repeat with If-None-Match is a 304 that
reads nothing. They are the job's own bytes, so they are served with ``nosniff`` and a CSP that
lets nothing run even if opened on their own.
"""
from __future__ import annotations

from typing import Any

from flask import Response, request
from flask.views import MethodView
from flask_smorest.error_handler import ErrorSchema
from marshmallow import Schema, fields

from gateway.api.docs import DocumentedBlueprint
from gateway.api.jobs import NOT_FOUND, UNAUTHORIZED, service
from gateway.auth import current_principal
from gateway.jobs.previews import NAME, NAME_RULE

blp = DocumentedBlueprint("previews", __name__, description="Preview images of running and finished jobs")

# A day: a name's bytes change only if Slurm requeues the job and RELION runs that iteration again
# (a new sha256, so a new ETag once the browser asks again).
MAX_AGE_S = 86400
IMAGE_CSP = "default-src 'none'; sandbox"


class PreviewSchema(Schema):
    name = fields.String(required=True, metadata={"example": "it002-classes.png", "pattern": NAME.pattern})
    iteration = fields.Integer(required=True, metadata={"example": 2})
    kind = fields.String(required=True, metadata={"description": "classes (2D montage), map-class<K>, fsc, map or history (resolution by iteration)"})
    width = fields.Integer(required=True, metadata={"description": "pixels"})
    height = fields.Integer(required=True, metadata={"description": "pixels"})
    bytes = fields.Integer(required=True)
    sha256 = fields.String(required=True, metadata={"description": "of the PNG; its ETag"})


class PreviewListSchema(Schema):
    previews = fields.List(fields.Nested(PreviewSchema), required=True, metadata={"description": "oldest iteration first; within one: classes, map-class1..K, map, fsc, history"})
    latest_iteration = fields.Integer(allow_none=True, required=True, metadata={"description": "the highest iteration listed; null: none yet"})
    updated_at = fields.String(allow_none=True, metadata={"description": "when the running job last wrote its index (ISO 8601); null once archived"})


PNG_RESPONSE = {
    "description": "The PNG",
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    "headers": {
        "ETag": {"description": "the preview's sha256, quoted", "schema": {"type": "string"}},
        "Cache-Control": {"description": f"private, max-age={MAX_AGE_S}", "schema": {"type": "string"}},
    },
}
NAME_PARAMETER = {
    "in": "path", "name": "name", "required": True, "description": f"a listed preview's name; it {NAME_RULE}",
    "schema": {"type": "string", "pattern": f"^{NAME.pattern}$"},
}


@blp.route("/jobs/<job_id>/previews")
class JobPreviews(MethodView):
    @blp.response(200, PreviewListSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(503, schema=ErrorSchema, description="S3 did not answer; retry")
    @blp.doc(operationId="listJobPreviews")
    def get(self, job_id: str) -> dict[str, Any]:
        """The job's preview images: while it runs from its log dir, once archived from metadata.json."""
        return service().previews(job_id, principal=current_principal()).as_dict()


@blp.route("/jobs/<job_id>/previews/<name>")
class JobPreviewImage(MethodView):
    @blp.doc(operationId="getJobPreview", parameters=[NAME_PARAMETER, {"in": "header", "name": "If-None-Match", "schema": {"type": "string"}}],
             responses={"200": PNG_RESPONSE, "304": {"description": "Not modified (If-None-Match holds the ETag)"}})
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, schema=ErrorSchema, description="No such job (or not the caller's), or no listed preview of that name")
    @blp.alt_response(503, schema=ErrorSchema, description="S3 did not answer; retry")
    def get(self, job_id: str, name: str) -> Response:
        """One preview PNG, from the job's log dir while it is there, else from the job's output in S3."""
        image = service().preview_image(job_id, name, principal=current_principal())
        if request.if_none_match.contains(image.etag):
            response = Response(status=304)
        else:
            response = Response(image.read(), mimetype="image/png")
        response.set_etag(image.etag)
        response.headers["Cache-Control"] = f"private, max-age={MAX_AGE_S}"
        # The cache is the browser's: never answer another token's request from this one's entry.
        response.headers["Vary"] = "Authorization"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = IMAGE_CSP
        return response
