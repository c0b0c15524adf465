"""GET /service-info: what a portal needs to build its submission form, from the configuration.

After GA4GH WES's service-info: the versions, the modes, the partitions with their limits and
GPUs, the per-user limits and the request fields' bounds, so a form offers only what the gateway
will accept. It reads the configuration only (no Slurm call), so it is as cheap as a job read.
"""
from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest.error_handler import ErrorSchema
from marshmallow import Schema, fields, validate

from gateway import __version__
from gateway.api.docs import DocumentedBlueprint
from gateway.api.schemas import STATES, ref
from gateway.api.parser import StrictJSONParser
from gateway.relion.modes import MODES

blp = DocumentedBlueprint("service", __name__, description="What this gateway offers")
blp.ARGUMENTS_PARSER = StrictJSONParser()

# The partition settings a portal may show ([slurm.partitions.<name>]); nothing else of the table.
PARTITION_FIELDS = ("max_ranks", "max_threads", "max_cpus", "max_memory_mb", "max_time", "cpus_per_node", "max_nodes", "memory_per_node_mb", "gpus")


class PartitionSchema(Schema):
    name = fields.String(required=True)
    default = fields.Boolean(required=True)
    max_ranks = fields.Integer(required=True, allow_none=True)
    max_threads = fields.Integer(required=True, allow_none=True)
    max_cpus = fields.Integer(required=True, allow_none=True)
    max_memory_mb = fields.Integer(required=True, allow_none=True)
    max_time = fields.String(required=True, allow_none=True, metadata={"description": "Slurm time, e.g. 2-00:00:00"})
    cpus_per_node = fields.Integer(required=True, allow_none=True)
    max_nodes = fields.Integer(required=True, allow_none=True)
    memory_per_node_mb = fields.Integer(required=True, allow_none=True)
    gpus = fields.Integer(required=True, allow_none=True, metadata={"description": "GPUs per node; 0: none"})


class ServiceInfoSchema(Schema):
    gateway_version = fields.String(required=True)
    relion_version = fields.String(required=True, metadata={"description": "the site's RELION ([relion] version)"})
    modes = fields.List(fields.String(validate=validate.OneOf(MODES), metadata=ref("Mode")), required=True)
    states = fields.List(fields.String(validate=validate.OneOf(STATES), metadata=ref("JobState")), required=True, metadata={"description": "every job state (README, Job states)"})
    default_partition = fields.String(required=True, allow_none=True)
    default_time_limit = fields.String(required=True)
    partitions = fields.List(fields.Nested(PartitionSchema), required=True)
    limits = fields.Dict(required=True, metadata={"description": "per-user limits: max_active_jobs, submissions_per_minute, max_cores_per_job"})
    max_auto_continue = fields.Integer(required=True)
    dataset_cache = fields.Boolean(required=True, metadata={"description": "whether [job] cache_dir is set"})
    stage_in_quota_bytes = fields.Integer(required=True)


def service_info(config: dict[str, Any]) -> dict[str, Any]:
    default = config["SLURM_PARTITION"] or None
    partitions = [
        {"name": name, "default": name == default, **{key: limits.get(key) for key in PARTITION_FIELDS}}
        for name, limits in sorted(config["SLURM_PARTITIONS"].items())
    ]
    return {
        "gateway_version": __version__,
        "relion_version": str(config["RELION_VERSION"]),
        "modes": list(MODES),
        "states": list(STATES),
        "default_partition": default,
        "default_time_limit": config["SLURM_TIME_LIMIT"],
        "partitions": partitions,
        "limits": {
            "max_active_jobs": int(config["LIMITS_MAX_ACTIVE_JOBS"]),
            "submissions_per_minute": int(config["LIMITS_SUBMISSIONS_PER_MINUTE"]),
            "max_cores_per_job": int(config["LIMITS_MAX_CORES_PER_JOB"]),
        },
        "max_auto_continue": int(config["JOB_MAX_AUTO_CONTINUE"]),
        "dataset_cache": bool(config["JOB_CACHE_DIR"]),
        "stage_in_quota_bytes": int(config["JOB_STAGE_IN_QUOTA_BYTES"]),
    }


@blp.route("/service-info")
class ServiceInfo(MethodView):
    @blp.response(200, ServiceInfoSchema)
    @blp.alt_response(401, schema=ErrorSchema, description="No valid bearer token")
    @blp.doc(operationId="getServiceInfo")
    def get(self) -> dict[str, Any]:
        """Versions, modes, partitions and their limits, GPUs, per-user limits: what a submission form needs."""
        return service_info(current_app.extensions["relion_gateway"].config)
