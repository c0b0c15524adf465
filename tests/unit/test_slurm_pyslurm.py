"""PyslurmBackend against a fake pyslurm module.

pyslurm 25.11 cannot be built against this machine's Slurm 22.05, so the fake mirrors the real
API's class and attribute names, read from PySlurm/pyslurm (25.11.x):

- pyslurm/core/job/submission.pyx, submission.pxd: ``JobSubmitDescription(**kwargs)`` sets only
  declared attributes (a cdef class: unknown names raise AttributeError); ``submit() -> int``;
  ``script`` is a path or the text (``_validate_batch_script``: must start with "#!");
  memory_per_cpu / memory_per_node together raise ValueError.
- pyslurm/core/job/job.pyx: ``Jobs.load(preload_passwd_info=False, frozen=False)``; ``Job(job_id)``,
  ``.cancel()`` = ``send_signal(9)``, which ignores ESLURM_ALREADY_DONE and ESLURM_INVALID_JOB_ID;
  ``Job.state``, ``state_reason``, ``name``, ``comment``, ``exit_code``, ``exit_code_signal``,
  ``start_time``, ``end_time``, ``run_time``, ``cluster``, ``id``.
- pyslurm/xcollections.pyx: ``MultiClusterMap`` (``data = {cluster: {id: item}}``, ``values()``
  spans clusters, ``get(id)``).
- pyslurm/db/job.pyx, job.pxd: ``db.JobFilter(**kwargs)`` (ids, names, start_time, ...),
  ``db.Jobs.load(db_filter=None, db_connection=None)``; ``db.Job`` adds ``elapsed_time``.
- pyslurm/core/error.pyx: ``RPCError(errno=..., msg=...)`` with ``.errno`` and ``.msg``.
- pyslurm/core/slurmctld/base.pyx: ``slurmctld.ping_primary() -> PingResponse`` with
  ``is_responding``, ``hostname``, ``latency``.
"""
from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.slurm.backend import SchedulerError
from gateway.slurm.factory import make_scheduler
from gateway.slurm.pyslurm_backend import PyslurmBackend, submit_attributes
from gateway.slurm.states import SlurmState

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = (ROOT / "tests" / "golden" / "2d.main.sbatch").read_text()
CLUSTER = "relion-local"
ESLURM_INVALID_JOB_ID = 2017
ESLURM_ALREADY_DONE = 2021


class RPCError(Exception):
    def __init__(self, errno: int = -1, msg: str | None = None) -> None:
        self.errno = errno
        self.msg = msg or f"Slurm error {errno}"
        super().__init__(self.msg)


class MultiClusterMap:
    def __init__(self, items: list[Any]) -> None:
        self.data: dict[str, dict[int, Any]] = {}
        for item in items:
            self.data.setdefault(item.cluster, {})[item.id] = item

    def values(self) -> Iterator[Any]:
        for cluster in self.data.values():
            yield from cluster.values()

    def get(self, key: int, default: Any = None) -> Any:
        return self.data.get(CLUSTER, {}).get(key, default)

    def __len__(self) -> int:
        return sum(len(c) for c in self.data.values())


class FakeSlurm:
    """What the fake module's calls read and change."""

    def __init__(self) -> None:
        self.next_id = 100
        self.live: dict[int, dict[str, Any]] = {}
        self.db: dict[int, dict[str, Any]] = {}
        self.submitted: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.fail: dict[str, RPCError] = {}
        self.up = True

    def check(self, call: str) -> None:
        self.calls.append(call)
        if call in self.fail:
            raise self.fail[call]


