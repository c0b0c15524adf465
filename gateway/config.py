"""Configuration in layers: code defaults -> TOML file named by GATEWAY_CONFIG -> GATEWAY_* env -> overrides.

The TOML file is sectioned (``[slurm] partition = "debug"``); each key becomes the flat Flask
config key ``SLURM_PARTITION``, which is also the name of its environment variable with a
``GATEWAY_`` prefix (``GATEWAY_SLURM_PARTITION=debug``). Env values are parsed as TOML values
when they parse (numbers, booleans, ``["a", "b"]`` lists) and taken as plain strings otherwise.
"""
from __future__ import annotations

import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

ENV_PREFIX = "GATEWAY_"
CONFIG_FILE_ENV = "GATEWAY_CONFIG"
DEFAULT_STATE_DIR = "/var/tmp/relion-gateway"


def default_config() -> dict[str, Any]:
    """Return the code defaults; paths below STATE_DIR are derived later unless set."""
    return {
        # [server]
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": 9012,
        "SERVER_BASE_PATH": "/v1/relion",
        # How jobs on compute nodes reach the gateway for signed progress/metadata events;
        # empty: http://<host>:<port> (the host's name when bound to 0.0.0.0).
        "SERVER_PUBLIC_URL": "",
        # HMAC key for per-job event tokens; empty: one kept in <state_dir>/callback.key.
        "SERVER_CALLBACK_SECRET": "",
        # Browser portals on these origins may call the API (CORS, e.g. ["https://portal.example.org"]);
        # their preflight OPTIONS is answered without a token. Empty: none.
        "SERVER_CORS_ORIGINS": [],
        "SERVER_WORKERS": 2,  # gunicorn worker processes (one poller runs among them, by lease)
        # Threads per worker (gthread), made as requests need them. Long-polls and event streams
        # each hold one (at most threads - 8): 2 x 512 holds 1,008 (bench/push.py held 1,000 on
        # 2 x 600 with a read's p99 at 8-11 ms, ~55 KiB per held request).
        "SERVER_THREADS": 512,
        "SERVER_TIMEOUT": 120,  # seconds before gunicorn restarts a stuck worker
        "SERVER_ACCESS_LOG": False,  # one line per request on stdout (costs ~10% of read throughput)
        "SERVER_JSON_LOGS": True,  # one JSON object per log line, with job_id when about a job
        "SERVER_METRICS_PUBLIC": False,  # true: /metrics needs no token (a scraper on a private network)
        # Requests each worker process may hold open waiting (Prefer: wait long-polls and server-sent
        # event streams); beyond, a long-poll is answered at once and a stream gets a 503. Keep it
        # below threads so reads are always answered.
        "SERVER_MAX_WAITERS": 0,  # 0: threads - 8 (at least 1): 8 threads a worker always keeps for reads
        "SERVER_MAX_WAIT_SECONDS": 300,  # the longest Prefer: wait honoured
        # [paths]
        "PATHS_STATE_DIR": DEFAULT_STATE_DIR,
        "PATHS_WORKSPACE_ROOT": "",  # default: <state_dir>/workspaces (must be visible to compute nodes)
        "PATHS_LOG_ROOT": "",  # default: <state_dir>/logs (Slurm stdout/stderr, phase, metadata.json)
        "PATHS_TEMPLATE_DIR": "",  # a site directory whose templates override the packaged ones
        # [store]
        "STORE_DATABASE_URL": "",  # default: sqlite:///<state_dir>/gateway.sqlite
        # [slurm]
        "SLURM_BACKEND": "cli",  # cli (sbatch/squeue/sacct), rest (slurmrestd + JWT) or pyslurm (Slurm >= 25.11)
        "SLURM_REST_URL": "http://127.0.0.1:6820",
        "SLURM_REST_USER": "root",
        "SLURM_REST_API_VERSION": "v0.0.38",
        "SLURM_REST_TOKEN_LIFESPAN": 3600,
        # slurmrestd's HS256 key (slurm.conf AuthAltParameters=jwt_key=): set, the rest backend mints
        # its JWTs itself (PyJWT) instead of running `scontrol token`, so it needs no Slurm binaries.
        "SLURM_REST_JWT_KEY_FILE": "",
        "SLURM_PARTITION": "",
        "SLURM_ACCOUNT": "",
        "SLURM_QOS": "",
        # Portal users -> the Slurm accounts (grants) they may charge, the first their default, e.g.
        # {alice = ["lab-a", "grant-123"], "*" = "facility"}. Empty: every job gets [slurm] account.
        "SLURM_ACCOUNTS": {},
        "SLURM_TIME_LIMIT": "01:00:00",
        "SLURM_ARCHIVE_TIME_LIMIT": "01:00:00",
        # --mem of the archive hook, whatever RELION was given: it holds up to four 64 MiB upload
        # parts plus tar and pigz (324 MB peak measured on 1 GB of output, bench/ datapath).
        "SLURM_ARCHIVE_MEMORY_MB": 1024,
        # The partition of the archive hook (2 CPUs, no GPU): empty, the job's own. A GPU partition's
        # nodes are better kept for GPU work, so a site points the hook at a CPU partition.
        "SLURM_ARCHIVE_PARTITION": "",
        "SLURM_EXTRA_DIRECTIVES": [],  # admin-owned lines such as "--constraint=skylake"
        "SLURM_COMMAND_TIMEOUT": 30.0,
        # Per-partition limits checked at submit time, so a request Slurm would refuse (or leave
        # pending forever) gets a 4xx that names the limit. Keys: max_ranks, max_threads,
        # max_cpus (ranks x threads), max_memory_mb (whole job), max_time ("D-HH:MM:SS"), gpus
        # (GPUs per node). Multi-node planning: cpus_per_node (then --nodes is worked out),
        # max_nodes, memory_per_node_mb. A partition not listed here has no gateway-side limits.
        "SLURM_PARTITIONS": {},
        # Ask sbatch --test-only at submit when Slurm would start the job (one more RPC per
        # submit; the poller's squeue keeps the estimate fresh afterwards).
        "SLURM_ESTIMATE_AT_SUBMIT": True,
        "SLURM_SUBMIT_ATTEMPTS": 4,  # sbatch tries on transient errors (controller unreachable, timeout)
        "SLURM_SUBMIT_RETRY_DELAY": 1.0,  # seconds before the first retry; doubles each time
        # [poller] One poller per deployment (a lease in the store elects it). Intervals adapt:
        # fast while a job stages, runs or archives, slower while all wait in the queue.
        "POLLER_ENABLED": True,
        "POLLER_INTERVAL_ACTIVE": 5.0,
        "POLLER_INTERVAL_QUEUED": 15.0,
        "POLLER_INTERVAL_IDLE": 30.0,
        "POLLER_MAX_BACKOFF": 120.0,  # after Slurm errors the interval doubles up to this
        "POLLER_LEASE_SECONDS": 30.0,  # a crashed leader's lease is taken over after this
        # [relion]
        "RELION_REFINE": "relion_refine",
        "RELION_REFINE_MPI": "relion_refine_mpi",
        # Admin-owned shell fragment put in front of relion_refine_mpi; "$SLURM_NTASKS" is expanded
        # by the job's shell. Real clusters usually want "srun --mpi=pmix".
        "RELION_LAUNCHER": 'mpirun -np "$SLURM_NTASKS"',
        "RELION_ENVIRONMENT": {},  # exported in the job before RELION runs
        "RELION_VERSION": "3.1",  # the site's RELION (3.1, 4.0 or 5.0): options it lacks are refused
        # Memory estimate per MPI rank, by mode; --mem-per-cpu = estimate x scale / threads.
        "RELION_MEMORY_PER_RANK_MB": {"2d": 1000, "3d": 2000, "autorefine": 2000},
        "RELION_MEMORY_SCALE": 1.0,
        "RELION_SETUP_LINES": [],  # e.g. ["module load relion/3.1.3"]
        # [s3]
        "S3_ENDPOINT_URL": "",  # empty: boto3's default (AWS)
        # Where jobs on the compute nodes reach S3, when not at endpoint_url (a service node may
        # use an internal name the nodes cannot resolve): the presigned URLs for jobs carry it.
        # Empty: endpoint_url.
        "S3_JOB_ENDPOINT_URL": "",
        "S3_REGION": "us-east-1",
        "S3_ALLOWED_BUCKETS": [],  # empty: any bucket
        # Per-user data boundaries: s3:// prefixes a user may name as a dataset (reading) and as an
        # output prefix (writing); "{user}" stands for the request's user_id. Empty: any key in an
        # allowed bucket. Admins may name anything in the allowed buckets.
        "S3_DATASET_PREFIXES": [],
        "S3_OUTPUT_PREFIXES": [],
        # [job]
        "JOB_PYTHON": sys.executable,  # the interpreter the job scripts use for stage-in and archive
        "JOB_STAGE_IN_QUOTA_BYTES": 500 * 1024**3,
        "JOB_STAGE_IN_MAX_MEMBERS": 100_000,
        "JOB_ARCHIVE_COMPRESSOR": "pigz",  # pigz (parallel) or gzip
        # The dataset cache on storage the compute nodes share, on the same file system as
        # [paths] workspace_root (its files are hard-linked into workspaces). Empty: off.
        "JOB_CACHE_DIR": "",
        "JOB_CACHE_QUOTA_BYTES": 200 * 1024**3,  # per job account; least recently used entries go first
        # The most automatic continuations a request may ask for (auto_continue): each one is a
        # whole new allocation of the job's size. 0 turns automatic continuation off.
        "JOB_MAX_AUTO_CONTINUE": 5,
        # The Unix account a portal user's jobs run as (sbatch --uid from a root gateway): "{user}"
        # stands for the user_id, a table entry in [job.run_as_users] overrides it. Empty: the
        # gateway's own account (then jobs can read what the gateway can: see README, Security).
        "JOB_RUN_AS": "",
        "JOB_RUN_AS_USERS": {},
        # Variables of the gateway's environment a job gets (sbatch --export lists them; never ALL,
        # so no S3 key, GATEWAY_* setting or database URL reaches a job). Besides these, a job gets
        # only its own token and Slurm's SLURM_* variables.
        "JOB_EXPORT": ["PATH", "LANG", "LC_ALL", "TZ"],
        # [auth] "token": every request but /healthz, the docs and signed job events needs a bearer
        # token (`relion-gateway token create`). "none" turns authentication off: development only,
        # logged as a WARNING whenever an app is built.
        "AUTH_MODE": "token",
        # Portals that authenticate users upstream: a header naming the user, trusted only from
        # the addresses in trusted_proxies (exact IPs or CIDR blocks). Empty: off.
        "AUTH_PROXY_HEADER": "",
        "AUTH_TRUSTED_PROXIES": [],
        "AUTH_PROXY_ADMINS": [],  # users named by the proxy header who are admins
        "AUTH_SCRYPT_N": 2**14,  # scrypt cost of new token hashes (a power of two; r=8, p=1)
        # Failed bearer-token checks one client address may make per window (seconds), per gateway
        # process; beyond: a 429 with Retry-After, without a check, until the window frees. 0: off.
        "AUTH_FAILURE_LIMIT": 10,
        "AUTH_FAILURE_WINDOW": 60.0,
        # [limits] per user (the job's user_id); 0 turns a limit off. A hit is a 429 naming the limit.
        "LIMITS_MAX_ACTIVE_JOBS": 100,  # jobs not yet ended
        "LIMITS_SUBMISSIONS_PER_MINUTE": 60,
        "LIMITS_MAX_CORES_PER_JOB": 1024,  # num_mpi x j (partition limits apply as well)
        # [webhooks] Portals register URLs that receive every state change of their jobs, signed as
        # Standard Webhooks define, from a durable outbox in the store (one dispatcher per
        # deployment, by lease, in a thread of its own: a dead endpoint never slows the poller).
        "WEBHOOKS_ENABLED": True,
        "WEBHOOKS_TIMEOUT_SECONDS": 5.0,  # per delivery attempt (connect and read)
        "WEBHOOKS_MAX_ATTEMPTS": 12,  # then the delivery is failed (the log says why)
        # Seconds before the 2nd, 3rd, ... attempt (the last repeats): about 5 days in all.
        "WEBHOOKS_RETRY_SECONDS": [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 86400, 172800],
        "WEBHOOKS_CONCURRENCY": 4,  # deliveries in flight at once (one per subscription at a time)
        "WEBHOOKS_MAX_PER_USER": 20,  # live subscriptions per user
        "WEBHOOKS_LOG_DAYS": 30,  # ended deliveries are kept this long in the delivery log
        # Targets resolving to loopback, link-local (cloud metadata), multicast or reserved
        # addresses are refused, so a webhook cannot make the gateway call its own services;
        # these CIDR blocks are allowed all the same (e.g. ["127.0.0.1/32"] for a local receiver).
        "WEBHOOKS_ALLOW_NETWORKS": [],
        # [budgets] CPU- and GPU-hours a user or a Slurm account may use per period ("month",
        # "year" or "all"), checked at submit: used (costed from sacct) + what its unfinished jobs
        # may still use + this request's maximum. Tables: [budgets.users.<user>] and
        # [budgets.accounts.<account>], each with cpu_hours and/or gpu_hours. Empty: no budgets.
        "BUDGETS_PERIOD": "month",
        "BUDGETS_USERS": {},
        "BUDGETS_ACCOUNTS": {},
        # [audit] one JSON line per submit, cancel, archive retry and token change (logger gateway.audit)
        "AUDIT_FILE": "",  # also append the lines to this file
    }


