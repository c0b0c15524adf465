"""The synthetic dataset generator; needs relion_project on PATH (installed with RELION 3.1.3)."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from click.testing import CliRunner

from gateway.relion.dataset import make_dataset, make_dataset_command, tarball_path
from gateway.relion.star import read_star

pytestmark = pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project is not installed")

BOX = 32
COUNT = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out_dir = tmp_path_factory.mktemp("ds") / "tiny"
    return out_dir, make_dataset(out_dir, box=BOX, particles=COUNT, seed=7)


def test_files_and_tarball_location(dataset: tuple[Path, Path]) -> None:
    out_dir, tarball = dataset
    assert tarball == out_dir.parent / "tiny.tar.gz" == tarball_path(out_dir)
    assert tarball.is_file()
    assert sorted(p.name for p in out_dir.iterdir()) == ["particles.mrcs", "particles.star", "ref.mrc", "truth.star"]


def test_particles_star(dataset: tuple[Path, Path]) -> None:
    out_dir, _ = dataset
    blocks = read_star(out_dir / "particles.star")
    assert list(blocks) == ["optics", "particles"]
    optics = blocks["optics"].loop
    assert len(optics) == 1
    assert optics[0]["rlnImageSize"] == str(BOX)
    assert float(optics[0]["rlnImagePixelSize"]) == 4.0
    assert optics[0]["rlnImageDimensionality"] == "2"
    particles = blocks["particles"]
    assert len(particles.loop) == COUNT
    assert particles.column("rlnImageName") == [f"{i:06d}@particles.mrcs" for i in range(1, COUNT + 1)]
    assert len(set(particles.column("rlnMicrographName"))) == 4
    assert "rlnAngleRot" not in particles.labels  # the truth stays out of the input


def test_truth_star(dataset: tuple[Path, Path]) -> None:
    out_dir, _ = dataset
    particles = read_star(out_dir / "truth.star")["particles"]
    assert len(particles.loop) == COUNT
    assert particles.column("rlnClassNumber") == ["1"] * (COUNT // 2) + ["2"] * (COUNT // 2)
    shifts = np.array(particles.column("rlnOriginXAngst") + particles.column("rlnOriginYAngst"), dtype=float)
    assert np.all(np.abs(shifts) <= 2 * 4.0)  # +-2 px at 4 A/px
    tilts = np.array(particles.column("rlnAngleTilt"), dtype=float)
    assert np.all((tilts >= 0) & (tilts <= 180))


def test_stack_and_reference(dataset: tuple[Path, Path]) -> None:
    out_dir, _ = dataset
    with mrcfile.open(out_dir / "particles.mrcs") as mrc:
        assert mrc.data.shape == (COUNT, BOX, BOX)
        assert mrc.data.dtype == np.float32
        assert mrc.is_image_stack()
        assert float(mrc.voxel_size.x) == pytest.approx(4.0)
        data = np.array(mrc.data)
    radius = np.hypot(*np.meshgrid(np.arange(BOX) - BOX // 2, np.arange(BOX) - BOX // 2, indexing="ij"))
    background = data[:, radius > 0.35 * BOX]
    assert np.allclose(background.mean(axis=1), 0.0, atol=1e-4)
    assert np.allclose(background.std(axis=1), 1.0, atol=1e-4)
    assert data[:, radius < 6].mean() > 0  # particles are white
    with mrcfile.open(out_dir / "ref.mrc") as mrc:
        assert mrc.data.shape == (BOX, BOX, BOX)
        assert float(mrc.voxel_size.x) == pytest.approx(4.0)


def test_tarball_members(dataset: tuple[Path, Path]) -> None:
    out_dir, tarball = dataset
    with tarfile.open(tarball) as tar:
        assert tar.getnames() == ["particles.star", "particles.mrcs", "ref.mrc"]
        for member in tar.getmembers():
            assert member.isfile()
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (out_dir / member.name).read_bytes()


def test_deterministic_for_one_seed(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    out_dir, tarball = dataset
    again = make_dataset(tmp_path / "again", box=BOX, particles=COUNT, seed=7)
    assert again.read_bytes() == tarball.read_bytes()
    assert (tmp_path / "again" / "truth.star").read_bytes() == (out_dir / "truth.star").read_bytes()
    make_dataset(tmp_path / "other", box=BOX, particles=COUNT, seed=8)
    assert (tmp_path / "other" / "particles.mrcs").read_bytes() != (out_dir / "particles.mrcs").read_bytes()


@pytest.mark.parametrize(("kwargs", "message"), [({"box": 31}, "box"), ({"particles": 1}, "particles"), ({"angpix": 0}, "angpix")])
def test_rejects_bad_parameters(tmp_path: Path, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_dataset(tmp_path / "bad", **kwargs)  # type: ignore[arg-type]


def test_click_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(make_dataset_command, ["--out", str(tmp_path / "cli"), "--particles", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(tmp_path / "cli.tar.gz")
    assert any("particles.mrcs" in line and " B" in line for line in lines[1:])
    with mrcfile.open(tmp_path / "cli" / "particles.mrcs") as mrc:
        assert mrc.data.shape == (4, 32, 32)
