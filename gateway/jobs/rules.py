"""The rules a job request must meet beyond its schema: the one owner of each.

The marshmallow schema checks shapes (types, lengths, patterns); these check what needs the
configuration or several fields at once. Each raises ``RequestError`` naming the field and the rule.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from gateway.errors import RequestError
from gateway.relion.catalogue import CATALOGUE
from gateway.relion.flags import NormalisedFlags
from gateway.storage.s3 import StorageError, check_s3_url, parse_s3_url
from gateway.textrules import text_problem

# Every number a request passes to RELION, whatever the option's own bounds.
MAX_NUMBER = 1e9
# A file name (one path component) no common file system takes beyond this (NAME_MAX).
MAX_NAME_BYTES = 255


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


# What S3 answers a HEAD of a missing or an unreadable object (codes boto3 and S3 servers give).
_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "Forbidden"}


def check_dataset_object(storage: Any, url: str, quota_bytes: int) -> None:
    """Fail fast at submit: the dataset exists, the gateway may read it, and it is within the quota.

    One HEAD, before anything reaches Slurm: on a busy cluster a job naming a missing dataset would
    otherwise wait in the queue for hours and fail only when it starts. A compressed object already
    larger than the stage-in quota cannot fit once extracted. S3 not answering is not the request's
    fault: the StorageError goes on (a 503 with Retry-After) and nothing is stored or queued.
    """
    try:
        info = storage.head(parse_s3_url(url))
    except StorageError as exc:
        if exc.code in _MISSING:
            raise RequestError("dataset_s3_url", f"there is no object at {url} (S3 answered {exc.code})") from exc
        if exc.code in _DENIED:
            raise RequestError("dataset_s3_url", f"the gateway may not read {url} (S3 answered {exc.code})") from exc
        raise
    if info.size == 0:
        raise RequestError("dataset_s3_url", f"{url} is an empty object, not a .tar.gz")
    if quota_bytes > 0 and info.size > quota_bytes:
        raise RequestError(
            "dataset_s3_url",
            f"{url} is {info.size} bytes compressed, more than the stage-in quota ([job] stage_in_quota_bytes) of {quota_bytes}",
        )


def check_bucket(config: dict[str, Any], field_name: str, url: str) -> None:
    try:
        check_s3_url(url)
        location = parse_s3_url(url)
    except ValueError as exc:
        raise RequestError(field_name, str(exc)) from exc
    allowed = config["S3_ALLOWED_BUCKETS"]
    if allowed and location.bucket not in allowed:
        raise RequestError(field_name, f"bucket {location.bucket!r} is not one of the allowed buckets {allowed}")
    if field_name == "dataset_s3_url" and not location.key.endswith((".tar.gz", ".tgz")):
        raise RequestError(field_name, "must name a .tar.gz (or .tgz) object")


def mode_flags(mode: str, flags: NormalisedFlags, num_mpi: int) -> NormalisedFlags:
    """What each mode needs and refuses; autorefine gets the two switches it always needs."""
    options = dict(flags.options)
    if mode == "2d" and "ref" in options:
        raise RequestError("flags.ref", "mode 2d (2D classification) takes no --ref")
    if mode in ("3d", "autorefine") and "ref" not in options:
        raise RequestError("flags.ref", f"mode {mode} needs --ref (a reference map in the dataset)")
    if mode == "autorefine":
        # RELION's gold-standard refinement: the gateway adds the two switches it needs.
        options.setdefault("auto_refine", True)
        options.setdefault("split_random_halves", True)
        if num_mpi < 3 or num_mpi % 2 == 0:
            raise RequestError(
                "num_mpi",
                "autorefine needs an odd number of MPI ranks, at least 3 (1 leader + 2 equal halves); "
                f"got {num_mpi}",
            )
    elif "auto_refine" in options:
        raise RequestError("flags.auto_refine", f"--auto_refine belongs to mode autorefine, not {mode}")
    return NormalisedFlags(options)


def gateway_gpu_flag(flags: NormalisedFlags, gpus: int) -> NormalisedFlags:
    """With gpus, --gpu is the gateway's: the job side builds its device string from the GPUs Slurm
    assigns (the ids a request could name are not known before the job runs), and the script adds it."""
    if gpus <= 0 or "gpu" not in flags.options:
        return flags
    value = flags.options["gpu"]
    if value is not True:
        raise RequestError(
            "flags.gpu",
            f"--gpu {value!r} names devices, but with gpus the job builds the device string from the GPUs "
            "Slurm assigns it; send --gpu true or leave it out",
        )
    return NormalisedFlags({key: v for key, v in flags.options.items() if key != "gpu"})


def check_auto_continue(config: dict[str, Any], value: Any) -> int:
    """auto_continue within [job] max_auto_continue (the schema has checked it is a whole number >= 0)."""
    wanted = int(value or 0)
    allowed = int(config["JOB_MAX_AUTO_CONTINUE"])
    if wanted > allowed:
        raise RequestError(
            "auto_continue",
            f"at most {allowed} automatic continuations ([job] max_auto_continue); each is a new allocation of the job's size",
        )
    return wanted


def check_threads(config: dict[str, Any], flags: NormalisedFlags, num_mpi: int) -> int:
    """The threads per rank (--j), within [limits] max_cores_per_job for all ranks together."""
    threads = flags.options.get("j", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise RequestError("flags.j", "--j (threads per rank) must be a whole number >= 1")
    max_cores = int(config["LIMITS_MAX_CORES_PER_JOB"])
    if max_cores > 0 and num_mpi * threads > max_cores:
        raise RequestError(
            "num_mpi",
            f"{num_mpi} ranks x {threads} threads = {num_mpi * threads} cores; "
            f"the limit ([limits] max_cores_per_job) is {max_cores}",
        )
    return threads


def check_values(flags: NormalisedFlags) -> None:
    """Bounds every option shares: finite numbers of at most MAX_NUMBER, text that cannot read as an option."""
    for key, value in flags.options.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise RequestError(f"flags.{key}", f"--{key} must be a finite number")
            if abs(value) > MAX_NUMBER:
                raise RequestError(f"flags.{key}", f"--{key} must be between -{MAX_NUMBER:g} and {MAX_NUMBER:g}, got {value!r}")
        elif isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                raise RequestError(f"flags.{key}", f"--{key} must not contain {problem}")
            if value.startswith("-"):
                raise RequestError(f"flags.{key}", f"--{key} must not start with '-' (it would read as an option): {value!r}")
            spec = CATALOGUE.get(key)
            if spec is not None and spec.kind == "path" and any(len(part.encode()) > MAX_NAME_BYTES for part in value.split("/")):
                raise RequestError(f"flags.{key}", f"--{key} has a path component longer than {MAX_NAME_BYTES} bytes")


def inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused unless it resolves inside ``root`` (symlinks followed)."""
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root) or path.resolve() == resolved_root:
        raise RequestError("workspace_id", f"the job's directory {str(path)!r} would leave {str(root)!r}")
    return path


