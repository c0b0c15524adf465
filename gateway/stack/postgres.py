"""PostgreSQL for the job store: `relion-gateway stack up --with-postgres`.

A cluster of Debian's own binaries (``/usr/lib/postgresql/<ver>/bin``) lives in ``<stack>/postgres``,
owned by user postgres, and runs in the foreground under our pid file like every other daemon:
``postgres -D <stack>/postgres -k <stack>/run/postgres -h 127.0.0.1 -p 5433`` (5433 keeps clear of a
Debian cluster on 5432). Local socket connections use peer auth (only OS user postgres, for
provisioning); TCP needs a password (scram-sha-256). The role ``gateway`` owns the database
``relion_gateway``; its password is kept in ``secrets.json`` next to the other stack credentials.

Enabling is sticky, as for slurmrestd: once the cluster exists every ``stack up`` keeps it running
and ``stack down`` stops it. Recovery from a SIGKILL: the postmaster's own ``postmaster.pid`` and
socket lock name a dead (often zombie) pid, which postgres would take for a live postmaster, and
its orphaned backends may still hold the shared memory; both are cleared before a start.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import pwd
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.process import run_command
from gateway.stack.credentials import _token, _write_private
from gateway.stack.daemons import DAEMON_PATH, Daemon, _wait_until, command_ok, is_alive, read_pid_file
from gateway.stack.layout import StackPaths

log = logging.getLogger(__name__)

PG_HOST = "127.0.0.1"
PG_PORT = 5433
PG_DATABASE = "relion_gateway"
PG_ROLE = "gateway"
OS_USER = "postgres"
SECRET_KEY = "postgres_gateway_password"
PACKAGES = ("postgresql",)
PG_LIB = Path("/usr/lib/postgresql")
PROC = Path("/proc")

APT_UPDATE_TIMEOUT_S = 600.0
APT_INSTALL_TIMEOUT_S = 3600.0


# --- where things are -------------------------------------------------------------------------


def data_dir(paths: StackPaths) -> Path:
    return paths.root / "postgres"


def socket_dir(paths: StackPaths) -> Path:
    return paths.run_dir / "postgres"


def postgres_enabled(paths: StackPaths) -> bool:
    """True once `up --with-postgres` made the cluster (initdb is atomic: see init_cluster)."""
    return (data_dir(paths) / "PG_VERSION").exists()


def installed_versions(root: Path = PG_LIB) -> list[str]:
    """Installed server versions, oldest first (a version counts when it has postgres and initdb)."""
    found = [
        Path(p).parent.parent.name
        for p in glob.glob(str(root / "*" / "bin" / "postgres"))
        if (Path(p).parent / "initdb").exists()
    ]
    return sorted(found, key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")])


def cluster_version(paths: StackPaths) -> str | None:
    try:
        return (data_dir(paths) / "PG_VERSION").read_text().strip() or None
    except OSError:
        return None


def bin_dir(paths: StackPaths, root: Path = PG_LIB) -> Path | None:
    """The binaries for this stack's cluster: its own version if it exists, else the newest installed."""
    version = cluster_version(paths)
    if version is not None:
        return root / version / "bin"
    versions = installed_versions(root)
    return root / versions[-1] / "bin" if versions else None


def database_url(password: str | None, host: str = PG_HOST, port: int = PG_PORT) -> str | None:
    if not password:
        return None
    return f"postgresql+psycopg://{PG_ROLE}:{password}@{host}:{port}/{PG_DATABASE}"


# --- packages, password, cluster ----------------------------------------------------------------


def ensure_postgres_packages() -> list[str]:
    """apt-get install postgresql when no server is installed; return what was installed."""
    if installed_versions():
        return []
    log.info("no PostgreSQL server under %s: installing %s", PG_LIB, " ".join(PACKAGES))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_command(["apt-get", "update"], timeout=APT_UPDATE_TIMEOUT_S, env=env)
    run_command(["apt-get", "install", "-y", *PACKAGES], timeout=APT_INSTALL_TIMEOUT_S, env=env)
    if not installed_versions():
        raise RuntimeError(f"no PostgreSQL server under {PG_LIB} after apt-get install {' '.join(PACKAGES)}")
    return list(PACKAGES)


