"""Request and response schemas (marshmallow), seed-compatible field names."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, pre_dump, validate, validates, validates_schema

from gateway.relion.modes import MODES
from gateway.database.events import EVENT_TYPES, STATE_CHANGED
from gateway.jobs.states import JobState
from gateway.textrules import text_problem

# Letters, digits and ._- ; used in paths and Slurm job names, so no '/', no spaces, not '.' or '..'.

class FullMatch(validate.Regexp):
    """validate.Regexp matching the whole value: its ``re.match`` lets ``$`` pass "alice\n".

    A value holding a character gateway/textrules.py refuses is told which one, by name: the
    pattern alone would only say "must be letters, digits..." of a value that looks like letters.
    """

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str) and (problem := text_problem(value)) is not None:
            raise ValidationError(f"must not contain {problem}")
        if not isinstance(value, str) or self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


IDENTIFIER_MAX = 64
IDENTIFIER_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{IDENTIFIER_MAX - 1}}}$"
IDENTIFIER = validate.And(
    FullMatch(IDENTIFIER_PATTERN, error=f"must be 1-{IDENTIFIER_MAX} characters of letters, digits, '.', '_' or '-', starting with a letter or digit"),
    validate.NoneOf([".", ".."], error="must not be '.' or '..'"),
)
# The same rule for the spec: apispec does not look inside validate.And. The pattern's first
# character already rules out '.' and '..'.
IDENTIFIER_DOC = {"pattern": IDENTIFIER_PATTERN, "minLength": 1, "maxLength": IDENTIFIER_MAX}
STATES = [state.value for state in JobState]


def ref(component: str, nullable: bool = False) -> dict[str, Any]:
    """Field metadata naming a spec component (gateway/api/docs.py registers JobState, Mode and
    JobMetadata), so a generated client has one enum or model for it wherever it appears. ``nullable``
    instead of allow_none: apispec turns allow_none beside a reference into an anyOf of it and {}."""
    return {"allOf": [{"$ref": f"#/components/schemas/{component}"}], **({"nullable": True} if nullable else {})}


MAX_FLAGS = 200
# GPUs per node a request may ask (the partition's own count is checked with the config).
MAX_GPUS = 64


def _at_most_flags(value: dict[str, Any]) -> None:
    if len(value) > MAX_FLAGS:
        raise ValidationError(f"at most {MAX_FLAGS} flags")


class JobRequestSchema(Schema):
    """POST /v1/relion/jobs body: the seed's fields."""

    class Meta:
        unknown = RAISE

    user_id = fields.String(required=True, validate=IDENTIFIER, metadata={"example": "alice", **IDENTIFIER_DOC})
    workspace_id = fields.String(required=True, validate=IDENTIFIER, metadata={"example": "ws1", **IDENTIFIER_DOC})
    dataset_s3_url = fields.String(
        validate=validate.Length(max=1024),
        metadata={
            "description": "s3://bucket/key of a .tar.gz holding the STAR file and stacks. Required unless input_job_id "
            "is given (a chained job runs on its parent's dataset)",
            "example": "s3://relion-local/datasets/tiny.tar.gz",
        },
    )
    # A chained job: its input is an earlier job of the same user.
    input_job_id = fields.String(
        validate=FullMatch(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", error="must be a job id"),
        metadata={
            "description": "an earlier succeeded job of the same user: this job reads its particles (its final _data.star, as "
            "--i parent/particles.star) and its dataset's images; GET /jobs/<id> lists its children",
            "example": "job_2d_ws1_0123abcd",
        },
    )
    select_classes = fields.List(
        fields.Integer(strict=True, validate=validate.Range(min=1)),
        validate=validate.Length(min=1, max=1000),
        metadata={"description": "with input_job_id: only the particles of these classes (rlnClassNumber)", "example": [1, 3]},
    )
    ref_class = fields.Integer(
        strict=True,
        validate=validate.Range(min=1),
        metadata={"description": "with input_job_id of a 3D job: that class's map is this job's --ref", "example": 1},
    )
    output_s3_prefix = fields.String(
        required=True,
        validate=validate.Length(max=1024),
        metadata={"description": "results go to <prefix>/<job_id>/", "example": "s3://relion-local/results"},
    )
    mode = fields.String(required=True, validate=validate.OneOf(MODES), metadata={"example": "2d", **ref("Mode")})
    num_mpi = fields.Integer(
        load_default=1,
        strict=True,
        validate=validate.Range(min=1, max=4096),
        metadata={"description": "MPI ranks (#SBATCH --ntasks)"},
    )
    partition = fields.String(
        validate=FullMatch(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", error="must be a Slurm partition name"),
        metadata={"description": "Slurm partition (default: [slurm] partition); checked against its limits"},
    )
    # No load_default: a request without gpus must keep the request_sha256 it had before the field.
    gpus = fields.Integer(
        strict=True,
        validate=validate.Range(min=0, max=MAX_GPUS),
        metadata={
            "description": "GPUs per node (#SBATCH --gres=gpu:<n>); the partition must have them ([slurm.partitions.<name>] gpus). "
            "The job passes RELION --gpu with the devices Slurm assigned (one group per follower rank; the leader gets none)",
            "example": 2,
        },
    )
    time_limit = fields.String(
        validate=validate.And(
            validate.Length(max=32),
            FullMatch(r"^(\d+-)?\d+(:\d+){0,2}$", error="must be a Slurm time such as 90, 01:30:00 or 2-00:00:00"),
        ),
        metadata={"description": "Slurm --time for the main job (default: [slurm] time_limit)", "example": "00:30:00"},
    )
    account = fields.String(
        validate=FullMatch(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", error="must be a Slurm account name"),
        metadata={"description": "the Slurm account (grant) to charge (#SBATCH --account): one of the user's in [slurm.accounts]; "
                                 "default: the user's first", "example": "lab-a"},
    )
    webhook = fields.Nested(
        "JobWebhookSchema",
        metadata={"description": "subscribe a URL to this job's events (Standard Webhooks); the answer carries its id and "
                                 "secret. Not part of the stored request"},
    )
    # No load_default, as for gpus: the request_sha256 of a request without it stays as it was.
    auto_continue = fields.Integer(
        strict=True,
        validate=validate.Range(min=0, max=1000),
        metadata={
            "description": "How many times the gateway may continue the job by itself (relion_refine --continue from the "
            "last finished iteration) when Slurm ends it for its time limit, a preemption or a node failure; never after "
            "RELION's own error or a cancel. At most [job] max_auto_continue. Default 0",
            "example": 2,
        },
    )
    flags = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=64)),
        values=fields.Raw(allow_none=False),
        # Not validate.Length: apispec would document it as maxLength, a string keyword, on an object.
        validate=_at_most_flags,
        load_default=dict,
        metadata={
            "maxProperties": MAX_FLAGS,
            "description": "relion_refine options by name (dashes or underscores); true for a switch",
            "example": {"i": "particles.star", "o": "Class2D/run", "K": 3, "iter": 2, "ctf": True, "j": 1},
        },
    )

    @validates("dataset_s3_url")
    def _dataset_url(self, value: str, **_: Any) -> None:
        if not value.startswith("s3://"):
            raise ValidationError("must be an s3:// URL")

    @validates_schema
    def _an_input(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("dataset_s3_url") and not data.get("input_job_id"):
            raise ValidationError("required: an s3:// URL of the dataset, unless input_job_id names the input", "dataset_s3_url")

    @validates("output_s3_prefix")
    def _output_prefix(self, value: str, **_: Any) -> None:
        if not value.startswith("s3://"):
            raise ValidationError("must be an s3:// URL")


# Response schemas: a field the gateway always writes is required (null where allow_none), so a
# generated client types it as present; enumerated values carry their enum, from their one owner.
EPOCH = "epoch seconds (UTC); kept for compatibility: `times` has the same moment as an ISO 8601 date-time"


def utc(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


class SlurmInfoSchema(Schema):
    main_job_id = fields.String(required=True, allow_none=True)
    archive_job_id = fields.String(required=True, allow_none=True)
    state = fields.String(required=True, metadata={"description": "Slurm's own view of the main job, e.g. 'PENDING (Resources)'"})
    exit_code = fields.Integer(required=True, allow_none=True)


class AttemptTimesSchema(Schema):
    created_at = fields.DateTime(required=True)
    started_at = fields.DateTime(required=True, allow_none=True)
    ended_at = fields.DateTime(required=True, allow_none=True)


class JobWebhookSchema(Schema):
    """A webhook asked for in a submit request: this job's events go to ``url``."""

    class Meta:
        unknown = RAISE

    url = fields.String(required=True, validate=validate.Length(min=1, max=2048), metadata={"description": "http(s) URL"})
    event_types = fields.List(fields.String(validate=validate.OneOf(EVENT_TYPES)), validate=validate.Length(min=1),
                              load_default=lambda: [STATE_CHANGED])


class WebhookSecretSchema(Schema):
    """The subscription a submit request made: verify each message's webhook-signature with the secret."""

    id = fields.String(required=True)
    job_id = fields.String(required=True)
    url = fields.String(required=True)
    secret = fields.String(required=True, metadata={"description": "whsec_... (answered again to a replay of the request)"})


class WaitSchema(Schema):
    """Why a queued job waits and when Slurm expects to start it: an estimate, never a promise."""

    pending_reason = fields.String(required=True, allow_none=True, metadata={"description": "Slurm's reason (Resources, Priority, Dependency, ...)"})
    estimated_start = fields.DateTime(required=True, allow_none=True, metadata={"description": "Slurm's estimate, ISO 8601 UTC; null: none yet"})
    estimate_source = fields.String(required=True, allow_none=True, validate=validate.OneOf(["sbatch --test-only", "squeue"]))
    estimated = fields.Boolean(required=True, metadata={"description": "always true: Slurm's backfill plan changes as jobs come and go"})


class AttemptSchema(Schema):
    """One run of the job in Slurm: the first, or a continuation."""

    number = fields.Integer(required=True, metadata={"description": "1 for the first run"})
    trigger = fields.String(required=True, metadata={"description": "submit, auto (auto_continue) or manual (POST .../continue)"})
    created_at = fields.Float(required=True, metadata={"description": EPOCH})
    from_iteration = fields.Integer(required=True, metadata={"description": "the iteration RELION continued from; 0: from the start"})
    continue_from = fields.String(required=True, metadata={"description": "RELION's optimiser file it continued from"})
    workspace = fields.String(required=True, metadata={"description": "kept (the earlier workspace) or restored (from the archived output); empty for the first"})
    main_slurm_id = fields.String(required=True, allow_none=True)
    archive_slurm_id = fields.String(required=True, allow_none=True)
    state = fields.String(required=True, metadata={"description": "gateway state of this attempt (its end, once ended)"})
    slurm_state = fields.String(required=True)
    exit_code = fields.Integer(required=True, allow_none=True)
    started_at = fields.Float(required=True, allow_none=True, metadata={"description": EPOCH})
    ended_at = fields.Float(required=True, allow_none=True, metadata={"description": EPOCH})
    last_iteration = fields.Integer(required=True, allow_none=True, metadata={"description": "the last iteration it finished"})
    message = fields.String(required=True)
    times = fields.Nested(AttemptTimesSchema, required=True, metadata={"description": "the attempt's moments, ISO 8601 in UTC"})

    @pre_dump
    def _times(self, attempt: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {**attempt, "times": {name: utc(attempt.get(name)) for name in ("created_at", "started_at", "ended_at")}}


class JobTimesSchema(Schema):
    """The job's moments as ISO 8601 date-times in UTC (the epoch fields beside them are the same)."""

    accepted_at = fields.DateTime(required=True)
    submitted_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "null: not in Slurm yet"})
    started_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "null: not started"})
    ended_at = fields.DateTime(required=True, allow_none=True, metadata={"description": "null: not ended"})
    updated_at = fields.DateTime(required=True, metadata={"description": "the job's last change"})


