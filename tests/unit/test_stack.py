"""Unit tests of the pure parts of gateway.stack: config rendering, pid-file liveness, secrets, CLI output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.stack.nodes import plan_topology
from gateway.stack import control, manager
from gateway.stack.credentials import load_or_create_secrets, load_secrets
from gateway.stack.daemons import (
    Daemon,
    State,
    argv_matches,
    find_processes,
    is_alive,
    pid_from_file,
    process_state,
    read_pid_file,
    wait_for_exec,
    write_pid_file,
)
from gateway.stack.layout import StackPaths, resolve_state_dir, stack_dir
from gateway.stack.packages import REQUIRED_BINARIES, missing_items
from gateway.stack.services import SlurmdProbe, wipe_foreign_cluster_state
from gateway.stack.slurm_conf import (
    MANAGED_HEADER,
    SlurmSettings,
    is_managed,
    render_slurm_conf,
    render_slurmdbd_conf,
    write_managed_file,
)

# --- layout ---------------------------------------------------------------------------------------


def test_state_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GATEWAY_PATHS_STATE_DIR", raising=False)
    assert resolve_state_dir() == Path("/var/tmp/relion-gateway")
    monkeypatch.setenv("GATEWAY_PATHS_STATE_DIR", str(tmp_path / "env"))
    assert stack_dir() == tmp_path / "env" / "stack"
    assert stack_dir(tmp_path / "arg") == tmp_path / "arg" / "stack"
    paths = StackPaths.for_state_dir(tmp_path)
    assert paths.pid_file("slurmd") == tmp_path / "stack" / "run" / "slurmd.pid"
    assert paths.nanio_venv == tmp_path / "stack" / "nanio-venv"
    assert paths.gateway_pid_file == tmp_path / "stack" / "run" / "gateway.pid"


# --- slurm.conf / slurmdbd.conf -----------------------------------------------------------------


def _settings(tmp_path: Path) -> SlurmSettings:
    return SlurmSettings.for_stack(StackPaths.for_state_dir(tmp_path), "vm", plan_topology(1, "vm"), "pw0123456789")


@pytest.mark.parametrize(
    "line",
    [
        MANAGED_HEADER,
        "ClusterName=relion-local",
        "SlurmctldHost=vm(127.0.0.1)",
        "NodeName=vm NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN",
        "SlurmdParameters=config_overrides",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "EnforcePartLimits=ALL",
        "DependencyParameters=kill_invalid_depend",
        "MailProg=/bin/true",
        "MinJobAge=300",
        "KillWait=5",
        "AccountingStorageType=accounting_storage/slurmdbd",
        "AccountingStorageHost=localhost",
        "AccountingStoreFlags=job_comment",
        "JobAcctGatherType=jobacct_gather/linux",
        "JobAcctGatherFrequency=task=2",
        "JobAcctGatherParams=OverMemoryKill",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=04:00:00 State=UP",
        "PartitionName=long Nodes=ALL MaxTime=2-00:00:00 State=UP",
        "SlurmUser=slurm",
        "SlurmdUser=root",
        "ReturnToService=2",
    ],
)
def test_slurm_conf_has_key(tmp_path: Path, line: str) -> None:
    assert line in render_slurm_conf(_settings(tmp_path)).splitlines()


def test_slurm_conf_paths_below_stack_dir(tmp_path: Path) -> None:
    conf = dict(
        line.split("=", 1)
        for line in render_slurm_conf(_settings(tmp_path)).splitlines()
        if line and not line.startswith("#") and " " not in line
    )
    stack = str(tmp_path / "stack")
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile",
                "SlurmctldLogFile", "SlurmdLogFile"):
        assert conf[key].startswith(stack + "/"), key


def test_slurmdbd_conf(tmp_path: Path) -> None:
    text = render_slurmdbd_conf(_settings(tmp_path))
    lines = text.splitlines()
    assert lines[0] == MANAGED_HEADER
    for line in ("StorageType=accounting_storage/mysql", "StorageUser=slurm", "StoragePass=pw0123456789",
                 "StorageLoc=slurm_acct_db", "DbdPort=6819", "SlurmUser=slurm"):
        assert line in lines


@pytest.mark.parametrize("bad", ["/tmp/with space", "/tmp/hash#dir", "/tmp/quote'd"])
def test_conf_refuses_values_slurm_would_misread(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        render_slurm_conf(SlurmSettings.for_stack(StackPaths.for_state_dir(bad), "vm", plan_topology(1, "vm"), "pw"))


def test_write_managed_file_moves_foreign_file_aside_once(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "slurm.conf"
    target.parent.mkdir()
    target.write_text("ClusterName=theirs\n")
    content = MANAGED_HEADER + "\nClusterName=ours\n"
    assert write_managed_file(target, content, mode=0o644) is True
    assert (tmp_path / "etc" / "slurm.conf.orig").read_text() == "ClusterName=theirs\n"
    assert is_managed(target) and target.read_text() == content
    assert target.stat().st_mode & 0o777 == 0o644
    # Same content again: nothing written, no second backup.
    mtime = target.stat().st_mtime_ns
    assert write_managed_file(target, content, mode=0o644) is False
    assert target.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in target.parent.iterdir()) == ["slurm.conf", "slurm.conf.orig"]
    # Our own file with other content is replaced without a backup.
    assert write_managed_file(target, content + "KillWait=5\n", mode=0o644) is True
    assert sorted(p.name for p in target.parent.iterdir()) == ["slurm.conf", "slurm.conf.orig"]
    # A new foreign file never overwrites the first backup.
    target.write_text("foreign again\n")
    write_managed_file(target, content, mode=0o600)
    assert (tmp_path / "etc" / "slurm.conf.orig").read_text() == "ClusterName=theirs\n"
    assert (tmp_path / "etc" / "slurm.conf.orig.1").read_text() == "foreign again\n"
    assert target.stat().st_mode & 0o777 == 0o600


def test_wipe_foreign_cluster_state(tmp_path: Path) -> None:
    state = tmp_path / "ctld"
    state.mkdir()
    assert wipe_foreign_cluster_state(state) is False  # fresh dir: nothing to do
    (state / "clustername").write_text("relion-local\n")
    (state / "job_state").write_text("x")
    assert wipe_foreign_cluster_state(state) is False
    assert (state / "job_state").exists()
    (state / "clustername").write_text("other\n")
    (state / "hash.1").mkdir()
    assert wipe_foreign_cluster_state(state) is True
    assert list(state.iterdir()) == []


# --- pid files and /proc ------------------------------------------------------------------------

BTIME = 1_700_000_000


def _fake_proc(root: Path, pid: int, *, state: str = "S", argv: list[str], start_s: float = 100.0) -> None:
    """Write the three /proc/PID files the liveness check reads, plus /proc/stat's btime."""
    (root / "stat").write_text(f"cpu  1 2 3\nbtime {BTIME}\n")
    proc = root / str(pid)
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "status").write_text(f"Name:\t{Path(argv[0]).name if argv else 'x'}\nState:\t{state} (whatever)\n")
    (proc / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + (b"\0" if argv else b""))
    ticks = int(start_s * os.sysconf("SC_CLK_TCK"))
    # comm may contain spaces and ")"; the parser must split after the last ")".
    fields = ["S", *["0"] * 18, str(ticks), "0"]
    (proc / "stat").write_text(f"{pid} (od d) name) {' '.join(fields)}\n")


