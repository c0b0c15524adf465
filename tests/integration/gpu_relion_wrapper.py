"""Stands in for RELION's GPU build in a job: records what a rank sees, then runs the CPU build.

test_gpus.py installs this file (with ``@REAL@`` replaced by the absolute path of the real
relion_refine or relion_refine_mpi, ``@LOG_ROOT@`` by the gateway's [paths] log_root, and a
``#!<python> -I`` line on top) as the gateway's ``[relion] refine_mpi`` and ``refine``. srun
starts it once per rank. Each rank writes ``gpu-wrapper-<rank>.json`` to the job's log directory:
its argv and the GPU variables Slurm set. Then it execs the real RELION with the
``--gpu <devices>`` pair removed, since RELION here is a CPU build.

The log directory is found from the working directory, ``<workspace_root>/<user>/<job_id>/dataset``
(the job script's cd): under ``srun`` the ranks get only the variables in the job's --export list
(sbatch's SLURM_EXPORT_ENV) and Slurm's own, so nothing the script exports reaches them.

Standard library only: it runs under the job's account with the job's environment.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

REAL = "@REAL@"
LOG_ROOT = "@LOG_ROOT@"
VARIABLES = (
    "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL", "SLURMD_NODENAME", "SLURM_PROCID",
    "RG_RANK_PROBE",  # set by [relion.environment] in the job script: it must reach every srun rank
)


def without_gpu(args: list[str]) -> list[str]:
    """``args`` without ``--gpu`` and the device string after it (when it is one, not another option)."""
    kept: list[str] = []
    skip = False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--gpu":
            following = args[index + 1] if index + 1 < len(args) else ""
            skip = bool(following) and not following.startswith("--")
            continue
        kept.append(arg)
    return kept


def main() -> None:
    rank = os.environ.get("SLURM_PROCID") or os.environ.get("PMIX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
    record = {
        "rank": int(rank),
        "hostname": socket.gethostname(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "env": {name: os.environ.get(name) for name in VARIABLES},
        # Every variable of the rank's environment that names loopback (none should, on a cluster).
        "loopback": sorted(k for k, v in os.environ.items() if "127.0.0.1" in v or "localhost" in v),
        "exec": [REAL, *without_gpu(sys.argv[1:])],
    }
    user, job_id = Path.cwd().parts[-3:-1]
    # The job's name is its gateway id; a rank started elsewhere records nothing rather than guess.
    log_dir = Path(LOG_ROOT) / user / job_id
    if job_id == os.environ.get("SLURM_JOB_NAME") and log_dir.is_dir():
        (log_dir / f"gpu-wrapper-{rank}.json").write_text(json.dumps(record, sort_keys=True) + "\n")
    print(f"GPU-WRAPPER rank {rank} on {record['hostname']}: CUDA_VISIBLE_DEVICES={record['env']['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    os.execv(REAL, record["exec"])


if __name__ == "__main__":
    main()
