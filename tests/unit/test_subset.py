"""Chaining jobs: a parent's outputs (job_outputs), the child's particle subset (write_subset), the submit check."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.relion.inputs import image_file, image_stacks
from gateway.relion.star import (
    StarBlock,
    format_star,
    loop_block,
    read_star,
    write_star,
)
from gateway.relion.subset import (
    JobOutputs,
    Subset,
    SubsetError,
    check_selection,
    job_outputs,
    write_subset,
)

# Real RELION outputs beside the checkout on a development machine (../shared/realstar; never in the
# repository): the tests that read them are skipped elsewhere.
REALSTAR = Path(__file__).resolve().parents[3] / "shared" / "realstar"
needs_realstar = pytest.mark.skipif(not REALSTAR.is_dir(), reason=f"{REALSTAR} is not on this machine")

OPTICS = loop_block(
    "optics",
    [
        {"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, "rlnImagePixelSize": "4.000000",
         "rlnImageSize": 32, "rlnImageDimensionality": 2, "rlnVoltage": "300.000000"},
        {"rlnOpticsGroupName": "opticsGroup2", "rlnOpticsGroup": 2, "rlnImagePixelSize": "4.000000",
         "rlnImageSize": 32, "rlnImageDimensionality": 2, "rlnVoltage": "200.000000"},
    ],
)
# Class of each particle in the final iteration: 1 x4, 2 x3, 3 x3 (3 particles a stack, so 4 stacks).
FINAL = [1, 2, 1, 3, 2, 1, 3, 3, 2, 1]


def rows(classes: list[int] | None, count: int = len(FINAL)) -> list[dict[str, Any]]:
    """Particle rows; the micrograph names hold a space, so the writer has to quote them."""
    table = []
    for i in range(1, count + 1):
        row: dict[str, Any] = {
            "rlnImageName": f"{i:06d}@Particles/stack_{(i - 1) // 3 + 1:03d}.mrcs",
            "rlnMicrographName": f"Micrographs/mic {i % 2}.mrc",
            "rlnOpticsGroup": 1 + i % 2,
            "rlnAngleRot": f"{i * 7.5:.6f}",
        }
        if classes is not None:
            row["rlnClassNumber"] = classes[i - 1]
        table.append(row)
    return table


def data_star(path: Path, classes: list[int] | None, *, version: str = "30001", general: bool = False) -> None:
    """A RELION 3.1+ data.star (with RELION 5's data_general block when asked)."""
    blocks = [OPTICS, loop_block("particles", rows(classes, len(classes) if classes else len(FINAL)))]
    if general:
        blocks.insert(0, StarBlock(name="general", values={"rlnTomoSubTomosAre2DStacks": "1"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_star(blocks).replace("# version 30001", f"# version {version}"))


def model_star(path: Path, classes: int, reference: str) -> None:
    general = StarBlock(name="model_general", values={"rlnCurrentResolution": "20.000000", "rlnNrClasses": str(classes)})
    table = [{"rlnReferenceImage": reference.format(n), "rlnClassDistribution": f"{1 / classes:.6f}"}
             for n in range(1, classes + 1)]
    write_star(path, [general, loop_block("model_classes", table)])


def stacks(root: Path, count: int = 4) -> None:
    (root / "Particles").mkdir(exist_ok=True)
    for n in range(1, count + 1):
        (root / "Particles" / f"stack_{n:03d}.mrcs").write_bytes(b"stack")


def classification(root: Path, mode: str) -> Path:
    """it000..it002 of a 2D ("Class2D/run") or 3D ("Class3D/run") classification, K=3; it003 cut short."""
    prefix = "Class2D/run" if mode == "2d" else "Class3D/run"
    for n in range(3):
        classes = FINAL if n == 2 else [1] * len(FINAL)
        data_star(root / f"{prefix}_it{n:03d}_data.star", classes)
        if mode == "2d":
            model_star(root / f"{prefix}_it{n:03d}_model.star", 3, "{:06d}@" + f"{prefix}_it{n:03d}_classes.mrcs")
            (root / f"{prefix}_it{n:03d}_classes.mrcs").write_bytes(b"classes")
        else:
            model_star(root / f"{prefix}_it{n:03d}_model.star", 4, f"{prefix}_it{n:03d}_class" + "{:03d}.mrc")
            for k in range(1, 5):  # class 4 is left empty
                (root / f"{prefix}_it{n:03d}_class{k:03d}.mrc").write_bytes(b"map")
    data_star(root / f"{prefix}_it003_data.star", [3] * len(FINAL))  # killed before it003's model.star
    stacks(root)
    return root


def autorefine(root: Path, *, converged: bool = True) -> Path:
    for n in range(3):
        data_star(root / f"Refine3D/run_it{n:03d}_data.star", [1] * len(FINAL))
        for half in (1, 2):
            model_star(root / f"Refine3D/run_it{n:03d}_half{half}_model.star", 1, "Refine3D/run_half1_class001.mrc")
            (root / f"Refine3D/run_it{n:03d}_half{half}_class001.mrc").write_bytes(b"half map")
    if converged:
        data_star(root / "Refine3D/run_data.star", None)  # no _rlnClassNumber: all class 1
        model_star(root / "Refine3D/run_model.star", 1, "Refine3D/run_class{:03d}.mrc")
        for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"):
            (root / "Refine3D" / name).write_bytes(b"map")
    stacks(root)
    return root


def kept(path: Path, classes: set[int]) -> list[dict[str, str]]:
    return [row for row in read_star(path)["particles"].loop if int(row["rlnClassNumber"]) in classes]


# --- job_outputs ---------------------------------------------------------------------------------------------


def test_2d_outputs_are_the_highest_finished_iteration_without_maps(tmp_path: Path) -> None:
    outputs = job_outputs(classification(tmp_path, "2d"), "Class2D/run", "2d")
    assert outputs == JobOutputs(
        mode="2d",
        iteration=2,  # it003 has a data.star but no model.star: not finished
        data_star="Class2D/run_it002_data.star",
        model_star="Class2D/run_it002_model.star",
        class_maps={},  # classes.mrcs is a stack of 2D averages, no --ref
        class_particles={1: 4, 2: 3, 3: 3},
    )


def test_3d_outputs_name_each_class_map_and_count_only_classes_with_particles(tmp_path: Path) -> None:
    outputs = job_outputs(classification(tmp_path, "3d"), "Class3D/run", "3d")
    assert outputs.iteration == 2 and outputs.data_star == "Class3D/run_it002_data.star"
    assert outputs.class_maps == {k: f"Class3D/run_it002_class{k:03d}.mrc" for k in range(1, 5)}
    assert outputs.class_particles == {1: 4, 2: 3, 3: 3}


def test_autorefine_outputs_are_the_final_files_and_all_particles_are_class_1(tmp_path: Path) -> None:
    outputs = job_outputs(autorefine(tmp_path), "Refine3D/run", "autorefine")
    assert outputs == JobOutputs(
        mode="autorefine",
        iteration=None,
        data_star="Refine3D/run_data.star",
        model_star="Refine3D/run_model.star",
        class_maps={1: "Refine3D/run_class001.mrc"},  # not the half maps
        class_particles={1: len(FINAL)},  # the final data.star has no _rlnClassNumber
    )


def test_an_autorefine_that_did_not_converge_leaves_nothing_for_a_child(tmp_path: Path) -> None:
    with pytest.raises(SubsetError, match=r"did not converge \(no Refine3D/run_model.star\)"):
        job_outputs(autorefine(tmp_path, converged=False), "Refine3D/run", "autorefine")


def test_no_output_or_no_data_star_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SubsetError, match="no finished iteration"):
        job_outputs(tmp_path, "Class2D/run", "2d")
    classification(tmp_path, "3d")
    (tmp_path / "Class3D/run_it002_data.star").unlink()
    with pytest.raises(SubsetError, match="Class3D/run_it002_data.star is missing"):
        job_outputs(tmp_path, "Class3D/run", "3d")  # not it001's: that is not the result
    with pytest.raises(SubsetError, match="mode must be one of"):
        job_outputs(tmp_path, "Class3D/run", "3D")


def test_a_classification_data_star_without_class_numbers_is_refused(tmp_path: Path) -> None:
    classification(tmp_path, "2d")
    data_star(tmp_path / "Class2D/run_it002_data.star", None)
    with pytest.raises(SubsetError, match="has no _rlnClassNumber column"):
        job_outputs(tmp_path, "Class2D/run", "2d")


# --- write_subset --------------------------------------------------------------------------------------------


def test_a_selection_keeps_exactly_the_rows_of_those_classes_and_the_optics_unchanged(tmp_path: Path) -> None:
    root = classification(tmp_path, "3d")
    outputs = job_outputs(root, "Class3D/run", "3d")
    subset = write_subset(root, outputs, [3, 1], "Select/job001/particles.star")
    source = root / "Class3D/run_it002_data.star"
    expected = kept(source, {1, 3})
    assert subset == Subset(
        star="Select/job001/particles.star",
        particles=7,
        classes=(1, 3),
        image_stacks=tuple(sorted({image_file(row["rlnImageName"]) for row in expected})),
    )
    written = read_star(root / subset.star)
    assert list(written) == ["optics", "particles"]
    assert written["optics"] == read_star(source)["optics"] == OPTICS  # both optics groups, as they were
    assert written["particles"].labels == read_star(source)["particles"].labels
    assert written["particles"].loop == expected  # in the source's order
    assert {row["rlnMicrographName"] for row in expected} == {"Micrographs/mic 0.mrc", "Micrographs/mic 1.mrc"}
    text = (root / subset.star).read_text()
    assert text.count("# version 30001") == 2  # before each block, as RELION 3.1/4.0 writes


def test_no_selection_keeps_every_class(tmp_path: Path) -> None:
    root = classification(tmp_path, "2d")
    subset = write_subset(root, job_outputs(root, "Class2D/run", "2d"), None, "all.star")
    assert (subset.particles, subset.classes) == (len(FINAL), (1, 2, 3))
    assert subset.image_stacks == tuple(f"Particles/stack_{n:03d}.mrcs" for n in range(1, 5))
    assert read_star(root / "all.star")["particles"] == read_star(root / "Class2D/run_it002_data.star")["particles"]


def test_autorefine_particles_without_class_numbers_are_class_1(tmp_path: Path) -> None:
    root = autorefine(tmp_path)
    outputs = job_outputs(root, "Refine3D/run", "autorefine")
    subset = write_subset(root, outputs, [1], "Class3D/input.star")
    assert (subset.particles, subset.classes) == (len(FINAL), (1,))
    assert "rlnClassNumber" not in read_star(root / "Class3D/input.star")["particles"].labels
    with pytest.raises(SubsetError, match=r"class 2 is not in Refine3D/run_data.star \(classes 1\)"):
        write_subset(root, outputs, [2], "Class3D/input2.star")


def test_a_relion_5_file_keeps_its_general_block_and_version_line(tmp_path: Path) -> None:
    data_star(tmp_path / "Class3D/run_it002_data.star", FINAL, version="50001", general=True)
    stacks(tmp_path)
    outputs = JobOutputs("3d", 2, "Class3D/run_it002_data.star", None, {}, {1: 4, 2: 3, 3: 3})
    write_subset(tmp_path, outputs, [2], "sub.star")
    written = read_star(tmp_path / "sub.star")
    assert list(written) == ["general", "optics", "particles"]
    assert written["general"].values == {"rlnTomoSubTomosAre2DStacks": "1"}
    text = (tmp_path / "sub.star").read_text()
    assert text.count("# version 50001") == 3 and "# version 30001" not in text


def pre31(path: Path, name: str, classes: list[int]) -> None:
    """A one-block particles file as RELION 1.3 (data_images) or 3.0 (data_) wrote it: no optics, no version line."""
    lines = ["", f"data_{name}", "", "loop_ ", "_rlnImageName #1", "_rlnMicrographName #2", "_rlnVoltage #3",
             "_rlnClassNumber #4"]
    for i, number in enumerate(classes, start=1):
        lines.append(f"{i:06d}@Particles/stack_{(i - 1) // 3 + 1:03d}.mrcs Micrographs/m{i % 2}.mrc 300.000000 {number}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, " ", ""]))


@pytest.mark.parametrize("name", ["images", ""])
def test_a_pre_3_1_file_stays_one_block_without_a_version_line(tmp_path: Path, name: str) -> None:
    pre31(tmp_path / "Class2D/run_it002_data.star", name, FINAL)
    stacks(tmp_path)
    outputs = JobOutputs("2d", 2, "Class2D/run_it002_data.star", None, {}, {1: 4, 2: 3, 3: 3})
    subset = write_subset(tmp_path, outputs, [2, 3], "sub.star")
    written = read_star(tmp_path / "sub.star")
    source = read_star(tmp_path / "Class2D/run_it002_data.star")[name]
    assert list(written) == [name]
    assert written[name].loop == [row for row in source.loop if row["rlnClassNumber"] in {"2", "3"}]
    assert subset.particles == 6
    # RELION 3.1 converts an untagged file, but refuses to convert one already tagged 30001.
    assert "version" not in (tmp_path / "sub.star").read_text()


def test_an_unknown_class_is_refused_naming_it_and_the_classes_there(tmp_path: Path) -> None:
    root = classification(tmp_path, "2d")
    outputs = job_outputs(root, "Class2D/run", "2d")
    with pytest.raises(SubsetError, match=r"^select_classes: class 7 is not in Class2D/run_it002_data.star \(classes 1-3\)$"):
        write_subset(root, outputs, [1, 7], "sub.star")
    with pytest.raises(SubsetError, match=r"classes 5, 7 are not in"):
        write_subset(root, outputs, [7, 5], "sub.star")
    assert not (root / "sub.star").exists()


def test_a_3d_class_without_particles_is_refused_as_empty(tmp_path: Path) -> None:
    root = classification(tmp_path, "3d")
    outputs = job_outputs(root, "Class3D/run", "3d")
    with pytest.raises(SubsetError, match=r"class 4 is empty in .*\(classes with particles: 1-3\)"):
        write_subset(root, outputs, [4], "sub.star")


@pytest.mark.parametrize(
    "selection, message",
    [
        ([], "empty; leave it out"),
        ([0], "0 is not a class number"),
        ([-2], "-2 is not a class number"),
        ([2, 1, 2], "class 2 is given twice"),
        ([True], "True is not a class number"),
        ([1.0], "1.0 is not a class number"),
        ("1", "expected a list"),
    ],
)
def test_malformed_selections_are_refused(tmp_path: Path, selection: Any, message: str) -> None:
    root = classification(tmp_path, "2d")
    with pytest.raises(SubsetError, match=f"^select_classes: .*{message}"):
        write_subset(root, job_outputs(root, "Class2D/run", "2d"), selection, "sub.star")


def test_a_missing_image_stack_of_a_kept_particle_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    root = classification(tmp_path, "2d")
    outputs = job_outputs(root, "Class2D/run", "2d")
    (root / "Particles/stack_003.mrcs").unlink()  # particles 7-9: classes 3, 3, 2
    assert write_subset(root, outputs, [1], "only1.star").image_stacks == (
        "Particles/stack_001.mrcs", "Particles/stack_002.mrcs", "Particles/stack_004.mrcs",
    )
    with pytest.raises(SubsetError, match=r"missing from the dataset: Particles/stack_003.mrcs \(named in sub.star\)"):
        write_subset(root, outputs, [3], "sub.star")
    assert not (root / "sub.star").exists()


def test_an_image_outside_the_dataset_is_refused(tmp_path: Path) -> None:
    text = format_star([OPTICS, loop_block("particles", rows(FINAL))]).replace("@Particles/stack_001", "@/tmp/stack_001")
    (tmp_path / "data.star").write_text(text)
    stacks(tmp_path)
    outputs = JobOutputs("2d", 5, "data.star", None, {}, {1: 4, 2: 3, 3: 3})
    with pytest.raises(SubsetError, match="input outside the dataset"):
        write_subset(tmp_path, outputs, [1], "sub.star")
    assert write_subset(tmp_path, outputs, [3], "sub.star").particles == 3  # particles 4, 7, 8: stacks 2 and 3


def test_the_written_file_must_read_back_as_the_kept_rows(tmp_path: Path) -> None:
    # Read from quotes, this name holds '" ' : the writer's double quotes cannot hold it, so it reads back wrong.
    text = format_star([OPTICS, loop_block("particles", rows(FINAL))]).replace(
        '"Micrographs/mic 1.mrc"', "'Micrographs/mic\" 1.mrc'"
    )
    (tmp_path / "data.star").write_text(text)
    stacks(tmp_path)
    assert read_star(tmp_path / "data.star")["particles"].loop[0]["rlnMicrographName"] == 'Micrographs/mic" 1.mrc'
    outputs = JobOutputs("2d", 5, "data.star", None, {}, {1: 4, 2: 3, 3: 3})
    with pytest.raises(SubsetError, match="as written"):
        write_subset(tmp_path, outputs, [1], "sub.star")
    assert not (tmp_path / "sub.star").exists()


def test_a_data_star_that_differs_from_the_recorded_outputs_is_refused(tmp_path: Path) -> None:
    root = classification(tmp_path, "2d")
    outputs = job_outputs(root, "Class2D/run", "2d")
    data_star(root / "Class2D/run_it002_data.star", [1] * len(FINAL))
    with pytest.raises(SubsetError, match="does not match the parent's recorded outputs"):
        write_subset(root, outputs, None, "sub.star")


@pytest.mark.parametrize(
    "out_star, message",
    [
        ("/tmp/sub.star", "relative to the dataset"),
        ("../sub.star", "without '..'"),
        ("sub.txt", "a .star file"),
        ("Class2D/run_it002_data.star", "is the parent's own data.star"),
        ("link/sub.star", "leaves the dataset"),
        ("link/new/sub.star", "leaves the dataset"),
        ("Particles", "a .star file"),
        ("Particles.star", "cannot be written"),
    ],
)
def test_out_star_must_be_a_new_star_file_inside_the_dataset(tmp_path: Path, out_star: str, message: str) -> None:
    root = classification(tmp_path / "dataset", "2d")
    (root / "link").symlink_to(tmp_path)
    (root / "Particles.star").mkdir()
    with pytest.raises(SubsetError, match=message):
        write_subset(root, job_outputs(root, "Class2D/run", "2d"), None, out_star)
    assert not (tmp_path / "sub.star").exists() and not (tmp_path / "new").exists()


# --- check_selection, to_dict / from_dict ---------------------------------------------------------------------

PARENT_2D = {"mode": "2d", "iteration": 25, "data_star": "Class2D/run_it025_data.star",
             "model_star": "Class2D/run_it025_model.star", "class_maps": {}, "class_particles": {"1": 10, "2": 5}}
PARENT_3D = {"mode": "3d", "iteration": 25, "data_star": "Class3D/run_it025_data.star",
             "model_star": "Class3D/run_it025_model.star",
             "class_maps": {str(k): f"Class3D/run_it025_class{k:03d}.mrc" for k in (1, 2, 3)},
             "class_particles": {"1": 10, "2": 5}}


def test_check_selection_accepts_a_good_choice() -> None:
    assert check_selection(PARENT_3D, [2, 1], 3) is None  # a map of an empty class still is a map
    assert check_selection(JobOutputs.from_dict(PARENT_2D), [2], None) is None


@pytest.mark.parametrize(
    "parent, select, ref, message",
    [
        (PARENT_2D, None, 1, r"^ref_class: the parent is a 2D classification, which leaves no class maps$"),
        (PARENT_3D, None, 4, r"^ref_class: class 4 has no map among the parent's outputs \(maps for classes 1-3\)$"),
        (PARENT_3D, None, 0, r"^ref_class: expected a class number"),
        (PARENT_3D, None, True, r"^ref_class: expected a class number"),
        (PARENT_3D, [3], None, r"^select_classes: class 3 is empty in Class3D/run_it025_data.star"),
        (PARENT_2D, [1, 3], None, r"^select_classes: class 3 is not in Class2D/run_it025_data.star \(classes 1-2\)$"),
    ],
)
def test_check_selection_names_the_field(parent: dict[str, Any], select: Any, ref: Any, message: str) -> None:
    with pytest.raises(SubsetError, match=message):
        check_selection(parent, select, ref)


def test_to_dict_and_from_dict_round_trip_through_json(tmp_path: Path) -> None:
    outputs = job_outputs(classification(tmp_path, "3d"), "Class3D/run", "3d")
    stored = json.loads(json.dumps(outputs.to_dict(), allow_nan=False))
    assert stored["class_maps"]["1"] == "Class3D/run_it002_class001.mrc" and stored["class_particles"] == {
        "1": 4, "2": 3, "3": 3}
    assert JobOutputs.from_dict(stored) == outputs
    assert JobOutputs.from_dict(PARENT_3D).to_dict() == PARENT_3D


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mode": "Class2D"}, "outputs.mode"),
        ({"iteration": "25"}, "outputs.iteration"),
        ({"data_star": "/data/run_it025_data.star"}, "outputs.data_star"),
        ({"model_star": "../run_it025_model.star"}, "outputs.model_star"),
        ({"class_maps": {"01": "Class3D/a.mrc"}}, "outputs.class_maps: key '01'"),
        ({"class_maps": {"1": "Class3D/a.mrcs"}}, r"outputs.class_maps\[1\]"),
        ({"class_maps": []}, "outputs.class_maps: expected an object"),
        ({"class_particles": {"1": -1}}, "outputs.class_particles"),
        ({"mode": "2d"}, "a 2D classification has no class maps"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_from_dict_refuses_malformed_outputs(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SubsetError, match=message):
        JobOutputs.from_dict({**PARENT_3D, **change})
    with pytest.raises(SubsetError, match=r"missing \['class_maps'\]"):
        JobOutputs.from_dict({k: v for k, v in PARENT_3D.items() if k != "class_maps"})


# --- real RELION outputs --------------------------------------------------------------------------------------


def real_dataset(tmp_path: Path, links: dict[str, str]) -> Path:
    """A dataset dir whose job folders link to the real files (read only), with a dummy file per image stack."""
    for name, target in links.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(REALSTAR / target)
    return tmp_path


def touch_stacks(root: Path, star: str) -> None:
    for stack in image_stacks(root / star):
        (root / stack).parent.mkdir(parents=True, exist_ok=True)
        (root / stack).write_bytes(b"")


@needs_realstar
def test_real_relion_1_3_class2d(tmp_path: Path) -> None:
    root = real_dataset(tmp_path, {"Class2D": "relion-on-spark/Class2D"})
    outputs = job_outputs(root, "Class2D/manual", "2d")
    assert (outputs.iteration, outputs.data_star) == (25, "Class2D/manual_it025_data.star")
    assert outputs.class_particles == {1: 36, 2: 264, 3: 107, 4: 291, 5: 143, 6: 167, 7: 33, 8: 6, 9: 4, 10: 48}
    assert outputs.class_maps == {}
    touch_stacks(root, outputs.data_star)
    subset = write_subset(root, outputs, [2, 4], "Select/job001/particles.star")
    assert (subset.particles, subset.classes) == (555, (2, 4))
    written = read_star(root / subset.star)
    source = read_star(root / outputs.data_star)
    assert list(written) == list(source) == ["images"]  # RELION 1.3's one block, no optics
    assert written["images"].loop == [row for row in source["images"].loop if row["rlnClassNumber"] in {"2", "4"}]
    assert "version" not in (root / subset.star).read_text()


@needs_realstar
def test_real_relion_5_autorefine(tmp_path: Path) -> None:
    root = real_dataset(tmp_path, {"Refine3D/job023": "cets-relion/Refine3D/job023"})
    outputs = job_outputs(root, "Refine3D/job023/run", "autorefine")
    assert outputs == JobOutputs(
        mode="autorefine", iteration=None, data_star="Refine3D/job023/run_data.star",
        model_star="Refine3D/job023/run_model.star",
        class_maps={},  # its authors left run_class001.mrc out of the repository
        class_particles={1: 3000},
    )
    with pytest.raises(SubsetError, match="ref_class: class 1 has no map"):
        check_selection(outputs.to_dict(), None, 1)
    touch_stacks(root, outputs.data_star)  # one 2D stack per subtomogram
    subset = write_subset(root, outputs, None, "Class3D/job030/particles.star")
    assert (subset.particles, len(subset.image_stacks)) == (3000, 3000)
    written, source = read_star(root / subset.star), read_star(root / outputs.data_star)
    assert list(written) == ["general", "optics", "particles"] and written == source
    assert (root / subset.star).read_text().count("# version 50001") == 3


@needs_realstar
def test_real_relion_5_class3d_without_its_data_star_is_refused(tmp_path: Path) -> None:
    root = real_dataset(tmp_path, {"Class3D/job017": "cets-relion/Class3D/job017"})
    with pytest.raises(SubsetError, match="Class3D/job017/run_it025_data.star is missing"):
        job_outputs(root, "Class3D/job017/run", "3d")
