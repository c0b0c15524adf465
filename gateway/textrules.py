"""Text a request may carry: the one owner of the characters refused in ids, flags and S3 URLs.

Those values end up in sbatch scripts, Slurm job names, paths and logs, which an admin reads with
``relion-gateway script`` or ``/script``. A control character breaks lines; a Unicode format
character (bidi overrides such as U+202E, isolates U+2066-U+2069, zero-width U+200B-U+200D,
U+FEFF) makes text display other than it runs; a line or paragraph separator (U+2028, U+2029)
breaks lines in editors and terminals that honour it. None belongs in such a value, so each is
refused with its code point and name, so the client can find an invisible character:
"U+202E RIGHT-TO-LEFT OVERRIDE".

Letters in any script, spaces and symbols stay allowed where a rule allows them (paths may be
``ünïcödé``); surrogates never reach here (the JSON parser refuses lone ones).
"""
from __future__ import annotations

import logging
import unicodedata

log = logging.getLogger(__name__)

# Unicode general categories refused, with the words a message uses for each.
REFUSED_CATEGORIES = {
    "Cc": "control characters",
    "Cs": "control characters",  # a lone surrogate: not text at all
    "Cf": "Unicode format characters",
    "Zl": "line or paragraph separators",
    "Zp": "line or paragraph separators",
}

# unicodedata has no names for control characters; these are their Unicode aliases.
_CONTROL_NAMES = dict(
    enumerate(
        "NULL,START OF HEADING,START OF TEXT,END OF TEXT,END OF TRANSMISSION,ENQUIRY,ACKNOWLEDGE,BELL,BACKSPACE,"
        "CHARACTER TABULATION,LINE FEED,LINE TABULATION,FORM FEED,CARRIAGE RETURN,SHIFT OUT,SHIFT IN,"
        "DATA LINK ESCAPE,DEVICE CONTROL ONE,DEVICE CONTROL TWO,DEVICE CONTROL THREE,DEVICE CONTROL FOUR,"
        "NEGATIVE ACKNOWLEDGE,SYNCHRONOUS IDLE,END OF TRANSMISSION BLOCK,CANCEL,END OF MEDIUM,SUBSTITUTE,"
        "ESCAPE,INFORMATION SEPARATOR FOUR,INFORMATION SEPARATOR THREE,INFORMATION SEPARATOR TWO,"
        "INFORMATION SEPARATOR ONE".split(",")
    )
) | {0x7F: "DELETE", 0x85: "NEXT LINE"}


def character_name(char: str) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE``; a control character by its alias, others by code point."""
    code = ord(char)
    name = unicodedata.name(char, None) or _CONTROL_NAMES.get(code) or f"<{unicodedata.category(char)}>"
    return f"U+{code:04X} {name}"


def refused_character(text: str) -> tuple[str, str] | None:
    """The first character of ``text`` a request must not carry, as (what, name); None if none.

    ``what`` is the kind in words ("control characters", ...), ``name`` the character as
    character_name gives it.
    """
    for char in text:
        what = REFUSED_CATEGORIES.get(unicodedata.category(char))
        if what is not None:
            return what, character_name(char)
    return None


def text_problem(text: str) -> str | None:
    """What a message says after "must not contain": ``Unicode format characters (U+202E
    RIGHT-TO-LEFT OVERRIDE)``; None when the text is acceptable."""
    found = refused_character(text)
    return None if found is None else f"{found[0]} ({found[1]})"