class JobLinksSchema(Schema):
    """The job's resources, as paths on this gateway."""

    self = fields.String(required=True, metadata={"description": "the full job (GET)"})
    metadata = fields.String(required=True, metadata={"description": "its metadata.json, once archived"})
    previews = fields.String(required=True)
    logs = fields.String(required=True)
    output = fields.String(required=True, metadata={"description": "a presigned URL of output.tar.gz, once archived"})


class ProgressSchema(Schema):
    """RELION's progress while the job runs (each key once RELION has said it)."""

    iteration = fields.Integer(allow_none=True)
    iterations_planned = fields.Integer(allow_none=True)
    resolution_angstrom = fields.Float(allow_none=True)
    converged = fields.Boolean(allow_none=True)

    @pre_dump
    def _typed(self, progress: dict[str, Any], **_: Any) -> dict[str, Any]:
        # Progress is what the job's signed events said: a value not of its documented type is left
        # out, so it can neither break the list (int("x")) nor reach a typed client mistyped.
        kinds: dict[str, tuple[type, ...]] = {"iteration": (int,), "iterations_planned": (int,), "resolution_angstrom": (int, float), "converged": (bool,)}
        return {
            key: value for key, value in progress.items()
            if key in kinds and (value is None or (isinstance(value, kinds[key]) and (key == "converged" or not isinstance(value, bool))))
        }


