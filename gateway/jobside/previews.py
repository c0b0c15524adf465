"""Previews of a RELION run: PNGs rendered from its own output after each finished iteration.

``python -I -m gateway.jobside previews --dir D --prefix P --mode M --iteration N --out O`` runs
this in a short-lived process (the watcher starts it, and the archive hook for a final iteration
the watcher missed), so numpy, mrcfile and Pillow never live in the watcher.

The contract (the API and the job page read it):

* ``<out>/it{NNN:03d}-{kind}.png`` with kind ``classes`` (2D: the class averages sorted by share of
  particles), ``map-class{K}`` (3D classification: class K, 1-based), ``map`` and ``fsc``
  (auto-refine: the map and the half-map FSC), ``history`` (every mode: resolution, and class
  shares, per iteration up to NNN). Each is written atomically (a temporary file, then a rename).
* ``<out>/index.json``, rewritten atomically after each iteration's set: ``{"schema_version": 1,
  "updated_at": ISO 8601, "previews": [{"name", "iteration", "kind", "width", "height", "bytes",
  "sha256"}, ...]}``, every PNG in the directory, oldest iteration first (within an iteration:
  classes, map-class1..K, map, fsc, history).

What is read (RELION 3.1, shared/notes/relion.md): iteration N's ``_itNNN_model.star``
(classification) or ``_itNNN_half1_model.star`` (auto-refine) for the resolution
(``_rlnCurrentResolution``), the pixel size (``_rlnPixelSize``), each class's share and resolution
(``_rlnClassDistribution``, ``_rlnEstimatedResolution``) and the FSC (``data_model_class_1``:
``_rlnResolution`` in 1/Å, ``_rlnGoldStandardFsc``); the images ``_itNNN_classes.mrcs``,
``_itNNN_class00K.mrc``, and for auto-refine the two half-maps ``_itNNN_half{1,2}_class001.mrc``,
shown averaged. A converged auto-refine's final iteration (last NNN + 1) is the un-numbered
``_model.star`` and ``_class001.mrc``. Iteration 0 (the initial references) is not previewed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from gateway.jobside.drawing import angstrom, percent, save_png
from gateway.jobside.preview_images import Drawn, class_montage, volume_panels
from gateway.jobside.preview_plots import IterationPoint, fsc_plot, history_plot
from gateway.jobside.preview_runner import INDEX_NAME, NAME_PATTERN
from gateway.relion.images import VolumeViews, read_stack, read_volume_views
from gateway.relion.modes import MODES
from gateway.relion.star import StarBlock, parse_float, read_star, read_whole_blocks

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 1
_KIND_ORDER = {"classes": 0, "map-class": 1, "map": 2, "fsc": 3, "history": 4}


def preview_name(iteration: int, kind: str) -> str:
    return f"it{iteration:03d}-{kind}.png"


def kind_order(kind: str) -> tuple[int, int]:
    if kind.startswith("map-class"):
        return _KIND_ORDER["map-class"], int(kind[len("map-class"):])
    return _KIND_ORDER[kind], 0


@dataclass(frozen=True)
class Model:
    """What previews need from one model.star."""

    path: Path
    resolution: float | None
    pixel_size: float | None
    shares: tuple[float, ...]
    class_resolutions: tuple[float | None, ...]
    fsc: tuple[tuple[float, float | None], ...]  # (1/Å, FSC) without the DC term

    @classmethod
    def read(cls, path: Path, *, fsc: bool = False) -> Model:
        wanted = ["model_general", "model_classes", *(["model_class_1"] if fsc else [])]
        blocks = read_whole_blocks(path, blocks=wanted)  # a block RELION is still writing is refused (retried)
        general = blocks.get("model_general")
        if general is None:
            raise ValueError(f"{path}: no data_model_general block")
        classes = blocks.get("model_classes") or StarBlock("model_classes")
        shares = tuple(v or 0.0 for v in _column(classes, "rlnClassDistribution"))
        curve: tuple[tuple[float, float | None], ...] = ()
        table = blocks.get("model_class_1")
        if table is not None and {"rlnResolution", "rlnGoldStandardFsc"}.issubset(table.labels):
            curve = tuple(
                (frequency, parse_float(row["rlnGoldStandardFsc"]))
                for row in table.loop
                if row.get("rlnSpectralIndex") != "0" and (frequency := parse_float(row["rlnResolution"])) is not None and frequency > 0
            )
        return cls(
            path,
            general.get_float("rlnCurrentResolution"),
            general.get_float("rlnPixelSize"),
            shares,
            tuple(_column(classes, "rlnEstimatedResolution")),
            curve,
        )


def _column(block: StarBlock, label: str) -> list[float | None]:
    return block.float_column(label) if label in block.labels else []


class RunOutput:
    """The files of one ``relion_refine --o <prefix>`` run that previews read."""

    def __init__(self, dataset_dir: Path, prefix: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        path = PurePosixPath(prefix)
        if not prefix or prefix.endswith("/") or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"prefix must be a relative path like 'Class2D/run', got {prefix!r}")
        self.dataset_dir = Path(dataset_dir)
        self.directory = self.dataset_dir.joinpath(*path.parent.parts)
        self.base = path.name
        self.mode = mode

    def numbered(self, iteration: int, suffix: str) -> Path:
        return self.directory / f"{self.base}_it{iteration:03d}_{suffix}"

    def final(self, suffix: str) -> Path:
        return self.directory / f"{self.base}_{suffix}"

    def is_final(self, iteration: int) -> bool:
        """Auto-refine's last iteration: no ``_itNNN_`` set, but the un-numbered final one."""
        return (
            self.mode == "autorefine"
            and not self.numbered(iteration, "half1_model.star").exists()
            and self.final("model.star").exists()
            and (iteration == 0 or self.numbered(iteration - 1, "half2_model.star").exists())
        )

    def model_path(self, iteration: int) -> Path | None:
        """The model.star of a finished iteration, or None."""
        if self.mode == "autorefine":
            if self.is_final(iteration):
                return self.final("model.star")
            if not self.numbered(iteration, "half2_model.star").exists():
                return None
            return self.numbered(iteration, "half1_model.star")
        path = self.numbered(iteration, "model.star")
        return path if path.exists() else None

    def maps(self, iteration: int) -> list[Path]:
        """Auto-refine: the final map, or the two half-maps of an iteration."""
        if self.is_final(iteration):
            return [self.final("class001.mrc")]
        return [self.numbered(iteration, f"half{h}_class001.mrc") for h in (1, 2)]

    def planned_iterations(self, iteration: int) -> int | None:
        """``--iter`` from the iteration's optimiser.star (classification only; auto-refine says 999)."""
        path = self.numbered(iteration, "optimiser.star")
        if self.mode == "autorefine" or not path.exists():
            return None
        try:
            block = read_star(path, blocks=["optimiser_general"]).get("optimiser_general")
        except (OSError, ValueError):
            return None
        return block.get_int("rlnNumberOfIterations") if block else None


