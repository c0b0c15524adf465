"""The jobs blueprint: thin views, schema in, schema out."""
from __future__ import annotations

import dataclasses
import hashlib

from typing import Any

import shlex

from flask import Response, current_app, request, url_for
from marshmallow import ValidationError
from flask.views import MethodView
from flask_smorest.error_handler import ErrorSchema

from gateway.api.docs import METADATA_COMPONENT, DocumentedBlueprint
from gateway.api.parser import StrictJSONParser
from gateway.api.portal import PortalJob
from gateway.api.push import hold_for_change, requested_wait, webhooks
from gateway.observability import SUBMITS
from gateway.api.schemas import (
    LogArgsSchema,
    OutputLinkSchema,
    IDEMPOTENCY_KEY,
    JobListArgsSchema,
    JobListSchema,
    JobRequestSchema,
    JobSchema,
    RenderArgsSchema,
    RenderSchema,
    ScriptArgsSchema,
)
from gateway.auth import Forbidden, authorize_user, current_principal, public
from gateway.callbacks import SIGNATURE_HEADER
from gateway.errors import RequestError
from gateway.jobs.poller import Poller
from gateway.jobs.states import TERMINAL_VALUES
from gateway.jobs.scripts import DRY_RUN_MAIN_ID
from gateway.jobs.service import JobService
from gateway.slurm.backend import SchedulerRefused
from gateway.database import JobNotFound, JobRecord

blp = DocumentedBlueprint("jobs", __name__, description="Submit and follow RELION jobs")
blp.ARGUMENTS_PARSER = StrictJSONParser()

