"""Chaining jobs: what a finished job left for a child, and the child's particles cut from it.

A new job may take its particles from an earlier job of the same user (its final ``_data.star``,
perhaps only some classes, ``select_classes``, 1-based like RELION's ``_rlnClassNumber``) and, for
3D classification or auto-refine, one class map of an earlier 3D job as its ``--ref`` (``ref_class``).
This module is the RELION-file part only (no S3, no Slurm); it runs job-side under ``python -I``,
so it uses the standard library and the project's own modules.

Facts it relies on (shared/notes/relion.md sections 2-3, RELION 1.3 / 3.1 / 5.0 outputs read):

* Classification (2D and 3D) has no final un-numbered files: the result is the highest finished
  ``<prefix>_itNNN_`` set, found by results.summarize_results (an iteration is finished once its
  model.star exists). 3D writes one ``_itNNN_classNNN.mrc`` per class; 2D writes ``_itNNN_classes.mrcs``,
  a stack of 2D averages that is no ``--ref``, so a 2D parent has no class maps.
* A converged auto-refine ends with un-numbered ``<prefix>_data.star``, ``_model.star`` and
  ``_class001.mrc``. One that did not converge (``--auto_iter_max``, a time limit) has only
  ``_itNNN_`` sets, refined in two separate halves and with no reconstruction from all particles:
  job_outputs refuses it rather than hand a child a refinement that did not finish.
* RELION 3.1+ data.star holds ``data_optics`` and ``data_particles`` (RELION 5 tomography adds
  ``data_general`` first), each block preceded by ``# version 30001`` (RELION 3.1, 4.0) or
  ``# version 50001`` (5.0). A pre-3.1 file (RELION 1.3: ``data_images``; 3.0: ``data_``) is one
  block without any version line, and must stay so: RELION reads a missing line as version 30000
  and converts such a file (``seems to be from a previous version of Relion``), but RELION 3.1's
  converter refuses a file already tagged 30001 (StarConverter::convert_3p0_particlesTo_3p1).
* Auto-refine's data.star gives every particle ``_rlnClassNumber 1``; a file without the column
  counts as all class 1 there. ``_rlnImageName`` is ``000012@Particles/stack_001.mrcs`` (or one
  file per particle, as RELION 5's 2D-stack subtomograms are).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gateway.relion.inputs import MissingInputError, check_inputs, image_file
from gateway.relion.modes import MODES
from gateway.relion.results import summarize_results
from gateway.relion.star import StarBlock, StarError, format_star, read_star

log = logging.getLogger(__name__)

# star.format_star writes this line before every block; write_subset puts the source's own tag there.
_WRITER_TAG = "# version 30001"
_VERSION = re.compile(r"#\s*version\s+(\d+)")
_CLASS_KEY = re.compile(r"[1-9][0-9]*")
_FIELDS = ("mode", "iteration", "data_star", "model_star", "class_maps", "class_particles")


class SubsetError(ValueError):
    """A parent's outputs or a selection from them cannot be used; the message names what was wrong."""


