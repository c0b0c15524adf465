"""Render slurm.conf and slurmdbd.conf for a one-machine cluster and write them to /etc/slurm.

Every key here was measured on Slurm 22.05 (see notes/slurm.md); the comments in the rendered
files say why each unusual key is there, for the admin who reads /etc/slurm/slurm.conf later.
"""
from __future__ import annotations

import grp
import logging
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from gateway.stack.layout import StackPaths

log = logging.getLogger(__name__)

MANAGED_HEADER = "# written by relion-gateway stack up"
CLUSTER_NAME = "relion-local"
SLURM_USER = "slurm"
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
SLURMDBD_PORT = 6819
ACCT_DB_NAME = "slurm_acct_db"
ACCT_DB_USER = "slurm"
NODE_CPUS = 16
NODE_MEMORY_MB = 16000
DEF_MEM_PER_CPU_MB = 1000

# Slurm's config parser splits on whitespace and treats "#" as a comment: a value holding either
# would silently change the meaning of the line, so refuse it instead of writing a broken config.
_SAFE_VALUE = re.compile(r"^[^\s#\"'\\]+$")


@dataclass(frozen=True)
class SlurmSettings:
    """What the rendered configs depend on."""

    hostname: str
    ctld_state_dir: Path
    slurmd_spool_dir: Path
    slurm_run_dir: Path
    log_dir: Path
    db_password: str
    # Set once `stack up --with-rest` was ever run: slurmrestd's JWT auth (gateway/stack/slurmrestd.py).
    jwt_key: Path | None = None

    @classmethod
    def for_stack(
        cls, paths: StackPaths, hostname: str, db_password: str, jwt_key: Path | None = None
    ) -> SlurmSettings:
        return cls(
            hostname=hostname,
            ctld_state_dir=paths.ctld_state_dir,
            slurmd_spool_dir=paths.slurmd_spool_dir,
            slurm_run_dir=paths.slurm_run_dir,
            log_dir=paths.log_dir,
            db_password=db_password,
            jwt_key=jwt_key,
        )


def _v(value: object) -> str:
    text = str(value)
    if not _SAFE_VALUE.match(text):
        raise ValueError(f"value {text!r} cannot be written to a Slurm config (whitespace, quote or '#')")
    return text


def _jwt_lines(s: SlurmSettings) -> str:
    if s.jwt_key is None:
        return ""
    # Only after `stack up --with-rest`: slurmrestd forwards each request's JWT, which slurmctld
    # and slurmdbd check with this key; munge stays the main AuthType for daemons and commands.
    return (
        "# slurmrestd (stack up --with-rest): JWTs minted by `scontrol token`, checked with this key.\n"
        "AuthAltTypes=auth/jwt\n"
        f"AuthAltParameters=jwt_key={_v(s.jwt_key)}\n"
    )


def render_slurm_conf(s: SlurmSettings) -> str:
    """Return the text of /etc/slurm/slurm.conf."""
    host = _v(s.hostname)
    return f"""{MANAGED_HEADER}
# One-machine cluster for relion-gateway; rewritten by every `stack up`, local edits are lost.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmUser={SLURM_USER}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
{_jwt_lines(s)}SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
StateSaveLocation={_v(s.ctld_state_dir)}
SlurmdSpoolDir={_v(s.slurmd_spool_dir)}
SlurmctldPidFile={_v(s.slurm_run_dir / "slurmctld.pid")}
SlurmdPidFile={_v(s.slurm_run_dir / "slurmd.pid")}
SlurmctldLogFile={_v(s.log_dir / "slurmctld.log")}
SlurmdLogFile={_v(s.log_dir / "slurmd.log")}
# A node that was DOWN (e.g. slurmd killed) returns to service when its slurmd registers again.
ReturnToService=2
MpiDefault=none
# No cgroups on this machine: plain /proc process tracking and no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Memory is a consumable resource so --mem/--mem-per-cpu are accounted and enforced at submit.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default, a job that asks for no memory would be given the whole node's memory
# and run alone.
DefMemPerCPU={DEF_MEM_PER_CPU_MB}
# The node declares more CPUs than the machine has; config_overrides keeps it from draining.
SlurmdParameters=config_overrides
# Reject at submit time what can never run, instead of pending forever (Reason=PartitionConfig).
EnforcePartLimits=ALL
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
# Finished jobs stay in squeue/scontrol for 5 minutes; after that only sacct knows them.
MinJobAge=300
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={SLURMDBD_PORT}
# Needed for `sacct -o Comment` (the gateway tags its jobs with --comment).
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
# No cgroups here, so memory is enforced by polling: a step whose processes together use more
# than its --mem is killed and the job ends OUT_OF_MEMORY. Sampling every 2 s catches a RELION
# job that overruns within seconds (a real site would use task/cgroup with ConstrainRAMSpace).
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=04:00:00 State=UP
PartitionName=long Nodes=ALL MaxTime=2-00:00:00 State=UP
"""


def render_slurmdbd_conf(s: SlurmSettings) -> str:
    """Return the text of /etc/slurm/slurmdbd.conf (holds the DB password: owner slurm, mode 600)."""
    return f"""{MANAGED_HEADER}
AuthType=auth/munge
{_jwt_lines(s)}DbdHost=localhost
DbdPort={SLURMDBD_PORT}
SlurmUser={SLURM_USER}
PidFile={_v(s.slurm_run_dir / "slurmdbd.pid")}
LogFile={_v(s.log_dir / "slurmdbd.log")}
StorageType=accounting_storage/mysql
# "localhost" makes the MariaDB client use the unix socket, matching the slurm@localhost account.
StorageHost=localhost
StoragePort=3306
StorageUser={ACCT_DB_USER}
StoragePass={_v(s.db_password)}
StorageLoc={ACCT_DB_NAME}
"""


def is_managed(path: Path) -> bool:
    """True when the file at path was written by us (its first line is our header)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().rstrip("\n") == MANAGED_HEADER
    except OSError:
        return False


def write_managed_file(path: Path, content: str, *, mode: int, owner: str | None = None) -> bool:
    """Write content to path unless it is already there; return True when the file changed.

    A file at path that we did not write is moved aside (to .orig, or .orig.N if that exists) once;
    later runs see our header and just compare contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    uid = gid = -1
    if owner is not None:
        uid = pwd.getpwnam(owner).pw_uid
        gid = grp.getgrnam(owner).gr_gid if _group_exists(owner) else pwd.getpwnam(owner).pw_gid
    if path.exists() or path.is_symlink():
        if not is_managed(path):
            backup = _free_backup_name(path)
            log.warning("moving %s (not written by relion-gateway) aside to %s", path, backup)
            path.rename(backup)
        else:
            try:
                same = path.read_text() == content
            except OSError:
                same = False
            if same:
                st = path.stat()
                if (st.st_mode & 0o777) != mode or (uid != -1 and (st.st_uid, st.st_gid) != (uid, gid)):
                    # slurmdbd refuses a slurmdbd.conf that is not owned by SlurmUser with mode 600.
                    os.chown(path, uid, gid)
                    path.chmod(mode)
                return False
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, mode)
    tmp.replace(path)
    log.info("wrote %s", path)
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _free_backup_name(path: Path) -> Path:
    candidate = path.with_name(path.name + ".orig")
    n = 1
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.orig.{n}")
        n += 1
    return candidate
