"""Config layers: defaults -> TOML file -> GATEWAY_* environment -> overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import build_config

ROOT = Path(__file__).resolve().parents[2]


def test_layers_apply_in_order(tmp_path: Path) -> None:
    config_file = tmp_path / "site.toml"
    config_file.write_text('[slurm]\npartition = "long"\ntime_limit = "02:00:00"\n[relion.environment]\nFOO = "1"\n')
    env = {"GATEWAY_CONFIG": str(config_file), "GATEWAY_SLURM_TIME_LIMIT": "03:00:00", "GATEWAY_SERVER_PORT": "9999"}
    config = build_config({"SLURM_QOS": "high"}, environ=env)
    assert config["SLURM_PARTITION"] == "long"  # file
    assert config["SLURM_TIME_LIMIT"] == "03:00:00"  # env beats file, and stays text
    assert config["SERVER_PORT"] == 9999  # env values are typed
    assert config["SLURM_QOS"] == "high"  # overrides last
    assert config["RELION_ENVIRONMENT"] == {"FOO": "1"}
    assert config["PATHS_WORKSPACE_ROOT"].endswith("/workspaces")


def test_unknown_key_in_a_file_is_an_error(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text("[slurm]\npartiton = 'debug'\n")
    with pytest.raises(ValueError, match="SLURM_PARTITON"):
        build_config(environ={"GATEWAY_CONFIG": str(config_file)})


@pytest.mark.parametrize("name", ["local.toml", "site-example.toml"])
def test_shipped_profiles_load(name: str) -> None:
    config = build_config(environ={"GATEWAY_CONFIG": str(ROOT / "config" / name)})
    assert config["SERVER_PORT"] == 9012