# -- one iteration ---------------------------------------------------------------------------


def render_iteration(run: RunOutput, iteration: int) -> list[tuple[str, Drawn]]:
    """Every preview of one finished iteration as (kind, drawing); ValueError/OSError if unreadable."""
    model_path = run.model_path(iteration)
    if model_path is None:
        raise FileNotFoundError(f"iteration {iteration} of {run.directory / run.base} has not finished (no model.star)")
    model = Model.read(model_path, fsc=run.mode == "autorefine")
    drawings: list[tuple[str, Drawn]] = []
    if run.mode == "2d":
        stack, header_pixel = read_stack(run.numbered(iteration, "classes.mrcs"))
        drawings.append((
            "classes",
            class_montage(
                stack, model.shares, model.class_resolutions, iteration=iteration,
                planned=run.planned_iterations(iteration), pixel_size=model.pixel_size or header_pixel,
                resolution=model.resolution,
            ),
        ))
    elif run.mode == "3d":
        planned = run.planned_iterations(iteration)
        for k in range(1, max(1, len(model.shares)) + 1):
            views = _views([run.numbered(iteration, f"class{k:03d}.mrc")], model.pixel_size)
            share = model.shares[k - 1] if k - 1 < len(model.shares) else None
            res = model.class_resolutions[k - 1] if k - 1 < len(model.class_resolutions) else None
            title = f"3D class {k} · iteration {iteration}" + (f" of {planned}" if planned else "")
            facts = [f"{percent(share)} of particles", angstrom(res), f"box {views.box}"]
            drawings.append((f"map-class{k}", volume_panels(views, title=title, facts=facts)))
    else:
        final = run.is_final(iteration)
        paths = run.maps(iteration)
        views = _views(paths, model.pixel_size)
        title = f"Auto-refine {'final map' if final else 'map'} · iteration {iteration}"
        facts = [angstrom(model.resolution), "half-maps averaged" if len(paths) > 1 else "halves joined", f"box {views.box}"]
        drawings.append(("map", volume_panels(views, title=title, facts=facts)))
        drawings.append((
            "fsc",
            fsc_plot(model.fsc, iteration=iteration, resolution=model.resolution, pixel_size=model.pixel_size, final=final),
        ))
    drawings.append(("history", _history(run, iteration)))
    return drawings


