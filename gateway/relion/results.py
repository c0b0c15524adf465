"""Summarise what a relion_refine run wrote: iterations, resolution, class distribution, files.

Facts this relies on (RELION 3.1.3, measured; see shared/notes/relion.md sections 2-4):

* Each finished iteration N writes ``<prefix>_itNNN_*``. Classification (2D/3D) writes
  ``_itNNN_model.star``; auto-refine writes ``_itNNN_half1_model.star`` and ``_itNNN_half2_model.star``.
  ``optimiser.star`` is written first and the rest of the set within a few ms, so an iteration counts as
  done only once its model file(s) exist.
* Auto-refine's last iteration (the one that joins the halves) writes no ``_itNNN_`` files, only the
  un-numbered ``<prefix>_model.star``, ``_data.star``, ``_class001.mrc`` ... and no optimiser.star. So a
  converged run did (last NNN + 1) iterations, and a missing ``<prefix>_model.star`` means "not
  converged" even when relion exited 0 (``--auto_iter_max`` stops like that).
* ``_rlnCurrentResolution`` in ``data_model_general`` is ``inf`` in it000; it is reported as None.
* Line 2 of every optimiser.star is ``# <the command-line arguments>``.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from gateway.relion.star import StarBlock, StarError, parse_float, read_star
from gateway.relion.modes import MODES

log = logging.getLogger(__name__)

GENERAL = "model_general"
CLASSES = "model_classes"


def summarize_results(dataset_dir: Path, output_prefix: str, mode: str) -> dict[str, Any]:
    """Summarise the output of ``relion_refine --o <output_prefix>`` run in ``dataset_dir``.

    ``output_prefix`` is relative to ``dataset_dir`` (``Class2D/run``); mode is ``2d``, ``3d`` or
    ``autorefine``. Return a JSON-serialisable dict (no NaN/inf; see module docstring for what counts):

    * ``iterations_run`` / ``last_iteration``: the last finished iteration (a converged auto-refine
      counts its final, un-numbered iteration as last NNN + 1); 0 and None when nothing was written.
    * ``iterations_planned``: ``--iter`` for classification, None for auto-refine.
    * ``resolution_angstrom``: ``_rlnCurrentResolution`` of the newest model; ``final_resolution_angstrom``
      the same from ``run_model.star`` for a converged auto-refine, else None.
    * ``resolution_per_iteration``: ``[{"iteration": n, "resolution_angstrom": x|None}]``.
    * ``classes``, ``class_distribution``: K and the ``_rlnClassDistribution`` column of the newest model;
      ``class_resolution_angstrom``: its ``_rlnEstimatedResolution`` column (per class).
    * ``converged``: auto-refine only (True iff ``run_model.star`` exists), None for classification;
      ``completed``: classification reached ``iterations_planned``, or auto-refine converged.
    * ``relion_command`` and ``relion_version`` from the newest optimiser.star; ``fsc`` (auto-refine only):
      ``[{"resolution_angstrom": x, "fsc": y}]`` without the DC term.
    * ``files``: paths relative to ``dataset_dir`` (``model``, ``data``, ``optimiser``, ``sampling``,
      ``classes`` (a list), plus ``half_maps`` or ``unmasked_classes`` when present).

    A missing directory or missing output gives ``iterations_run: 0`` and nulls. Raise ValueError for a
    bad mode or prefix, and StarError (a ValueError naming the file) for a STAR file that cannot be parsed.
    """
    run = _RunFiles.scan(Path(dataset_dir), output_prefix, mode)
    summary: dict[str, Any] = {
        "mode": mode,
        "output_prefix": output_prefix,
        "iterations_run": 0,
        "last_iteration": None,
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
    history: list[tuple[int, float | None]] = [(n, _resolution(run.model_path(n))) for n in done]
    final_model = run.final_model_path()
    if final_model is not None:
        # The final auto-refine iteration is un-numbered; it comes after the last itNNN set.
        history.append(((done[-1] + 1) if done else 0, _resolution(final_model)))
    if not history:
        return summary

    last = history[-1][0]
    newest_model = final_model if final_model is not None else run.model_path(done[-1])
    model = read_star(newest_model)
    general = _block(model, GENERAL, newest_model)
    classes_block = model.get(CLASSES)
    distribution = (
        [value if value is not None else 0.0 for value in classes_block.float_column("rlnClassDistribution")]
        if classes_block is not None and "rlnClassDistribution" in classes_block.labels
        else []
    )
    class_resolution = (
        classes_block.float_column("rlnEstimatedResolution")
        if classes_block is not None and "rlnEstimatedResolution" in classes_block.labels
        else []
    )
    summary.update(
        iterations_run=last,
        last_iteration=last,
        resolution_angstrom=general.get_float("rlnCurrentResolution"),
        resolution_per_iteration=[{"iteration": n, "resolution_angstrom": res} for n, res in history],
        classes=general.get_int("rlnNrClasses") or (len(distribution) or None),
        class_distribution=distribution,
        class_resolution_angstrom=class_resolution,
    )

    optimiser_path = run.iteration_file(done[-1], "optimiser.star") if done else None
    if optimiser_path is not None:
        command, version = _optimiser_header(optimiser_path)
        optimiser = read_star(optimiser_path, blocks=["optimiser_general"])
        planned = _block(optimiser, "optimiser_general", optimiser_path).get_int("rlnNumberOfIterations")
        summary.update(relion_command=command, relion_version=version)
        if mode != "autorefine":
            summary["iterations_planned"] = planned
            summary["completed"] = planned is not None and last >= planned

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

    Return ``{"iteration": last finished iteration (0 if none), "resolution_angstrom": float|None,
    "converged": bool (auto-refine) | None (classification), "started": bool}``. A model.star that is
    still being written (unparseable) is skipped in favour of the previous iteration.
    """
    run = _RunFiles.scan(Path(dataset_dir), output_prefix, mode)
    progress: dict[str, Any] = {
        "iteration": 0,
        "resolution_angstrom": None,
        "converged": False if mode == "autorefine" else None,
        "started": run.started(),
    }
    done = run.done_iterations()
    candidates = [(n, run.model_path(n), False) for n in reversed(done)]
    final_model = run.final_model_path()
    if final_model is not None:
        candidates.insert(0, ((done[-1] + 1) if done else 0, final_model, True))
    for iteration, path, final in candidates:
        try:
            resolution = _resolution(path)
        except StarError as exc:
            # RELION may be writing this file right now; the previous iteration's is complete.
            log.debug("progress: skipping %s: %s", path, exc)
            continue
        progress.update(iteration=iteration, resolution_angstrom=resolution)
        if final:
            progress["converged"] = True
        break
    return progress


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
        return bool(self.iterations)

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

    def result_files(self, iteration: int | None, *, final: bool) -> dict[str, Any]:
        def rel(path: Path | None) -> str | None:
            return path.relative_to(self.dataset_dir).as_posix() if path is not None else None

        def at(suffix: str) -> Path | None:
            return self.iteration_file(iteration, suffix) if iteration is not None else None

        files: dict[str, Any] = {"optimiser": rel(at("optimiser.star"))}
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


def _resolution(path: Path) -> float | None:
    """``_rlnCurrentResolution`` of a model.star; None for ``inf`` (it000) or a file that has gone."""
    try:
        blocks = read_star(path, blocks=[GENERAL])
    except FileNotFoundError:
        log.warning("%s was listed but is gone", path)
        return None
    return _block(blocks, GENERAL, path).get_float("rlnCurrentResolution")


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
                "resolution_angstrom": parse_float(row["rlnAngstromResolution"]),
                "fsc": parse_float(row["rlnGoldStandardFsc"]),
            }
        )
    return curve
