"""Previews rendered from synthetic RELION-like outputs (mrcfile stacks and maps, model.star text).

The outputs are made here with RELION 3.1's names and STAR layout (as in tests/fixtures/relion),
small (box 24-32), so every test renders real PNGs in well under a second.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from PIL import Image

from gateway.jobside.drawing import clip_contrast, contrast_limits, nice_length
from gateway.jobside.preview_plots import IterationPoint, share_groups
from gateway.jobside.previews import (
    NAME_PATTERN,
    Model,
    RunOutput,
    render_iteration,
    render_previews,
    write_index,
)
from gateway.relion.images import read_volume_views

BOX = 32
PIXEL = 4.0


# -- synthetic RELION output ---------------------------------------------------------------------


def model_star(
    path: Path,
    *,
    resolution: float | str,
    classes: list[tuple[float, float]],
    reference: str,
    fsc: list[float] | None = None,
    pixel: float = PIXEL,
) -> Path:
    """A model.star as RELION 3.1 writes it: general, classes (share, resolution), optionally the FSC."""
    lines = [
        "", "# version 30001", "", "data_model_general", "",
        "_rlnReferenceDimensionality 2", f"_rlnOriginalImageSize {BOX}", f"_rlnCurrentResolution {resolution}",
        f"_rlnPixelSize {pixel:.6f}", f"_rlnNrClasses {len(classes)}", " ",
        "", "# version 30001", "", "data_model_classes", "", "loop_ ",
        "_rlnReferenceImage #1 ", "_rlnClassDistribution #2 ", "_rlnEstimatedResolution #3 ",
    ]
    lines += [f"{reference.format(k=k)} {share:.6f} {res:.6f}" for k, (share, res) in enumerate(classes, start=1)]
    lines.append(" ")
    if fsc is not None:
        lines += ["", "# version 30001", "", "data_model_class_1", "", "loop_ ",
                  "_rlnSpectralIndex #1 ", "_rlnResolution #2 ", "_rlnAngstromResolution #3 ", "_rlnGoldStandardFsc #4 "]
        lines.append("0 0.000000 999.000000 1.000000")  # the DC term: left out of the plot
        for index, value in enumerate(fsc, start=1):
            frequency = index / (BOX * pixel)
            lines.append(f"{index} {frequency:.6f} {1 / frequency:.6f} {value:.6f}")
        lines.append(" ")
    path.write_text("\n".join(lines) + "\n")
    return path


def blob_volume(box: int = BOX, centre: tuple[float, float, float] = (0.0, 0.0, 0.0), seed: int = 0) -> np.ndarray:
    z, y, x = np.mgrid[:box, :box, :box].astype(np.float32) - box / 2
    cz, cy, cx = centre
    volume = np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * (box / 8) ** 2))
    return (volume + np.random.default_rng(seed).normal(0, 0.01, volume.shape)).astype(np.float32)


def write_mrc(path: Path, data: np.ndarray, pixel: float = PIXEL) -> Path:
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = pixel
    return path


def fsc_curve(resolution_index: int = 5) -> list[float]:
    return [float(1 / (1 + np.exp(2.0 * (i - resolution_index)))) for i in range(1, BOX // 2 + 1)]


SHARES_2D = [(0.2, 30.0), (0.5, 25.6), (0.3, 21.3)]  # class 2 is the largest, then 3, then 1


def make_2d(root: Path, iterations: int = 2, shares: list[tuple[float, float]] = SHARES_2D) -> Path:
    out = root / "Class2D"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for n in range(iterations + 1):
        stack = rng.normal(0, 1, (len(shares), BOX, BOX)).astype(np.float32)
        for k in range(len(shares)):
            stack[k, BOX // 2 - k - 2 : BOX // 2 + k + 2, :] += 5.0  # each class its own band
        write_mrc(out / f"run_it{n:03d}_classes.mrcs", stack)
        model_star(out / f"run_it{n:03d}_model.star", resolution="inf" if n == 0 else 30.0 - n,
                   classes=shares, reference="{k:06d}@Class2D/run_it%03d_classes.mrcs" % n)
        (out / f"run_it{n:03d}_optimiser.star").write_text(
            f"# RELION optimiser; version 3.1.3\n# --o Class2D/run --iter {iterations}\n\ndata_optimiser_general\n\n"
            f"_rlnCurrentIteration {n}\n_rlnNumberOfIterations {iterations}\n \n"
        )
    return root


def make_3d(root: Path, iterations: int = 2) -> Path:
    out = root / "Class3D"
    out.mkdir(parents=True, exist_ok=True)
    for n in range(iterations + 1):
        for k in (1, 2):
            write_mrc(out / f"run_it{n:03d}_class{k:03d}.mrc", blob_volume(centre=(0, 0, 4.0 * k), seed=n * 10 + k))
        model_star(out / f"run_it{n:03d}_model.star", resolution=28.0 - n, classes=[(0.45, 28.0), (0.55, 25.6)],
                   reference="Class3D/run_it%03d_class{k:03d}.mrc" % n)
    return root


def make_autorefine(root: Path, iterations: int = 3, converged: bool = True) -> Path:
    out = root / "Refine3D"
    out.mkdir(parents=True, exist_ok=True)
    for n in range(iterations + 1):
        for half in (1, 2):
            write_mrc(out / f"run_it{n:03d}_half{half}_class001.mrc", blob_volume(seed=n * 10 + half))
            model_star(out / f"run_it{n:03d}_half{half}_model.star", resolution=32.0 - 2 * n, classes=[(1.0, 32.0)],
                       reference="Refine3D/run_it%03d_half%d_class001.mrc" % (n, half), fsc=fsc_curve(4 + n // 2))
    if converged:
        write_mrc(out / "run_class001.mrc", blob_volume(seed=99))
        model_star(out / "run_model.star", resolution=21.333333, classes=[(1.0, 21.3)], reference="Refine3D/run_class001.mrc",
                   fsc=fsc_curve(6))
    return root


def png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image


# -- contrast ------------------------------------------------------------------------------------


def test_clip_contrast_maps_the_percentiles_to_black_and_white_and_clips_outliers() -> None:
    values = np.linspace(0.0, 1.0, 9999).reshape(101, 99)
    values[0, 0], values[-1, -1] = -1000.0, 1000.0  # a dead and a hot pixel must not flatten the rest
    gray = clip_contrast(values, 1.0, 99.0)
    assert gray.dtype == np.uint8 and gray.shape == values.shape
    lo, hi = contrast_limits(values, 1.0, 99.0)
    assert 0.005 < lo < 0.015 and 0.985 < hi < 0.995
    assert gray[0, 0] == 0 and gray[-1, -1] == 255
    middle = gray.ravel()[4999]
    assert abs(int(middle) - 128) <= 2  # the median stays mid-grey: the outliers did not compress it
    assert 0.01 * values.size <= (gray == 0).sum() <= 0.013 * values.size  # the lowest 1% (and what rounds to it)


def test_clip_contrast_of_a_flat_or_broken_image_is_black() -> None:
    assert not clip_contrast(np.full((8, 8), 3.0)).any()
    broken = np.full((4, 4), np.nan)
    assert not clip_contrast(broken).any()
    mixed = np.arange(16, dtype=float).reshape(4, 4)
    mixed[0, 0] = np.inf
    assert clip_contrast(mixed, limits=(0.0, 15.0))[0, 0] == 255  # +inf is white, never an error
    assert clip_contrast(np.array([[0.0, 5.0, 10.0]]), limits=(0.0, 10.0)).tolist() == [[0, 128, 255]]


def test_scale_bar_lengths_are_round() -> None:
    assert [nice_length(x) for x in (38.4, 77.0, 9.9, 260.0, 0.0)] == [25.0, 50.0, 5.0, 250.0, 0.0]


# -- the images ------------------------------------------------------------------------------------


def test_2d_montage_is_sorted_by_class_distribution_and_labelled(tmp_path: Path) -> None:
    run = RunOutput(make_2d(tmp_path), "Class2D/run", "2d")
    drawings = dict(render_iteration(run, 2))
    assert list(drawings) == ["classes", "history"]
    montage = drawings["classes"]
    assert montage.details["order"] == [2, 3, 1]
    assert [t["share"] for t in montage.details["tiles"]] == [0.5, 0.3, 0.2]
    assert [t["label"] for t in montage.details["tiles"]] == ["#2 50.0%  25.6 Å", "#3 30.0%  21.3 Å", "#1 20.0%  30.0 Å"]
    assert montage.labels[0] == "2D class averages · iteration 2 of 2"
    assert "3 classes by share of particles · 28.0 Å · 4.00 Å/px" in montage.labels
    assert "50 Å" in montage.labels  # the scale bar: a tile is 128 Å across (box 32 at 4 Å/px)
    tile = montage.details["tile_px"]
    assert tile == 160 and montage.image.width >= 3 * tile and montage.image.mode == "L"
    # Each tile shows its own class: class k's bright band is 2k + 4 px tall of 32, a tile is 5x that.
    pixels = np.asarray(montage.image)
    for entry in montage.details["tiles"]:
        x, y = entry["xy"]
        bright = (pixels[y : y + tile, x : x + tile].mean(axis=1) > 128).sum()  # rows brighter than mid-grey
        assert bright == pytest.approx((2 * (entry["class"] - 1) + 4) * tile / BOX, abs=6)


def test_2d_tiles_keep_their_own_contrast_and_an_empty_class_is_black(tmp_path: Path) -> None:
    make_2d(tmp_path, iterations=1, shares=[(0.0, 99.0), (1.0, 20.0)])
    stack_path = tmp_path / "Class2D" / "run_it001_classes.mrcs"
    with mrcfile.open(str(stack_path), mode="r+") as mrc:
        data = mrc.data.copy()
        data[0] = 0.0  # an empty class: RELION leaves it flat
        data[1] *= 1000.0  # and a bright one: per-tile contrast keeps both readable
        mrc.set_data(data)
    montage = dict(render_iteration(RunOutput(tmp_path, "Class2D/run", "2d"), 1))["classes"]
    assert montage.details["order"] == [2, 1]
    pixels = np.asarray(montage.image)
    tile = montage.details["tile_px"]
    (bx, by), (ex, ey) = (t["xy"] for t in montage.details["tiles"])
    assert not pixels[ey : ey + tile, ex : ex + tile].any()  # the empty class: black
    bright = pixels[by : by + tile, bx : bx + tile]
    assert bright.std() > 30 and bright.min() == 0 and bright.max() == 255  # stretched, not saturated flat


def test_3d_class_maps_show_slices_and_projections_with_labels(tmp_path: Path) -> None:
    run = RunOutput(make_3d(tmp_path), "Class3D/run", "3d")
    drawings = dict(render_iteration(run, 2))
    assert list(drawings) == ["map-class1", "map-class2", "history"]
    second = drawings["map-class2"]
    assert second.labels[0] == "3D class 2 · iteration 2"
    assert second.labels[1] == "55.0% of particles · 25.6 Å · box 32 · 4.00 Å/px"
    assert {"central slices", "projections", "along z", "along y", "along x"} <= set(second.labels)
    assert "50 Å" in second.labels
    assert second.details["box"] == BOX and second.image.mode == "L"


def test_volume_views_are_central_slices_and_sums_along_each_axis(tmp_path: Path) -> None:
    volume = np.zeros((BOX, BOX, BOX), dtype=np.float32)
    volume[BOX // 2, 3, 5] = 7.0  # z = centre, y = 3, x = 5
    views = read_volume_views(write_mrc(tmp_path / "v.mrc", volume))
    assert views.slices[0][3, 5] == 7.0  # along z: the xy plane at the central z
    assert views.slices[1].max() == 0.0 and views.slices[2].max() == 0.0  # y = 3 and x = 5 are off-centre
    assert views.projections[0][3, 5] == 7.0 and views.projections[1][BOX // 2, 5] == 7.0 and views.projections[2][BOX // 2, 3] == 7.0
    assert views.pixel_size == PIXEL and views.box == BOX


def test_autorefine_renders_map_fsc_and_history_per_iteration_and_for_the_final_one(tmp_path: Path) -> None:
    run = RunOutput(make_autorefine(tmp_path), "Refine3D/run", "autorefine")
    assert run.is_final(4) and not run.is_final(3) and run.model_path(5) is None
    middle = dict(render_iteration(run, 2))
    assert list(middle) == ["map", "fsc", "history"]
    assert middle["map"].labels[:2] == ["Auto-refine map · iteration 2", "28.0 Å · half-maps averaged · box 32 · 4.00 Å/px"]
    final = dict(render_iteration(run, 4))
    assert final["map"].labels[0] == "Auto-refine final map · iteration 4"
    fsc = final["fsc"]
    assert fsc.details["points"] == BOX // 2  # the DC term is left out
    assert fsc.details["nyquist_per_angstrom"] == pytest.approx(1 / (2 * PIXEL))
    assert {"Gold-standard FSC · iteration 4", "0.143", "21.3 Å", "FSC", "resolution (Å)"} <= set(fsc.labels)
    history = final["history"]
    assert history.details["iterations"] == [1, 2, 3, 4]
    assert history.details["resolutions"] == [30.0, 28.0, 26.0, pytest.approx(21.333333)]
    assert "shares" not in history.details  # one class: no shares panel
    assert fsc.image.size == (760, 470) and history.image.size == (760, 440)


def test_history_stacks_class_shares_and_groups_many_classes(tmp_path: Path) -> None:
    run = RunOutput(make_2d(tmp_path, iterations=3), "Class2D/run", "2d")
    history = dict(render_iteration(run, 3))["history"]
    assert history.details["iterations"] == [1, 2, 3]  # it000 (the initial references) is left out
    assert history.details["resolutions"] == [29.0, 28.0, 27.0]
    assert history.details["shares"] == [[0.2, 0.5, 0.3]] * 3
    assert history.details["legend"] == ["class 1", "class 2", "class 3"]
    assert history.image.size == (760, 700)
    shares = tuple([0.01] * 20 + [0.8])
    groups = share_groups([IterationPoint(1, 10.0, shares)])
    assert [g[0] for g in groups] == [*(f"class {k}" for k in (1, 2, 3, 4, 5, 6, 21)), "14 others"]
    assert sorted(k for g in groups for k in g[1]) == list(range(1, 22))


# -- files and index.json ------------------------------------------------------------------------


def test_render_writes_pngs_and_the_index_atomically_newest_last(tmp_path: Path) -> None:
    dataset = make_3d(tmp_path / "d")
    out = tmp_path / "logs" / "previews"
    written, failures = render_previews(dataset, "Class3D/run", "3d", [2], out)
    assert failures == []
    written2, _ = render_previews(dataset, "Class3D/run", "3d", [1], out)  # an older iteration, later
    index = json.loads((out / "index.json").read_text())
    assert index["schema_version"] == 1 and index["updated_at"].endswith("+00:00")
    names = [e["name"] for e in index["previews"]]
    assert names == [
        "it001-map-class1.png", "it001-map-class2.png", "it001-history.png",
        "it002-map-class1.png", "it002-map-class2.png", "it002-history.png",
    ]
    for entry in index["previews"]:
        assert set(entry) == {"name", "iteration", "kind", "width", "height", "bytes", "sha256"}
        data = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        image = png(out / entry["name"])
        assert (entry["width"], entry["height"]) == image.size and min(image.size) >= 400
        assert NAME_PATTERN.match(entry["name"]) and entry["name"] == f"it{entry['iteration']:03d}-{entry['kind']}.png"
    by_name = {w.name: w for w in written + written2}
    assert {(e["width"], e["height"], e["sha256"]) for e in index["previews"]} == {(w.width, w.height, w.sha256) for w in by_name.values()}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_index_lists_only_preview_pngs(tmp_path: Path) -> None:
    out = tmp_path / "previews"
    out.mkdir()
    Image.new("L", (10, 20)).save(out / "it007-map-class12.png")
    Image.new("L", (10, 20)).save(out / "it007-classes.png")
    for stray in (".it008-map.png.123.tmp", "render.log", "notes.png", "it7-map.png", "it008-map-class0.png"):
        (out / stray).write_bytes(b"x")
    index = write_index(out)
    assert [(e["name"], e["kind"], e["iteration"], e["width"], e["height"]) for e in index["previews"]] == [
        ("it007-classes.png", "classes", 7, 10, 20), ("it007-map-class12.png", "map-class12", 7, 10, 20),
    ]


def test_an_unfinished_or_unreadable_iteration_fails_alone(tmp_path: Path) -> None:
    dataset = make_2d(tmp_path / "d")
    (dataset / "Class2D" / "run_it001_classes.mrcs").write_bytes(b"\0" * 100)  # torn: shorter than a header
    out = tmp_path / "previews"
    slept: list[float] = []
    written, failures = render_previews(dataset, "Class2D/run", "2d", [1, 2, 5], out, sleep=slept.append)
    assert [w.name for w in written] == ["it002-classes.png", "it002-history.png"]
    assert len(failures) == 2 and failures[0].startswith("iteration 1:") and "has not finished" in failures[1]
    assert slept == [0.5, 0.5, 0.5, 0.5]  # each failing iteration was retried twice
    assert [e["name"] for e in json.loads((out / "index.json").read_text())["previews"]] == ["it002-classes.png", "it002-history.png"]


def test_model_star_reading_takes_the_pixel_size_shares_and_fsc(tmp_path: Path) -> None:
    path = model_star(tmp_path / "m.star", resolution="inf", classes=[(0.25, 12.0), (0.75, 10.0)], reference="x", fsc=[1.0, 0.5, 0.0])
    model = Model.read(path, fsc=True)
    assert model.resolution is None and model.pixel_size == PIXEL
    assert model.shares == (0.25, 0.75) and model.class_resolutions == (12.0, 10.0)
    assert [round(f, 6) for f, _ in model.fsc] == [0.007812, 0.015625, 0.023438] and [v for _, v in model.fsc] == [1.0, 0.5, 0.0]


def test_recorded_relion_model_stars_are_read(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "relion"
    final = Model.read(fixtures / "autorefine" / "Refine3D" / "run_model.star", fsc=True)
    assert final.resolution == 25.6 and final.pixel_size == 4.0 and len(final.fsc) == 16
    assert final.fsc[4] == (pytest.approx(0.039062), pytest.approx(0.265696))
    classes = Model.read(fixtures / "2d" / "Class2D" / "run_it002_model.star")
    assert classes.shares == (0.289037, 0.307839, 0.403123)


def test_the_previews_command_renders_and_reports_failure_by_exit_code(tmp_path: Path) -> None:
    dataset = make_autorefine(tmp_path / "d")
    out = tmp_path / "previews"
    command = [sys.executable, "-I", "-m", "gateway.jobside", "previews", "--dir", str(dataset), "--prefix", "Refine3D/run",
               "--mode", "autorefine", "--iteration", "3", "--iteration", "4", "--out", str(out), "--nice", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    assert "iteration 4: it004-map.png" in done.stderr
    kinds = [(e["iteration"], e["kind"]) for e in json.loads((out / "index.json").read_text())["previews"]]
    assert kinds == [(3, "map"), (3, "fsc"), (3, "history"), (4, "map"), (4, "fsc"), (4, "history")]
    missing = subprocess.run([*command[:-2], "--iteration", "9"], capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert missing.returncode == 1 and "iteration 9: no previews" in missing.stderr


def test_a_model_star_cut_while_relion_writes_it_is_never_drawn_from(tmp_path: Path) -> None:
    dataset = make_2d(tmp_path / "d", iterations=1)
    model = dataset / "Class2D" / "run_it001_model.star"
    text = model.read_text()
    model.write_text(text[: text.index("000002@")])  # cut after the first class's row: RELION mid-write
    written, failures = render_previews(dataset, "Class2D/run", "2d", [1], tmp_path / "previews", sleep=lambda s: None)
    assert written == [] and len(failures) == 1 and "data_model_classes" in failures[0]