class _JobFieldsSchema(Schema):
    """What a job and a job's summary both have."""

    job_id = fields.String(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(STATES), metadata={"description": "gateway state (see README, Job states)", **ref("JobState")}
    )
    message = fields.String(required=True)
    user_id = fields.String(required=True)
    workspace_id = fields.String(required=True)
    mode = fields.String(required=True, validate=validate.OneOf(MODES), metadata=ref("Mode"))
    times = fields.Nested(JobTimesSchema, required=True)
    accepted_at = fields.Float(required=True, metadata={"description": EPOCH})
    submitted_at = fields.Float(required=True, allow_none=True, metadata={"description": EPOCH})
    started_at = fields.Float(required=True, allow_none=True, metadata={"description": EPOCH})
    ended_at = fields.Float(required=True, allow_none=True, metadata={"description": EPOCH})
    slurm = fields.Nested(SlurmInfoSchema, required=True, metadata={"description": "the current attempt's Slurm jobs"})
    next_poll_s = fields.Float(
        required=True, allow_none=True, metadata={"description": "when this record may next change (seconds); null once the job has ended"}
    )
    links = fields.Nested(JobLinksSchema, required=True)
    wait = fields.Nested(WaitSchema, required=True, allow_none=True, metadata={"description": "while queued; null once it started or ended"})