def load_password(secrets_file: Path) -> str | None:
    try:
        value = json.loads(secrets_file.read_text()).get(SECRET_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def load_or_create_password(secrets_file: Path) -> tuple[str, bool]:
    """The gateway role's password from secrets.json, added there if missing; (password, created)."""
    try:
        data = json.loads(secrets_file.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if data.get(SECRET_KEY):
        return str(data[SECRET_KEY]), False
    # Letters and digits only (credentials.py): safe in a SQL literal and in a URL.
    data[SECRET_KEY] = _token(32)
    _write_private(secrets_file, json.dumps(data, indent=2) + "\n")
    log.info("added the PostgreSQL password to %s", secrets_file)
    return str(data[SECRET_KEY]), True


def _as_postgres(argv: list[str], *, timeout: float, input: str | None = None) -> str:
    # SQL (and so the password) goes on stdin, never on a command line; cwd / so that tools run as
    # postgres do not trip over the caller's unreadable working directory.
    return run_command(
        ["runuser", "-u", OS_USER, "--", *argv],
        timeout=timeout,
        input=input,
        env={"PATH": DAEMON_PATH, "LANG": "C.UTF-8"},
        cwd="/",
    )


def _chown(path: Path, owner: str = OS_USER, mode: int | None = None) -> None:
    """Fix owner and mode only when they differ (a warm `up` changes nothing)."""
    entry = pwd.getpwnam(owner)
    st = path.stat()
    if (st.st_uid, st.st_gid) != (entry.pw_uid, entry.pw_gid):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    if mode is not None and st.st_mode & 0o7777 != mode:
        path.chmod(mode)


def init_cluster(paths: StackPaths, bindir: Path) -> bool:
    """initdb the cluster unless it exists; return True when it was made.

    initdb runs into a scratch directory that is renamed into place only once it succeeded, so an
    interrupted initdb never leaves a half-made cluster that later runs would take for a real one.
    """
    target = data_dir(paths)
    if (target / "PG_VERSION").exists():
        return False
    if target.exists():
        raise RuntimeError(f"{target} exists but holds no PostgreSQL cluster (no PG_VERSION): move it away")
    scratch = target.with_name(target.name + ".initdb")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    _chown(scratch, mode=0o700)
    _as_postgres(
        [
            str(bindir / "initdb"), "-D", str(scratch), "-U", OS_USER, "-E", "UTF8", "--locale=C.UTF-8",
            "--auth-local=peer", "--auth-host=scram-sha-256", "--no-instructions",
        ],
        timeout=300,
    )
    scratch.rename(target)
    log.info("initialised a PostgreSQL %s cluster in %s", cluster_version(paths), target)
    return True


def prepare(paths: StackPaths) -> list[str]:
    """Package, password and cluster; return what was done (for the report)."""
    done = []
    installed = ensure_postgres_packages()
    if installed:
        done.append(f"installed {' '.join(installed)}")
    if load_or_create_password(paths.secrets_file)[1]:
        done.append(f"created the password of PostgreSQL role {PG_ROLE} in {paths.secrets_file}")
    bindir = bin_dir(paths)
    if bindir is None or not (bindir / "postgres").exists():
        raise RuntimeError(
            f"{data_dir(paths)} was made by PostgreSQL {cluster_version(paths)}, which is not installed under {PG_LIB}"
        )
    if init_cluster(paths, bindir):
        done.append(f"initialised PostgreSQL {cluster_version(paths)} cluster {data_dir(paths)}")
    return done


def provision(paths: StackPaths) -> list[str]:
    """Role gateway (password (re)set to ours) and database relion_gateway owned by it.

    Idempotent and run on every `up` (one psql): ALTER ROLE also repairs a role whose password
    drifted from secrets.json. Returns what was created (for the report).
    """
    password, _ = load_or_create_password(paths.secrets_file)
    bindir = bin_dir(paths)
    assert bindir is not None
    role_missing = f"NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PG_ROLE}')"
    db_missing = f"NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}')"
    # Each plain SELECT prints a report line (psql -At) only when something is about to be created.
    sql = (
        f"SELECT 'created PostgreSQL role {PG_ROLE}' WHERE {role_missing};\n"
        f"SELECT 'CREATE ROLE {PG_ROLE} LOGIN' WHERE {role_missing} \\gexec\n"
        f"ALTER ROLE {PG_ROLE} WITH LOGIN PASSWORD '{password}';\n"
        f"SELECT 'created PostgreSQL database {PG_DATABASE}' WHERE {db_missing};\n"
        f"SELECT 'CREATE DATABASE {PG_DATABASE} OWNER {PG_ROLE}' WHERE {db_missing} \\gexec\n"
        f"ALTER DATABASE {PG_DATABASE} OWNER TO {PG_ROLE};\n"
    )
    out = _as_postgres(
        [str(bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(socket_dir(paths)),
         "-p", str(PG_PORT), "-d", "postgres", "-f", "-"],
        input=sql,
        timeout=60,
    )
    return [line for line in out.splitlines() if line.strip()]


# --- the daemon -------------------------------------------------------------------------------


def process_cwd(pid: int, proc_root: Path = PROC) -> str | None:
    """Where a process runs (the postmaster and every backend chdir to the data dir); None if unreadable."""
    try:
        return os.readlink(proc_root / str(pid) / "cwd")
    except OSError:
        return None


def cluster_processes(directory: Path, proc_root: Path = PROC) -> list[int]:
    """Every live process (postmaster and backends, orphaned or not) running in this data dir."""
    target = os.path.realpath(directory)
    found = []
    for entry in proc_root.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if process_cwd(pid, proc_root) == target and is_alive(pid, proc_root=proc_root):
                found.append(pid)
    return sorted(found)


def clear_stale_locks(directory: Path, sockets: Path, port: int = PG_PORT, wait_s: float = 5.0) -> list[str]:
    """Before a start: let orphaned backends of a killed postmaster go, drop lock files naming a dead pid.

    postgres refuses to start while postmaster.pid (or the socket's lock file) names a pid that
    kill(pid, 0) finds, and a SIGKILLed postmaster stays a zombie for a while; its backends notice
    their parent is gone and exit on their own, but may still hold the shared memory meanwhile.
    """
    done = []
    orphans = cluster_processes(directory)
    if orphans:
        log.info("waiting for orphaned processes of %s to exit: %s", directory, orphans)
        if not _wait_until(lambda: not cluster_processes(directory), wait_s):
            for pid in cluster_processes(directory):
                log.warning("killing orphaned postgres process %d", pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait_until(lambda: not cluster_processes(directory), 10.0)
        done.append(f"orphaned processes {orphans} gone")
    for lock in (directory / "postmaster.pid", sockets / f".s.PGSQL.{port}.lock"):
        if not lock.exists():
            continue
        pid = read_pid_file(lock)
        if pid is None or not is_alive(pid, names=("postgres",)):
            lock.unlink(missing_ok=True)
            done.append(f"removed stale {lock.name} (pid {pid})")
    return done


@dataclass
class PostgresDaemon(Daemon):
    """A Daemon that only counts postmasters of its own data dir and stops them with a fast shutdown."""

    data_dir: Path = Path()

    def _ours(self, pid: int) -> bool:
        cwd = process_cwd(pid, self.proc_root)
        # Unreadable (status run by a non-root user): fall back to the name check alone.
        return cwd is None or cwd == os.path.realpath(self.data_dir)

    def live_pid(self) -> int | None:
        pid = super().live_pid()
        return pid if pid is not None and self._ours(pid) else None

    def external_pids(self) -> list[int]:
        # Another cluster's postmaster (Debian's own on 5432, say) is not ours to adopt.
        target = os.path.realpath(self.data_dir)
        return [pid for pid in super().external_pids() if process_cwd(pid, self.proc_root) == target]

    def stop(self) -> str:
        # SIGTERM is postgres's "smart" shutdown, which waits for every client (a pooled gateway)
        # to disconnect; SIGINT rolls back open transactions and stops at once.
        pid = self.live_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            if _wait_until(lambda: not is_alive(pid, names=self.names, proc_root=self.proc_root), self.stop_timeout):
                self.pid_file.unlink(missing_ok=True)
                return "stopped"
        return super().stop()


def _probe(bindir: Path) -> Any:
    argv = [str(bindir / "pg_isready"), "-q", "-h", PG_HOST, "-p", str(PG_PORT), "-t", "2"]

    def ready(_since: float | None) -> bool:
        return command_ok(argv, timeout=5) is not None

    return ready


def postgres_daemons(paths: StackPaths, enabled: bool) -> list[Daemon]:
    """[postgres] when enabled, else []; it needs nothing else of the stack."""
    if not enabled:
        return []
    bindir = bin_dir(paths) or PG_LIB / "missing" / "bin"
    directory, sockets = data_dir(paths), socket_dir(paths)

    def prestart() -> None:
        sockets.mkdir(parents=True, exist_ok=True)
        _chown(sockets, mode=0o755)
        _chown(directory, mode=0o700)  # postgres refuses a data dir others can read
        for line in clear_stale_locks(directory, sockets):
            log.info("postgres: %s", line)

    return [
        PostgresDaemon(
            name="postgres",
            argv=[str(bindir / "postgres"), "-D", str(directory), "-k", str(sockets), "-h", PG_HOST, "-p", str(PG_PORT)],
            pid_file=paths.pid_file("postgres"),
            log_file=paths.out_file("postgres"),
            names=("postgres",),
            probe=_probe(bindir),
            user=OS_USER,
            prestart=prestart,
            ready_timeout=120.0,  # crash recovery after a SIGKILL replays the WAL
            data_dir=directory,
        )
    ]


def postgres_status(paths: StackPaths) -> dict[str, Any]:
    """What `stack status --json` shows under "postgres" (the password unmasked, like the S3 keys)."""
    enabled = postgres_enabled(paths)
    password = load_password(paths.secrets_file) if enabled else None
    return {
        "enabled": enabled,
        "url": database_url(password) if enabled else None,
        "host": PG_HOST,
        "port": PG_PORT,
        "database": PG_DATABASE,
        "user": PG_ROLE,
        "password": password,
        "version": cluster_version(paths),
        "data_dir": str(data_dir(paths)) if enabled else None,
        "socket_dir": str(socket_dir(paths)) if enabled else None,
        "log": str(paths.out_file("postgres")) if enabled else None,
    }
