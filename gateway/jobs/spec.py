"""The typed job record: what the gateway decided about one job at submit time.

It crosses two boundaries: the ``jobs.job_json`` column (read back by the poller, retries and
replacements) and ``job.json`` in the job's log directory (read by the job side, which imports
this module under ``python -I``: it must stay standard library only).

``schema_version`` tells the shapes apart. Version 1 is the untyped dict an earlier gateway wrote
(it also carried ``archive_context``, the archive template's variables, which are now derived from
the record and the configuration, so renaming a template variable is no longer a data migration).
The reader is tolerant: a missing field takes its default and an unknown one is ignored, so every
record an earlier gateway stored still loads.
"""
from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOB_SPEC_VERSION = 2
# Records written before the spec was typed have no schema_version at all.
LEGACY_JOB_SPEC_VERSION = 1


@dataclass(frozen=True)
class Resources:
    """The Slurm allocation planned for the main job (gateway.jobs.resources plans it)."""

    partition: str
    ntasks: int
    cpus_per_task: int
    mem_per_cpu_mb: int
    time_limit: str
    # Records written before multi-node planning have neither: one node, no GPUs.
    nodes: int = 1  # --nodes, worked out from the partition's cpus_per_node
    gpus_per_node: int = 0  # --gres=gpu:<n>, the request's gpus
    account: str = ""  # --account ([slurm.accounts], the request's account); "": [slurm] account

    @property
    def time_limit_s(self) -> int:
        from gateway.slurm.times import parse_slurm_time

        return parse_slurm_time(self.time_limit)

    @property
    def total_cpus(self) -> int:
        return self.ntasks * self.cpus_per_task

    @property
    def total_memory_mb(self) -> int:
        return self.total_cpus * self.mem_per_cpu_mb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_cpus": self.total_cpus, "total_memory_mb": self.total_memory_mb}

    @classmethod
    def from_dict(cls, data: Any) -> "Resources | None":
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})
        except (KeyError, TypeError):
            return None


# What started an attempt: the submit itself, the gateway after Slurm ended the previous attempt for
# its time limit, a preemption or a node failure ([job] auto_continue), or a user's POST .../continue.
TRIGGERS = ("submit", "auto", "manual")


@dataclass(frozen=True)
class Attempt:
    """One run of a gateway job in Slurm: the first, or a continuation with RELION's --continue.

    A job keeps one gateway id across attempts; each attempt has its own Slurm jobs. The record's
    last attempt is the current one: its Slurm ids and state live in the job's record until it ends,
    and are copied here when the next attempt starts.
    """

    number: int
    trigger: str = "submit"
    created_at: float = 0.0
    # The iteration RELION continues from (its run_itNNN_optimiser.star), 0 for the first attempt.
    from_iteration: int = 0
    continue_from: str = ""  # that optimiser file, relative to the dataset directory
    # How a continuation found the earlier files: "kept" (the workspace was still there) or
    # "restored" (the archived output was staged back in); "" for the first attempt.
    workspace: str = ""
    # Filled in when the attempt has ended.
    main_slurm_id: str | None = None
    archive_slurm_id: str | None = None
    state: str = ""
    slurm_state: str = ""
    exit_code: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    last_iteration: int | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Attempt | None":
        if not isinstance(data, dict) or not isinstance(data.get("number"), int):
            return None
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# Where a chained job finds its parent's output, relative to its dataset directory, and the
# particles STAR file the gateway writes there for it (its --i).
PARENT_DIR = "parent"
PARENT_STAR = f"{PARENT_DIR}/particles.star"


