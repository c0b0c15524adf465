"""The README's configuration table lists every config key the code has (and no key it lacks)."""
from __future__ import annotations

import re
from pathlib import Path

from gateway.config import TABLE_KEYS, default_config

README = Path(__file__).resolve().parents[2] / "README.md"
SECTIONS = ("server", "paths", "store", "slurm", "poller", "relion", "s3", "job", "auth", "limits", "webhooks", "budgets", "audit")


def documented_keys() -> set[str]:
    keys: set[str] = set()
    for line in README.read_text().splitlines():
        cell = line.split("|")[1] if line.startswith("| `[") else ""
        section = None
        for token in re.findall(r"`([^`]+)`", cell):
            match = re.fullmatch(r"\[([a-z0-9_.]+)\](?: (\w+))?", token.replace(".<name>", ""))
            if match:
                section = match.group(1).upper().replace(".", "_")
                if match.group(2):
                    keys.add(f"{section}_{match.group(2).upper()}")
                else:
                    keys.add(section)  # a table such as [relion.environment]
            elif section and re.fullmatch(r"\w+", token):
                keys.add(f"{section}_{token.upper()}")
    return keys


def split(key: str) -> str:
    for section in SECTIONS:
        if key.startswith(section.upper() + "_"):
            return key
    raise AssertionError(f"config key {key} has no section")


def test_every_config_key_is_documented() -> None:
    code = {split(key) for key in default_config()}
    missing = sorted(code - documented_keys())
    assert not missing, f"README's Configuration table lacks {missing}"
    assert TABLE_KEYS <= code
