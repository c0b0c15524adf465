"""The pre-flight input check: the STAR file, every stack it names, and the other path options."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.relion.inputs import MissingInputError, check_inputs, image_stacks

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
    assert check_inputs(root, "particles.star", ["ref.mrc"]) == {"stacks": 2}


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
    with pytest.raises(MissingInputError, match=r"\.\./\.\./etc/passwd \(must be a relative path inside the dataset\)"):
        check_inputs(tmp_path, "particles.star")


def test_star_without_image_names(tmp_path: Path) -> None:
    (tmp_path / "particles.star").write_text("data_particles\nloop_\n_rlnOpticsGroup #1\n1\n")
    with pytest.raises(MissingInputError, match="no particle table with _rlnImageName"):
        check_inputs(tmp_path, "particles.star")