def test_is_alive_with_fake_proc(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 10, argv=["/usr/sbin/slurmd", "-D"])
    _fake_proc(tmp_path, 11, state="Z", argv=[])
    _fake_proc(tmp_path, 12, argv=["/usr/bin/vim", "notes"])
    _fake_proc(tmp_path, 13, argv=["/venv/bin/python", "/venv/bin/nanio", "serve"])
    assert is_alive(10, names=("slurmd",), proc_root=tmp_path)
    assert not is_alive(11, names=("slurmd",), proc_root=tmp_path)  # zombie
    assert not is_alive(11, proc_root=tmp_path)  # zombie, even without a name check
    assert not is_alive(12, names=("slurmd",), proc_root=tmp_path)  # pid reused by another program
    assert not is_alive(99, proc_root=tmp_path)  # no such process
    assert is_alive(13, names=("nanio",), proc_root=tmp_path)  # python script: argv[1]
    # Started at btime+100 s: alive for a pid file written later, reused for one written long before.
    assert is_alive(10, names=("slurmd",), not_after=BTIME + 101, proc_root=tmp_path)
    assert not is_alive(10, names=("slurmd",), not_after=BTIME + 50, proc_root=tmp_path)


def test_find_processes_skips_zombies_and_others(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 20, argv=["/usr/sbin/munged", "-F"])
    _fake_proc(tmp_path, 21, state="Z", argv=["/usr/sbin/munged"])
    _fake_proc(tmp_path, 22, argv=["munge", "-n"])
    (tmp_path / "self").mkdir()
    assert find_processes(("munged",), proc_root=tmp_path) == [20]