# Keys whose value is itself a table (kept as a dict, not flattened further).
TABLE_KEYS = frozenset({"RELION_ENVIRONMENT", "SLURM_PARTITIONS", "RELION_MEMORY_PER_RANK_MB", "JOB_RUN_AS_USERS", "SLURM_ACCOUNTS",
                        "BUDGETS_USERS", "BUDGETS_ACCOUNTS"})


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}".upper()
        if isinstance(value, dict) and name not in TABLE_KEYS:
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sectioned TOML config file into flat keys."""
    with open(path, "rb") as handle:
        return _flatten(tomllib.load(handle))


def _parse_env_value(raw: str) -> Any:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    # TOML would read "01:00:00" as a time and "1979-05-27" as a date: keep those as text.
    return value if isinstance(value, (bool, int, float, str, list, dict)) else raw


def from_environment(environ: Mapping[str, str], known: set[str]) -> dict[str, Any]:
    """Pick GATEWAY_<KEY> variables for known keys; unknown ones are ignored with a warning."""
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        key = name[len(ENV_PREFIX):]
        if key not in known:
            log.warning("ignoring %s: no such config key", name)
            continue
        values[key] = _parse_env_value(raw)
    return values


def derive_paths(config: dict[str, Any]) -> None:
    """Fill in the paths that default to places below PATHS_STATE_DIR."""
    state = Path(config["PATHS_STATE_DIR"])
    if not config["PATHS_WORKSPACE_ROOT"]:
        config["PATHS_WORKSPACE_ROOT"] = str(state / "workspaces")
    if not config["PATHS_LOG_ROOT"]:
        config["PATHS_LOG_ROOT"] = str(state / "logs")
    if not config["STORE_DATABASE_URL"]:
        config["STORE_DATABASE_URL"] = f"sqlite:///{state / 'gateway.sqlite'}"


def build_config(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge every layer and return the flat config."""
    environ = os.environ if environ is None else environ
    config = default_config()
    config_file = environ.get(CONFIG_FILE_ENV)
    if config_file:
        file_values = load_file(config_file)
        unknown = set(file_values) - set(config)
        if unknown:
            raise ValueError(f"{config_file}: unknown config keys {sorted(unknown)}")
        config.update(file_values)
    config.update(from_environment(environ, set(config)))
    if overrides:
        config.update(overrides)
    derive_paths(config)
    validate(config)
    return config


