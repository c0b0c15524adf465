"""relion-gateway: a Slurm-backed REST gateway for RELION cryo-EM jobs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from flask import Flask

__version__ = "0.1.0"


def create_app(overrides: Mapping[str, Any] | None = None, **services: Any) -> "Flask":
    """Application factory (defined in gateway.app so job-side commands need not import Flask)."""
    from gateway.app import create_app as _create_app

    return _create_app(overrides, **services)
