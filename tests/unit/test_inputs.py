"""The pre-flight input check: the STAR file, every stack it names, and the other path options."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.relion.inputs import MissingInputError, check_inputs, image_file, image_stacks

STAR = """
data_optics
loop_
_rlnOpticsGroup #1
_rlnImageSize #2
1 32

data_particles
loop_
_rlnImageName #1
_rlnOpticsGroup #2
000001@Extract/job001/a.mrcs 1
000002@Extract/job001/a.mrcs 1
000001@Extract/job002/b.mrcs 1
"""


def dataset(tmp_path: Path, *files: str) -> Path:
    (tmp_path / "particles.star").write_text(STAR)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0")
    return tmp_path


def test_stacks_in_nested_folders_are_found(tmp_path: Path) -> None:
    root = dataset(tmp_path, "Extract/job001/a.mrcs", "Extract/job002/b.mrcs", "ref.mrc")
    assert image_stacks(root / "particles.star") == ["Extract/job001/a.mrcs", "Extract/job002/b.mrcs"]
    assert check_inputs(root, "particles.star", ["ref.mrc"]) == {"stacks": 2, "files": 4, "star_files": 1}


def test_every_missing_input_is_named(tmp_path: Path) -> None:
    root = dataset(tmp_path, "Extract/job001/a.mrcs")
    with pytest.raises(MissingInputError) as excinfo:
        check_inputs(root, "particles.star", ["ref.mrc", "mask.mrc"])
    assert str(excinfo.value) == "missing from the dataset: ref.mrc, mask.mrc, Extract/job002/b.mrcs (named in particles.star)"


def test_missing_star_file(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="missing from the dataset: nope.star"):
        check_inputs(tmp_path, "nope.star")


def test_a_stack_path_that_leaves_the_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "particles.star").write_text(STAR.replace("Extract/job002/b.mrcs", "../../etc/passwd"))
    (tmp_path / "Extract/job001").mkdir(parents=True)
    (tmp_path / "Extract/job001/a.mrcs").write_bytes(b"\0")
    with pytest.raises(MissingInputError) as excinfo:
        check_inputs(tmp_path, "particles.star")
    assert str(excinfo.value) == (
        "input outside the dataset: particles.star data_particles row 3, column _rlnImageName: "
        "'../../etc/passwd' (must be a relative path inside the dataset, without '..')"
    )


def test_star_without_image_names(tmp_path: Path) -> None:
    (tmp_path / "particles.star").write_text("data_particles\nloop_\n_rlnOpticsGroup #1\n1\n")
    with pytest.raises(MissingInputError, match="no particle table with _rlnImageName"):
        check_inputs(tmp_path, "particles.star")


# --- Every file RELION opens from a STAR file must be inside the dataset. ------------------------


def write(root: Path, name: str, text: str = "") -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if text:
        path.write_text(text)
    else:
        path.write_bytes(b"\0")
    return path


def particles(*images: str, micrographs: tuple[str, ...] = ()) -> str:
    """A RELION 3.1 particles STAR (data_optics + data_particles) naming ``images``."""
    mics = micrographs or tuple(f"MotionCorr/job002/mic{n}.mrc" for n in range(len(images)))
    rows = "\n".join(f"{image} {mic} 1" for image, mic in zip(images, mics))
    return (
        "# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnImageSize #3\n"
        "1 opticsGroup1 64\n\n# version 30001\n\ndata_particles\n\nloop_\n"
        f"_rlnImageName #1\n_rlnMicrographName #2\n_rlnOpticsGroup #3\n{rows}\n"
    )


def references(*images: str) -> str:
    """A --ref STAR: RELION reads _rlnReferenceImage from data_model_classes (or the first block)."""
    rows = "\n".join(f"{image} 0.5" for image in images)
    return f"data_model_classes\n\nloop_\n_rlnReferenceImage #1\n_rlnClassDistribution #2\n{rows}\n"


def refusal(root: Path, star: str, others: list[str] | None = None) -> str:
    with pytest.raises(MissingInputError) as excinfo:
        check_inputs(root, star, others or [])
    return str(excinfo.value)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("/data/tenant_b/Extract/b.mrcs", "must be a relative path inside the dataset, without '..'"),
        ("000002@/data/tenant_b/b.mrcs", "must be a relative path inside the dataset, without '..'"),
        ("1@Extract/../../tenant_b/b.mrcs", "must be a relative path inside the dataset, without '..'"),
    ],
)
def test_absolute_and_dotdot_image_names_are_refused(tmp_path: Path, value: str, rule: str) -> None:
    write(tmp_path, "particles.star", particles("1@Extract/a.mrcs", "2@Extract/a.mrcs", value))
    write(tmp_path, "Extract/a.mrcs")
    path = image_file(value)
    assert refusal(tmp_path, "particles.star") == (
        f"input outside the dataset: particles.star data_particles row 3, column _rlnImageName: {path!r} ({rule})"
    )


def test_a_symlink_out_of_the_dataset_is_refused(tmp_path: Path) -> None:
    outside = write(tmp_path, "tenant_b/b.mrcs")
    root = tmp_path / "dataset"
    write(root, "particles.star", particles("1@Extract/a.mrcs", "1@Linked/b.mrcs", "1@Stacks/b.mrcs"))
    write(root, "Extract/a.mrcs")
    (root / "Linked").mkdir()
    (root / "Linked" / "b.mrcs").symlink_to(outside)  # a file link
    (root / "Stacks").symlink_to(outside.parent, target_is_directory=True)  # a directory link
    message = refusal(root, "particles.star")
    assert message == (
        "input outside the dataset: "
        "particles.star data_particles row 2, column _rlnImageName: 'Linked/b.mrcs' (resolves outside the dataset, through a symlink); "
        "particles.star data_particles row 3, column _rlnImageName: 'Stacks/b.mrcs' (resolves outside the dataset, through a symlink)"
    )


def test_a_symlink_inside_the_dataset_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "particles.star", particles("1@Extract/a.mrcs", "1@Alias/a.mrcs"))
    write(tmp_path, "Extract/a.mrcs")
    (tmp_path / "Alias").symlink_to(tmp_path / "Extract", target_is_directory=True)
    assert check_inputs(tmp_path, "particles.star")["stacks"] == 2


def test_option_values_are_held_to_the_dataset_too(tmp_path: Path) -> None:
    write(tmp_path, "particles.star", particles("1@a.mrcs"))
    write(tmp_path, "a.mrcs")
    write(tmp_path / "elsewhere", "mask.mrc")
    (tmp_path / "ds").mkdir()
    for name in ("particles.star", "a.mrcs"):
        (tmp_path / name).rename(tmp_path / "ds" / name)
    (tmp_path / "ds" / "mask.mrc").symlink_to(tmp_path / "elsewhere" / "mask.mrc")
    assert refusal(tmp_path / "ds", "particles.star", ["mask.mrc", "/etc/passwd"]) == (
        "input outside the dataset: 'mask.mrc' (resolves outside the dataset, through a symlink); "
        "'/etc/passwd' (must be a relative path inside the dataset, without '..')"
    )
    assert refusal(tmp_path / "ds", "/ds/particles.star").startswith("input outside the dataset: '/ds/particles.star'")


def test_micrograph_names_need_not_exist(tmp_path: Path) -> None:
    # relion_refine carries rlnMicrographName along for grouping; it never opens the micrograph.
    write(tmp_path, "particles.star", particles("1@a.mrcs", micrographs=("/scratch/other/mic.mrc",)))
    write(tmp_path, "a.mrcs")
    assert check_inputs(tmp_path, "particles.star") == {"stacks": 1, "files": 2, "star_files": 1}


def test_a_reference_star_is_read_and_its_images_checked(tmp_path: Path) -> None:
    write(tmp_path, "particles.star", particles("1@a.mrcs"))
    write(tmp_path, "a.mrcs")
    write(tmp_path, "refs.star", references("000001@Class2D/classes.mrcs", "000002@Class2D/classes.mrcs", "Refs/ref3.mrc"))
    write(tmp_path, "Class2D/classes.mrcs")
    write(tmp_path, "Refs/ref3.mrc")
    assert check_inputs(tmp_path, "particles.star", ["refs.star"]) == {"stacks": 1, "files": 5, "star_files": 2}

    (tmp_path / "Refs/ref3.mrc").unlink()
    assert refusal(tmp_path, "particles.star", ["refs.star"]) == "missing from the dataset: Refs/ref3.mrc (named in refs.star)"

    write(tmp_path, "refs.star", references("000001@Class2D/classes.mrcs", "../tenant_b/ref.mrc"))
    assert refusal(tmp_path, "particles.star", ["refs.star"]) == (
        "input outside the dataset: refs.star data_model_classes row 2, column _rlnReferenceImage: "
        "'../tenant_b/ref.mrc' (must be a relative path inside the dataset, without '..')"
    )


def test_refusals_and_missing_files_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, "particles.star", particles("1@a.mrcs", "1@/abs/b.mrcs", "1@c.mrcs"))
    write(tmp_path, "a.mrcs")
    assert refusal(tmp_path, "particles.star", ["mask.mrc"]) == (
        "input outside the dataset: particles.star data_particles row 2, column _rlnImageName: '/abs/b.mrcs' "
        "(must be a relative path inside the dataset, without '..'); "
        "missing from the dataset: mask.mrc, c.mrcs (named in particles.star)"
    )


def test_an_optimisation_set_is_followed_into_the_star_files_it_names(tmp_path: Path) -> None:
    # RELION 4/5 --ios: key-values naming the particles and tomograms STAR files; "None" is no file.
    write(tmp_path, "particles.star", particles("1@a.mrcs"))
    write(tmp_path, "a.mrcs")
    write(
        tmp_path,
        "optimisation_set.star",
        "data_optimisation_set\n\n_rlnTomoParticlesFile Extract/job020/particles.star\n"
        "_rlnTomoTomogramsFile Tomograms/tomograms.star\n_rlnTomoTrajectoriesFile None\n"
        '_rlnTomoReferenceMap1File ""\n_rlnTomoReferenceMaskFile mask.mrc\n',
    )
    write(tmp_path, "mask.mrc")
    write(tmp_path, "Extract/job020/particles.star", particles("1@Extract/job020/TS_01/1_stack2d.mrcs", "1@/tomo/TS_02/2_stack2d.mrcs"))
    write(tmp_path, "Extract/job020/TS_01/1_stack2d.mrcs")
    write(
        tmp_path,
        "Tomograms/tomograms.star",
        "data_global\n\nloop_\n_rlnTomoName #1\n_rlnTomoTiltSeriesStarFile #2\n"
        "TS_01 Tomograms/tilt_series/TS_01.star\nTS_02 Tomograms/tilt_series/TS_02.star\n",
    )
    write(tmp_path, "Tomograms/tilt_series/TS_01.star", "data_TS_01\n\nloop_\n_rlnCtfImage #1\n/elsewhere/ps.ctf:mrc\n")
    assert refusal(tmp_path, "particles.star", ["optimisation_set.star"]) == (
        "input outside the dataset: Extract/job020/particles.star data_particles row 2, column _rlnImageName: "
        "'/tomo/TS_02/2_stack2d.mrcs' (must be a relative path inside the dataset, without '..'); "
        "missing from the dataset: Tomograms/tilt_series/TS_02.star (named in Tomograms/tomograms.star)"
    )


def test_star_files_naming_each_other_are_read_once(tmp_path: Path) -> None:
    write(tmp_path, "particles.star", particles("1@a.mrcs"))
    write(tmp_path, "a.mrcs")
    write(tmp_path, "a.star", "data_\n_rlnTomoParticlesFile b.star\n")
    write(tmp_path, "b.star", "data_\n_rlnTomoParticlesFile a.star\n")
    assert check_inputs(tmp_path, "particles.star", ["a.star", "b.star"])["star_files"] == 3


def test_image_file_strips_the_index_and_relions_type_suffix() -> None:
    assert image_file("000012@Extract/job001/a.mrcs") == "Extract/job001/a.mrcs"
    assert image_file("CtfFind/job003/a_PS.ctf:mrc") == "CtfFind/job003/a_PS.ctf"
    assert image_file("Refine3D/run_class001.mrc") == "Refine3D/run_class001.mrc"


def test_a_3d_ctf_image_column_is_checked(tmp_path: Path) -> None:
    star = particles("Subtomo/p1.mrc").replace("_rlnOpticsGroup #3\n", "_rlnOpticsGroup #3\n_rlnCtfImage #4\n")
    star = star.replace("Subtomo/p1.mrc MotionCorr/job002/mic0.mrc 1", "Subtomo/p1.mrc MotionCorr/job002/mic0.mrc 1 Subtomo/p1_ctf.mrc:mrc")
    write(tmp_path, "particles.star", star)
    write(tmp_path, "Subtomo/p1.mrc")
    assert refusal(tmp_path, "particles.star") == "missing from the dataset: Subtomo/p1_ctf.mrc (named in particles.star)"


def test_a_relion_3_0_unnamed_block(tmp_path: Path) -> None:
    write(tmp_path, "particles.star", "data_\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@../x.mrcs 10000\n")
    assert "particles.star data_ row 1, column _rlnImageName: '../x.mrcs'" in refusal(tmp_path, "particles.star")