def _time_limit(where: str, value: Any) -> str:
    """A Slurm time limit from config, as text; ValueError naming the key otherwise."""
    from gateway.slurm.times import parse_slurm_time  # the one reader of Slurm time limits

    # TOML, or an environment variable parsed as TOML, turns a bare 90 (minutes) into an integer.
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ValueError(f"{where}: must be a Slurm time limit such as \"01:00:00\", not {value!r}")
    try:
        parse_slurm_time(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return text


# Per-partition counts: each must be a whole number of at least this (gpus 0: no GPUs).
PARTITION_COUNTS = {"max_nodes": 1, "cpus_per_node": 1, "memory_per_node_mb": 1, "gpus": 0}
# Keys that mean something only per node, which the gateway knows only from cpus_per_node: without
# it Slurm may spread the tasks over nodes as it likes, so a per-node check would refuse wrongly.
NEEDS_CPUS_PER_NODE = ("max_nodes", "memory_per_node_mb")


def _partition_counts(name: str, limits: Mapping[str, Any]) -> dict[str, int]:
    """The partition's node and GPU counts, checked; ValueError naming the key otherwise."""
    counts: dict[str, int] = {}
    for key, minimum in PARTITION_COUNTS.items():
        if key not in limits:
            continue
        value = limits[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"[slurm.partitions.{name}] {key}: must be a whole number >= {minimum}, not {value!r}")
        counts[key] = value
    for key in NEEDS_CPUS_PER_NODE:
        if key in counts and "cpus_per_node" not in counts:
            raise ValueError(f"[slurm.partitions.{name}] {key}: needs cpus_per_node (the gateway plans nodes from it)")
    return counts


BUDGET_PERIODS = ("month", "year", "all")
BUDGET_KEYS = ("cpu_hours", "gpu_hours")


def _budgets(config: dict[str, Any]) -> None:
    if config["BUDGETS_PERIOD"] not in BUDGET_PERIODS:
        raise ValueError(f"[budgets] period: must be one of {list(BUDGET_PERIODS)}, not {config['BUDGETS_PERIOD']!r}")
    for table in ("users", "accounts"):
        for name, budget in config[f"BUDGETS_{table.upper()}"].items():
            if not isinstance(budget, Mapping) or not budget or set(budget) - set(BUDGET_KEYS):
                raise ValueError(f"[budgets.{table}.{name}]: must set cpu_hours and/or gpu_hours, not {budget!r}")
            for key, value in budget.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"[budgets.{table}.{name}] {key}: must be a number of hours >= 0, not {value!r}")
    for user, accounts in config["SLURM_ACCOUNTS"].items():
        names = [accounts] if isinstance(accounts, str) else accounts
        if not isinstance(names, list) or not names or not all(isinstance(a, str) and a for a in names):
            raise ValueError(f"[slurm.accounts] {user}: must be an account name or a non-empty list of them, not {accounts!r}")