# Error responses all have the one shape (flask-smorest's ErrorSchema: code, status, message, errors).
BAD_JSON = {"schema": ErrorSchema, "description": "The body is not valid JSON (NaN, Infinity and lone surrogates included)"}
UNKNOWN_QUERY = {"schema": ErrorSchema, "description": "A query parameter this operation does not take (named in the message)"}
UNAUTHORIZED = {"schema": ErrorSchema, "description": "No valid bearer token (WWW-Authenticate: Bearer)"}
FORBIDDEN_USER = {"schema": ErrorSchema, "description": "user_id is not the caller's own (only admins act for other users)"}
NOT_FOUND = {"schema": ErrorSchema, "description": "No such job, or not the caller's"}
# Conditional GET (RFC 9110): a client that sends back the ETag it holds gets a 304 while nothing changed.
IF_NONE_MATCH = {"in": "header", "name": "If-None-Match", "schema": {"type": "string"}, "description": "the ETag of the copy the client holds"}
NOT_MODIFIED = {"description": "Not modified since the ETag in If-None-Match (no body)", "headers": {"ETag": {"schema": {"type": "string"}}}}
LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the job's URL (GET it to follow the job)"}}
INVALID = {"schema": ErrorSchema, "description": "The request breaks a validation rule (the message names the field)"}
TOO_LARGE = {"schema": ErrorSchema, "description": "The body is larger than the limit"}
UNAVAILABLE = {"schema": ErrorSchema, "description": "Slurm or S3 did not answer; retry"}
# RFC 8288 links to the list's neighbouring pages, the same URLs as the body's next and prev.
LINK = {"Link": {"schema": {"type": "string"}, "description": '<url>; rel="next", <url>; rel="prev" (those that exist)'}}
RATE_LIMITED = {
    "schema": ErrorSchema,
    "description": "A per-user limit is reached (the message names it)",
    "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}


def service() -> JobService:
    return current_app.extensions["relion_gateway"]  # type: ignore[no-any-return]


def poller() -> Poller:
    return current_app.extensions["relion_gateway_poller"]  # type: ignore[no-any-return]


def record_etag(record: JobRecord, children: list[str]) -> str:
    """The job resource's ETag: everything it shows comes from the record (updated on every change)
    and the list of its children, so these name one representation without rendering it."""
    basis = f"{record.job_id}\n{record.updated_at!r}\n{','.join(children)}"
    return f'"{hashlib.sha256(basis.encode()).hexdigest()[:32]}"'


def not_modified(tag: str, next_poll_s: float | None) -> Response:
    """304: the client's copy is current (no body, RFC 9110 15.4.5), with when to look again."""
    response = Response(status=304)
    response.headers["ETag"] = tag
    if next_poll_s:
        response.headers["Retry-After"] = str(int(next_poll_s))
    return response


def job_location(job_id: str) -> dict[str, str]:
    """Location of a job resource, for a 202 that accepted work on it."""
    return {"Location": url_for("jobs.JobById", job_id=job_id)}


def page_url(args: dict[str, Any], page: int) -> str:
    """The list's URL for another page, with the same filters and page size."""
    filters = {key: args[key] for key in ("state", "mode", "user_id") if args.get(key)}
    return url_for("jobs.Jobs", **filters, page=page, page_size=args["page_size"])


# RFC 7240 long-polls: the answer waits for a change (GET) or the job's end (POST), at most N seconds.
PREFER_WAIT = {"in": "header", "name": "Prefer", "schema": {"type": "string", "example": "wait=60"},
               "description": "wait=N: hold the answer until the job's state changes (GET) or it ends (POST), at most N s "
                              "([server] max_wait_seconds); honoured when Preference-Applied comes back"}
PREFERENCE_HEADERS = {"Preference-Applied": {"schema": {"type": "string"}, "description": "wait=N when the answer waited"}}


def preference_applied(wait: float) -> dict[str, str]:
    """The headers of an answer that honoured Prefer: wait (RFC 7240: Preference-Applied; caches
    must key it by Prefer)."""
    return {"Preference-Applied": f"wait={wait:g}", "Vary": "Prefer"}


def shaped(record: JobRecord) -> PortalJob:
    return PortalJob(record, service().next_poll_seconds(record))


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
    @blp.response(202, JobSchema, headers=LOCATION)
    @blp.alt_response(400, **BAD_JSON)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(403, **FORBIDDEN_USER)
    @blp.alt_response(413, **TOO_LARGE)
    @blp.alt_response(422, **INVALID)
    @blp.alt_response(429, **RATE_LIMITED)
    @blp.alt_response(503, **UNAVAILABLE)
    @blp.alt_response(200, schema=JobSchema, description="With Prefer: wait=N, the job ended within the wait: its final state and result",
                      headers={**LOCATION, **PREFERENCE_HEADERS})
    @blp.doc(operationId="submitJob", parameters=[{"in": "header", "name": "Idempotency-Key", "schema": {"type": "string", "maxLength": 128},
                          "description": "the same key from the same user always returns the same job"}, PREFER_WAIT])
    def post(self, job_request: dict[str, Any]) -> tuple[PortalJob, int, dict[str, str]]:
        """Submit a RELION job: it is stored, then its main and archive Slurm jobs are submitted.

        With ``Prefer: wait=N`` (RFC 7240) the answer waits until the job has ended or N seconds
        have passed: a 200 with the final job (its metadata_b64), as the synchronous service this
        gateway replaces answered, or the usual 202 if it is still going."""
        principal = current_principal()
        # Not part of the job's request (nor its hash): a subscription of its own, checked first so
        # a webhook the gateway may not call stores no job.
        hook_request = job_request.pop("webhook", None)
        if hook_request is not None:
            webhooks().check_url(hook_request["url"], field="webhook.url")
        record = service().submit(job_request, idempotency_key=idempotency_key(), principal=principal, enforce_limits=True)
        SUBMITS.labels(record.mode, "submit_failed" if record.state == "submit_failed" else "accepted").inc()
        poller().wake()
        headers = job_location(record.job_id)
        hook_answer = None
        if hook_request is not None:
            hook, secret = webhooks().for_submitted_job(principal, record, hook_request["url"], hook_request["event_types"])
            hook_answer = {"id": hook.id, "job_id": record.job_id, "url": hook.url, "secret": secret}
        wait = requested_wait()
        if wait and record.state not in TERMINAL_VALUES:
            if hold_for_change(record.job_id, record.state, wait, until_end=True):
                headers.update(preference_applied(wait))
            record = service().get(record.job_id, principal=principal)
        answer = dataclasses.replace(shaped(record), webhook=hook_answer)
        return answer, 200 if record.state in TERMINAL_VALUES and wait else 202, headers

    @blp.arguments(JobListArgsSchema, location="query")
    @blp.alt_response(400, **UNKNOWN_QUERY)
    @blp.response(200, JobListSchema, headers=LINK)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(403, schema=ErrorSchema, description="The user_id filter names another user (admins only)")
    @blp.alt_response(422, **INVALID)
    @blp.doc(operationId="listJobs")
    def get(self, args: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
        """List jobs, newest first, with filters and pages: the caller's own jobs, or any for admins.

        Each item is a summary (no request, attempts or metadata): GET its links.self for the whole job.
        """
        principal = current_principal()
        user_id = args.get("user_id")
        if not principal.admin:
            if user_id is not None and user_id != principal.user:
                raise Forbidden("user_id", f"the user_id filter is for admins; you see your own jobs ({principal.user})")
            user_id = principal.user
        size = args["page_size"]
        records, total = service().list_jobs(
            user_id=user_id,
            states=args.get("state"),
            mode=args.get("mode"),
            limit=size,
            offset=(args["page"] - 1) * size,
        )
        page = args["page"]
        pages = {"next": page_url(args, page + 1) if page * size < total else None, "prev": page_url(args, page - 1) if page > 1 else None}
        links = ", ".join(f'<{url}>; rel="{rel}"' for rel, url in pages.items() if url)
        body = {"jobs": [shaped(r) for r in records], "total": total, "page": page, "page_size": size, **pages}
        return body, 200, {"Link": links} if links else {}


@blp.route("/jobs/<job_id>")
class JobById(MethodView):
    @blp.response(200, JobSchema, headers={"ETag": {"schema": {"type": "string"}}, **PREFERENCE_HEADERS})
    @blp.alt_response(304, **NOT_MODIFIED)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.doc(operationId="getJob", parameters=[IF_NONE_MATCH, PREFER_WAIT])
    def get(self, job_id: str) -> Any:
        """A job's state, Slurm's view of it and, once it has ended, its metadata. Reads the store only."""
        principal = current_principal()
        record = service().get(job_id, principal=principal)
        children = service().children(record.job_id)
        tag = record_etag(record, children)
        held: dict[str, str] = {}
        wait = requested_wait()
        # A long-poll (Prefer: wait=N) holds the answer until the state changes, unless the client's
        # copy is already stale (its If-None-Match is not the current ETag) or the job has ended.
        stale = bool(request.if_none_match) and not request.if_none_match.contains_weak(tag.strip('"'))
        if wait and not stale and record.state not in TERMINAL_VALUES:
            if hold_for_change(record.job_id, record.state, wait):
                held = preference_applied(wait)
            record = service().get(job_id, principal=principal)
            children = service().children(record.job_id)
            tag = record_etag(record, children)
        if request.if_none_match.contains_weak(tag.strip('"')):
            response = not_modified(tag, service().next_poll_seconds(record))
            response.headers.update(held)
            return response
        body = dataclasses.replace(shaped(record), children=children)
        headers = {"ETag": tag, **held, **({"Retry-After": str(int(body.next_poll_s))} if body.next_poll_s else {})}
        return body, 200, headers

    @blp.response(202, JobSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(409, schema=ErrorSchema, description="The job has already ended")
    @blp.alt_response(503, **UNAVAILABLE)
    @blp.doc(operationId="cancelJob")
    def delete(self, job_id: str) -> PortalJob:
        """Cancel a job; its archive hook still runs and saves whatever was produced. Repeating is harmless."""
        record = service().cancel(job_id, principal=current_principal())
        poller().wake()
        return shaped(record)


@blp.route("/jobs/<job_id>/script")
class JobScript(MethodView):
    @blp.arguments(ScriptArgsSchema, location="query")
    @blp.alt_response(400, **UNKNOWN_QUERY)
    @blp.doc(responses={"200": {"description": "The exact script submitted", "content": {"text/x-shellscript": {"schema": {"type": "string"}}}}})
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(422, **INVALID)
    @blp.doc(operationId="getJobScript")
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """The exact text of the main (or, with which=archive, the archive) script as submitted."""
        record = service().get(job_id, principal=current_principal())
        text = record.main_script if args["which"] == "main" else record.archive_script
        return Response(text, mimetype="text/x-shellscript")


@blp.route("/jobs/<job_id>/metadata")
class JobMetadata(MethodView):
    @blp.doc(operationId="getJobMetadata", responses={"200": {
        "description": "metadata.json, as the archive job wrote it (schema: gateway/jobside/metadata.schema.json)",
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{METADATA_COMPONENT}"}}},
        "headers": {"ETag": {"schema": {"type": "string"}}},
    }}, parameters=[IF_NONE_MATCH])
    @blp.alt_response(304, **NOT_MODIFIED)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, schema=ErrorSchema, description="No such job (or not the caller's), or no metadata yet (the job has not been archived)")
    def get(self, job_id: str) -> Any:
        """The job's metadata.json."""
        record = service().get(job_id, principal=current_principal())
        if record.metadata_json is None:
            raise JobNotFound(f"{job_id} has no metadata yet (state {record.state})")
        tag = f'"{hashlib.sha256(record.metadata_json.encode()).hexdigest()[:32]}"'
        if request.if_none_match.contains_weak(tag.strip('"')):
            return not_modified(tag, None)
        return Response(record.metadata_json, mimetype="application/json", headers={"ETag": tag})


@blp.route("/jobs/<job_id>/archive")
class JobArchive(MethodView):
    @blp.response(202, JobSchema, headers=LOCATION)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(409, schema=ErrorSchema, description="The job is not archive_failed")
    @blp.alt_response(503, **UNAVAILABLE)
    @blp.doc(operationId="retryJobArchive")
    def post(self, job_id: str) -> tuple[PortalJob, int, dict[str, str]]:
        """Run the completion hook again for a job whose archive failed (its workspace was kept)."""
        record = service().retry_archive(job_id, principal=current_principal())
        poller().wake()
        return shaped(record), 202, job_location(record.job_id)


@blp.route("/jobs/<job_id>/continue")
class JobContinue(MethodView):
    @blp.response(202, JobSchema, headers=LOCATION)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(
        409,
        schema=ErrorSchema,
        description="The job has not ended timeout, cancelled, node_fail or failed, or its archived output holds no finished iteration",
    )
    @blp.alt_response(503, **UNAVAILABLE)
    @blp.doc(operationId="continueJob")
    def post(self, job_id: str) -> tuple[PortalJob, int, dict[str, str]]:
        """Continue an ended job: a new attempt, RELION resuming from its last finished iteration (relion_refine --continue).

        The job keeps its id; `attempts` lists every run. The new attempt stages the dataset and the job's archived
        output again (or uses the workspace an automatic continuation kept) and archives the whole output when it ends.
        """
        record = service().continue_job(job_id, principal=current_principal())
        poller().wake()
        return shaped(record), 202, job_location(record.job_id)


@blp.route("/jobs/<job_id>/logs")
class JobLogs(MethodView):
    @blp.arguments(LogArgsSchema, location="query")
    @blp.alt_response(400, **UNKNOWN_QUERY)
    @blp.doc(responses={"200": {"description": "The log text", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(422, **INVALID)
    @blp.doc(operationId="getJobLogs")
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """A job's Slurm output: RELION's stdout (out) or stderr (err), or the archive job's (archive-out, archive-err)."""
        text = service().read_log(job_id, args["stream"], args.get("tail"), principal=current_principal())
        return Response(text, mimetype="text/plain")


@blp.route("/jobs/<job_id>/output")
class JobOutput(MethodView):
    @blp.response(200, OutputLinkSchema)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(503, **UNAVAILABLE)
    @blp.doc(operationId="getJobOutput")
    def get(self, job_id: str) -> dict[str, Any]:
        """A presigned URL (valid one hour) for the job's output.tar.gz: download without S3 credentials."""
        return service().output_link(job_id, principal=current_principal())


# What a job's signed request looks like in the spec: its signature header, a JSON body, no bearer token.
SIGNED_BY_A_JOB: dict[str, Any] = {
    "parameters": [{"in": "header", "name": SIGNATURE_HEADER, "required": True, "schema": {"type": "string"},
                    "description": "sha256=<HMAC of the body with the job's token>"}],
    "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
    "security": [],
}


@blp.route("/jobs/<job_id>/events")
@public  # authenticated by its HMAC signature (the job's token), not by a bearer token
class JobEvents(MethodView):
    @blp.doc(**SIGNED_BY_A_JOB)
    @blp.response(204)
    @blp.alt_response(401, schema=ErrorSchema, description="Bad or missing signature")
    @blp.alt_response(404, schema=ErrorSchema, description="No such job")
    @blp.alt_response(413, **TOO_LARGE)
    @blp.alt_response(422, schema=ErrorSchema, description="Not a valid event")
    @blp.doc(operationId="postJobEvent")
    def post(self, job_id: str) -> None:
        """Signed events from a running job (progress) and from its hook (metadata). Not for portals."""
        service().record_event(job_id, request.get_data(), request.headers.get(SIGNATURE_HEADER, ""))


@blp.route("/jobs/<job_id>/storage")
@public  # authenticated by its HMAC signature (the job's token), not by a bearer token
class JobStorageRequests(MethodView):
    @blp.doc(**SIGNED_BY_A_JOB)
    @blp.response(200, schema=None, description="The operation's answer: presigned URLs, an upload id, or an object's size and ETag")
    @blp.alt_response(401, schema=ErrorSchema, description="Bad or missing signature, a token not allowed this operation, expired or replayed")
    @blp.alt_response(404, schema=ErrorSchema, description="No such job")
    @blp.alt_response(413, **TOO_LARGE)
    @blp.alt_response(422, schema=ErrorSchema, description="Not a valid request, or a key outside the job's output prefix")
    @blp.alt_response(503, schema=ErrorSchema, description="S3 did not answer; retry")
    @blp.doc(operationId="requestJobStorage")
    def post(self, job_id: str) -> Any:
        """A job's S3 access: its dataset (main job) and its own output prefix (archive hook). Not for portals.

        Jobs hold no S3 credentials: they ask here, signed with their own token, for presigned URLs
        that the gateway makes only for the job's recorded dataset and ``<output_s3_prefix>/<job_id>/``.
        """
        return service().storage_request(job_id, request.get_data(), request.headers.get(SIGNATURE_HEADER, ""))


@blp.route("/render")
class Render(MethodView):
    @blp.arguments(JobRequestSchema)
    @blp.arguments(RenderArgsSchema, location="query")
    @blp.response(200, RenderSchema)
    @blp.alt_response(400, **BAD_JSON)
    @blp.alt_response(401, **UNAUTHORIZED)
    @blp.alt_response(403, **FORBIDDEN_USER)
    @blp.alt_response(413, **TOO_LARGE)
    @blp.alt_response(422, **INVALID)
    @blp.alt_response(503, **UNAVAILABLE)
    @blp.doc(operationId="renderJob")
    def post(self, job_request: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Validate and render a job without submitting it (optionally asking sbatch --test-only)."""
        authorize_user(current_principal(), job_request["user_id"])
        jobs = service()
        prepared = jobs.prepare(job_request, principal=current_principal())
        try:
            verdict = jobs.test_only(prepared.main_script) if args["slurm_test"] else None
        except SchedulerRefused as exc:
            # Slurm answered no: the request is at fault (a 422 with Slurm's reason). Slurm not
            # answering stays a SchedulerError, the 503 "Slurm is not answering".
            raise RequestError("slurm_test", f"Slurm refused the script (sbatch --test-only): {exc.reason}") from exc
        return {
            "job_id": prepared.job_id,
            "main_script": prepared.main_script,
            "archive_script": jobs.render_archive(prepared, DRY_RUN_MAIN_ID),
            "relion_command": list(prepared.spec.relion_command),
            "command_line": shlex.join(prepared.spec.relion_command),
            "resources": prepared.spec.resources.as_dict() if prepared.spec.resources else None,
            "warnings": prepared.warnings,
            "slurm_test": verdict,
        }