class JobSummarySchema(_JobFieldsSchema):
    """A job in a list: what a table of jobs shows. The whole job (request, attempts, metadata) is at links.self."""

    progress = fields.Nested(ProgressSchema, required=True, metadata={"description": "null: no progress reported yet", **ref("Progress", nullable=True)})


class JobSchema(_JobFieldsSchema):
    """A gateway job as a portal sees it; `status`, `message`, `metadata_b64`, `job_id` as in the seed."""

    num_mpi = fields.Integer(required=True)
    partition = fields.String(required=True, allow_none=True, metadata={"description": "as requested; null: the configured default"})
    gpus = fields.Integer(required=True, allow_none=True, metadata={"description": "GPUs per node as requested; null: none"})
    time_limit = fields.String(required=True, allow_none=True, metadata={"description": "as requested; null: the configured default"})
    flags = fields.Dict(required=True)
    auto_continue = fields.Integer(required=True, metadata={"description": "automatic continuations the request allows"})
    attempts = fields.List(fields.Nested(AttemptSchema), required=True, metadata={"description": "every attempt, the current one last"})
    input_job_id = fields.String(required=True, allow_none=True, metadata={"description": "the job this one is chained on"})
    select_classes = fields.List(fields.Integer(), required=True, allow_none=True)
    ref_class = fields.Integer(required=True, allow_none=True)
    children = fields.List(
        fields.String(), required=True, allow_none=True, metadata={"description": "jobs chained on this one (GET /jobs/<id> only; null otherwise)"}
    )
    output_url = fields.String(required=True, metadata={"description": "s3:// prefix holding output.tar.gz and metadata.json"})
    # Every key RELION's progress has (the summary's ProgressSchema names the usual ones).
    progress = fields.Dict(
        required=True,
        allow_none=True,
        metadata={"description": "RELION's progress while it runs: iteration, iterations_planned, resolution_angstrom, converged"},
    )
    # Raw, not Dict: a Dict would also say "type: object, additionalProperties" beside the reference.
    metadata = fields.Raw(required=True, metadata={"description": "metadata.json once the job has ended", **ref("JobMetadata", nullable=True)})
    metadata_b64 = fields.String(required=True, allow_none=True, metadata={"description": "metadata.json, base64 (seed compatible)"})
    webhook = fields.Nested(WebhookSecretSchema, required=True, allow_none=True,
                            metadata={"description": "the answer to a submit that asked for one; null otherwise"})


