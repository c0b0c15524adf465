"""`stack up`, `stack down` and `stack status`: the local Slurm + MariaDB + S3 stack as one unit.

`up` converges from whatever an earlier run left (stale pid files, zombies, daemons started by a
package postinst, old state dirs and databases) and is a fast no-op on a running stack.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from gateway.stack import accounts, nodes, s3_server, slurmrestd
from gateway.stack import postgres
from gateway.stack.credentials import StackSecrets, load_or_create_secrets, load_secrets
from gateway.stack.daemons import State, pid_from_file, terminate
from gateway.stack.layout import GRES_CONF, SLURM_CONF, SLURMDBD_CONF, StackPaths
from gateway.stack.packages import ensure_packages
from gateway.stack.services import S3Probe, build_daemons, make_slurm_dirs, node_state, short_hostname
from gateway.stack.slurm_conf import (
    CLUSTER_NAME,
    SLURM_USER,
    SlurmSettings,
    render_gres_conf,
    render_slurm_conf,
    render_slurmdbd_conf,
    write_managed_file,
)

log = logging.getLogger(__name__)

Report = Callable[[str], None]

# Which daemons read which config: they must be restarted when it changes under them.
_READERS = {SLURM_CONF: ("slurmctld", "slurmd", "slurmrestd"), SLURMDBD_CONF: ("slurmdbd",), GRES_CONF: ("slurmctld", "slurmd")}


def _reads(daemon_name: str, readers: set[str]) -> bool:
    # One slurmd per node ("slurmd-rgnode1"): each reads what "slurmd" reads.
    return daemon_name in readers or (daemon_name.startswith("slurmd-") and "slurmd" in readers)


def choose_topology(paths: StackPaths, requested: int | None, report: Report) -> nodes.Topology:
    """The nodes to run: as asked, else as the last `up` left them, else DEFAULT_NODES.

    More than one node needs network namespaces; where they cannot be made the one-node layout is
    used, and the reason said, rather than failing the whole stack.
    """
    saved = nodes.load_topology(paths)
    count = requested if requested is not None else (len(saved.nodes) if saved and saved.multinode else None)
    if count is None:
        count = 1 if saved is not None and not saved.multinode and not saved.fallback_reason else nodes.DEFAULT_NODES
    reason = nodes.namespaces_unavailable() if count > 1 else None
    if reason:
        report(f"warning: {count} nodes asked for, but {reason}: using the one-node layout (slurmd on this host)")
    return nodes.plan_topology(count, short_hostname(), reason)


def _log_report(line: str) -> None:
    log.info("%s", line)


def _daemon_line(name: str, state: str, pid: int | None, note: str) -> str:
    return f"{name:<10} {state:<9} pid {pid if pid is not None else '-':<8} {note}"


def stack_up(
    state_dir: str | os.PathLike[str] | None = None, report: Report | None = None, *, with_rest: bool = False,
    with_postgres: bool = False, node_count: int | None = None,
) -> dict[str, Any]:
    """Bring every daemon of the stack up; return the status dict plus `actions` and `elapsed_s`.

    ``with_rest`` also sets up slurmrestd; once done, later runs keep it (gateway/stack/slurmrestd.py).
    ``with_postgres`` also runs PostgreSQL for the job store; sticky too (gateway/stack/postgres.py).
    """
    report = report or _log_report
    started = time.monotonic()
    if os.geteuid() != 0:
        # apt-get, /etc/slurm, /run/munge and starting munged/mariadbd as their users all need root.
        raise PermissionError("`stack up` must run as root")
    paths = StackPaths.for_state_dir(state_dir)
    paths.make_base_dirs()
    with paths.lock():
        missing = ensure_packages()
        if missing:
            report(f"installed packages (missing: {', '.join(missing)})")
        secrets = load_or_create_secrets(paths.secrets_file)
        for line in [*accounts.ensure_job_accounts(), *accounts.ensure_jobside_reachable()]:
            report(line)
        topology = choose_topology(paths, node_count, report)
        previous = nodes.load_topology(paths)
        if previous is not None and previous != topology:
            # Another layout: its slurmds and namespaces go before the new ones come up.
            report(f"nodes change from {[n.name for n in previous.nodes]} to {[n.name for n in topology.nodes]}")
            for daemon in build_daemons(paths, secrets, previous):
                if daemon.name.startswith("slurmd"):
                    daemon.stop()
            if previous.multinode:
                for line in nodes.remove_network(previous):
                    report(line)
        network_done, rebuilt = nodes.ensure_network(topology)
        for line in network_done:
            report(line)
        if nodes.write_hosts(topology):
            report(f"wrote {nodes.HEAD_NAME} and the node names to {nodes.HOSTS_FILE}")
        nodes.save_topology(paths, topology)
        make_slurm_dirs(paths)
        with_rest = with_rest or slurmrestd.rest_enabled(paths)
        if with_rest:
            for line in slurmrestd.prepare(paths):
                report(line)
        with_postgres = with_postgres or postgres.postgres_enabled(paths)
        if with_postgres:
            for line in postgres.prepare(paths):
                report(line)
        settings = SlurmSettings.for_stack(
            paths, short_hostname(), topology, secrets.mariadb_slurm_password,
            jwt_key=slurmrestd.jwt_key_path(paths) if with_rest else None,
        )
        restart: set[str] = {f"slurmd-{name}" for name in rebuilt}
        for path, text, mode, owner in (
            (SLURM_CONF, render_slurm_conf(settings), 0o644, None),
            # slurmdbd refuses a config that is not owned by SlurmUser with mode 600.
            (SLURMDBD_CONF, render_slurmdbd_conf(settings), 0o600, SLURM_USER),
            (GRES_CONF, render_gres_conf(settings), 0o644, None),
        ):
            if write_managed_file(path, text, mode=mode, owner=owner):
                restart.update(_READERS[path])
        daemons = [*build_daemons(paths, secrets, topology), *slurmrestd.rest_daemons(paths, with_rest)]
        daemons += postgres.postgres_daemons(paths, with_postgres)
        states: dict[str, tuple[State, int | None]] = {}
        actions: dict[str, str] = {}
        for daemon in daemons:
            t0 = time.monotonic()
            if _reads(daemon.name, restart):
                if daemon.live_pid() is not None:
                    report(f"{daemon.name}: its config or its node changed, restarting it")
                    daemon.stop()
                elif daemon.external_pids():
                    report(f"warning: {daemon.name}'s config changed but it was not started by us: restart it")
            action, pid = daemon.ensure()
            state = State.EXTERNAL if action == "external" else State.UP
            states[daemon.name] = (state, pid)
            actions[daemon.name] = action
            report(_daemon_line(daemon.name, state.value, pid, f"{action} ({time.monotonic() - t0:.2f} s)"))
        # Reuse the readiness probe's client: building a second boto3 client costs ~50 ms.
        probe = next(d for d in daemons if d.name == "nanio").probe
        client = probe.client() if isinstance(probe, S3Probe) else _s3_client(secrets)
        if s3_server.ensure_bucket(client, s3_server.S3_BUCKET):
            report(f"created bucket {s3_server.S3_BUCKET}")
        if with_postgres:
            for line in postgres.provision(paths):
                report(line)
    status = _status_dict(paths, states, secrets, topology)
    status["actions"] = actions
    status["elapsed_s"] = round(time.monotonic() - started, 3)
    report(f"stack up in {status['elapsed_s']:.2f} s")
    return status


def stack_down(state_dir: str | os.PathLike[str] | None = None, report: Report | None = None) -> None:
    """Stop the gateway and every daemon (reverse order) by pid file; leave all data in place."""
    report = report or _log_report
    paths = StackPaths.for_state_dir(state_dir)
    if not paths.root.exists():
        report(f"nothing to stop: {paths.root} does not exist")
        return
    with paths.lock():
        report(f"{'gateway':<10} {_stop_gateway(paths)}")
        topology = nodes.load_topology(paths) or nodes.plan_topology(1, short_hostname())
        daemons = [
            *build_daemons(paths, load_secrets(paths.secrets_file), topology),
            *slurmrestd.rest_daemons(paths, slurmrestd.rest_enabled(paths)),
        ]
        daemons += postgres.postgres_daemons(paths, postgres.postgres_enabled(paths))
        for daemon in reversed(daemons):
            pid = daemon.live_pid()
            result = daemon.stop()
            report(f"{daemon.name:<10} {result}" + (f" (pid {pid})" if pid is not None else ""))
        # What `up` made outside the state dir: the nodes' namespaces and links, the bridge, the
        # mount `ip netns` made, our /etc/hosts lines. topology.json stays: the next `up` brings
        # back the same nodes.
        if topology.multinode:
            for line in nodes.remove_network(topology):
                report(line)
        if nodes.write_hosts(None):
            report(f"removed our lines from {nodes.HOSTS_FILE}")


def stack_status(state_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Return the state of every daemon and what a client needs (S3 endpoint and keys, env)."""
    paths = StackPaths.for_state_dir(state_dir)
    secrets = load_secrets(paths.secrets_file)
    topology = nodes.load_topology(paths) or nodes.plan_topology(1, short_hostname())
    daemons = [*build_daemons(paths, secrets, topology), *slurmrestd.rest_daemons(paths, slurmrestd.rest_enabled(paths))]
    daemons += postgres.postgres_daemons(paths, postgres.postgres_enabled(paths))
    states = {daemon.name: daemon.inspect() for daemon in daemons}
    return _status_dict(paths, states, secrets, topology)