def test_argv_matches() -> None:
    assert argv_matches(["/usr/sbin/mariadbd", "--user=mysql"], ("mariadbd", "mysqld"))
    assert not argv_matches(["slurmctld: slurmscriptd"], ("slurmctld",))
    assert not argv_matches(["/usr/sbin/slurmstepd"], ("slurmd",))
    assert not argv_matches(["bash", "-c", "slurmd"], ("slurmd",))


def test_read_pid_file(tmp_path: Path) -> None:
    path = tmp_path / "x.pid"
    assert read_pid_file(path) is None
    for text, expected in (("123\n", 123), ("", None), ("garbage", None), ("0", None), ("-5", None)):
        path.write_text(text)
        assert read_pid_file(path) == expected
    write_pid_file(path, 456)
    assert read_pid_file(path) == 456


def test_real_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["sleep", "30"])
    wait_for_exec(child.pid)  # Popen's vfork returns before /proc shows the new program
    try:
        assert is_alive(child.pid, names=("sleep",))
        assert not is_alive(child.pid, names=("slurmd",))
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet: the kernel keeps a zombie, which pgrep would still list.
        deadline = time.monotonic() + 5
        while process_state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_state(child.pid) == "Z"
        assert not is_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not is_alive(child.pid)


def test_pid_file_naming_an_older_process_counts_as_reused(tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    write_pid_file(pid_file, os.getpid())
    assert pid_from_file(pid_file) == (os.getpid(), True)
    # A pid file written long before this process started cannot name it.
    old = time.time() - 10 * 86400
    os.utime(pid_file, (old, old))
    assert pid_from_file(pid_file) == (os.getpid(), False)


# --- Daemon with a real short-lived process ------------------------------------------------------


@pytest.fixture()
def sleeper(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon made of a uniquely named copy of sleep, so no other process on the box matches it."""
    name = f"rg-sleeper-{uuid.uuid4().hex[:8]}"
    binary = tmp_path / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    ready = {"value": True}
    daemon = Daemon(
        name="sleeper",
        argv=[str(binary), "300"],
        pid_file=tmp_path / "run" / "sleeper.pid",
        log_file=tmp_path / "sleeper.out",
        names=(name,),
        probe=lambda _since: ready["value"],
        ready_timeout=2.0,
        stop_timeout=5.0,
    )
    daemon.pid_file.parent.mkdir()
    yield daemon
    daemon.stop()


def test_daemon_lifecycle(sleeper: Daemon) -> None:
    assert sleeper.inspect() == (State.DOWN, None)
    action, pid = sleeper.ensure()
    assert action == "started"
    assert read_pid_file(sleeper.pid_file) == pid
    # Detached through the launcher: re-parented, so it never becomes our zombie.
    ppid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()
    assert sleeper.inspect() == (State.UP, pid)
    assert sleeper.ensure() == ("already up", pid)
    assert sleeper.stop() == "stopped"
    assert not sleeper.pid_file.exists()
    assert not is_alive(pid, names=sleeper.names)
    assert sleeper.stop() == "not running"  # idempotent


def test_daemon_restarts_after_kill_9_with_stale_pid_file(sleeper: Daemon) -> None:
    _, pid = sleeper.ensure()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_alive(pid, names=sleeper.names) and time.monotonic() < deadline:
        time.sleep(0.01)
    state, stale_pid = sleeper.inspect()
    assert (state, stale_pid) == (State.STALE, pid)
    action, new_pid = sleeper.ensure()
    assert action == "started" and new_pid != pid
    assert read_pid_file(sleeper.pid_file) == new_pid


def test_pid_file_with_reused_pid_is_stale(sleeper: Daemon) -> None:
    write_pid_file(sleeper.pid_file, os.getpid())  # alive, but it is pytest, not the daemon
    assert sleeper.inspect() == (State.STALE, os.getpid())
    assert sleeper.stop() == "stale pid file removed"
    assert not sleeper.pid_file.exists()


def test_daemon_started_elsewhere_is_external(sleeper: Daemon) -> None:
    other = subprocess.Popen([sleeper.argv[0], "300"], start_new_session=True)
    wait_for_exec(other.pid)
    try:
        assert sleeper.inspect() == (State.EXTERNAL, other.pid)
        assert sleeper.ensure() == ("external", other.pid)
        assert not sleeper.pid_file.exists()
        assert sleeper.stop() == f"not running; external pid {other.pid} left running"
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_command_that_merely_names_the_daemon_is_not_the_daemon(sleeper: Daemon) -> None:
    # `grep slurmd` in an admin's shell once passed for slurmd, and `stack up` adopted it.
    name = sleeper.names[0]
    grep = subprocess.Popen(["sleep", "300", name], start_new_session=True)  # argv[1:] names it
    wait_for_exec(grep.pid)
    try:
        assert argv_matches(["/usr/bin/python3", f"/venv/bin/{name}", "serve"], sleeper.names)
        assert not argv_matches(["grep", name], sleeper.names)
        action, pid = sleeper.ensure()
        assert action == "started" and pid != grep.pid
    finally:
        grep.kill()
        grep.wait()
        sleeper.stop()


def test_daemon_that_dies_at_start_reports_its_log(tmp_path: Path) -> None:
    # A uniquely named copy of sh, as for the sleeper: named plain "sh", any other shell on the
    # machine (a Slurm job's, under make test's stack tests) passed for it and was waited on instead.
    name = f"rg-broken-{uuid.uuid4().hex[:8]}"
    shutil.copy("/bin/sh", tmp_path / name)
    daemon = Daemon(
        name="broken",
        argv=[str(tmp_path / name), "-c", "echo 'fatal: no config' >&2; exit 3"],
        pid_file=tmp_path / "broken.pid",
        log_file=tmp_path / "broken.out",
        names=(name,),
        probe=lambda _since: False,
        ready_timeout=5.0,
    )
    with pytest.raises(Exception, match="fatal: no config"):
        daemon.ensure()


def test_unready_daemon_is_restarted(sleeper: Daemon) -> None:
    _, pid = sleeper.ensure()
    calls = {"n": 0}

    def probe(since: float | None) -> bool:
        calls["n"] += 1
        return since is not None  # only a freshly started process answers

    sleeper.probe = probe
    sleeper.ready_timeout = 0.3
    assert sleeper.inspect() == (State.UNREADY, pid)
    action, new_pid = sleeper.ensure()
    assert action == "started" and new_pid != pid


# --- slurmd readiness ---------------------------------------------------------------------------


def test_slurmd_probe_waits_for_new_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.stack import services

    monkeypatch.setattr(services, "node_state", lambda node: "idle")
    monkeypatch.setattr(services, "slurmd_start_time", lambda node: 1000.0)
    probe = SlurmdProbe("vm")
    assert probe(None)  # already running: the node state is enough
    assert probe(1001.0)  # registered within the one-second resolution
    assert not probe(1010.0)  # slurmctld still shows the old slurmd's registration
    monkeypatch.setattr(services, "node_state", lambda node: "down*")
    assert not probe(None)


def test_slurmd_repair_resumes_only_drained_responding_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.stack import services

    calls: list[list[str]] = []

    def fake_command_ok(argv: list[str], timeout: float = 10.0, input: str | None = None) -> str:
        calls.append(list(argv))
        return ""

    monkeypatch.setattr(services, "command_ok", fake_command_ok)
    for state, resumed in (("drain", True), ("down", True), ("down*", False), ("idle", False), ("drng", True)):
        calls.clear()
        monkeypatch.setattr(services, "node_state", lambda node, s=state: s)
        SlurmdProbe("vm").repair()
        assert bool(calls) == resumed, state
        if resumed:
            assert calls[0] == ["scontrol", "update", "nodename=vm", "state=resume"]


# --- secrets, packages --------------------------------------------------------------------------


def test_secrets_are_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "stack" / "secrets.json"
    first = load_or_create_secrets(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secrets(path) == first == load_secrets(path)
    for value in json.loads(path.read_text()).values():
        assert value.isalnum()


def test_secrets_keep_stored_values_when_completing(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"s3_access_key": "KEEPME"}))
    secrets = load_or_create_secrets(path)
    assert secrets.s3_access_key == "KEEPME"
    assert secrets.s3_secret_key and secrets.mariadb_slurm_password


def test_missing_items() -> None:
    assert missing_items(which=lambda name: "/usr/bin/" + name, pmix_present=lambda: True) == []
    missing = missing_items(which=lambda name: None if name == "slurmdbd" else "/x", pmix_present=lambda: False)
    assert missing == ["slurmdbd", "libpmix.so"]
    assert set(REQUIRED_BINARIES.values()) <= {"munge", "mariadb-server", "slurm-wlm", "slurmdbd", "relion",
                                               "openmpi-bin", "pigz"}


# --- status output ------------------------------------------------------------------------------


def _status(all_up: bool) -> dict[str, Any]:
    paths = StackPaths.for_state_dir("/srv/state dir")
    states = {name: (State.UP if all_up else State.STALE, 42) for name in ("munged", "slurmd")}
    secrets = type("S", (), {"s3_access_key": "AK", "s3_secret_key": "S'K", "mariadb_slurm_password": "x"})()
    return manager._status_dict(paths, states, secrets, plan_topology(1, "vm"))  # type: ignore[arg-type]


def test_status_dict_shape() -> None:
    status = _status(True)
    assert status["all_up"] is True
    assert status["daemons"]["slurmd"] == {"state": "up", "pid": 42, "log": status["daemons"]["slurmd"]["log"]}
    assert status["s3"]["endpoint_url"] == "http://rghead:9010"
    assert status["s3"]["bucket"] == "relion-local"
    assert status["environment"] == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "S'K",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GATEWAY_S3_ENDPOINT_URL": "http://rghead:9010",
        "GATEWAY_PATHS_STATE_DIR": "/srv/state dir",
    }
    assert status["gateway_url"] is None
    assert status["slurm_conf"] == "/etc/slurm/slurm.conf"
    assert _status(False)["all_up"] is False


def test_human_status_is_evaluable_by_a_shell() -> None:
    text = control.format_status(_status(True))
    out = subprocess.run(
        ["bash", "-c", text + '\nprintf "%s|%s" "$AWS_SECRET_ACCESS_KEY" "$GATEWAY_PATHS_STATE_DIR"'],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout
    assert out == "S'K|/srv/state dir"


@pytest.mark.parametrize(("all_up", "code"), [(True, 0), (False, 1)])
def test_status_cli_json_and_exit_code(monkeypatch: pytest.MonkeyPatch, all_up: bool, code: int) -> None:
    seen: list[str] = []

    def fake_status(state_dir: str) -> dict[str, Any]:
        seen.append(state_dir)
        return _status(all_up)

    monkeypatch.setattr(control, "stack_status", fake_status)
    result = CliRunner().invoke(control.stack_group, ["--state-dir", "/tmp/sd", "status", "--json"])
    assert result.exit_code == code, result.output
    assert json.loads(result.output)["all_up"] is all_up
    assert seen == ["/tmp/sd"]
    result = CliRunner().invoke(control.stack_group, ["status", "--state-dir", "/tmp/other"])
    assert result.exit_code == code
    assert "export AWS_ACCESS_KEY_ID=AK" in result.output
    assert seen[-1] == "/tmp/other"


# --- the gateway's pid file ---------------------------------------------------------------------


def test_gateway_status_and_stop(tmp_path: Path) -> None:
    paths = StackPaths.for_state_dir(tmp_path)
    paths.run_dir.mkdir(parents=True)
    assert manager.gateway_status(paths) == (State.DOWN, None, None)
    gateway = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        write_pid_file(paths.gateway_pid_file, gateway.pid)
        paths.gateway_url_file.write_text("http://127.0.0.1:9012/v1/relion\n")
        assert manager.gateway_status(paths) == (State.UP, gateway.pid, "http://127.0.0.1:9012/v1/relion")
        assert manager._stop_gateway(paths) == "stopped"
        assert gateway.wait(timeout=5) == -signal.SIGTERM
        assert not paths.gateway_pid_file.exists() and not paths.gateway_url_file.exists()
    finally:
        gateway.kill()
        gateway.wait()
    write_pid_file(paths.gateway_pid_file, gateway.pid)  # now a dead pid
    assert manager.gateway_status(paths)[0] == State.STALE
    assert manager._stop_gateway(paths) == "stale pid file removed"


def test_down_without_a_stack_dir_is_a_no_op(tmp_path: Path) -> None:
    lines: list[str] = []
    manager.stack_down(tmp_path / "never-used", report=lines.append)
    assert lines and "nothing to stop" in lines[0]
    assert not (tmp_path / "never-used").exists()


def test_ensure_packages_installs_only_when_something_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.stack import packages

    calls: list[tuple[list[str], str | None]] = []

    def fake_run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
        calls.append((list(argv), (env or {}).get("DEBIAN_FRONTEND")))
        return ""

    monkeypatch.setattr(packages, "run_command", fake_run)
    monkeypatch.setattr(packages, "missing_items", lambda: [])
    assert packages.ensure_packages() == [] and calls == []
    answers = iter([["pigz", "libpmix.so"], []])
    monkeypatch.setattr(packages, "missing_items", lambda: next(answers))
    assert packages.ensure_packages() == ["pigz", "libpmix.so"]
    assert calls == [
        (["apt-get", "update"], "noninteractive"),
        (["apt-get", "install", "-y", *packages.PACKAGES], "noninteractive"),
    ]