def validate(config: dict[str, Any]) -> None:
    """Refuse at load what would otherwise fail every request: a config error names its key."""
    from gateway.slurm.times import parse_slurm_time

    _budgets(config)

    config["SLURM_TIME_LIMIT"] = _time_limit("[slurm] time_limit", config["SLURM_TIME_LIMIT"])
    config["SLURM_ARCHIVE_TIME_LIMIT"] = _time_limit("[slurm] archive_time_limit", config["SLURM_ARCHIVE_TIME_LIMIT"])
    partitions = config["SLURM_PARTITIONS"]
    if not isinstance(partitions, Mapping):
        raise ValueError(f"[slurm.partitions]: must be a table of partitions, not {partitions!r}")
    archive_partition = config["SLURM_ARCHIVE_PARTITION"]
    if not isinstance(archive_partition, str) or (archive_partition and partitions and archive_partition not in partitions):
        raise ValueError(f"[slurm] archive_partition: {archive_partition!r} is not one of [slurm.partitions] {sorted(partitions)}")
    checked: dict[str, dict[str, Any]] = {}
    for name, limits in partitions.items():
        if not isinstance(limits, Mapping):
            raise ValueError(f"[slurm.partitions.{name}]: must be a table of limits, not {limits!r}")
        checked[name] = {**limits, **_partition_counts(name, limits)}
        if "max_time" in limits:
            # Leave max_time out for no gateway-side limit: an "UNLIMITED" here would let a request
            # ask Slurm for none.
            checked[name]["max_time"] = _time_limit(f"[slurm.partitions.{name}] max_time", limits["max_time"])
    config["SLURM_PARTITIONS"] = checked
    default = checked.get(config["SLURM_PARTITION"] or "", {})
    if "max_time" in default and parse_slurm_time(config["SLURM_TIME_LIMIT"]) > parse_slurm_time(default["max_time"]):
        raise ValueError(
            f"[slurm] time_limit {config['SLURM_TIME_LIMIT']} exceeds the default partition "
            f"{config['SLURM_PARTITION']}'s max_time = {default['max_time']}: every request without a time_limit would be refused"
        )