def _stop_gateway(paths: StackPaths) -> str:
    # The gateway is started by the lead's `serve`, not by `up`; we only know its pid file. Without a
    # fixed executable name, the pid-file-mtime check is what keeps us from killing a reused pid.
    pid, alive = pid_from_file(paths.gateway_pid_file)
    if alive and pid is not None:
        killed = terminate(pid, timeout=15.0)
        result = "killed" if killed else "stopped"
    elif pid is not None:
        result = "stale pid file removed"
    else:
        result = "not running"
    paths.gateway_pid_file.unlink(missing_ok=True)
    paths.gateway_url_file.unlink(missing_ok=True)
    return result


def gateway_status(paths: StackPaths) -> tuple[State, int | None, str | None]:
    """The gateway's state from its pid file, and its URL when it is up."""
    pid, alive = pid_from_file(paths.gateway_pid_file)
    if alive:
        try:
            url = paths.gateway_url_file.read_text().strip() or None
        except OSError:
            url = None
        return State.UP, pid, url
    if paths.gateway_pid_file.exists():
        return State.STALE, pid, None
    return State.DOWN, None, None


def _s3_client(secrets: StackSecrets) -> s3_server.S3Client:
    return s3_server.s3_client(secrets.s3_access_key, secrets.s3_secret_key)