def user_accounts(config: dict[str, Any], user: str) -> list[str]:
    """The Slurm accounts a user may charge, the default first ([] if none)."""
    accounts: dict[str, Any] = config["SLURM_ACCOUNTS"]
    if not accounts:
        return [str(config["SLURM_ACCOUNT"])] if config["SLURM_ACCOUNT"] else []
    allowed = accounts.get(user, accounts.get("*"))
    if allowed is None:
        return []
    return [allowed] if isinstance(allowed, str) else [str(a) for a in allowed]


def check_account(config: dict[str, Any], user: str, requested: str | None) -> str:
    """The Slurm account a user's job is charged to (--account).

    ``[slurm.accounts]`` maps portal users to the accounts (grants) they may charge, the first being
    their default; a ``"*"`` entry is everyone else's. With a map, a user it does not name (and no
    ``"*"``) may not submit, and a request's ``account`` must be one of the user's. Without one, only
    ``[slurm] account`` (or none) is charged.
    """
    default = str(config["SLURM_ACCOUNT"])
    accounts: dict[str, Any] = config["SLURM_ACCOUNTS"]
    if not accounts:
        if requested not in (None, default):
            raise RequestError("account", f"this gateway charges every job to {default or 'the users default account'!r}; "
                                          "[slurm.accounts] would let users choose")
        return default
    allowed = user_accounts(config, user)
    if not allowed:
        raise RequestError("account", f"user {user!r} has no Slurm account to charge ([slurm.accounts])", status=403)
    if requested is None:
        return allowed[0]
    if requested not in allowed:
        raise RequestError("account", f"user {user!r} may charge {allowed} ([slurm.accounts]), not {requested!r}", status=403)
    return requested
