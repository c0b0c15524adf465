"""The six daemons of the local stack, in start order, with their preparation and readiness checks.

Every daemon runs in the foreground under our launcher (munged -F, slurm* -D, mariadbd and nanio
never fork), so the pid we record is the daemon itself; the daemons' own pid files are kept
apart (Debian defaults, or ``run/slurm/``) so that the two never race.
"""
from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from gateway.process import run_command
from gateway.stack import s3_server
from gateway.stack.credentials import StackSecrets
from gateway.stack.daemons import Daemon, NodeEntry, Probe, command_ok
from gateway.stack.layout import StackPaths
from gateway.stack.nodes import Node, Topology, ensure_gpu_devices, ensure_node_dirs
from gateway.stack.slurm_conf import (
    ACCT_DB_NAME,
    ACCT_DB_USER,
    CLUSTER_NAME,
    SLURM_USER,
    SLURMDBD_PORT,
)

log = logging.getLogger(__name__)

DAEMON_ORDER = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "nanio")

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MYSQL_RUN_DIR = Path("/run/mysqld")
MYSQL_DATADIR = Path("/var/lib/mysql")
# sinfo %t states of a node that can take jobs (a trailing "*" means "not responding").
NODE_READY_STATES = {"idle", "mix", "alloc", "comp"}
NODE_RESUMABLE_STATES = {"down", "drain", "drng", "drained", "draining", "fail", "failg"}


def short_hostname() -> str:
    """The node name Slurm uses: `hostname -s` (the part of the host name before the first dot)."""
    return socket.gethostname().split(".")[0]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_dir(path: Path, *, owner: str | None = None, mode: int = 0o755) -> None:
    """mkdir -p, then fix owner and mode only if they differ (a warm `up` changes nothing)."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    if owner is not None:
        uid = pwd.getpwnam(owner).pw_uid
        gid = grp.getgrnam(owner).gr_gid
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid)
    if st.st_mode & 0o7777 != mode:
        path.chmod(mode)


def ensure_owned_file(path: Path, owner: str, mode: int = 0o640) -> None:
    """Create a file owned by owner (Slurm opens its log files after dropping root)."""
    if not path.exists():
        path.touch(mode=mode)
    st = path.stat()
    uid = pwd.getpwnam(owner).pw_uid
    gid = grp.getgrnam(owner).gr_gid
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)


def _chown_tree(root: Path, owner: str) -> None:
    uid = pwd.getpwnam(owner).pw_uid
    gid = grp.getgrnam(owner).gr_gid
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.chown(root, uid, gid)


def make_slurm_dirs(paths: StackPaths) -> None:
    """Directories that Slurm's daemons write after dropping root to SlurmUser."""
    ensure_dir(paths.slurm_run_dir, owner=SLURM_USER)
    ensure_dir(paths.ctld_state_dir, owner=SLURM_USER)
    if paths.ctld_state_dir.stat().st_uid != pwd.getpwnam(SLURM_USER).pw_uid:
        _chown_tree(paths.ctld_state_dir, SLURM_USER)
    ensure_dir(paths.slurmd_spool_dir)  # slurmd runs as root
    for name in ("slurmctld.log", "slurmdbd.log"):
        ensure_owned_file(paths.log_dir / name, SLURM_USER)


# --- munged -------------------------------------------------------------------------------------


def _munge_prestart() -> None:
    ensure_dir(MUNGE_RUN_DIR, owner="munge", mode=0o755)
    for path, mode in ((Path("/var/log/munge"), 0o700), (Path("/var/lib/munge"), 0o711)):
        ensure_dir(path, owner="munge", mode=mode)
    if not MUNGE_KEY.exists():
        # The Debian package creates a key; a machine where it is missing gets a fresh one.
        log.info("creating %s", MUNGE_KEY)
        ensure_dir(MUNGE_KEY.parent, owner="munge", mode=0o700)
        run_command(["mungekey", "-c", "-k", str(MUNGE_KEY)], timeout=30)
    uid = pwd.getpwnam("munge").pw_uid
    gid = grp.getgrnam("munge").gr_gid
    st = MUNGE_KEY.stat()
    if (st.st_uid, st.st_gid) != (uid, gid) or st.st_mode & 0o777 != 0o600:
        # munged refuses a key readable by others or not owned by the user it runs as.
        os.chown(MUNGE_KEY, uid, gid)
        MUNGE_KEY.chmod(0o600)


def _munge_probe(_since: float | None) -> bool:
    # `munge -n | unmunge` as two calls: run_command never uses a shell.
    credential = command_ok(["munge", "-n"], timeout=5)
    return bool(credential) and command_ok(["unmunge"], timeout=5, input=credential) is not None


# --- mariadbd -----------------------------------------------------------------------------------