def _status_dict(
    paths: StackPaths,
    states: dict[str, tuple[State, int | None]],
    secrets: StackSecrets | None,
    topology: nodes.Topology,
) -> dict[str, Any]:
    g_state, g_pid, g_url = gateway_status(paths)
    access_key = secrets.s3_access_key if secrets else None
    secret_key = secrets.s3_secret_key if secrets else None
    return {
        "all_up": all(state.ok for state, _ in states.values()),
        "state_dir": str(paths.state_dir),
        "stack_dir": str(paths.root),
        "daemons": {
            name: {"state": state.value, "pid": pid, "log": str(paths.out_file(name))}
            for name, (state, pid) in states.items()
        },
        "gateway": {"state": g_state.value, "pid": g_pid, "url": g_url},
        "gateway_url": g_url,
        "s3": {
            "endpoint_url": s3_server.S3_ENDPOINT_URL,
            "bucket": s3_server.S3_BUCKET,
            "region": s3_server.S3_REGION,
            "access_key": access_key,
            "secret_key": secret_key,
            "data_dir": str(paths.s3_data_dir),
        },
        "environment": {
            "AWS_ACCESS_KEY_ID": access_key or "",
            "AWS_SECRET_ACCESS_KEY": secret_key or "",
            "AWS_DEFAULT_REGION": s3_server.S3_REGION,
            "GATEWAY_S3_ENDPOINT_URL": s3_server.S3_ENDPOINT_URL,
            "GATEWAY_PATHS_STATE_DIR": str(paths.state_dir),
        },
        "slurm": {
            "cluster": CLUSTER_NAME,
            "node": topology.nodes[0].name,
            "partitions": ["debug", "long", *(["gpu"] if topology.gpu_nodes else [])],
        },
        "head": {"name": nodes.HEAD_NAME, "address": topology.head_address},
        "multinode": topology.multinode,
        "fallback_reason": topology.fallback_reason,
        "nodes": [
            {
                "name": n.name, "address": n.address, "cpus": n.cpus, "memory_mb": n.memory_mb, "gpus": n.gpus,
                "state": node_state(n.name) if states.get("slurmctld", (None,))[0] in (State.UP, State.EXTERNAL) else None,
            }
            for n in topology.nodes
        ],
        "slurm_conf": str(SLURM_CONF),
        "slurmdbd_conf": str(SLURMDBD_CONF),
        "slurmrestd": slurmrestd.rest_status(paths),
        "postgres": postgres.postgres_status(paths),
    }

