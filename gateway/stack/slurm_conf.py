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
from gateway.stack.nodes import Topology

log = logging.getLogger(__name__)

MANAGED_HEADER = "# written by relion-gateway stack up"
CLUSTER_NAME = "relion-local"
SLURM_USER = "slurm"
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
SLURMDBD_PORT = 6819
ACCT_DB_NAME = "slurm_acct_db"
ACCT_DB_USER = "slurm"
DEF_MEM_PER_CPU_MB = 1000
GPU_PARTITION = "gpu"

# Slurm's config parser splits on whitespace and treats "#" as a comment: a value holding either
# would silently change the meaning of the line, so refuse it instead of writing a broken config.
_SAFE_VALUE = re.compile(r"^[^\s#\"'\\]+$")


@dataclass(frozen=True)
class SlurmSettings:
    """What the rendered configs depend on."""

    hostname: str
    topology: Topology
    # Per-node directories (TmpFS, stand-in GPUs): <nodes_dir>/<node>/...
    nodes_dir: Path
    ctld_state_dir: Path
    slurmd_spool_dir: Path
    slurm_run_dir: Path
    log_dir: Path
    db_password: str
    # Set once `stack up --with-rest` was ever run: slurmrestd's JWT auth (gateway/stack/slurmrestd.py).
    jwt_key: Path | None = None

    @classmethod
    def for_stack(
        cls, paths: StackPaths, hostname: str, topology: Topology, db_password: str, jwt_key: Path | None = None
    ) -> SlurmSettings:
        return cls(
            hostname=hostname,
            topology=topology,
            nodes_dir=paths.slurm_dir / "nodes",
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


def _node_lines(s: SlurmSettings) -> str:
    topology = s.topology
    if not topology.multinode:
        node = topology.nodes[0]
        return (
            f"NodeName={_v(node.name)} NodeAddr=127.0.0.1 CPUs={node.cpus} RealMemory={node.memory_mb} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=04:00:00 State=UP\n"
            "PartitionName=long Nodes=ALL MaxTime=2-00:00:00 State=UP\n"
        )
    lines = []
    for node in topology.nodes:
        gres = f" Gres=gpu:{node.gpus}" if node.gpus else ""
        # NodeHostname: each slurmd has its own UTS namespace and hostname (nodes.py says why).
        lines.append(
            f"NodeName={_v(node.name)} NodeAddr={_v(node.address)} NodeHostname={_v(node.name)} "
            f"CPUs={node.cpus} RealMemory={node.memory_mb}{gres} State=UNKNOWN"
        )
    gpu_nodes = ",".join(n.name for n in topology.gpu_nodes)
    lines += [
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=04:00:00 State=UP",
        "PartitionName=long Nodes=ALL MaxTime=2-00:00:00 State=UP",
    ]
    if gpu_nodes:
        lines.append(f"PartitionName={GPU_PARTITION} Nodes={_v(gpu_nodes)} MaxTime=04:00:00 State=UP")
    return "\n".join(lines) + "\n"


def _topology_lines(s: SlurmSettings) -> str:
    """Keys a multi-node stack needs (each found by a failure: notes/multinode.md)."""
    if not s.topology.multinode:
        return ""
    gres = (
        "# Stand-in GPUs (notes/gpus.md): gres.conf names character devices; sacct counts gres/gpu.\n"
        "GresTypes=gpu\n"
        "AccountingStorageTRES=gres/gpu\n"
    ) if s.topology.gpu_nodes else ""
    return (
        "# A node whose slurmd stops answering is DOWN after 30 s (Slurm's default, 300 s, suits real\n"
        "# clusters; the fault tests cut a node's link and must see its jobs end within minutes).\n"
        "SlurmdTimeout=30\n"
        "# Nodes share one file system: the pmix plugin mkdir()s its dir below TmpFS and fails if it exists.\n"
        f"TmpFS={_v(s.nodes_dir)}/%n/tmp\n"
        f"{gres}"
    )


def render_slurm_conf(s: SlurmSettings) -> str:
    """Return the text of /etc/slurm/slurm.conf."""
    host = _v(s.hostname)
    topology = s.topology
    # The nodes reach slurmctld (and slurmdbd, for sacct in jobs) at the head's bridge address;
    # %n (the node name) keeps each slurmd's spool, pid and log files apart on the shared disk.
    head = _v(topology.head_address)
    per_node = "/%n" if topology.multinode else ""
    pid_name = "slurmd.%n.pid" if topology.multinode else "slurmd.pid"
    log_name = "slurmd.%n.log" if topology.multinode else "slurmd.log"
    layout = f"{len(topology.nodes)}-node" if topology.multinode else "One-machine"
    return f"""{MANAGED_HEADER}
# {layout} cluster for relion-gateway; rewritten by every `stack up`, local edits are lost.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}({head})
SlurmUser={SLURM_USER}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
{_jwt_lines(s)}SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
StateSaveLocation={_v(s.ctld_state_dir)}
SlurmdSpoolDir={_v(s.slurmd_spool_dir)}{per_node}
SlurmctldPidFile={_v(s.slurm_run_dir / "slurmctld.pid")}
SlurmdPidFile={_v(s.slurm_run_dir / pid_name)}
SlurmctldLogFile={_v(s.log_dir / "slurmctld.log")}
SlurmdLogFile={_v(s.log_dir / log_name)}
{_topology_lines(s)}# A node that was DOWN (e.g. slurmd killed) returns to service when its slurmd registers again.
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
# The nodes declare more CPUs than the machine has; config_overrides keeps them from draining.
SlurmdParameters=config_overrides
# Reject at submit time what can never run, instead of pending forever (Reason=PartitionConfig).
EnforcePartLimits=ALL
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
# Finished jobs stay in squeue/scontrol for 5 minutes; after that only sacct knows them.
MinJobAge=300
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={"localhost" if not topology.multinode else head}
AccountingStoragePort={SLURMDBD_PORT}
# Needed for `sacct -o Comment` (the gateway tags its jobs with --comment).
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
# No cgroups here, so memory is enforced by polling: a step whose processes together use more
# than its --mem is killed and the job ends OUT_OF_MEMORY. Sampling every 2 s catches a RELION
# job that overruns within seconds (a real site would use task/cgroup with ConstrainRAMSpace).
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=2
{_node_lines(s)}"""


def render_gres_conf(s: SlurmSettings) -> str:
    """/etc/slurm/gres.conf: the stand-in GPUs (AutoDetect off: there is no NVML to ask)."""
    lines = [MANAGED_HEADER, "AutoDetect=off"]
    for node in s.topology.gpu_nodes:
        devices = s.nodes_dir / node.name / "dev"
        lines.append(f"NodeName={_v(node.name)} Name=gpu File={_v(devices)}/nvidia[0-{node.gpus - 1}]")
    return "\n".join(lines) + "\n"


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
