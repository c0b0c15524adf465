"""Slurm's time formats: time limits read (sbatch --time, partition MaxTime) and times written as
sacct writes them.

One reading of a time spec (``time_spec_seconds``) serves both callers, each with its own rules:
``parse_slurm_time`` (gateway.jobs.resources, gateway.config: seconds, and a ValueError for "no limit"
or anything Slurm could not read) and ``parse_time_limit`` (the #SBATCH reader: minutes for the
job description, as slurmrestd's ``time_limit`` wants them).
"""
from __future__ import annotations

import math
import re
import time
from typing import Any

NO_VAL = 0xFFFFFFFE  # Slurm's "not set" for uint32 fields

# Slurm's time format (sbatch --time, partition MaxTime): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
# D-HH:MM:SS. ASCII digits only: \d would also take Unicode digits, which int() reads and Slurm
# does not. No whitespace: Slurm's own check (_is_valid_timespec) refuses it too.
_TIME = re.compile(r"(?:(?P<days>[0-9]+)-)?(?P<rest>[0-9]+(?::[0-9]+){0,2})")
# The same with \d, as the #SBATCH reader has always read --time (see parse_time_limit).
_TIME_ANY_DIGITS = re.compile(r"(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})")
# What Slurm reads as "no time limit" besides a total of zero (time_str2secs returns INFINITE).
_NO_LIMIT_WORDS = frozenset({"-1", "INFINITE", "UNLIMITED"})
# Slurm counts the seconds in a C int and rounds them up to minutes ((s + 59) / 60): beyond this
# the sum overflows, and a wrap to -1 would be INFINITE. About 68 years.
MAX_SLURM_TIME_S = 2**31 - 1 - 59
EXAMPLES = "e.g. 90, 01:30:00, 2-00:00:00"


def time_spec_seconds(text: str, *, ascii_digits: bool = True) -> int | None:
    """Seconds in a Slurm time spec (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), taken as it
    is (no stripping); None if ``text`` is not one. Zero and huge totals are the caller's to judge."""
    match = (_TIME if ascii_digits else _TIME_ANY_DIGITS).fullmatch(text)
    if not match:
        return None
    parts = [int(p) for p in match.group("rest").split(":")]
    if match.group("days") is not None:
        days = int(match.group("days"))
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def parse_slurm_time(value: str) -> int:
    """Seconds in a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS).

    The one place the gateway reads a time limit (requests, [slurm] time_limit and
    archive_time_limit, partition max_time). A ValueError for anything Slurm would read as no
    limit at all (0, 0:0, 0-0, 00:00:00, -1, INFINITE, UNLIMITED) or could not read.
    """
    if value.strip().upper() in _NO_LIMIT_WORDS:
        raise ValueError(f"{value!r} means no time limit to Slurm; give a positive limit ({EXAMPLES})")
    total = time_spec_seconds(value)
    if total is None:
        raise ValueError(f"{value!r} is not a Slurm time ({EXAMPLES})")
    if total == 0:
        # sbatch --time=0 "requests that no time limit be imposed" (sbatch(1)).
        raise ValueError(f"{value!r} is zero, which Slurm reads as no time limit; give a positive limit ({EXAMPLES})")
    if total > MAX_SLURM_TIME_S:
        raise ValueError(f"{value!r} is longer than Slurm can count ({MAX_SLURM_TIME_S} s); give a shorter limit")
    return total


def parse_time_limit(value: str) -> int:
    """A Slurm time spec (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) in minutes, seconds rounded
    up as Slurm's time_str2mins does.

    The #SBATCH reader's converter for --time: surrounding whitespace is stripped, any Unicode
    digit is read, and 0 (no limit) is passed on as 0, as it always has been here; the gateway's
    own limits were checked by ``parse_slurm_time`` before a script was rendered.
    """
    seconds = time_spec_seconds(value.strip(), ascii_digits=False)
    if seconds is None:
        raise ValueError(f"not a Slurm time limit: {value!r}")
    return math.ceil(seconds / 60)


def format_time(epoch: Any) -> str:
    """Epoch seconds as sacct prints them (local time, ISO without zone); unset -> "Unknown"."""
    if not isinstance(epoch, int) or epoch <= 0 or epoch >= NO_VAL:
        return "Unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def format_elapsed(seconds: Any) -> str:
    """Seconds as sacct's Elapsed: [D-]HH:MM:SS."""
    if not isinstance(seconds, int) or seconds < 0:
        return ""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


# sbatch --test-only's verdict: "sbatch: Job 1003 to start at 2026-01-01T00:00:00 using 3 processors ..."
_START_AT = re.compile(r"\bto start at (\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})\b")


def parse_timestamp(text: str) -> float | None:
    """A time as squeue, sacct and sbatch print it (local time, ISO without zone) in epoch seconds;
    None for what they print when there is none ("N/A", "Unknown", "None", empty)."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def start_from_test_only(output: str) -> float | None:
    """When ``sbatch --test-only`` expects the job to start (epoch seconds), if it says."""
    match = _START_AT.search(output)
    return parse_timestamp(match.group(1)) if match else None
