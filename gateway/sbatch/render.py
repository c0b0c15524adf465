"""Render the admin-owned sbatch templates with StrictUndefined and shell quoting.

A site overrides a template by putting a file of the same name in the directory named by
``[paths] template_dir``; the packaged templates fill in the rest.
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

MAIN_TEMPLATE = "main.sbatch.j2"
ARCHIVE_TEMPLATE = "archive.sbatch.j2"


def packaged_template_dir() -> Path:
    """The templates/sbatch directory of a source checkout, else the installed data files."""
    source = Path(__file__).resolve().parents[2] / "templates" / "sbatch"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "relion-gateway" / "templates" / "sbatch"


def shell_quote(value: Any) -> str:
    """Quote any value as one shell word; refuse undefined or None so a missing value is loud."""
    if value is None:
        raise jinja2.UndefinedError("a None value reached a template (use a conditional block)")
    return shlex.quote(str(value))


class ScriptRenderer:
    """Render main and archive scripts from a context dict."""

    def __init__(self, site_template_dir: str | Path | None = None) -> None:
        search = [str(site_template_dir)] if site_template_dir else []
        search.append(str(packaged_template_dir()))
        self.search_path = search
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(search),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,  # shell, not HTML: quoting is done by the `q` filter
        )
        self._env.filters["q"] = shell_quote

    def render(self, template_name: str, context: Mapping[str, Any]) -> str:
        return self._env.get_template(template_name).render(**context)

    def template_source(self, template_name: str) -> str:
        """Which file a template comes from (site override or packaged)."""
        template = self._env.get_template(template_name)
        return template.filename or template_name
