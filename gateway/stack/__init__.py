"""The local stack (munged, MariaDB, slurmdbd, slurmctld, slurmd, nanio S3) behind `relion-gateway stack`.

Public API (used by the demo and the integration tests)::

    stack_dir(state_dir=None) -> Path          # <state_dir>/stack
    stack_up(state_dir=None) -> dict           # start what is not running; returns stack_status()
    stack_down(state_dir=None) -> None         # stop the gateway and every daemon, keep data
    stack_status(state_dir=None) -> dict       # what `stack status --json` prints

state_dir defaults to $GATEWAY_PATHS_STATE_DIR, else gateway.config.DEFAULT_STATE_DIR.
"""
from __future__ import annotations

from gateway.stack.layout import stack_dir
from gateway.stack.manager import stack_down, stack_status, stack_up

__all__ = ["stack_dir", "stack_down", "stack_status", "stack_up"]
