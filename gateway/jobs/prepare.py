"""Prepare a job: check a request against the rules, plan its allocation, build its record, render its script."""
from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gateway.audit import Actor
from gateway.errors import RequestError
from gateway.database import JobNotFound, JobRecord
from gateway.jobs import rules
from gateway.jobs.chain import resolve_parent
from gateway.jobs.dirs import job_account
from gateway.jobs.resources import check_gpus, gpus_per_node, plan_resources
from gateway.jobs.scripts import JobScripts
from gateway.jobs.spec import Attempt, JobSpec
from gateway.relion.catalogue import validate_options
from gateway.relion.flags import FlagError, NormalisedFlags, normalise_flags
from gateway.storage.boundaries import check_data_boundaries
from gateway.storage.s3 import parse_s3_url


@dataclass
class PreparedJob:
    """A validated, rendered job that has not been submitted."""

    spec: JobSpec
    main_script: str
    flags: NormalisedFlags
    warnings: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def job(self) -> dict[str, Any]:
        """The record as job.json holds it."""
        return self.spec.to_dict()


def _no_jobs(job_id: str) -> JobRecord:
    raise JobNotFound(job_id)


class Preparer:
    def __init__(self, config: dict[str, Any], scripts: JobScripts, find_job: Callable[[str], JobRecord] | None = None) -> None:
        self.config = config
        self.scripts = scripts
        self.find_job = find_job or _no_jobs

    def prepare(self, request: dict[str, Any], *, principal: Actor | None = None) -> PreparedJob:
        """Validate and render a request without submitting it.

        A ``principal`` that is not an admin is held to the per-user S3 boundaries ([s3]
        dataset_prefixes, output_prefixes); admins and offline rendering are not.
        """
        config = self.config
        # A chained job's dataset, --i and --ref come from its parent (checked here, at submit).
        request, chain = resolve_parent(request, self.find_job)
        mode = request["mode"]
        num_mpi = int(request["num_mpi"])
        rules.check_bucket(config, "dataset_s3_url", request["dataset_s3_url"])
        rules.check_bucket(config, "output_s3_prefix", request["output_s3_prefix"])
        if principal is not None and not principal.admin:
            check_data_boundaries(config, request["user_id"], request["dataset_s3_url"], request["output_s3_prefix"])
        try:
            flags = normalise_flags(request.get("flags") or {})
        except FlagError as exc:
            raise RequestError(f"flags.{exc.key}", exc.message) from exc
        flags = rules.mode_flags(mode, flags, num_mpi)
        gpus = int(request.get("gpus") or 0)
        # Before the options, so gpus on a partition without GPUs is told so (field gpus) rather than
        # that a --gpu in its flags needs a GPU partition.
        check_gpus(config, request.get("partition"), gpus)
        try:
            warnings = validate_options(
                flags.options,
                mode=mode,
                relion_version=str(config["RELION_VERSION"]),
                gpu_allowed=gpus_per_node(config, request.get("partition")) > 0,
            )
        except FlagError as exc:
            raise RequestError(f"flags.{exc.key}", exc.message) from exc
        flags = rules.gateway_gpu_flag(flags, gpus)
        rules.check_values(flags)
        threads = rules.check_threads(config, flags, num_mpi)

        job_id = f"job_{mode}_{request['workspace_id']}_{secrets.token_hex(4)}"
        user = request["user_id"]
        account = job_account(config, user)
        log_dir = rules.inside(Path(config["PATHS_LOG_ROOT"]), user, job_id)
        workspace_dir = rules.inside(Path(config["PATHS_WORKSPACE_ROOT"]), user, job_id)
        output_url = parse_s3_url(request["output_s3_prefix"]).child(job_id).url + "/"
        # relion_refine_mpi refuses to run with one rank; the sequential program does the same work.
        relion_binary = config["RELION_REFINE_MPI"] if num_mpi > 1 else config["RELION_REFINE"]
        normalised_request = {**request, "flags": flags.options}
        plan = plan_resources(
            config,
            mode=mode,
            num_mpi=num_mpi,
            threads=threads,
            partition=request.get("partition"),
            time_limit=request.get("time_limit"),
            gpus=gpus,
        )
        plan = dataclasses.replace(plan, account=rules.check_account(config, user, request.get("account")))
        auto_continue = rules.check_auto_continue(config, request.get("auto_continue"))
        accepted_at = time.time()
        spec = JobSpec(
            job_id=job_id,
            user_id=user,
            workspace_id=request["workspace_id"],
            mode=mode,
            request=normalised_request,
            request_sha256=rules.request_hash(normalised_request),
            resources=plan,
            relion_command=(relion_binary, *flags.argv()),
            dataset_s3_url=request["dataset_s3_url"],
            output_url=output_url,
            log_dir=str(log_dir),
            workspace_dir=str(workspace_dir),
            output_prefix=flags.output_prefix,
            output_dir=flags.output_dir,
            accepted_at=accepted_at,
            run_as=account,
            auto_continue=auto_continue,
            attempts=(Attempt(number=1, trigger="submit", created_at=accepted_at),),
            chain=chain,
        )
        return PreparedJob(spec, self.scripts.main(spec), flags, warnings)