def make_module(slurm: FakeSlurm) -> types.ModuleType:
    # The attribute names JobSubmitDescription declares (submission.pxd), trimmed to a subset
    # that covers everything the backend can set.
    declared = {
        "name", "account", "user_id", "group_id", "priority", "site_factor", "wckey", "array", "batch_constraints",
        "begin_time", "clusters", "cluster_constraints", "comment", "admin_comment", "requires_contiguous_nodes",
        "working_directory", "nodes", "deadline", "dependencies", "excluded_nodes", "required_nodes", "constraints",
        "kill_on_node_fail", "licenses", "mail_user", "mail_types", "mcs_label", "memory_per_cpu", "memory_per_node",
        "memory_per_gpu", "network", "nice", "log_files_open_mode", "overcommit", "partitions", "qos",
        "requires_node_reboot", "is_requeueable", "reservations", "script", "script_args", "environment",
        "get_user_environment", "resource_sharing", "distribution", "time_limit", "time_limit_min", "container",
        "cpus_per_task", "cpus_per_gpu", "sockets_per_node", "cores_per_socket", "threads_per_core", "gpus",
        "gpus_per_socket", "gpus_per_task", "gres_per_node", "gres_binding", "ntasks", "ntasks_per_node",
        "ntasks_per_socket", "ntasks_per_core", "ntasks_per_gpu", "switches", "signal", "standard_in",
        "standard_output", "standard_error", "kill_on_invalid_dependency", "spreads_over_nodes", "use_min_nodes",
        "temporary_disk_per_node",
    }

    class JobSubmitDescription:
        def __init__(self, **kwargs: Any) -> None:
            for key in declared:
                object.__setattr__(self, key, None)
            for key, value in kwargs.items():
                setattr(self, key, value)

        def __setattr__(self, key: str, value: Any) -> None:
            if key not in declared:
                raise AttributeError(f"'pyslurm.core.job.submission.JobSubmitDescription' object has no attribute '{key}'")
            object.__setattr__(self, key, value)

        def submit(self) -> int:
            slurm.check("JobSubmitDescription.submit")
            script = self.script
            if script and Path(script).is_file():
                script = Path(script).read_text()
            if not script or not script.startswith("#!"):
                raise ValueError("Not a valid Batch script. First line must start with '#!'")
            if self.memory_per_cpu and self.memory_per_node:
                raise ValueError("Only one of memory_per_cpu, memory_per_node or memory_per_gpu can be set.")
            slurm.next_id += 1
            attrs = {k: getattr(self, k) for k in declared if getattr(self, k) is not None}
            attrs["script_text"] = script
            slurm.submitted.append(attrs)
            slurm.live[slurm.next_id] = {"name": self.name or "", "comment": self.comment or "", "state": "PENDING",
                                         "state_reason": "None"}
            return slurm.next_id

    class Job:
        def __init__(self, job_id: int, **fields: Any) -> None:
            self.id = job_id
            self.cluster = CLUSTER
            self.name = fields.get("name", "")
            self.state = fields.get("state", "PENDING")
            self.state_reason = fields.get("state_reason", "None")
            self.comment = fields.get("comment")
            self.exit_code = fields.get("exit_code", 0)
            self.exit_code_signal = fields.get("exit_code_signal", 0)
            self.start_time = fields.get("start_time")
            self.end_time = fields.get("end_time")
            self.run_time = fields.get("run_time", 0)

        @staticmethod
        def load(job_id: int) -> Job:
            slurm.check("Job.load")
            if job_id not in slurm.live:
                raise RPCError(ESLURM_INVALID_JOB_ID, "Invalid job id specified")
            return Job(job_id, **slurm.live[job_id])

        def cancel(self) -> None:
            slurm.check("Job.cancel")
            job = slurm.live.get(self.id)
            if job is None:
                return  # send_signal(9) ignores ESLURM_INVALID_JOB_ID
            if job["state"] in ("PENDING", "RUNNING"):
                job.update(state="CANCELLED", exit_code=0, exit_code_signal=9)

    class Jobs(MultiClusterMap):
        @staticmethod
        def load(preload_passwd_info: bool = False, frozen: bool = False) -> Jobs:
            slurm.check("Jobs.load")
            return Jobs([Job(i, **fields) for i, fields in slurm.live.items()])

    class DbJob(Job):
        def __init__(self, job_id: int = 0, **fields: Any) -> None:
            super().__init__(job_id, **fields)
            self.elapsed_time = fields.get("elapsed_time", 0)

    filter_fields = {"ids", "start_time", "end_time", "accounts", "association_ids", "clusters", "constraints", "cpus",
                     "max_cpus", "nodes", "max_nodes", "qos", "names", "partitions", "groups", "timelimit",
                     "max_timelimit", "users", "wckeys", "nodelist", "with_script", "with_env", "truncate_time"}

    class JobFilter:
        def __init__(self, **kwargs: Any) -> None:
            for key in filter_fields:
                object.__setattr__(self, key, None)
            for key, value in kwargs.items():
                if key not in filter_fields:
                    raise AttributeError(f"'pyslurm.db.job.JobFilter' object has no attribute '{key}'")
                object.__setattr__(self, key, value)

    class DbJobs(MultiClusterMap):
        @staticmethod
        def load(db_filter: JobFilter | None = None, db_connection: Any = None) -> DbJobs:
            slurm.check("db.Jobs.load")
            chosen = []
            for job_id, fields in slurm.db.items():
                if db_filter is not None and db_filter.ids and job_id not in db_filter.ids:
                    continue
                if db_filter is not None and db_filter.names and fields.get("name") not in db_filter.names:
                    continue
                chosen.append(DbJob(job_id, **fields))
            return DbJobs(chosen)

    class PingResponse:
        def __init__(self, responding: bool) -> None:
            self.is_primary = True
            self.is_responding = responding
            self.index = 0
            self.hostname = "vm"
            self.latency = 0.4

    def ping_primary() -> PingResponse:
        slurm.check("slurmctld.ping_primary")
        if not slurm.up:
            raise RPCError(1800, "Unable to contact slurm controller (connect failure)")
        return PingResponse(True)

    module = types.ModuleType("pyslurm")
    module.RPCError = RPCError  # type: ignore[attr-defined]
    module.Job = Job  # type: ignore[attr-defined]
    module.Jobs = Jobs  # type: ignore[attr-defined]
    module.JobSubmitDescription = JobSubmitDescription  # type: ignore[attr-defined]
    db = types.ModuleType("pyslurm.db")
    db.Job, db.Jobs, db.JobFilter = DbJob, DbJobs, JobFilter  # type: ignore[attr-defined]
    slurmctld = types.ModuleType("pyslurm.slurmctld")
    slurmctld.ping_primary = ping_primary  # type: ignore[attr-defined]
    module.db, module.slurmctld = db, slurmctld  # type: ignore[attr-defined]
    return module


