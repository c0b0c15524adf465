"""Read and write the STAR files RELION uses, with no dependency beyond the standard library.

A STAR file is a sequence of ``data_<name>`` blocks. Each block holds key-value pairs
(``_rlnCurrentResolution  21.333``) and/or one ``loop_``: a list of labels (RELION writes them as
``_rlnClassDistribution #2``, the ``#2`` being a comment) followed by whitespace-separated rows.
Values may be quoted with ``"`` or ``'``; by the STAR rules a quote only closes a value when it is
followed by whitespace or the end of the line. Labels are stored without their leading ``_``.

RELION (1.3 to 5.0, ``MetaDataTable::write``) ends every table, key-value list or loop, with a "white
line" (``" \n"``). It writes ``model.star`` and ``optimiser.star`` in place, so a reader may see a file
cut anywhere; a block read up to its white line (or up to the next ``data_``) was written whole, and
``StarBlock.closed`` says which blocks were.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class StarError(ValueError):
    """A STAR file could not be parsed; the message names the file and the line."""


class StarIncomplete(StarError):
    """A STAR file ends inside a block: RELION is still writing it, or was stopped while it did."""


@dataclass
class StarBlock:
    """One ``data_`` block: its key-value pairs and the rows of its loop (if any)."""

    name: str
    values: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    loop: list[dict[str, str]] = field(default_factory=list)
    # True once the block's content was followed by a blank line or the next ``data_``: the whole
    # block was written (see the module docstring). Not part of equality: it is about the file.
    closed: bool = field(default=False, compare=False, repr=False)

    def column(self, label: str) -> list[str]:
        """Return one loop column as strings; KeyError if the loop has no such label."""
        if label not in self.labels:
            raise KeyError(f"data_{self.name} has no loop column {label!r}")
        return [row[label] for row in self.loop]

    def float_column(self, label: str) -> list[float | None]:
        """Return one loop column as floats, with ``inf``/``nan`` as None."""
        return [parse_float(value) for value in self.column(label)]

    def get_float(self, label: str) -> float | None:
        """Return a key-value as a float; None if absent, non-finite (RELION writes ``inf``) or not a number."""
        value = self.values.get(label)
        return None if value is None else parse_float(value)

    def get_int(self, label: str) -> int | None:
        """Return a key-value as an int; None if absent or not an integer."""
        value = self.values.get(label)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            number = parse_float(value)
            return int(number) if number is not None and number.is_integer() else None


def parse_float(value: str) -> float | None:
    """Parse a STAR number; ``inf``, ``nan`` and non-numbers give None so results stay JSON-safe."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def read_star(path: str | Path, *, blocks: Collection[str] | None = None) -> dict[str, StarBlock]:
    """Parse a STAR file into its blocks, keyed by name without ``data_`` (``data_`` alone gives ``""``).

    With ``blocks``, stop reading once those blocks have been read (RELION puts
    ``data_model_general`` first in model.star, so its resolution costs one small read even when
    the per-group tables that follow are large); blocks not listed may be missing from the result.
    Raise FileNotFoundError if the file is missing and StarError (a ValueError) naming the file if it
    cannot be parsed.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return parse_star(handle, source=str(path), blocks=blocks)
    except IsADirectoryError as exc:
        raise StarError(f"{path}: is a directory") from exc


def read_whole_blocks(path: str | Path, *, blocks: Collection[str] | None = None) -> dict[str, StarBlock]:
    """read_star, but only if the blocks read (with ``blocks``: those of them there) were written whole.

    A file cut inside a value (``_rlnCurrentResolution   1`` of ``12.8``), or after a row of a loop
    whose other rows are still to come, parses; only its missing end line tells. Raise StarIncomplete
    for such a block, or for a file without any block yet; a wanted block that is simply not there is
    left to the caller to name.
    """
    result = read_star(path, blocks=blocks)
    if not result:  # RELION opens the file, then writes; a header comment alone is no STAR file yet
        raise StarIncomplete(f"{path}: no data_ block yet (RELION writes STAR files in place: half-written?)")
    checked = result if blocks is None else {name: result[name] for name in blocks if name in result}
    open_blocks = [name for name, block in checked.items() if not block.closed]
    if open_blocks:
        raise StarIncomplete(
            f"{path}: ends inside data_{open_blocks[-1]} (RELION writes STAR files in place: half-written?)"
        )
    return result


def parse_star(
    text: str | Iterable[str], *, source: str = "<string>", blocks: Collection[str] | None = None
) -> dict[str, StarBlock]:
    """Parse STAR text (a string or an iterable of lines); see read_star."""
    lines = text.splitlines(keepends=True) if isinstance(text, str) else text
    wanted = set(blocks) if blocks is not None else None
    result: dict[str, StarBlock] = {}
    block: StarBlock | None = None
    in_loop = False  # between ``loop_`` and the end of that loop's rows
    pending: list[str] = []  # loop values not yet making up a whole row
    pending_line = 0

    def error(lineno: int, message: str) -> StarError:
        return StarError(f"{source}:{lineno}: {message}")

    def close_loop(lineno: int) -> None:
        nonlocal in_loop
        if pending:
            width = len(block.labels) if block else 0
            raise error(pending_line, f"loop row has {len(pending)} values, expected {width}")
        in_loop = False

    lineno = 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            # RELION ends a table with a white line; the STAR rules let rows run on, so keep reading rows,
            # but what came before it was written whole. Only a whole line counts: RELION right-aligns
            # values (setw(10)), so a file cut in a row's leading spaces ends in spaces too.
            if block is not None and (block.values or block.loop) and raw.endswith(("\n", "\r")):
                block.closed = True
            continue
        if line.startswith("#"):
            continue
        lower = line.lower()
        if lower.startswith("data_"):
            if in_loop:
                close_loop(lineno)
            if block is not None:
                block.closed = True  # RELION writes blocks one after the other
            if wanted is not None and wanted.issubset(result):
                return result  # every requested block is complete
            name = line.split()[0][5:]
            if name in result:
                raise error(lineno, f"duplicate block data_{name}")
            block = StarBlock(name=name)
            result[name] = block
            continue
        if block is None:
            raise error(lineno, "content before the first data_ block")
        if lower.split()[0] == "loop_":
            if in_loop:
                close_loop(lineno)
            if block.labels:
                raise error(lineno, f"second loop_ in data_{block.name}")
            in_loop = True
            continue
        tokens = _tokens(line, source, lineno)
        if not tokens:
            continue  # only a trailing comment
        if tokens[0].startswith("_"):
            label = tokens[0][1:]
            if in_loop and not block.loop and not pending:
                # A label line in the loop header; anything after the label is a ``#N`` comment.
                if len(tokens) > 1:
                    raise error(lineno, f"unexpected text after loop label {tokens[0]}")
                if label in block.labels:
                    raise error(lineno, f"duplicate loop label {tokens[0]}")
                block.labels.append(label)
                continue
            if in_loop:
                close_loop(lineno)
            if len(tokens) != 2:
                raise error(lineno, f"expected '{tokens[0]} value', got {len(tokens) - 1} values")
            block.values[label] = tokens[1]
            block.closed = False
            continue
        if not in_loop or not block.labels:
            raise error(lineno, f"value outside a loop: {line[:60]!r}")
        if not pending:
            pending_line = lineno
        pending.extend(tokens)
        width = len(block.labels)
        block.closed = False
        while len(pending) >= width:
            block.loop.append(dict(zip(block.labels, pending[:width])))
            pending = pending[width:]
            pending_line = lineno
    if in_loop:
        close_loop(lineno)
    return result


def _tokens(line: str, source: str, lineno: int) -> list[str]:
    """Split one line into values, honouring STAR quoting and dropping a ``#`` comment."""
    tokens: list[str] = []
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if char.isspace():
            i += 1
            continue
        if char == "#":
            break
        if char in "\"'":
            # The closing quote is the same character followed by whitespace or the end of the line.
            j = i + 1
            while j < n and not (line[j] == char and (j + 1 == n or line[j + 1].isspace())):
                j += 1
            if j >= n:
                raise StarError(f"{source}:{lineno}: unterminated quote")
            tokens.append(line[i + 1 : j])
            i = j + 1
            continue
        j = i
        while j < n and not line[j].isspace():
            j += 1
        tokens.append(line[i:j])
        i = j
    return tokens