class JobListArgsSchema(Schema):
    state = fields.List(
        fields.String(validate=validate.OneOf(STATES), metadata=ref("JobState")),
        validate=validate.Length(max=len(JobState)),
        metadata={"description": "only jobs in these states (repeat the parameter)"},
    )
    mode = fields.String(validate=validate.OneOf(MODES), metadata=ref("Mode"))
    user_id = fields.String(validate=IDENTIFIER, metadata={"description": "only this user's jobs (admins only)", **IDENTIFIER_DOC})
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))
    page_size = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSummarySchema), required=True, metadata={"description": "summaries, newest first"})
    total = fields.Integer(required=True, metadata={"description": "jobs matching the filters, over all pages"})
    page = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    next = fields.String(required=True, allow_none=True, metadata={"description": "the next page (same filters); null on the last"})
    prev = fields.String(required=True, allow_none=True, metadata={"description": "the previous page; null on the first"})


IDEMPOTENCY_KEY = FullMatch(r"^[\x21-\x7e]{1,128}$", error="must be 1-128 printable ASCII characters without spaces")


class RenderArgsSchema(Schema):
    slurm_test = fields.Boolean(
        load_default=False, metadata={"description": "also ask Slurm (sbatch --test-only) whether it would accept the main script"}
    )


class RenderSchema(Schema):
    """A dry run: what would be submitted, nothing stored, nothing queued."""

    job_id = fields.String(required=True, metadata={"description": "the id this request would get (a new one on every call)"})
    main_script = fields.String(required=True)
    archive_script = fields.String(required=True, metadata={"description": "its dependency names MAIN_JOB_ID, the main job's id at submit time"})
    relion_command = fields.List(fields.String(), required=True, metadata={"description": "argv of the RELION step"})
    command_line = fields.String(required=True, metadata={"description": "the RELION step as one shell-quoted line"})
    resources = fields.Dict(required=True, allow_none=True)
    warnings = fields.List(fields.String(), required=True)
    slurm_test = fields.String(required=True, allow_none=True, metadata={"description": "sbatch --test-only's verdict, when asked"})


class ScriptArgsSchema(Schema):
    which = fields.String(load_default="main", validate=validate.OneOf(["main", "archive"]))


class TokenSchema(Schema):
    """A bearer token as admins see it: never its secret or hash (its exact fields are pinned by the
    admin tooling's tests, so its times stay epoch seconds only)."""

    id = fields.String(required=True, metadata={"description": "the token's public id: rg_<id>_<secret>"})
    user = fields.String(required=True)
    admin = fields.Boolean(required=True)
    created_at = fields.Float(required=True, metadata={"description": "epoch seconds (UTC)"})
    last_used_at = fields.Float(required=True, allow_none=True, metadata={"description": "epoch seconds (UTC)"})
    revoked_at = fields.Float(required=True, allow_none=True, metadata={"description": "epoch seconds (UTC)"})


class LogArgsSchema(Schema):
    stream = fields.String(load_default="out", validate=validate.OneOf(["out", "err", "archive-out", "archive-err"]))
    tail = fields.Integer(validate=validate.Range(min=1, max=100_000), metadata={"description": "only the last N lines"})


class OutputLinkSchema(Schema):
    url = fields.String(required=True, metadata={"description": "presigned GET URL of output.tar.gz"})
    expires_in = fields.Integer(required=True, metadata={"description": "seconds the URL stays valid"})
    bytes = fields.Integer(required=True, allow_none=True)
    sha256 = fields.String(required=True, allow_none=True)
