"""RELION's --gpu device string, built inside the job from the GPUs Slurm assigned it.

Standard library only: it runs in the job's batch step, before RELION, under the job's --mem.

Slurm sets ``CUDA_VISIBLE_DEVICES`` in the batch step to the job's GPUs on the first node (the
same as ``SLURM_JOB_GPUS`` there, see shared/notes/gpus.md). CUDA numbers the visible devices
from 0 whatever their real indices, so the string names ordinals 0..k-1. ``--gres=gpu:<n>`` is per
node, so every node of a multi-node job has the same k and the same ordinals.

RELION reads the string as one ':'-separated group per rank that computes: with MPI the leader
(rank 0) only coordinates and gets none; follower i takes group i-1. A sequential relion_refine
spreads its threads over the devices of its one group ("0,1").
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
SLURM_ENV = "SLURM_JOB_GPUS"
# What Slurm puts in CUDA_VISIBLE_DEVICES when a GRES has no device files (gpus.md: regular files).
NO_DEVICES = "NoDevFiles"
RECORD_NAME = "gpus.json"


class NoGpuError(Exception):
    """No GPU is visible to the job: RELION with --gpu would fail, later and less clearly."""


@dataclass(frozen=True)
class GpuLayout:
    """What gpus.json holds: the devices seen and the --gpu string built from them."""

    visible_devices: str
    device_string: str
    ranks: int
    mode: str = ""
    source: str = VISIBLE_ENV
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def visible_devices(environ: Mapping[str, str]) -> tuple[str, str, int]:
    """(variable read, its value, devices counted) from CUDA_VISIBLE_DEVICES, else SLURM_JOB_GPUS."""
    source = VISIBLE_ENV if VISIBLE_ENV in environ else SLURM_ENV
    raw = environ.get(source, "").strip()
    if raw == NO_DEVICES:
        return source, raw, 0
    count = 0
    for token in raw.split(","):
        token = token.strip()
        # CUDA stops at the first entry that is not a device ("-1" hides all that follow).
        if not token or (token.startswith("-") and token[1:].isdigit()):
            break
        count += 1
    return source, raw, count


def device_string(ranks: int, devices: int) -> tuple[str, list[str]]:
    """RELION's --gpu value for ``ranks`` MPI ranks (1: sequential) over ``devices`` ordinals, and warnings."""
    if devices < 1:
        raise ValueError("device_string needs at least one device")
    if ranks <= 1:
        return ",".join(str(ordinal) for ordinal in range(devices)), []
    followers = ranks - 1
    groups = [str((follower - 1) % devices) for follower in range(1, ranks)]
    warnings: list[str] = []
    if followers > devices:
        warnings.append(f"{followers} ranks share {devices} devices")
    elif followers < devices:
        idle = ",".join(str(ordinal) for ordinal in range(followers, devices))
        warnings.append(f"{followers} follower ranks for {devices} devices: ordinals {idle} stay idle")
    return ":".join(groups), warnings


def gpu_layout(environ: Mapping[str, str], *, ranks: int, mode: str = "") -> GpuLayout:
    """The layout for this job's environment; NoGpuError when it sees no device."""
    source, raw, count = visible_devices(environ)
    if count == 0:
        shown = f"{VISIBLE_ENV}={environ[VISIBLE_ENV]!r}" if VISIBLE_ENV in environ else f"{VISIBLE_ENV} is unset"
        slurm = f"{SLURM_ENV}={environ[SLURM_ENV]!r}" if SLURM_ENV in environ else f"{SLURM_ENV} is unset"
        raise NoGpuError(
            f"no GPU is visible to this job ({shown}, {slurm}): the job asked for GPUs, but Slurm assigned "
            "none it could name (does the node's gres.conf give each GPU a File=?)"
        )
    string, warnings = device_string(ranks, count)
    if source != VISIBLE_ENV:
        warnings.insert(
            0,
            f"{VISIBLE_ENV} is unset: counted {SLURM_ENV}={raw} and used ordinals 0..{count - 1}, "
            "which CUDA uses only when the device cgroup hides the node's other GPUs",
        )
    return GpuLayout(raw, string, ranks, mode, source, warnings)


def write_layout(layout: GpuLayout, log_dir: Path) -> Path:
    path = log_dir / RECORD_NAME
    path.write_text(json.dumps(layout.as_dict(), indent=2, sort_keys=True) + "\n")
    return path


def current_layout(*, ranks: int, mode: str, log_dir: Path) -> GpuLayout:
    """The layout for the running job, recorded as gpus.json in its log directory."""
    layout = gpu_layout(os.environ, ranks=ranks, mode=mode)
    write_layout(layout, log_dir)
    return layout
