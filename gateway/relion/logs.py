"""Find the line that explains a failure in a job's stderr (RELION's own ERROR, or ours)."""
from __future__ import annotations

from pathlib import Path


def error_line(path: Path) -> str:
    """The most telling error line of a stderr file, or "" if there is none."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for index, line in enumerate(lines):
        # RELION prints "ERROR: " alone on one line and the message on the next, then a backtrace.
        if line.rstrip(":") == "ERROR" and index + 1 < len(lines):
            return f"ERROR: {lines[index + 1]}"
        if line.startswith("ERROR"):
            return line
    for line in reversed(lines):
        if "failed" in line or "error" in line.lower():
            return line
    return lines[-1] if lines else ""