@dataclass(frozen=True)
class ChainInput:
    """A job that takes its input from an earlier job of the same user (input_job_id).

    Everything the job side needs without asking the gateway again: the parent's recorded outputs
    (gateway.relion.subset.JobOutputs as a dict, paths relative to the parent's dataset directory),
    the class selection, and the identity of the parent's archived output (the dataset cache's key).
    """

    parent_job_id: str
    parent_mode: str
    outputs: dict[str, Any]
    output_url: str  # s3:// of the parent's output.tar.gz
    output_etag: str
    output_bytes: int
    select_classes: tuple[int, ...] | None = None
    ref_class: int | None = None
    particles: int = 0  # how many the selection keeps, from the parent's per-class counts

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["select_classes"] = list(self.select_classes) if self.select_classes is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "ChainInput | None":
        if not isinstance(data, dict) or not data.get("parent_job_id"):
            return None
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if values.get("select_classes") is not None:
            values["select_classes"] = tuple(int(n) for n in values["select_classes"])
        return cls(**values)


@dataclass(frozen=True)
class JobSpec:
    job_id: str = ""
    user_id: str = ""
    workspace_id: str = ""
    mode: str = ""
    # The request as accepted, flags normalised: echoed in metadata.json, never re-read for rules.
    request: dict[str, Any] = field(default_factory=dict)
    request_sha256: str = ""
    resources: Resources | None = None
    relion_command: tuple[str, ...] = ()
    dataset_s3_url: str = ""
    output_url: str = ""
    log_dir: str = ""
    workspace_dir: str = ""
    output_prefix: str = ""
    output_dir: str = ""
    accepted_at: float = 0.0
    # The local account the job runs as ([job] run_as), None for the gateway's own.
    run_as: str | None = None
    main_slurm_id: str | None = None
    archive_slurm_id: str | None = None
    # The request's auto_continue: how many times the gateway may continue the job by itself.
    auto_continue: int = 0
    # Every attempt so far, the current one last; records written before attempts existed have
    # none, which reads as one first attempt.
    attempts: tuple[Attempt, ...] = ()
    chain: ChainInput | None = None
    schema_version: int = JOB_SPEC_VERSION

    @property
    def flags(self) -> dict[str, Any]:
        return dict(self.request.get("flags") or {})

    @property
    def attempt(self) -> Attempt:
        """The current attempt."""
        return self.attempts[-1] if self.attempts else Attempt(number=1, created_at=self.accepted_at)

    @property
    def slurm_name(self) -> str:
        """The main Slurm job's name: the gateway id, and the attempt from the second on.

        Names are how the gateway recognises its Slurm jobs (a Slurm id is not a durable identity,
        gateway.jobs.track), so no attempt may answer to an earlier attempt's name.
        """
        number = self.attempt.number
        return self.job_id if number == 1 else f"{self.job_id}.attempt{number}"

    @property
    def slurm_archive_name(self) -> str:
        return f"{self.slurm_name}.archive"

    @property
    def attempt_started_at(self) -> float:
        """Since when Slurm may hold this attempt's jobs (the lower bound of a find-by-name)."""
        return self.attempt.created_at or self.accepted_at

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["resources"] = self.resources.as_dict() if self.resources else None
        data["relion_command"] = list(self.relion_command)
        data["attempts"] = [a.to_dict() for a in self.attempts]
        data["chain"] = self.chain.to_dict() if self.chain else None
        data["schema_version"] = JOB_SPEC_VERSION  # what is written is always the current shape
        return data

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True) + ("\n" if indent else "")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        ignored = sorted(set(data) - known)
        if ignored:
            log.debug("job record %s: ignoring fields %s", data.get("job_id"), ignored)
        values = {k: v for k, v in data.items() if k in known}
        values["schema_version"] = int(data.get("schema_version", LEGACY_JOB_SPEC_VERSION))
        values["resources"] = Resources.from_dict(data.get("resources"))
        values["relion_command"] = tuple(str(a) for a in data.get("relion_command") or ())
        values["request"] = dict(data.get("request") or {})
        values["accepted_at"] = float(data.get("accepted_at") or 0.0)
        values["chain"] = ChainInput.from_dict(data.get("chain"))
        values["attempts"] = tuple(a for a in (Attempt.from_dict(d) for d in data.get("attempts") or ()) if a is not None)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls.from_dict(dict(json.loads(text)))

    @classmethod
    def load(cls, path: Path) -> "JobSpec":
        return cls.from_json(path.read_text())