@dataclass(frozen=True)
class JobOutputs:
    """What a finished job left for a child: paths relative to the dataset dir (RELION's cwd)."""

    mode: str
    iteration: int | None  # the final iteration whose files these are; None for auto-refine's final files
    data_star: str
    model_star: str | None
    class_maps: dict[int, str] = field(default_factory=dict)  # 3D and auto-refine only
    class_particles: dict[int, int] = field(default_factory=dict)  # from _rlnClassNumber of data_star

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SubsetError(f"outputs.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.iteration is not None and not _is_int(self.iteration, minimum=0):
            raise SubsetError(f"outputs.iteration: must be an iteration number or null, got {self.iteration!r}")
        _check_path("outputs.data_star", self.data_star)
        if self.model_star is not None:
            _check_path("outputs.model_star", self.model_star)
        for number, path in self.class_maps.items():
            if not _is_int(number, minimum=1):
                raise SubsetError(f"outputs.class_maps: {number!r} is not a class number")
            _check_path(f"outputs.class_maps[{number}]", path, suffix=".mrc")
        if self.mode == "2d" and self.class_maps:
            raise SubsetError("outputs.class_maps: a 2D classification has no class maps")
        for number, count in self.class_particles.items():
            if not _is_int(number, minimum=1) or not _is_int(count, minimum=0):
                raise SubsetError(f"outputs.class_particles: {number!r}: {count!r} is not a class and a count")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (class numbers as string keys, in order) that from_dict reads back."""
        return {
            "mode": self.mode,
            "iteration": self.iteration,
            "data_star": self.data_star,
            "model_star": self.model_star,
            "class_maps": {str(n): self.class_maps[n] for n in sorted(self.class_maps)},
            "class_particles": {str(n): self.class_particles[n] for n in sorted(self.class_particles)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobOutputs:
        """Read to_dict's form back (from metadata.json, which the job wrote); SubsetError if malformed."""
        if not isinstance(data, Mapping):
            raise SubsetError(f"outputs: expected an object, got {type(data).__name__}")
        missing = [name for name in _FIELDS if name not in data]
        unknown = sorted(str(name) for name in data if name not in _FIELDS)
        if missing or unknown:
            raise SubsetError(f"outputs: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}")
        return cls(
            mode=data["mode"],
            iteration=data["iteration"],
            data_star=data["data_star"],
            model_star=data["model_star"],
            class_maps=_keyed("outputs.class_maps", data["class_maps"]),
            class_particles=_keyed("outputs.class_particles", data["class_particles"]),
        )


@dataclass(frozen=True)
class Subset:
    """A particles STAR file write_subset wrote, relative to the dataset dir."""

    star: str
    particles: int
    classes: tuple[int, ...]  # the classes kept (every class present when there was no selection)
    image_stacks: tuple[str, ...]  # the distinct files the kept particles' _rlnImageName open, sorted


def job_outputs(dataset_dir: Path, output_prefix: str, mode: str) -> JobOutputs:
    """Find what ``relion_refine --o <output_prefix>`` (mode ``2d``, ``3d`` or ``autorefine``) left for a child.

    Classification: the highest finished iteration's data.star, model.star and (3D) class maps.
    Auto-refine: the final un-numbered run_data.star, run_model.star and run_class001.mrc; a run that
    did not converge is refused (see the module docstring). Raise SubsetError naming the file missing
    or unreadable.
    """
    if mode not in MODES:
        raise SubsetError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        summary = summarize_results(Path(dataset_dir), output_prefix, mode)
    except ValueError as exc:  # a bad prefix, or a StarError (a ValueError) naming the file
        raise SubsetError(f"{output_prefix}: {exc}") from exc
    files = summary["files"]
    if summary["iterations_run"] == 0:
        raise SubsetError(f"{output_prefix}: RELION left no finished iteration there")
    if mode == "autorefine":
        if not summary["converged"]:
            raise SubsetError(
                f"{output_prefix}: the auto-refine did not converge (no {output_prefix}_model.star), so it left"
                " no final particles or map for a child"
            )
        iteration = None
        expected = f"{output_prefix}_data.star"
    else:
        iteration = summary["last_iteration"]
        if iteration is None:
            raise SubsetError(f"{output_prefix}: RELION finished no iteration (no {output_prefix}_itNNN_model.star)")
        expected = f"{output_prefix}_it{iteration:03d}_data.star"
    data_star = files.get("data")
    if data_star is None:
        raise SubsetError(f"{output_prefix}: {expected} is missing")
    class_maps: dict[int, str] = {}
    if mode != "2d":
        # <base>_itNNN_classNNN.mrc (3D) or the final <base>_classNNN.mrc (auto-refine), not the half maps.
        numbered = "" if iteration is None else f"_it{iteration:03d}"
        own = re.compile(rf"^{re.escape(PurePosixPath(output_prefix).name)}{numbered}_class(\d{{3,}})\.mrc$")
        for path in files.get("classes", []):
            match = own.match(PurePosixPath(path).name)
            if match:
                class_maps[int(match.group(1))] = path
    particles = _read_particles(Path(dataset_dir), data_star)
    return JobOutputs(
        mode=mode,
        iteration=iteration,
        data_star=data_star,
        model_star=files.get("model"),
        class_maps=class_maps,
        class_particles=dict(sorted(Counter(_classes(particles.block, mode, data_star)).items())),
    )


def check_selection(
    outputs: JobOutputs | Mapping[str, Any], select_classes: Sequence[int] | None, ref_class: int | None
) -> None:
    """Check a child's ``select_classes`` and ``ref_class`` against its parent's recorded outputs (at submit).

    ``outputs`` may be the dict that to_dict gave. Raise SubsetError naming the field: a class absent
    from the parent or without particles, ``ref_class`` for a 2D parent (2D has no maps) or for a
    class whose map the parent did not leave.
    """
    if not isinstance(outputs, JobOutputs):
        outputs = JobOutputs.from_dict(outputs)
    _selected(select_classes, outputs.class_particles, outputs.data_star, outputs.class_maps)
    if ref_class is None:
        return
    if not _is_int(ref_class, minimum=1):
        raise SubsetError(f"ref_class: expected a class number (an integer >= 1), got {ref_class!r}")
    if outputs.mode == "2d":
        raise SubsetError("ref_class: the parent is a 2D classification, which leaves no class maps")
    if ref_class not in outputs.class_maps:
        present = f"maps for classes {_ranges(outputs.class_maps)}" if outputs.class_maps else "no class maps"
        raise SubsetError(f"ref_class: class {ref_class} has no map among the parent's outputs ({present})")


def write_subset(
    dataset_dir: Path, outputs: JobOutputs, select_classes: Sequence[int] | None, out_star: str
) -> Subset:
    """Write ``out_star`` (relative to dataset_dir): the particles of outputs.data_star in select_classes (all if None).

    Every block other than the particles is copied unchanged (data_optics, RELION 5's data_general)
    and the file keeps the source's shape: the same blocks, the source's ``# version`` line before
    each block, none for a pre-3.1 file. The file is read back and must hold exactly the kept rows;
    every file the kept rows name must exist inside the dataset (inputs.check_inputs). Raise
    SubsetError, leaving no out_star behind, when anything is wrong.
    """
    root = Path(dataset_dir)
    _check_path("out_star", out_star, suffix=".star")
    if PurePosixPath(out_star) == PurePosixPath(outputs.data_star):
        raise SubsetError(f"out_star: {out_star} is the parent's own data.star")
    source = _read_particles(root, outputs.data_star)
    classes = _classes(source.block, outputs.mode, outputs.data_star)
    counts = Counter(classes)
    recorded = {n: c for n, c in outputs.class_particles.items() if c}
    if dict(counts) != recorded:
        raise SubsetError(
            f"{outputs.data_star} does not match the parent's recorded outputs: here classes {_ranges(counts)},"
            f" {sum(counts.values())} particles; recorded classes {_ranges(recorded)}, {sum(recorded.values())}"
        )
    kept_classes = _selected(select_classes, counts, outputs.data_star, outputs.class_maps)
    rows = [row for row, number in zip(source.block.loop, classes) if number in kept_classes]
    if not rows:
        raise SubsetError(f"{outputs.data_star} has no particles to keep")
    kept = StarBlock(
        name=source.block.name, values=dict(source.block.values), labels=list(source.block.labels), loop=rows
    )
    blocks = [kept if block is source.block else block for block in source.blocks.values()]
    text = _format(blocks, source.version)

    target = root / out_star
    resolved = target.parent.resolve()  # before mkdir: no directory is made outside the dataset
    if target.is_symlink() or (resolved != root.resolve() and root.resolve() not in resolved.parents):
        raise SubsetError(f"out_star: {out_star} leaves the dataset (through a symlink)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SubsetError(f"out_star: {out_star} cannot be written: {exc}") from exc
    try:
        _check_written(root, out_star, blocks)
    except SubsetError:
        target.unlink(missing_ok=True)
        raise
    stacks = tuple(sorted({image_file(row["rlnImageName"]) for row in rows}))
    log.info("wrote %s: %d of %d particles (classes %s), %d image files",
             out_star, len(rows), len(classes), _ranges(kept_classes), len(stacks))
    return Subset(star=out_star, particles=len(rows), classes=tuple(sorted(kept_classes)), image_stacks=stacks)


@dataclass(frozen=True)
class _Particles:
    blocks: dict[str, StarBlock]
    block: StarBlock  # the particles: data_particles (3.1+) or the one block naming images (pre-3.1)
    version: str | None  # the number of the source's first ``# version`` line


def _read_particles(root: Path, data_star: str) -> _Particles:
    """Read a data.star and find its particle block; SubsetError if it is missing or not one."""
    path = root / data_star
    try:
        blocks = read_star(path)
        version = _version_tag(path)
    except FileNotFoundError as exc:
        raise SubsetError(f"{data_star} is missing") from exc
    except StarError as exc:
        raise SubsetError(f"{data_star} is not a readable STAR file: {exc}") from exc
    if "optics" in blocks:  # RELION 3.1+
        block = blocks.get("particles")
        if block is None:
            raise SubsetError(f"{data_star} has data_optics but no data_particles block")
    else:  # pre-3.1: one table of images (RELION 1.3 data_images, 3.0 data_)
        tables = [b for b in blocks.values() if "rlnImageName" in b.labels]
        if len(tables) != 1:
            raise SubsetError(f"{data_star} has no data_optics and {len(tables)} tables with _rlnImageName, not one")
        block = tables[0]
    if "rlnImageName" not in block.labels:
        raise SubsetError(f"{data_star} data_{block.name} has no _rlnImageName column")
    return _Particles(blocks=blocks, block=block, version=version)


def _version_tag(path: Path) -> str | None:
    """The number in the first ``# version N`` comment before the first block (RELION 3.1+ writes one)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stripped = line.strip()
            if stripped.lower().startswith("data_"):
                return None
            match = _VERSION.match(stripped)
            if match:
                return match.group(1)
    return None


def _classes(block: StarBlock, mode: str, data_star: str) -> list[int]:
    """Each particle's _rlnClassNumber; auto-refine data without the column are all class 1."""
    if "rlnClassNumber" not in block.labels:
        if mode == "autorefine":
            return [1] * len(block.loop)
        raise SubsetError(f"{data_star} data_{block.name} has no _rlnClassNumber column")
    numbers = []
    for row_number, value in enumerate(block.column("rlnClassNumber"), start=1):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number.is_integer() or number < 1:  # RELION numbers classes from 1
            raise SubsetError(f"{data_star} data_{block.name} row {row_number}: _rlnClassNumber {value!r} is no class")
        numbers.append(int(number))
    return numbers


def _selected(
    select_classes: Sequence[int] | None, counts: Mapping[int, int], data_star: str, class_maps: Mapping[int, str]
) -> set[int]:
    """The classes to keep: select_classes checked against the classes with particles, or all of them."""
    present = sorted(n for n, count in counts.items() if count > 0)
    if select_classes is None:
        return set(present)
    if isinstance(select_classes, (str, bytes)) or not isinstance(select_classes, Sequence):
        raise SubsetError(f"select_classes: expected a list of class numbers, got {select_classes!r}")
    if not select_classes:
        raise SubsetError("select_classes: empty; leave it out to keep every class")
    seen: set[int] = set()
    for number in select_classes:
        if not _is_int(number, minimum=1):
            raise SubsetError(
                f"select_classes: {number!r} is not a class number (RELION numbers classes from 1)"
            )
        if number in seen:
            raise SubsetError(f"select_classes: class {number} is given twice")
        seen.add(number)
    absent = sorted(n for n in seen if n not in present and n not in class_maps)
    if absent:
        raise SubsetError(f"select_classes: {_plural(absent)} not in {data_star} (classes {_ranges(present)})")
    empty = sorted(n for n in seen if n not in present)
    if empty:
        raise SubsetError(
            f"select_classes: {_plural(empty)} empty in {data_star}: no particle has that _rlnClassNumber"
            f" (classes with particles: {_ranges(present)})"
        )
    return seen


def _format(blocks: Sequence[StarBlock], version: str | None) -> str:
    """format_star's text with the source's version line before each block, or none (pre-3.1 shape)."""
    lines = format_star(blocks).split("\n")
    if lines.count(_WRITER_TAG) != len(blocks):
        raise RuntimeError(f"star.format_star no longer writes {_WRITER_TAG!r} before each block")
    out: list[str] = []
    dropped = False
    for line in lines:
        if line == _WRITER_TAG:
            if version is None:
                dropped = True  # and the blank line after it
                continue
            line = f"# version {version}"
        elif dropped and line == "":
            dropped = False
            continue
        dropped = False
        out.append(line)
    return "\n".join(out)


def _check_written(root: Path, out_star: str, blocks: Sequence[StarBlock]) -> None:
    """Read out_star back: the same blocks, rows and labels as written; every file it names is there."""
    try:
        written = read_star(root / out_star)
    except StarError as exc:
        raise SubsetError(f"{out_star} as written does not read back: {exc}") from exc
    expected = {block.name: block for block in blocks}
    if list(written) != list(expected):
        raise SubsetError(f"{out_star} as written reads back as blocks {list(written)}, not {list(expected)}")
    for name, block in expected.items():
        if written[name] != block:
            got = written[name]
            raise SubsetError(
                f"{out_star} as written reads back with a different data_{name}: {len(got.loop)} rows of"
                f" {len(got.labels)} labels for {len(block.loop)} of {len(block.labels)} (a value the writer"
                " cannot quote?)"
            )
    try:
        check_inputs(root, out_star)
    except MissingInputError as exc:
        raise SubsetError(f"{out_star}: {exc}") from exc


def _check_path(name: str, value: object, *, suffix: str = "") -> None:
    path = PurePosixPath(value) if isinstance(value, str) and value else None
    if path is None or path.is_absolute() or ".." in path.parts or "\\" in str(value) or not path.name.endswith(suffix):
        kind = f"a {suffix} file" if suffix else "a file"
        raise SubsetError(f"{name}: must be {kind} path relative to the dataset, without '..', got {value!r}")


def _keyed(name: str, value: object) -> dict[int, Any]:
    """A JSON object keyed by class numbers ("1", "2", ...) as a dict keyed by int."""
    if not isinstance(value, Mapping):
        raise SubsetError(f"{name}: expected an object keyed by class number, got {type(value).__name__}")
    result: dict[int, Any] = {}
    for key, item in value.items():
        if isinstance(key, str) and _CLASS_KEY.fullmatch(key):
            result[int(key)] = item
        elif _is_int(key, minimum=1):
            result[key] = item
        else:
            raise SubsetError(f"{name}: key {key!r} is not a class number")
    return result


def _is_int(value: object, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _plural(numbers: Sequence[int]) -> str:
    return f"class {numbers[0]} is" if len(numbers) == 1 else f"classes {', '.join(map(str, numbers))} are"


def _ranges(numbers: Mapping[int, object] | set[int] | Sequence[int]) -> str:
    """Class numbers as ``1-3, 5``; ``none`` when there are none."""
    ordered = sorted(numbers)
    if not ordered:
        return "none"
    parts: list[str] = []
    start = previous = ordered[0]
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(parts)