def _views(paths: list[Path], pixel_size: float | None) -> VolumeViews:
    views = VolumeViews.mean([read_volume_views(p) for p in paths])
    if pixel_size:
        views = VolumeViews(views.slices, views.projections, views.box, pixel_size)
    return views


def _history(run: RunOutput, iteration: int) -> Drawn:
    points = []
    for n in range(1, iteration + 1):
        path = run.model_path(n)
        if path is None:
            continue
        try:
            model = Model.read(path)
        except (OSError, ValueError) as exc:  # an older iteration's file gone or torn: leave the point out
            log.warning("history: skipping iteration %d: %s", n, exc)
            continue
        points.append(IterationPoint(n, model.resolution, model.shares))
    return history_plot(points, iteration=iteration, classes=run.mode != "autorefine", final=run.is_final(iteration))


# -- files and the index ---------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """One PNG written, with what the drawing carried (labels, details) for the caller."""

    name: str
    kind: str
    iteration: int
    width: int
    height: int
    bytes: int
    sha256: str
    labels: tuple[str, ...]
    details: dict[str, Any]


def write_previews(run: RunOutput, iteration: int, out: Path) -> list[Written]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, drawn in render_iteration(run, iteration):
        path = save_png(drawn.image, out / preview_name(iteration, kind))
        data = path.read_bytes()
        written.append(Written(
            path.name, kind, iteration, drawn.image.width, drawn.image.height, len(data),
            hashlib.sha256(data).hexdigest(), tuple(drawn.labels), drawn.details,
        ))
    return written


def index_entry(path: Path) -> dict[str, Any] | None:
    match = NAME_PATTERN.match(path.name)
    if not match or not path.is_file():
        return None
    data = path.read_bytes()
    with Image.open(path) as image:  # reads the header only
        width, height = image.size
    return {
        "name": path.name,
        "iteration": int(match.group("iteration")),
        "kind": match.group("kind"),
        "width": width,
        "height": height,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_index(out: Path) -> dict[str, Any]:
    """Rebuild index.json from the PNGs in ``out`` (under a lock), atomically; return it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = [e for e in (index_entry(p) for p in out.iterdir()) if e is not None]
        entries.sort(key=lambda e: (e["iteration"], kind_order(e["kind"])))
        index = {
            "schema_version": INDEX_SCHEMA_VERSION,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "previews": entries,
        }
        tmp = out / f".{INDEX_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out / INDEX_NAME)
    return index


def render_previews(
    dataset_dir: Path,
    prefix: str,
    mode: str,
    iterations: list[int],
    out: Path,
    *,
    attempts: int = 3,
    retry_delay: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[Written], list[str]]:
    """Render the previews of each iteration, in the order given, rewriting index.json after each.

    A file RELION is still writing can be unreadable for a moment: each iteration is tried
    ``attempts`` times. Return what was written and one message per iteration that failed.
    """
    run = RunOutput(dataset_dir, prefix, mode)
    written: list[Written] = []
    failures: list[str] = []
    for iteration in dict.fromkeys(iterations):  # the archive hook asks for the final iteration first
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            try:
                done = write_previews(run, iteration, out)
            except (OSError, ValueError) as exc:  # missing or unreadable input: RELION may still be writing it
                if attempt == attempts:
                    failures.append(f"iteration {iteration}: {exc}")
                    log.error("iteration %d: no previews: %s", iteration, exc)
                else:
                    sleep(retry_delay)
                continue
            except Exception as exc:  # a bug here must not cost the other iterations their previews
                failures.append(f"iteration {iteration}: {type(exc).__name__}: {exc}")
                log.exception("iteration %d: no previews", iteration)
                break
            written += done
            write_index(out)
            log.info(
                "iteration %d: %s in %.2f s", iteration,
                ", ".join(f"{w.name} ({w.width}x{w.height}, {w.bytes // 1024} KiB)" for w in done),
                time.perf_counter() - started,
            )
            break
    return written, failures
