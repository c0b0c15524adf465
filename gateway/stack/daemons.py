"""Pid-file daemons: start detached, tell a live process from a stale, zombie or reused pid, stop politely.

Liveness is decided from the pid file and ``/proc`` only, never from ``pgrep``: a SIGKILLed daemon stays
a zombie for up to ~20 s on these machines (PID 1 reaps slowly), and pids wrap at 32768, so a pid in
an old pid file may belong to an unrelated process. A pid counts as alive when

- ``/proc/PID/status`` says the State is not ``Z``/``X`` (zombie or dead),
- ``/proc/PID/cmdline`` names the expected executable (argv[0], or argv[1] for a Python script), and
- the process started before the pid file was written (a reused pid starts later).
"""
from __future__ import annotations

import enum
import json
import logging
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.process import CommandError, run_command

log = logging.getLogger(__name__)

PROC = Path("/proc")
# /proc/stat's btime has one-second resolution and the clock may have been stepped since boot.
START_TIME_SLACK_S = 5.0
# PATH for daemons: a clean environment, not the caller's (pytest, a Slurm job, a venv).
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs in a throw-away interpreter: it starts the daemon in a new session with its output in a log
# file and exits at once, so the daemon is re-parented to PID 1 and never becomes a zombie child of
# a long-lived caller (the gateway, pytest). The spec comes on stdin, so secrets in the daemon's
# environment never show up in `ps`.
_LAUNCHER = r"""
import json, os, subprocess, sys
spec = json.load(sys.stdin)
os.umask(0o022)
out = os.open(spec["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
node = spec.get("node")

def enter_node():
    # A compute node of the local cluster (gateway/stack/nodes.py): join its network namespace only
    # (setns, as `nsenter --net` does; `ip netns exec` would remount /sys), then a UTS namespace of
    # its own with its hostname. In the child before exec, so the pid we record is the daemon's.
    import ctypes, socket
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(node["netns"], os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns " + node["netns"])
    os.close(fd)
    if libc.unshare(0x04000000) != 0:  # CLONE_NEWUTS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(node["hostname"])

child = subprocess.Popen(
    spec["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=spec["env"], cwd=spec["cwd"],
    start_new_session=True, user=spec["user"], group=spec["group"], extra_groups=spec["extra_groups"],
    preexec_fn=enter_node if node else None,
)
sys.stdout.write(str(child.pid))
"""


@dataclass(frozen=True)
class NodeEntry:
    """Where a node's daemon runs: the node's network namespace (a /run/netns path) and hostname."""

    netns: Path
    hostname: str


class DaemonError(Exception):
    """A daemon could not be started, did not become ready, or could not be stopped."""


class State(str, enum.Enum):
    """What ``status`` reports for a daemon."""

    UP = "up"
    DOWN = "down"
    STALE = "stale pid file"
    EXTERNAL = "external"  # running and ready, but not started by us (e.g. by a package postinst)
    UNREADY = "not ready"  # our process is alive but its readiness check fails

    @property
    def ok(self) -> bool:
        return self in (State.UP, State.EXTERNAL)


# ---------------------------------------------------------------------------------------------
# /proc inspection (proc_root is a parameter so that tests can pass a fake /proc)


