"""The variables the sbatch templates get, derived from a job's record and the configuration.

Nothing here is stored: the archive hook's script is rendered again from the record whenever it is
(re)submitted (a lost hook replaced, an archive retried), so a record never pins template variables.
"""
from __future__ import annotations

import grp
import pwd
import socket
from typing import Any

from gateway import __version__
from gateway.callbacks import TOKEN_ENV
from gateway.jobs.dirs import cache_root
from gateway.jobs.spec import JobSpec, Resources
from gateway.relion.catalogue import CATALOGUE
from gateway.sbatch.render import ARCHIVE_TEMPLATE, MAIN_TEMPLATE, ScriptRenderer
from gateway.slurm.times import parse_slurm_time

# Placeholder shown in a dry-run archive script, where the main job has no Slurm id yet.
DRY_RUN_MAIN_ID = "MAIN_JOB_ID"
# The hook packs and uploads with two threads (pigz and the uploader); it needs no more.
ARCHIVE_CPUS = 2


def callback_url(config: dict[str, Any]) -> str:
    """Where jobs send signed events: [server] public_url, else host and port."""
    if config["SERVER_PUBLIC_URL"]:
        return str(config["SERVER_PUBLIC_URL"]).rstrip("/") + config["SERVER_BASE_PATH"]
    host = config["SERVER_HOST"]
    host = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{config['SERVER_PORT']}{config['SERVER_BASE_PATH']}"


class JobScripts:
    """Renders a job's main script and its archive hook from its ``JobSpec``."""

    def __init__(self, config: dict[str, Any], renderer: ScriptRenderer) -> None:
        self.config = config
        self.renderer = renderer

    def main(self, spec: JobSpec) -> str:
        resources = _resources(spec)
        flags = spec.flags
        relion_binary, *relion_args = spec.relion_command
        context = {
            **self._common(spec, resources),
            "job_name": spec.slurm_name,
            "attempt": spec.attempt.number,
            # A continuation: the optimiser file RELION continues from (the stage-in keeps or
            # restores the earlier attempt's output so that it is there).
            "continue_from": spec.attempt.continue_from,
            # A chained job: the stage-in reads its parent from job.json.
            "chained": spec.chain is not None,
            # The watcher says when the remaining iterations cannot finish within this.
            "time_limit_seconds": parse_slurm_time(resources.time_limit),
            "ntasks": resources.ntasks,
            "cpus_per_task": resources.cpus_per_task,
            "nodes": resources.nodes,
            "gpus": resources.gpus_per_node,
            "time_limit": resources.time_limit,
            "workspace_dir": spec.workspace_dir,
            "environment": sorted(self.config["RELION_ENVIRONMENT"].items()),
            "dataset_s3_url": spec.dataset_s3_url,
            "quota_bytes": int(self.config["JOB_STAGE_IN_QUOTA_BYTES"]),
            "max_members": int(self.config["JOB_STAGE_IN_MAX_MEMBERS"]),
            # The job account's own part of the dataset cache ([job] cache_dir), "" without one.
            "cache_dir": str(cache_root(self.config, spec.run_as) or ""),
            "cache_quota_bytes": int(self.config["JOB_CACHE_QUOTA_BYTES"]),
            "output_dir": spec.output_dir,
            "input_star": flags["i"],
            "output_prefix": spec.output_prefix,
            "iterations": flags.get("iter") if spec.mode != "autorefine" else None,
            "required_inputs": [
                str(value) for key, value in flags.items() if key not in ("i", "o") and CATALOGUE[key].kind == "path"
            ],
            "mpi": resources.ntasks > 1,
            "launcher": self.config["RELION_LAUNCHER"],
            "relion_binary": relion_binary,
            "relion_args": relion_args,
        }
        return self.renderer.render(MAIN_TEMPLATE, context)

    def archive(self, spec: JobSpec, main_slurm_id: str | None, *, after_main: bool = True) -> str:
        """The hook's script; ``after_main`` False submits it with no dependency (the main job has ended)."""
        context = {
            **self._common(spec, _resources(spec)),
            # [slurm] archive_partition, else the job's own: the hook needs no GPU node.
            **({"partition": self.config["SLURM_ARCHIVE_PARTITION"]} if self.config["SLURM_ARCHIVE_PARTITION"] else {}),
            "archive_job_name": spec.slurm_archive_name,
            "after_main": after_main,
            "archive_cpus": ARCHIVE_CPUS,
            # Not RELION's estimate: a job given little memory per CPU must still get its hook run.
            "archive_memory_mb": int(self.config["SLURM_ARCHIVE_MEMORY_MB"]),
            "archive_time_limit": self.config["SLURM_ARCHIVE_TIME_LIMIT"],
            "compressor": self.config["JOB_ARCHIVE_COMPRESSOR"],
            "main_slurm_id": main_slurm_id,
            # The hook leaves the output in the dataset cache for chained jobs.
            "cache_dir": str(cache_root(self.config, spec.run_as) or ""),
            "cache_quota_bytes": int(self.config["JOB_CACHE_QUOTA_BYTES"]),
        }
        return self.renderer.render(ARCHIVE_TEMPLATE, context)

    def _common(self, spec: JobSpec, resources: Resources) -> dict[str, Any]:
        account = spec.run_as
        return {
            "job_id": spec.job_id,
            "user_id": spec.user_id,
            "workspace_id": spec.workspace_id,
            "mode": spec.mode,
            "request_hash": spec.request_sha256,
            "gateway_version": __version__,
            "comment": f"relion-gateway:{spec.job_id}",
            "log_dir": spec.log_dir,
            "partition": resources.partition,
            # Records made before [slurm.accounts] have none: the configured one, as they were rendered.
            "account": resources.account or self.config["SLURM_ACCOUNT"],
            "qos": self.config["SLURM_QOS"],
            "extra_directives": list(self.config["SLURM_EXTRA_DIRECTIVES"]),
            "setup_lines": list(self.config["RELION_SETUP_LINES"]),
            "python": self.config["JOB_PYTHON"],
            "mem_per_cpu_mb": resources.mem_per_cpu_mb,
            "callback_url": callback_url(self.config),
            "run_as": account or "",
            "run_as_group": grp.getgrgid(pwd.getpwnam(account).pw_gid).gr_name if account else "",
            # sbatch --export: never ALL, so nothing of the gateway's environment but these reaches a job.
            "export": sorted({*self.config["JOB_EXPORT"], TOKEN_ENV}),
        }


def _resources(spec: JobSpec) -> Resources:
    if spec.resources is None:
        raise ValueError(f"job {spec.job_id} has no planned resources in its record")
    return spec.resources
