"""Turn a request's `flags` object into a checked relion_refine argument list.

RELION only knows underscore options and silently ignores anything else (a dashed
``--particle-diameter 100`` runs with the default diameter and exits 0), so every key is
normalised to the underscore spelling here and the gateway never passes one RELION would skip.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping

from gateway.textrules import text_problem

FlagValue = bool | int | float | str

_KEY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_STRING_LENGTH = 1024


class FlagError(ValueError):
    """A flag is not acceptable; ``field`` names it as the client spelled it (``flags.<key>``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class NormalisedFlags:
    """relion_refine options by underscore name; ``True`` is a switch."""

    options: dict[str, FlagValue] = field(default_factory=dict)

    @property
    def output_prefix(self) -> str:
        return str(self.options["o"])

    @property
    def output_dir(self) -> str:
        """The directory RELION writes into, relative to the dataset root (RELION does not create it)."""
        return str(PurePosixPath(self.output_prefix).parent)

    def argv(self) -> list[str]:
        """The relion_refine arguments: ``--i --o --ref`` first, then the rest by name, so the same
        request always renders the same command line (JSON clients do not keep key order)."""
        args: list[str] = []
        for key in sorted(self.options, key=_argument_order):
            value = self.options[key]
            args.append(f"--{key}")
            if value is not True:
                args.append(_format_value(value))
        return args


_LEADING = ("i", "o", "ref")


def _argument_order(key: str) -> tuple[int, str]:
    return (_LEADING.index(key), "") if key in _LEADING else (len(_LEADING), key.lower())


def _format_value(value: FlagValue) -> str:
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    return str(value)


def normalise_key(raw: str) -> str:
    """`--particle-diameter` / `particle_diameter` / `-K` -> `particle_diameter` / `K`."""
    key = raw.lstrip("-").replace("-", "_")
    problem = text_problem(raw)
    if problem is not None:
        raise FlagError(raw, f"flag name {raw!r} must not contain {problem}")
    if not _KEY_PATTERN.fullmatch(key):
        raise FlagError(raw, f"flag name {raw!r} is not a relion_refine option name (letters, digits, '_' or '-')")
    return key


def check_relative_path(key: str, value: str) -> str:
    """A path must stay inside the dataset directory and never read as an option."""
    if not value:
        raise FlagError(key, f"--{key} must not be empty")
    if value.startswith("/"):
        raise FlagError(key, f"--{key} must be relative to the dataset root, not absolute: {value!r}")
    if value.startswith("-"):
        raise FlagError(key, f"--{key} must not start with '-': {value!r}")
    if ".." in PurePosixPath(value).parts:
        raise FlagError(key, f"--{key} must not contain '..': {value!r}")
    return value


def normalise_flags(raw_flags: Mapping[str, Any]) -> NormalisedFlags:
    """Check and normalise a flags object; raise FlagError naming the first bad flag."""
    options: dict[str, FlagValue] = {}
    for raw_key, value in raw_flags.items():
        key = normalise_key(raw_key)
        if isinstance(value, bool):
            checked: FlagValue = value
        elif isinstance(value, (int, float)):
            checked = value
        elif isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                raise FlagError(raw_key, f"--{key} must not contain {problem}")
            if len(value) > MAX_STRING_LENGTH:
                raise FlagError(raw_key, f"--{key} is longer than {MAX_STRING_LENGTH} characters")
            checked = value
        else:
            raise FlagError(raw_key, f"--{key} must be a switch (true), a number or a string, not {type(value).__name__}")
        if key in options and options[key] != checked:
            raise FlagError(raw_key, f"--{key} is given twice with different values")
        if checked is False:
            continue  # a switch turned off is simply not passed
        if key in ("i", "o"):
            # Every other path option is checked by the catalogue, which knows their kinds.
            if not isinstance(checked, str):
                raise FlagError(raw_key, f"--{key} must be a path string")
            check_relative_path(key, checked)
        options[key] = checked
    for required in ("i", "o"):
        if required not in options:
            raise FlagError(required, f"--{required} is required")
    out = PurePosixPath(str(options["o"]))
    if len(out.parts) < 2:
        raise FlagError("o", "--o must name a directory and a file prefix, e.g. 'Class2D/run'")
    return NormalisedFlags(options)


def _typed(token: str) -> FlagValue:
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            continue
    return token


def _is_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:
        float(token)  # "--offset -2": a negative number is a value, not an option
        return True
    except ValueError:
        return False


def parse_command_line(args: list[str]) -> dict[str, FlagValue]:
    """Parse relion_refine options as typed on its command line into a flags object.

    ``--i particles.star --K 3 --ctf --tau2-fudge 2`` -> ``{"i": "particles.star", "K": 3,
    "ctf": True, "tau2-fudge": 2}`` (keys are normalised later, by normalise_flags).
    """
    flags: dict[str, FlagValue] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("-") or _is_value(token):
            raise FlagError(token, f"expected an option such as --K, got {token!r}")
        key = token.lstrip("-")
        if index + 1 < len(args) and _is_value(args[index + 1]):
            value: FlagValue = _typed(args[index + 1])
            index += 2
        else:
            value = True
            index += 1
        if key in flags and flags[key] != value:
            raise FlagError(token, f"{token} is given twice with different values")
        flags[key] = value
    return flags