@pytest.fixture
def slurm() -> FakeSlurm:
    return FakeSlurm()


@pytest.fixture
def backend(slurm: FakeSlurm) -> PyslurmBackend:
    return PyslurmBackend(make_module(slurm), environment={"PATH": "/bin", "AWS_ACCESS_KEY_ID": "AK"}, cwd="/srv/gw")


def test_submit_maps_directives_to_pyslurm_attributes(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    job_id = backend.submit(GOLDEN, environment={"RELION_GATEWAY_JOB_TOKEN": "t0k"}, after_any="41")
    assert job_id == "101"
    (sent,) = slurm.submitted
    assert sent["script_text"] == GOLDEN  # passed as a path, read by pyslurm
    assert sent["name"] == "job_2d_ws1_0123abcd" and sent["comment"] == "relion-gateway:job_2d_ws1_0123abcd"
    assert (sent["ntasks"], sent["cpus_per_task"], sent["memory_per_cpu"], sent["time_limit"]) == (3, 1, "1000M", "01:00:00")
    assert sent["partitions"] == "debug" and sent["dependencies"] == "afterany:41"
    assert sent["standard_output"].endswith("/main-%j.out") and sent["working_directory"] == "/srv/gw"
    # The script's --export lists what a job gets: never the gateway's S3 keys.
    assert "AWS_ACCESS_KEY_ID" not in sent["environment"] and sent["environment"]["SLURM_CPUS_PER_TASK"] == "1"
    assert sent["environment"]["RELION_GATEWAY_JOB_TOKEN"] == "t0k"
    assert not Path(sent["script"]).exists()  # the temporary file is gone


def test_submit_attributes_flags() -> None:
    attrs = submit_attributes("#!/bin/bash\n#SBATCH --hold --exclusive --no-requeue -i /dev/null\ntrue\n",
                              environment={}, cwd="/w")
    assert (attrs["priority"], attrs["resource_sharing"], attrs["is_requeueable"], attrs["standard_in"]) == (
        0, "exclusive", False, "/dev/null")


def test_submit_errors_are_translated_once(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    slurm.fail["JobSubmitDescription.submit"] = RPCError(2005, "More processors requested than permitted")
    with pytest.raises(SchedulerError, match="More processors requested than permitted.*errno 2005") as info:
        backend.submit(GOLDEN)
    assert not info.value.transient
    slurm.fail["JobSubmitDescription.submit"] = RPCError(1800, "Unable to contact slurm controller")
    with pytest.raises(SchedulerError) as info:
        backend.submit(GOLDEN)
    assert info.value.transient
    del slurm.fail["JobSubmitDescription.submit"]
    with pytest.raises(SchedulerError, match="refused the job description: Only one of memory"):
        backend.submit("#!/bin/bash\n#SBATCH --mem=1G --mem-per-cpu=1G\ntrue\n")
    with pytest.raises(SchedulerError, match="option not supported"):
        backend.submit("#!/bin/bash\n#SBATCH --array=1-3\ntrue\n")


def test_status_one_controller_call_then_one_database_call(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    slurm.live = {
        7: {"name": "run", "state": "RUNNING", "start_time": 1_700_000_000, "comment": "c7"},
        8: {"name": "wait", "state": "PENDING", "state_reason": "Dependency", "start_time": 1_800_000_000},
        9: {"name": "bad", "state": "FAILED", "state_reason": "NonZeroExitCode", "exit_code": 3,
            "start_time": 1_700_000_000, "end_time": 1_700_000_002, "run_time": 2},
    }
    slurm.db = {
        5: {"name": "old", "state": "COMPLETED", "exit_code": 0, "exit_code_signal": 0, "elapsed_time": 3725,
            "start_time": 1_600_000_000, "end_time": 1_600_003_725, "comment": "c5"},
        6: {"name": "killed", "state": "FAILED", "exit_code": 0, "exit_code_signal": 9},
    }
    found = backend.status(["9", "7", "8", "5", "6", "404"])
    assert slurm.calls == ["Jobs.load", "db.Jobs.load"]
    assert set(found) == {"5", "6", "7", "8", "9"}
    assert (found["9"].state, found["9"].exit_code, found["9"].signal, found["9"].elapsed) == (SlurmState.FAILED, 3, 0, "00:00:02")
    assert found["7"].exit_code is None and found["7"].source == "squeue" and found["7"].comment == "c7"
    assert found["8"].describe() == "PENDING (Dependency)" and found["8"].start == "Unknown"
    assert (found["5"].source, found["5"].elapsed, found["5"].comment) == ("sacct", "01:02:05", "c5")
    assert (found["6"].exit_code, found["6"].signal) == (0, 9)
    slurm.calls.clear()
    assert set(backend.status(["7", "9"])) == {"7", "9"} and slurm.calls == ["Jobs.load"]
    assert backend.status([]) == {}


def test_status_rpc_failure(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    slurm.fail["Jobs.load"] = RPCError(1800, "Unable to contact slurm controller (connect failure)")
    with pytest.raises(SchedulerError, match="Jobs.load failed") as info:
        backend.status(["1"])
    assert info.value.transient


def test_cancel_and_unknown_ids(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    job_id = backend.submit("#!/bin/bash\nsleep 60\n")
    backend.cancel(job_id)
    backend.cancel("999999")
    assert backend.status([job_id])[job_id].state == SlurmState.CANCELLED
    slurm.fail["Job.cancel"] = RPCError(2002, "Access/permission denied")
    with pytest.raises(SchedulerError, match="cancel of job 5 failed: Access/permission denied"):
        backend.cancel("5")


def test_find_by_name(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    slurm.live = {3: {"name": "a"}, 4: {"name": "b"}}
    slurm.db = {1: {"name": "z", "state": "COMPLETED"}}
    assert backend.find_by_name("b", since=0) == ["4"]
    assert backend.find_by_name("z", since=1000) == ["1"]
    assert backend.find_by_name("none", since=1000) == []


def test_ping(slurm: FakeSlurm, backend: PyslurmBackend) -> None:
    assert backend.ping() is True
    slurm.up = False
    assert backend.ping() is False


def test_missing_pyslurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyslurm", None)
    lazy = PyslurmBackend()
    with pytest.raises(SchedulerError, match="pyslurm 25.11"):
        lazy.submit(GOLDEN)
    assert lazy.ping() is False


def test_factory_passes_the_module(slurm: FakeSlurm) -> None:
    scheduler = make_scheduler({"SLURM_BACKEND": "pyslurm"}, pyslurm_module=make_module(slurm))
    assert scheduler.ping() is True and slurm.calls == ["slurmctld.ping_primary"]


def test_run_as_directives_become_the_jobs_user_and_group() -> None:
    from gateway.slurm.pyslurm_backend import submit_attributes

    script = "#!/bin/bash\n#SBATCH --uid=rgjob\n#SBATCH --gid=rgjob\n#SBATCH --export=PATH\necho\n"
    attrs = submit_attributes(script, environment={"PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "s"}, cwd="/")
    assert (attrs["user_id"], attrs["group_id"]) == ("rgjob", "rgjob")
    assert "AWS_SECRET_ACCESS_KEY" not in attrs["environment"]


def test_a_test_only_refusal_is_slurms_answer_as_with_every_backend() -> None:
    from gateway.process import CommandError
    from gateway.slurm.backend import SchedulerRefused

    def refuses(argv: list[str], **_: object) -> str:
        raise CommandError(argv, 1, "", "sbatch: error: Batch job submission failed: More processors requested than permitted")

    pyslurm_backend = PyslurmBackend(make_module(FakeSlurm()), runner=refuses)
    with pytest.raises(SchedulerRefused, match="More processors requested than permitted"):
        pyslurm_backend.test_only("#!/bin/bash\ntrue\n")