def _mariadb_prestart() -> None:
    ensure_dir(MYSQL_RUN_DIR, owner="mysql", mode=0o755)
    if not (MYSQL_DATADIR / "mysql").is_dir():
        log.info("initialising the MariaDB datadir %s", MYSQL_DATADIR)
        ensure_dir(MYSQL_DATADIR, owner="mysql", mode=0o755)
        run_command(["mariadb-install-db", "--user=mysql", f"--datadir={MYSQL_DATADIR}"], timeout=300)


def _mariadb_probe(_since: float | None) -> bool:
    return command_ok(["mariadb-admin", "--connect-timeout=2", "ping"], timeout=10) is not None


def provision_accounting_db(password: str) -> None:
    """Create slurm_acct_db and slurm@localhost, and (re)set its password to ours.

    Runs as root over the unix socket (Debian's root@localhost uses unix_socket auth). ALTER USER
    after CREATE ... IF NOT EXISTS fixes a database left from an earlier run with another password.
    The SQL goes on stdin so the password never appears in `ps`.
    """
    sql = (
        f"CREATE DATABASE IF NOT EXISTS `{ACCT_DB_NAME}`;\n"
        f"CREATE USER IF NOT EXISTS '{ACCT_DB_USER}'@'localhost' IDENTIFIED BY '{password}';\n"
        f"ALTER USER '{ACCT_DB_USER}'@'localhost' IDENTIFIED BY '{password}';\n"
        f"GRANT ALL PRIVILEGES ON `{ACCT_DB_NAME}`.* TO '{ACCT_DB_USER}'@'localhost';\n"
        "FLUSH PRIVILEGES;\n"
    )
    run_command(["mariadb", "--batch", "-u", "root"], input=sql, timeout=60)


# --- slurmctld / slurmd -------------------------------------------------------------------------


def wipe_foreign_cluster_state(state_dir: Path, cluster: str = CLUSTER_NAME) -> bool:
    """Empty StateSaveLocation if it belongs to another ClusterName; return True when wiped.

    slurmctld refuses to start when the clustername file in its state dir names another cluster.
    """
    marker = state_dir / "clustername"
    try:
        found = marker.read_text().strip()
    except FileNotFoundError:
        return False
    if found == cluster:
        return False
    log.warning("%s holds state of cluster %r, not %r: wiping it", state_dir, found, cluster)
    for child in state_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return True


def _slurmctld_probe(_since: float | None) -> bool:
    out = command_ok(["scontrol", "ping"], timeout=10)
    return out is not None and "is UP" in out


def node_state(node: str) -> str | None:
    """sinfo's compact state of node (e.g. 'idle', 'down*', 'drain'), or None."""
    out = command_ok(["sinfo", "-h", "-n", node, "-o", "%t"], timeout=10)
    if out is None:
        return None
    lines = out.split()
    return lines[0] if lines else None


def slurmd_start_time(node: str) -> float | None:
    """When the node's slurmd last registered (scontrol's SlurmdStartTime, local time)."""
    out = command_ok(["scontrol", "show", "node", "-o", node], timeout=10)
    if out is None:
        return None
    for token in out.split():
        if token.startswith("SlurmdStartTime="):
            try:
                return datetime.strptime(token.split("=", 1)[1], "%Y-%m-%dT%H:%M:%S").timestamp()
            except ValueError:
                return None
    return None


class SlurmdProbe:
    """Ready when sinfo shows the node usable and, after a (re)start, the new slurmd registered.

    slurmctld keeps showing a node 'idle' for minutes after its slurmd died, so a fresh slurmd is
    only ready once SlurmdStartTime is not older than our spawn.
    """

    def __init__(self, node: str) -> None:
        self.node = node

    def __call__(self, since: float | None) -> bool:
        state = node_state(self.node)
        if state is None or state not in NODE_READY_STATES:
            return False
        if since is None:
            return True
        started = slurmd_start_time(self.node)
        # SlurmdStartTime has one-second resolution.
        return started is not None and started >= since - 1.5

    def repair(self) -> None:
        state = node_state(self.node)
        if state is None or state.endswith("*"):
            return  # not responding: resuming will not help, the registration will
        if state.rstrip("~#!%$@^-") in NODE_RESUMABLE_STATES:
            log.info("node %s is %s: resuming it", self.node, state)
            command_ok(["scontrol", "update", f"nodename={self.node}", "state=resume"], timeout=10)


# --- nanio --------------------------------------------------------------------------------------


class S3Probe:
    """Ready when an authenticated list_buckets succeeds; the boto3 client is built on first use."""

    def __init__(self, secrets: StackSecrets | None, host: str) -> None:
        self.secrets = secrets
        self.host = host
        self._client: s3_server.S3Client | None = None

    def client(self) -> s3_server.S3Client:
        if self.secrets is None:
            raise RuntimeError("no S3 credentials yet (run `stack up`)")
        if self._client is None:
            self._client = s3_server.s3_client(
                self.secrets.s3_access_key, self.secrets.s3_secret_key, timeout=3.0, retries=0
            )
        return self._client

    def __call__(self, _since: float | None) -> bool:
        # A closed port answers in microseconds; boto3 would spend its timeout and retries.
        if self.secrets is None or not port_open(self.host, s3_server.S3_PORT):
            return False
        return s3_server.s3_ready(self.client())


