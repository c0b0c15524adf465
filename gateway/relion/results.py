"""Summarise what a relion_refine run wrote: iterations, resolution, class distribution, files.

Facts this relies on (RELION 3.1.3 measured, see shared/notes/relion.md sections 2-4; RELION 4.0 and 5.0
from their sources, src/ml_optimiser*.cpp and src/ml_model.cpp, and from a real RELION 5.0 project):

* Each finished iteration N writes ``<prefix>_itNNN_*``. Classification (2D/3D) writes
  ``_itNNN_model.star``; auto-refine writes ``_itNNN_half1_model.star`` and ``_itNNN_half2_model.star``
  (two ranks, at the same time). ``optimiser.star`` is written first and the rest of the set within a
  few ms, so an iteration counts as done only once its model file(s) exist. (With ``--grad``, RELION >= 4
  writes a set only every ``--grad_write_iter`` iterations: the numbers may jump.)
* Auto-refine's last iteration (the one that joins the halves) writes no ``_itNNN_`` files, only the
  un-numbered ``<prefix>_model.star``, ``_data.star``, ``_class001.mrc`` ... So a converged run did
  (last NNN + 1) iterations, and a missing ``<prefix>_model.star`` means "not converged" even when relion
  exited 0 (``--auto_iter_max`` stops like that). RELION 3.1 writes no final optimiser.star; RELION >= 4.0
  writes ``<prefix>_optimiser.star`` too, before the final model.star, with ``_rlnCurrentIteration -1``
  (the iteration number is reset so that the files carry none): no final file says how many iterations
  ran, so a project that kept only the final files (as the real RELION 5.0 project we read does: its
  authors dropped the ``_itNNN_`` files) has an unknown count (``iterations_known`` False).
* model.star and optimiser.star are written in place, not renamed into place, so a reader can catch one
  half-written; every STAR read here needs the blocks it uses written whole (star.read_whole_blocks), and
  the live reader (read_progress) also needs the file to have held still (read_settled).
* ``_rlnCurrentResolution`` in ``data_model_general`` is ``inf`` in it000 (1/0); RELION's "no estimate"
  in Angstrom fields is 999 (the resolution of shell 0; a class with no particles has accuracies of 999).
  Both are reported as None.
* Line 1 of every optimiser.star is ``# RELION optimiser; version <v>`` (RELION 1.3: no version), line 2
  ``# <the command-line arguments>``.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gateway.relion.modes import MODES
from gateway.relion.star import (
    StarBlock,
    StarError,
    StarIncomplete,
    parse_float,
    read_whole_blocks,
)

log = logging.getLogger(__name__)

GENERAL = "model_general"
CLASSES = "model_classes"
OPTIMISER = "optimiser_general"
# Un-numbered STAR files: a converged auto-refine's final set (optimiser.star only from RELION 4.0).
FINAL_STAR_FILES = ("optimiser.star", "model.star", "data.star", "sampling.star")

# RELION's "no estimate" in Angstrom fields (MlModel::getResolutionAngstrom(0), the accuracies of an empty
# class); RELION itself tests 998.99 < x < 999.01 for its 999 sentinels.
NO_ESTIMATE = 999.0

# read_settled: a file must keep its size, mtime and inode this long before and while it is read. RELION
# writes a whole iteration's set within about 5 ms (notes section 4), a model.star in less.
SETTLE_S = 0.05
SETTLE_ATTEMPTS = 3


def summarize_results(dataset_dir: Path, output_prefix: str, mode: str) -> dict[str, Any]:
    """Summarise the output of ``relion_refine --o <output_prefix>`` run in ``dataset_dir``.

    ``output_prefix`` is relative to ``dataset_dir`` (``Class2D/run``); mode is ``2d``, ``3d`` or
    ``autorefine``. Return a JSON-serialisable dict (no NaN/inf; see module docstring for what counts):

    * ``iterations_run`` / ``last_iteration``: the last finished iteration (a converged auto-refine
      counts its final, un-numbered iteration as last NNN + 1); 0 and None when nothing was written.
    * ``iterations_known``: False when only the final, un-numbered files are there: then
      ``iterations_run`` is 1 (the final iteration, the one seen), ``last_iteration`` None and
      ``resolution_per_iteration`` empty, since no final file carries the iteration's number.
    * ``iterations_planned``: ``--iter`` for classification, None for auto-refine.
    * ``resolution_angstrom``: ``_rlnCurrentResolution`` of the newest model; ``final_resolution_angstrom``
      the same from ``run_model.star`` for a converged auto-refine, else None. None for inf or 999.
    * ``resolution_per_iteration``: ``[{"iteration": n, "resolution_angstrom": x|None}]``.
    * ``classes``, ``class_distribution``: K and the ``_rlnClassDistribution`` column of the newest model;
      ``class_resolution_angstrom``: its ``_rlnEstimatedResolution`` column (per class).
    * ``converged``: auto-refine only (True iff ``run_model.star`` exists), None for classification;
      ``completed``: classification reached ``iterations_planned``, or auto-refine converged.
    * ``relion_command`` and ``relion_version`` from the newest optimiser.star (a converged RELION >= 4
      auto-refine's final ``run_optimiser.star``); ``fsc`` (auto-refine only):
      ``[{"resolution_angstrom": x, "fsc": y}]`` without the DC term.
    * ``files``: paths relative to ``dataset_dir`` (``model``, ``data``, ``optimiser``, ``sampling``,
      ``classes`` (a list), plus ``half_maps`` or ``unmasked_classes`` when present).

    A missing directory or missing output gives ``iterations_run: 0`` and nulls. Raise ValueError for a
    bad mode or prefix, and StarError (a ValueError naming the file) for a STAR file that cannot be parsed
    or was not written whole (StarIncomplete: RELION was stopped while writing it).
    """
    run = _RunFiles.scan(Path(dataset_dir), output_prefix, mode)
    summary: dict[str, Any] = {
        "mode": mode,
        "output_prefix": output_prefix,
        "iterations_run": 0,
        "last_iteration": None,
        "iterations_known": True,
        "iterations_planned": None,
        "resolution_angstrom": None,
        "final_resolution_angstrom": None,
        "resolution_per_iteration": [],
        "classes": None,
        "class_distribution": [],
        "class_resolution_angstrom": [],
        "converged": False if mode == "autorefine" else None,
        "completed": False,
        "relion_command": None,
        "relion_version": None,
        "fsc": None,
        "files": {},
    }
    done = run.done_iterations()
    final_model = run.final_model_path()
    if not done and final_model is None:
        return summary

    # The job has ended when this runs (the archive hook), so no file is still growing: read without settling.
    history: list[tuple[int, float | None]] = [(n, _resolution(run.model_path(n), settle=False)) for n in done]
    if final_model is not None and done:
        # The final auto-refine iteration is un-numbered; it comes after the last itNNN set.
        history.append((done[-1] + 1, _resolution(final_model, settle=False)))
    last = history[-1][0] if history else None  # None: the final files alone, whose number nobody wrote

    newest_model = final_model if final_model is not None else run.model_path(done[-1])
    model = read_whole_blocks(newest_model)
    general = _block(model, GENERAL, newest_model)
    classes_block = _block(model, CLASSES, newest_model)  # RELION always writes it; missing = cut short
    distribution = (
        [value if value is not None else 0.0 for value in classes_block.float_column("rlnClassDistribution")]
        if "rlnClassDistribution" in classes_block.labels
        else []
    )
    class_resolution = (
        [_angstrom(value) for value in classes_block.float_column("rlnEstimatedResolution")]
        if "rlnEstimatedResolution" in classes_block.labels
        else []
    )
    summary.update(
        iterations_run=last if last is not None else 1,
        last_iteration=last,
        iterations_known=last is not None,
        resolution_angstrom=_angstrom(general.get_float("rlnCurrentResolution")),
        resolution_per_iteration=[{"iteration": n, "resolution_angstrom": res} for n, res in history],
        classes=general.get_int("rlnNrClasses") or (len(distribution) or None),
        class_distribution=distribution,
        class_resolution_angstrom=class_resolution,
    )

    optimiser_path = run.optimiser_path(done[-1] if done else None, final=final_model is not None)
    if optimiser_path is not None:
        command, version = _optimiser_header(optimiser_path)
        optimiser = read_whole_blocks(optimiser_path, blocks=[OPTIMISER])
        planned = _block(optimiser, OPTIMISER, optimiser_path).get_int("rlnNumberOfIterations")
        summary.update(relion_command=command, relion_version=version)
        if mode != "autorefine":
            summary["iterations_planned"] = planned
            summary["completed"] = planned is not None and last is not None and last >= planned

    if mode == "autorefine":
        converged = final_model is not None
        summary.update(converged=converged, completed=converged)
        if converged:
            summary["final_resolution_angstrom"] = summary["resolution_angstrom"]
        summary["fsc"] = _fsc(model.get("model_class_1"))

    summary["files"] = run.result_files(done[-1] if done else None, final=final_model is not None)
    return summary


def read_progress(dataset_dir: Path, output_prefix: str, mode: str) -> dict[str, Any]:
    """Report live progress cheaply: list the output directory and read only the newest model.star.

    Return ``{"iteration": last finished iteration (0 if none; None for final files alone, whose
    number RELION does not write), "resolution_angstrom": float|None, "converged": bool (auto-refine) |
    None (classification), "started": bool (RELION wrote any file for the prefix)}``.

    RELION writes model.star in place, so the newest one may be half-written when read: it is used only
    once it has held still and its ``data_model_general`` was written whole (read_settled, retried a few
    times); otherwise the previous iteration is reported, never a value read from part of a file.
    """
    run = _RunFiles.scan(Path(dataset_dir), output_prefix, mode)
    progress: dict[str, Any] = {
        "iteration": 0,
        "resolution_angstrom": None,
        "converged": False if mode == "autorefine" else None,
        "started": run.started(),
    }
    done = run.done_iterations()
    candidates: list[tuple[int | None, Path, bool]] = [(n, run.model_path(n), False) for n in reversed(done)]
    final_model = run.final_model_path()
    if final_model is not None:
        candidates.insert(0, ((done[-1] + 1) if done else None, final_model, True))
    for iteration, path, final in candidates:
        try:
            resolution = _resolution(path, settle=True)
        except StarError as exc:
            # RELION may be writing this file right now; the previous iteration's is complete.
            log.debug("progress: skipping %s: %s", path, exc)
            continue
        progress.update(iteration=iteration, resolution_angstrom=resolution)
        if final:
            progress["converged"] = True
        break
    return progress


@dataclass(frozen=True)
class _FileState:
    """What changes while RELION writes a file (the inode, were it ever renamed into place)."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> _FileState:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino)


def read_settled(path: Path, *, blocks: Collection[str] | None = None, settle: bool = True) -> dict[str, StarBlock]:
    """Read a STAR file RELION may be writing: only whole blocks and, with ``settle``, only from a file at rest.

    With ``settle`` the file must keep its size, mtime and inode across two stats SETTLE_S apart and
    across the read; a file that moves, or whose blocks are not whole (star.read_whole_blocks), is tried
    SETTLE_ATTEMPTS times in all, then refused with the last StarError (StarIncomplete when it was
    moving). Without ``settle`` (a job that has ended) one read decides. Raise FileNotFoundError if the
    file is gone.
    """
    problem: StarError = StarIncomplete(f"{path}: not read")
    for _attempt in range(SETTLE_ATTEMPTS if settle else 1):
        before = _FileState.of(path) if settle else None
        if settle:
            time.sleep(SETTLE_S)
            if _FileState.of(path) != before:
                problem = StarIncomplete(f"{path}: still being written (it changed within {SETTLE_S:g} s)")
                continue
        try:
            parsed = read_whole_blocks(path, blocks=blocks)
        except StarError as exc:
            if not settle:
                raise
            problem = exc  # perhaps caught mid-write between two stats: try again
            continue
        if settle and _FileState.of(path) != before:
            problem = StarIncomplete(f"{path}: changed while it was read")
            continue
        return parsed
    raise problem


class _RunFiles:
    """The files one output prefix has produced, from a single directory listing."""

    def __init__(self, dataset_dir: Path, directory: Path, base: str, mode: str, names: set[str]) -> None:
        self.dataset_dir = dataset_dir
        self.directory = directory
        self.base = base
        self.mode = mode
        self.names = names
        pattern = re.compile(rf"^{re.escape(base)}_it(\d{{3,}})_(.+)$")
        self.iterations: dict[int, set[str]] = {}
        for name in names:
            match = pattern.match(name)
            if match:
                self.iterations.setdefault(int(match.group(1)), set()).add(match.group(2))

    @classmethod
    def scan(cls, dataset_dir: Path, output_prefix: str, mode: str) -> _RunFiles:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        prefix = PurePosixPath(output_prefix)
        if not output_prefix or output_prefix.endswith("/") or prefix.is_absolute() or ".." in prefix.parts:
            raise ValueError(f"output_prefix must be a relative path like 'Class2D/run', got {output_prefix!r}")
        directory = dataset_dir.joinpath(*prefix.parent.parts)
        try:
            names = set(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            names = set()
        return cls(dataset_dir, directory, prefix.name, mode, names)

    @property
    def _model_suffix(self) -> str:
        return "half2_model.star" if self.mode == "autorefine" else "model.star"

    def started(self) -> bool:
        """RELION wrote something for this prefix: an ``_itNNN_`` file or one of the final STAR files."""
        return bool(self.iterations) or any(self.final_file(name) is not None for name in FINAL_STAR_FILES)

    def done_iterations(self) -> list[int]:
        """Iterations whose model file(s) exist, in order."""
        return sorted(n for n, suffixes in self.iterations.items() if self._model_suffix in suffixes)

    def iteration_file(self, iteration: int, suffix: str) -> Path | None:
        if suffix not in self.iterations.get(iteration, set()):
            return None
        return self.directory / f"{self.base}_it{iteration:03d}_{suffix}"

    def final_file(self, suffix: str) -> Path | None:
        name = f"{self.base}_{suffix}"
        return self.directory / name if name in self.names else None

    def model_path(self, iteration: int) -> Path:
        """The model.star to read for a done iteration (half1 for auto-refine; both halves agree on resolution)."""
        if self.mode == "autorefine":
            half1 = self.iteration_file(iteration, "half1_model.star")
            if half1 is not None:
                return half1
        path = self.iteration_file(iteration, self._model_suffix)
        assert path is not None  # only called for done iterations
        return path

    def final_model_path(self) -> Path | None:
        """``<prefix>_model.star``: only a converged auto-refine writes it."""
        return self.final_file("model.star") if self.mode == "autorefine" else None

    def optimiser_path(self, iteration: int | None, *, final: bool) -> Path | None:
        """The newest optimiser.star: a converged RELION >= 4.0 auto-refine's final one, else iteration's.

        The final optimiser.star counts only with the final model.star (final): RELION writes it first,
        so alone it is a final iteration cut short.
        """
        final_optimiser = self.final_file("optimiser.star") if final else None
        if final_optimiser is not None:
            return final_optimiser
        return self.iteration_file(iteration, "optimiser.star") if iteration is not None else None

    def result_files(self, iteration: int | None, *, final: bool) -> dict[str, Any]:
        def rel(path: Path | None) -> str | None:
            return path.relative_to(self.dataset_dir).as_posix() if path is not None else None

        def at(suffix: str) -> Path | None:
            return self.iteration_file(iteration, suffix) if iteration is not None else None

        files: dict[str, Any] = {"optimiser": rel(self.optimiser_path(iteration, final=final))}
        if final:
            files.update(
                model=rel(self.final_file("model.star")),
                data=rel(self.final_file("data.star")),
                sampling=rel(self.final_file("sampling.star")),
                classes=_existing(
                    rel(self.final_file(name)) for name in self._class_names(self.names, prefix=f"{self.base}_")
                ),
                half_maps=_existing(rel(self.final_file(f"half{h}_class001_unfil.mrc")) for h in (1, 2)),
            )
            return files
        suffixes = self.iterations.get(iteration, set()) if iteration is not None else set()
        files.update(
            model=rel(self.model_path(iteration)) if iteration is not None else None,
            data=rel(at("data.star")),
            sampling=rel(at("sampling.star")),
            classes=_existing(rel(at(suffix)) for suffix in self._class_names(suffixes, prefix="")),
        )
        unmasked = self.final_file("unmasked_classes.mrcs")  # 2D writes it after the last iteration
        if unmasked is not None:
            files["unmasked_classes"] = rel(unmasked)
        return files

    def _class_names(self, names: Iterable[str], *, prefix: str) -> list[str]:
        """Class maps among names: ``classes.mrcs`` (2D), ``classNNN.mrc`` (3D), ``half{1,2}_class001.mrc``."""
        pattern = re.compile(rf"^{re.escape(prefix)}(classes\.mrcs|class\d{{3}}\.mrc|half[12]_class\d{{3}}\.mrc)$")
        return sorted(name[len(prefix) :] for name in names if pattern.match(name))


def _existing(paths: Iterable[str | None]) -> list[str]:
    return [path for path in paths if path is not None]


def _block(blocks: dict[str, StarBlock], name: str, path: Path) -> StarBlock:
    block = blocks.get(name)
    if block is None:
        raise StarError(f"{path}: no data_{name} block")
    return block


def _angstrom(value: float | None) -> float | None:
    """A resolution or accuracy as RELION wrote it, with its 999 "no estimate" as None (inf is None already)."""
    if value is None or abs(value - NO_ESTIMATE) < 0.01:
        return None
    return value


def _resolution(path: Path, *, settle: bool) -> float | None:
    """``_rlnCurrentResolution`` of a model.star; None for ``inf`` (it000), 999 or a file that has gone.

    Only ``data_model_general`` is read (RELION writes it first), and only once it was written whole.
    """
    try:
        blocks = read_settled(path, blocks=[GENERAL], settle=settle)
    except FileNotFoundError:
        log.warning("%s was listed but is gone", path)
        return None
    return _angstrom(_block(blocks, GENERAL, path).get_float("rlnCurrentResolution"))


def _optimiser_header(path: Path) -> tuple[str | None, str | None]:
    """Return (command-line arguments, RELION version) from the two comment lines atop an optimiser.star."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        first, second = handle.readline(), handle.readline()
    version_match = re.search(r"version\s+(\S+)", first) if first.startswith("#") else None
    command = second[1:].strip() if second.startswith("#") else None
    return command or None, version_match.group(1) if version_match else None


def _fsc(block: StarBlock | None) -> list[dict[str, float | None]] | None:
    """The gold-standard FSC curve of an auto-refine model, without the DC term (whose resolution is 999)."""
    if block is None or not {"rlnAngstromResolution", "rlnGoldStandardFsc"}.issubset(block.labels):
        return None
    curve = []
    for row in block.loop:
        if row.get("rlnSpectralIndex") == "0":
            continue
        curve.append(
            {
                "resolution_angstrom": _angstrom(parse_float(row["rlnAngstromResolution"])),
                "fsc": parse_float(row["rlnGoldStandardFsc"]),
            }
        )
    return curve