def format_star(blocks: Iterable[StarBlock]) -> str:
    """Render blocks the way RELION 3.1 does: ``# version 30001``, key-values, then the loop."""
    out: list[str] = []
    for block in blocks:
        out += ["", "# version 30001", "", f"data_{block.name}", ""]
        if block.values:
            width = max(len(label) for label in block.values) + 1
            out += [f"_{label:<{width}}{_quote(value)}" for label, value in block.values.items()]
            out.append("")
        if block.labels:
            out.append("loop_ ")
            out += [f"_{label} #{number}" for number, label in enumerate(block.labels, start=1)]
            out += [" ".join(_quote(row[label]) for label in block.labels) for row in block.loop]
            out.append("")
    return "\n".join(out) + "\n"


def write_star(path: str | Path, blocks: Iterable[StarBlock]) -> Path:
    """Write blocks to path (see format_star) and return the path."""
    path = Path(path)
    path.write_text(format_star(blocks), encoding="utf-8")
    return path


def loop_block(name: str, rows: Sequence[Mapping[str, object]], labels: Sequence[str] | None = None) -> StarBlock:
    """Build a loop block from rows of labelled values (numbers are rendered with repr-free str())."""
    names = list(labels) if labels is not None else (list(rows[0]) if rows else [])
    table = [{label: _render(row[label]) for label in names} for row in rows]
    return StarBlock(name=name, labels=names, loop=table)


def _render(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def _quote(value: str) -> str:
    reserved = value == "" or value[0] in "\"'#_" or value.lower().startswith(("data_", "loop_"))
    if reserved or any(char.isspace() for char in value):
        return f'"{value}"'
    return value