# --- the list -----------------------------------------------------------------------------------


def build_daemons(paths: StackPaths, secrets: StackSecrets | None, topology: Topology) -> list[Daemon]:
    """Return the stack's daemons in start order (stop in reverse): one slurmd per node."""
    run, out = paths.pid_file, paths.out_file
    s3_probe = S3Probe(secrets, topology.head_address)

    def slurmdbd_prestart() -> None:
        if secrets is None:
            raise RuntimeError("no stack secrets")
        provision_accounting_db(secrets.mariadb_slurm_password)

    def slurmctld_prestart() -> None:
        wipe_foreign_cluster_state(paths.ctld_state_dir)
        make_slurm_dirs(paths)

    def nanio_prestart() -> None:
        s3_server.ensure_nanio_venv(paths.nanio_venv)
        paths.s3_data_dir.mkdir(parents=True, exist_ok=True)

    def slurm_daemon(
        name: str, probe: Probe, prestart: Callable[[], None], repair: Callable[[], None] | None = None
    ) -> Daemon:
        # Slurm's daemons run in the foreground (-D) and log to <log_dir>/<name>.log (slurm_conf.py).
        return Daemon(
            name=name,
            argv=[f"/usr/sbin/{name}", "-D"],
            pid_file=run(name),
            log_file=out(name),
            names=(name,),
            probe=probe,
            prestart=prestart,
            repair=repair,
            extra_logs=(paths.log_dir / f"{name}.log",),
        )

    nanio_env = (
        s3_server.nanio_env(secrets.s3_access_key, secrets.s3_secret_key) if secrets is not None else {}
    )
    return [
        Daemon(
            name="munged",
            argv=["/usr/sbin/munged", "--foreground"],
            pid_file=run("munged"),
            log_file=out("munged"),
            names=("munged",),
            probe=_munge_probe,
            user="munge",
            prestart=_munge_prestart,
            ready_timeout=20.0,
            extra_logs=(Path("/var/log/munge/munged.log"),),
        ),
        Daemon(
            name="mariadbd",
            # slurmdbd asks for a long lock wait (its rollups hold locks); costs nothing here.
            argv=["/usr/sbin/mariadbd", "--user=mysql", "--innodb-lock-wait-timeout=900"],
            pid_file=run("mariadbd"),
            log_file=out("mariadbd"),
            names=("mariadbd", "mysqld"),
            probe=_mariadb_probe,
            prestart=_mariadb_prestart,
            ready_timeout=120.0,  # crash recovery after a SIGKILL can take a while
            stop_timeout=60.0,
        ),
        slurm_daemon("slurmdbd", lambda _since: port_open("127.0.0.1", SLURMDBD_PORT), slurmdbd_prestart),
        slurm_daemon("slurmctld", _slurmctld_probe, slurmctld_prestart),
        *[slurmd_daemon(paths, topology, node) for node in topology.nodes],
        Daemon(
            name="nanio",
            argv=s3_server.nanio_argv(paths.nanio_venv, paths.s3_data_dir, topology.head_address),
            pid_file=run("nanio"),
            log_file=out("nanio"),
            names=("nanio",),
            probe=s3_probe,
            env=nanio_env,
            prestart=nanio_prestart,
            ready_timeout=30.0,
        ),
    ]


def slurmd_daemon(paths: StackPaths, topology: Topology, node: Node) -> Daemon:
    """The slurmd of one node: on the host in the one-node layout, else inside the node's namespaces."""
    probe = SlurmdProbe(node.name)

    def prestart() -> None:
        ensure_dir(paths.slurmd_spool_dir)
        if topology.multinode:
            ensure_node_dirs(paths, topology)
            ensure_gpu_devices(paths, topology)

    if not topology.multinode:
        # As before the multi-node layout, so an upgrade adopts a running one-node slurmd.
        return Daemon(
            name="slurmd", argv=["/usr/sbin/slurmd", "-D"], pid_file=paths.pid_file("slurmd"),
            log_file=paths.out_file("slurmd"), names=("slurmd",), probe=probe, prestart=prestart,
            repair=probe.repair, extra_logs=(paths.log_dir / "slurmd.log",),
        )
    name = f"slurmd-{node.name}"
    return Daemon(
        name=name,
        # -N: which NodeName line this slurmd is (every node runs the same binary and config).
        argv=["/usr/sbin/slurmd", "-D", "-N", node.name],
        pid_file=paths.pid_file(name),
        log_file=paths.out_file(name),
        names=("slurmd",),
        probe=probe,
        prestart=prestart,
        repair=probe.repair,
        extra_logs=(paths.log_dir / f"slurmd.{node.name}.log",),
        node=NodeEntry(node.netns_path, node.name),
        marker=node.name,
    )