def read_pid_file(path: Path) -> int | None:
    """Return the pid in a pid file, or None when it is missing, empty or garbage."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0]) if text else 0
    except ValueError:
        log.warning("%s does not hold a pid: %r", path, text[:40])
        return None
    return pid if pid > 0 else None


def write_pid_file(path: Path, pid: int) -> None:
    """Write a pid file atomically (a reader never sees a half-written pid)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def process_state(pid: int, proc_root: Path = PROC) -> str | None:
    """Return the one-letter State of /proc/PID/status, or None when there is no such process."""
    try:
        status = (proc_root / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("State:"):
            parts = line.split()
            return parts[1] if len(parts) > 1 else None
    return None


def process_argv(pid: int, proc_root: Path = PROC) -> list[str]:
    """Return /proc/PID/cmdline as a list (empty for zombies, kernel threads and vanished pids)."""
    try:
        raw = (proc_root / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def boot_time(proc_root: Path = PROC) -> float:
    for line in (proc_root / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError(f"no btime in {proc_root / 'stat'}")


def process_start_time(pid: int, proc_root: Path = PROC) -> float | None:
    """Return when a process started (epoch seconds), from field 22 of /proc/PID/stat."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
        # comm (field 2) may contain spaces and parentheses: split after its last ")".
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[19])
        return boot_time(proc_root) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def argv_matches(argv: Sequence[str], names: Sequence[str]) -> bool:
    """True when argv[0] is one of names, or a Python interpreter runs one (``python3 /venv/bin/nanio serve``).

    argv[1] alone is not enough: ``grep slurmd`` or ``tail slurmd`` in an admin's shell would pass
    for the daemon, and ``stack up`` would adopt it instead of starting slurmd.
    """
    if not argv:
        return False
    if os.path.basename(argv[0]) in names:
        return True
    return len(argv) > 1 and os.path.basename(argv[0]).startswith("python") and os.path.basename(argv[1]) in names


def is_alive(
    pid: int,
    *,
    names: Sequence[str] | None = None,
    not_after: float | None = None,
    proc_root: Path = PROC,
) -> bool:
    """True when pid is a running (not zombie) process, named as expected, started by not_after."""
    state = process_state(pid, proc_root)
    if state is None or state in ("Z", "X", "x"):
        return False
    if names and not argv_matches(process_argv(pid, proc_root), names):
        log.debug("pid %d is not %s (pid reused)", pid, "/".join(names))
        return False
    if not_after is not None:
        started = process_start_time(pid, proc_root)
        if started is not None and started > not_after + START_TIME_SLACK_S:
            log.debug("pid %d started after its pid file was written (pid reused)", pid)
            return False
    return True


def pid_from_file(path: Path, names: Sequence[str] | None = None, proc_root: Path = PROC) -> tuple[int | None, bool]:
    """Return (pid, alive) for a pid file; pid is None when there is no usable pid file."""
    pid = read_pid_file(path)
    if pid is None:
        return None, False
    try:
        written = path.stat().st_mtime
    except OSError:
        return None, False
    return pid, is_alive(pid, names=names, not_after=written, proc_root=proc_root)


def find_processes(names: Sequence[str], proc_root: Path = PROC) -> list[int]:
    """Return the pids of running (not zombie) processes whose argv names one of names."""
    found: list[int] = []
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        if argv_matches(process_argv(pid, proc_root), names) and is_alive(pid, proc_root=proc_root):
            found.append(pid)
    return sorted(found)


def tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file (for error messages)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# starting and stopping


def spawn(
    argv: Sequence[str],
    *,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    cwd: str = "/",
    node: "NodeEntry | None" = None,
) -> int:
    """Start argv detached (new session, re-parented to PID 1) and return its pid; inside ``node`` if given."""
    group: int | None = None
    extra_groups: list[int] | None = None
    if user is not None:
        group = pwd.getpwnam(user).pw_gid
        extra_groups = []  # drop root's supplementary groups
    spec = {
        "argv": list(argv),
        "log_file": str(log_file),
        "env": {"PATH": DAEMON_PATH, "LANG": "C.UTF-8", **(env or {})},
        "cwd": cwd,
        "user": user,
        "group": group,
        "extra_groups": extra_groups,
        "node": {"netns": str(node.netns), "hostname": node.hostname} if node else None,
    }
    # -I -S: an isolated interpreter without site-packages starts in ~15 ms and ignores PYTHON* vars.
    out = run_command([sys.executable, "-I", "-S", "-c", _LAUNCHER], input=json.dumps(spec), timeout=30)
    pid = int(out.strip())
    wait_for_exec(pid)
    return pid


def wait_for_exec(pid: int, timeout: float = 5.0, proc_root: Path = PROC) -> None:
    """Wait until a just-started pid shows its new cmdline.

    Python's Popen uses vfork, which lets the parent go on while the kernel is still inside execve:
    for that moment /proc/PID/cmdline is empty and the Name is still python's, and the name check
    would call a perfectly healthy daemon "not ours".
    """
    _wait_until(
        lambda: bool(process_argv(pid, proc_root)) or process_state(pid, proc_root) in (None, "Z", "X"),
        timeout,
        interval=0.002,
    )


def terminate(
    pid: int,
    *,
    names: Sequence[str] | None = None,
    timeout: float = 30.0,
    proc_root: Path = PROC,
) -> bool:
    """SIGTERM pid, wait up to timeout, then SIGKILL; return True when it had to be killed."""

    def alive() -> bool:
        return is_alive(pid, names=names, proc_root=proc_root)

    if not alive():
        return False
    _signal(pid, signal.SIGTERM)
    if _wait_until(lambda: not alive(), timeout):
        return False
    log.warning("pid %d did not stop within %g s after SIGTERM: sending SIGKILL", pid, timeout)
    _signal(pid, signal.SIGKILL)
    if not _wait_until(lambda: not alive(), 10.0):
        raise DaemonError(f"pid {pid} survived SIGKILL")
    return True


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


# A readiness probe gets the time the process was spawned by this run (None when it was already
# running); slurmd's probe uses it to wait for a registration newer than the spawn.
Probe = Callable[[float | None], bool]


@dataclass
class Daemon:
    """One daemon of the stack with its pid file, log file and readiness check."""

    name: str
    argv: Sequence[str]
    pid_file: Path
    log_file: Path
    names: tuple[str, ...]  # basenames that identify the process in /proc/PID/cmdline
    probe: Probe
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
    prestart: Callable[[], None] | None = None  # prepare dirs/keys/databases right before spawning
    repair: Callable[[], None] | None = None  # nudge an alive-but-unready daemon (e.g. resume a node)
    ready_timeout: float = 60.0
    stop_timeout: float = 30.0
    extra_logs: tuple[Path, ...] = ()
    proc_root: Path = PROC
    node: NodeEntry | None = None
    # A word its argv must hold besides a name in ``names``: several slurmd (one per node) share a name.
    marker: str | None = None

    def live_pid(self) -> int | None:
        """Return the pid from our pid file if that process is alive and is this daemon."""
        pid, alive = pid_from_file(self.pid_file, self.names, self.proc_root)
        return pid if alive and pid is not None and self._marked(pid) else None

    def _runs_argv(self, pid: int) -> bool:
        """True when the process runs our argv (a script's interpreter may stand in front of it)."""
        actual = process_argv(pid, self.proc_root)
        wanted = [os.path.basename(self.argv[0]), *self.argv[1:]]
        return len(actual) >= len(wanted) and [os.path.basename(actual[-len(wanted)]), *actual[len(actual) - len(wanted) + 1:]] == wanted

    def _marked(self, pid: int) -> bool:
        return self.marker is None or self.marker in process_argv(pid, self.proc_root)

    def ready(self, since: float | None = None) -> bool:
        try:
            return self.probe(since)
        except Exception as exc:  # a probe must answer, not crash `status`
            log.debug("%s probe failed: %s", self.name, exc)
            return False

    def external_pids(self) -> list[int]:
        """Processes of this daemon that are not the one in our pid file."""
        ours = read_pid_file(self.pid_file)
        return [pid for pid in find_processes(self.names, self.proc_root) if pid != ours and self._marked(pid)]

    def inspect(self) -> tuple[State, int | None]:
        """Return the daemon's state and pid without changing anything."""
        pid = self.live_pid()
        if pid is not None:
            return (State.UP if self.ready() else State.UNREADY), pid
        others = self.external_pids()
        if others and self.ready():
            return State.EXTERNAL, others[0]
        if self.pid_file.exists():
            return State.STALE, read_pid_file(self.pid_file)
        return State.DOWN, None

    def ensure(self) -> tuple[str, int]:
        """Bring the daemon up; return (what was done, pid): started / already up / external."""
        pid = self.live_pid()
        if pid is not None and not self._runs_argv(pid):
            # Started with other arguments by an earlier `up` (another bind address, another node
            # layout): it would never become what this `up` asks for.
            log.info("%s (pid %d) runs with other arguments: restarting it", self.name, pid)
            self.stop()
            pid = None
        if pid is not None:
            if self.ready():
                return "already up", pid
            log.info("%s (pid %d) is alive but not ready: waiting", self.name, pid)
            try:
                self._wait_ready(pid, None, self.ready_timeout)
                return "already up", pid
            except DaemonError as exc:
                log.warning("%s: %s; restarting it", self.name, exc)
                self.stop()
        elif self.pid_file.exists():
            log.info("%s: removing stale pid file %s", self.name, self.pid_file)
            self.pid_file.unlink(missing_ok=True)
        others = self.external_pids()
        if others:
            # Started outside our pid files (a package postinst, an earlier state dir): adopt it if
            # it answers; starting a second copy would only fight over ports, sockets and locks.
            if not self.ready():
                self._wait_ready(others[0], None, self.ready_timeout, external=True)
            return "external", others[0]
        if self.prestart is not None:
            self.prestart()
        spawned_at = time.time()
        pid = spawn(self.argv, log_file=self.log_file, env=self.env, user=self.user, node=self.node)
        write_pid_file(self.pid_file, pid)
        log.debug("%s started as pid %d", self.name, pid)
        self._wait_ready(pid, spawned_at, self.ready_timeout)
        return "started", pid

    def stop(self) -> str:
        """Stop our process (SIGTERM, wait, SIGKILL) and remove the pid file; never touch others."""
        pid = self.live_pid()
        if pid is not None:
            killed = terminate(pid, names=self.names, timeout=self.stop_timeout, proc_root=self.proc_root)
            result = "killed" if killed else "stopped"
        elif self.pid_file.exists():
            result = "stale pid file removed"
        else:
            result = "not running"
        self.pid_file.unlink(missing_ok=True)
        others = self.external_pids()
        if others:
            result += f"; external pid {others[0]} left running"
        return result

    def _wait_ready(self, pid: int, since: float | None, timeout: float, external: bool = False) -> None:
        deadline = time.monotonic() + timeout
        interval = 0.05
        last_repair = 0.0
        while True:
            if not is_alive(pid, names=self.names, proc_root=self.proc_root):
                raise DaemonError(f"{self.name} (pid {pid}) exited before it was ready{self._log_hint()}")
            if self.ready(since):
                return
            now = time.monotonic()
            if self.repair is not None and now - last_repair > 2.0:
                last_repair = now
                self.repair()
            if now >= deadline:
                what = "external " if external else ""
                raise DaemonError(f"{what}{self.name} (pid {pid}) not ready after {timeout:g} s{self._log_hint()}")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.3)

    def _log_hint(self) -> str:
        parts = []
        for path in (self.log_file, *self.extra_logs):
            text = tail(path)
            if text:
                parts.append(f"\n--- last lines of {path} ---\n{text}")
        return "".join(parts)


def command_ok(argv: Sequence[str], timeout: float = 10.0, input: str | None = None) -> str | None:
    """Run a probe command; return its stdout, or None when it failed."""
    try:
        return run_command(argv, timeout=timeout, input=input)
    except CommandError as exc:
        log.debug("probe %s failed: %s", argv[0], exc)
        return None
