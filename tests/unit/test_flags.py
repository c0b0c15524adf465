"""Flag normalisation and the RELION command-line parser."""
from __future__ import annotations

import pytest

from gateway.relion.flags import FlagError, normalise_flags, parse_command_line


def test_keys_are_normalised_to_underscores_and_switches_kept() -> None:
    flags = normalise_flags({"--i": "p.star", "-o": "C/run", "tau2-fudge": 2, "ctf": True, "norm": False})
    assert flags.options == {"i": "p.star", "o": "C/run", "tau2_fudge": 2, "ctf": True}
    assert flags.argv() == ["--i", "p.star", "--o", "C/run", "--ctf", "--tau2_fudge", "2"]
    assert flags.output_dir == "C"


def test_same_flag_twice_with_the_same_value_is_fine_but_conflicts_are_not() -> None:
    assert normalise_flags({"i": "p.star", "o": "C/run", "ctf": True, "--ctf": True}).options["ctf"] is True
    with pytest.raises(FlagError, match="twice with different values"):
        normalise_flags({"i": "p.star", "o": "C/run", "K": 3, "--K": 4})


@pytest.mark.parametrize("key", ["", "--", "a b", "x;rm", "$(id)", "1abc"])
def test_bad_flag_names_are_refused(key: str) -> None:
    with pytest.raises(FlagError, match="not a relion_refine option name"):
        normalise_flags({"i": "p.star", "o": "C/run", key: 1})


def test_parse_command_line_like_relion() -> None:
    args = "--i particles.star --o Class2D/run --K 50 --tau2-fudge 2 --ctf --ctf --offset_step -2 --ini_high 30.5".split()
    assert parse_command_line(args) == {
        "i": "particles.star",
        "o": "Class2D/run",
        "K": 50,
        "tau2-fudge": 2,
        "ctf": True,
        "offset_step": -2,
        "ini_high": 30.5,
    }


def test_parse_command_line_refuses_a_stray_value_and_conflicts() -> None:
    with pytest.raises(FlagError, match="expected an option"):
        parse_command_line(["particles.star"])
    with pytest.raises(FlagError, match="twice"):
        parse_command_line(["--K", "3", "--K", "4"])


def test_float_values_render_without_noise() -> None:
    flags = normalise_flags({"i": "p.star", "o": "C/run", "ini_high": 30.0, "tau2_fudge": 0.5})
    assert flags.argv()[-4:] == ["--ini_high", "30", "--tau2_fudge", "0.5"]
