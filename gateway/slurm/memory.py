"""How Slurm says it killed a job for using too much memory, which its job state may not.

Slurm 22.05 ends such a job in different states depending on how memory is enforced:

- ``JobAcctGatherParams=OverMemoryKill`` (polling, no cgroups; the local stack): the job ends
  FAILED with exit 0:9 and the batch step CANCELLED; slurmstepd writes to the job's stderr
  ``StepId=5798.batch exceeded memory limit (205733888 > 104857600), being killed`` and
  ``Exceeded job memory limit``.
- ``task/cgroup`` with ``ConstrainRAMSpace=yes``: the job usually ends OUT_OF_MEMORY, and
  slurmstepd writes ``Detected 1 oom-kill event(s) in StepId=...``.

So a FAILED or CANCELLED main job whose stderr carries one of these lines is an out-of-memory job.
"""
from __future__ import annotations

from pathlib import Path

from gateway.jobfiles import read_job_file

# Lower-case fragments of slurmstepd's messages (22.05 and the wording of older releases).
MEMORY_KILL_MARKERS = (
    "exceeded memory limit",
    "exceeded job memory limit",
    "exceeded step memory limit",
    "oom-kill event",
    "oom_kill event",
    "out-of-memory handler",
)
# slurmstepd writes its messages at the end; a long RELION log need not be read whole.
TAIL_BYTES = 64 * 1024


def memory_kill_line(stderr: Path) -> str:
    """The first line of a job's stderr in which Slurm reports a memory kill, or ""."""
    # The job's account owns its log dir: read it as a job file (no symlink followed, bounded).
    data = read_job_file(None, stderr)
    if data is None:
        return ""
    text = data[-TAIL_BYTES:].decode(errors="replace")
    for line in text.splitlines():
        if any(marker in line.lower() for marker in MEMORY_KILL_MARKERS):
            return line.strip()
    return ""
