"""Choose the scheduler backend from config: `SLURM_BACKEND` = cli | rest | pyslurm.

Config keys (their defaults are gateway/config.py's, the one owner; DEFAULTS reads them there):

- SLURM_BACKEND: "cli" (sbatch/squeue/sacct), "rest" (slurmrestd), "pyslurm" (Slurm >= 25.11 only)
- SLURM_COMMAND_TIMEOUT: seconds for each command, HTTP request or token mint
- SLURM_REST_URL, SLURM_REST_USER, SLURM_REST_API_VERSION, SLURM_REST_TOKEN_LIFESPAN (seconds)
- SLURM_REST_JWT_KEY_FILE: slurmrestd's HS256 key; set, tokens are signed here (no `scontrol token`)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.config import default_config
from gateway.slurm.backend import SchedulerBackend

if TYPE_CHECKING:
    from gateway.slurm.tokens import TokenProvider

log = logging.getLogger(__name__)

BACKENDS = ("cli", "rest", "pyslurm")

# For a config mapping that lacks a key (tests, embedding code): the code defaults of gateway/config.py.
DEFAULTS: dict[str, Any] = {
    key: value for key, value in default_config().items()
    if key in ("SLURM_BACKEND", "SLURM_COMMAND_TIMEOUT") or key.startswith("SLURM_REST_")
}


def _get(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    return DEFAULTS[key] if value is None or value == "" else value


def make_scheduler(config: Mapping[str, Any], **overrides: Any) -> SchedulerBackend:
    """Build the backend named by config["SLURM_BACKEND"].

    ``overrides`` go to the backend's constructor (tests pass e.g. ``session=`` for REST or
    ``pyslurm_module=`` for pyslurm). Unknown names raise ValueError listing the allowed ones.
    """
    name = str(_get(config, "SLURM_BACKEND")).strip().lower()
    timeout = float(_get(config, "SLURM_COMMAND_TIMEOUT"))
    if name == "cli":
        from gateway.slurm.cli import SlurmCliBackend

        return SlurmCliBackend(timeout=timeout, **overrides)
    if name == "rest":
        from gateway.slurm.rest import SlurmRestBackend

        user = str(_get(config, "SLURM_REST_USER"))
        tokens = overrides.pop("token_provider", None) or make_token_provider(config)
        return SlurmRestBackend(
            str(_get(config, "SLURM_REST_URL")),
            user,
            tokens,
            api_version=str(_get(config, "SLURM_REST_API_VERSION")),
            timeout=timeout,
            **overrides,
        )
    if name == "pyslurm":
        from gateway.slurm.pyslurm_backend import PyslurmBackend

        # pyslurm is imported on first use, so a missing package fails with a clear
        # SchedulerError then, not at app start-up.
        return PyslurmBackend(timeout=timeout, **overrides)
    raise ValueError(f"unknown SLURM_BACKEND {name!r}: allowed values are {', '.join(BACKENDS)}")


def make_token_provider(config: Mapping[str, Any]) -> TokenProvider:
    """slurmrestd's tokens: signed with [slurm] rest_jwt_key_file when set, else from `scontrol token`."""
    from gateway.slurm.tokens import JwtTokenProvider, TokenProvider

    user = str(_get(config, "SLURM_REST_USER"))
    lifespan = int(_get(config, "SLURM_REST_TOKEN_LIFESPAN"))
    timeout = float(_get(config, "SLURM_COMMAND_TIMEOUT"))
    key_file = str(config.get("SLURM_REST_JWT_KEY_FILE") or DEFAULTS["SLURM_REST_JWT_KEY_FILE"])
    if key_file:
        log.info("slurmrestd tokens for %s are signed with the key in %s", user, key_file)
        return JwtTokenProvider(user, key_file, lifespan=lifespan, timeout=timeout)
    return TokenProvider(user, lifespan=lifespan, timeout=timeout)
