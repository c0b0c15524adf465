"""Make a tiny synthetic RELION dataset: two Gaussian-blob maps projected with CTF, plus noise.

Recipe (docs: shared/notes/relion.md, section 1): map A has 6 Gaussian blobs and no symmetry,
map B is A without one blob; the first half of the particles come from A and the rest from B, at
uniform random orientations with +-2 px shifts, defocus 1.0-2.5 um with some astigmatism and 4 fake
micrographs (so ``--scale`` has 4 groups). ``relion_project --ctf`` makes the clean images, numpy adds
white noise (SNR 0.5 inside the particle) and normalises each image so its background has mean 0 and
stddev 1, which is what ``--norm`` expects. The result is deterministic for a given seed.
"""
from __future__ import annotations

import gzip
import logging
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import mrcfile
import numpy as np

from gateway.process import run_command
from gateway.relion.star import StarBlock, loop_block, read_star, write_star

log = logging.getLogger(__name__)

#: Members of the tarball, at the archive root; a RELION job runs in the directory they unpack into.
TARBALL_MEMBERS = ("particles.star", "particles.mrcs", "ref.mrc")
PROJECT_TIMEOUT = 300.0  # relion_project takes about 0.03 s for 200 32-px images
NUM_MICROGRAPHS = 4
NUM_BLOBS = 6
BLOB_SPREAD = 0.12  # blob centres lie within +-BLOB_SPREAD*box of the box centre
BLOB_SIGMA = (0.12, 0.16)  # blob widths, as fractions of the box
SNR = 0.5
MAX_SHIFT_PX = 2.0
VOLTAGE = 300.0
CS = 2.7
Q0 = 0.1

OPTICS_LABELS = (
    "rlnOpticsGroupName",
    "rlnOpticsGroup",
    "rlnMicrographOriginalPixelSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
)
PARTICLE_LABELS = (
    "rlnImageName",
    "rlnMicrographName",
    "rlnOpticsGroup",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnPhaseShift",
)
TRUTH_LABELS = PARTICLE_LABELS + (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnClassNumber",
)


@dataclass(frozen=True)
class _Particle:
    number: int  # 1-based position in particles.mrcs
    klass: int  # 1 = map A, 2 = map B
    micrograph: str
    rot: float
    tilt: float
    psi: float
    origin_x: float  # Angstrom
    origin_y: float
    defocus_u: float  # Angstrom
    defocus_v: float
    defocus_angle: float

    def row(self) -> dict[str, object]:
        return {
            "rlnImageName": f"{self.number:06d}@particles.mrcs",
            "rlnMicrographName": self.micrograph,
            "rlnOpticsGroup": 1,
            "rlnDefocusU": self.defocus_u,
            "rlnDefocusV": self.defocus_v,
            "rlnDefocusAngle": self.defocus_angle,
            "rlnCtfBfactor": 0.0,
            "rlnCtfScalefactor": 1.0,
            "rlnPhaseShift": 0.0,
            "rlnAngleRot": self.rot,
            "rlnAngleTilt": self.tilt,
            "rlnAnglePsi": self.psi,
            "rlnOriginXAngst": self.origin_x,
            "rlnOriginYAngst": self.origin_y,
            "rlnClassNumber": self.klass,
        }


def tarball_path(out_dir: Path) -> Path:
    """Return where make_dataset puts the tarball: ``<out_dir>/../<out_dir.name>.tar.gz``."""
    return out_dir.parent / f"{out_dir.name}.tar.gz"


def make_dataset(out_dir: Path, *, box: int = 32, particles: int = 200, angpix: float = 4.0, seed: int = 0) -> Path:
    """Write particles.star, particles.mrcs, ref.mrc and truth.star into out_dir and return the tarball.

    The tarball is ``<out_dir>/../<out_dir.name>.tar.gz`` (a sibling of out_dir, e.g. ``/tmp/tiny`` ->
    ``/tmp/tiny.tar.gz``) and holds particles.star, particles.mrcs and ref.mrc at its root. Intermediate
    files (the maps, relion_project's input and output) live in a temporary directory. Raise ValueError
    for impossible parameters and gateway.process.CommandError if relion_project fails.
    """
    if box < 16 or box % 2:
        raise ValueError(f"box must be an even number >= 16, got {box}")
    if particles < 2:
        raise ValueError(f"particles must be >= 2 (half come from each map), got {particles}")
    if angpix <= 0:
        raise ValueError(f"angpix must be positive, got {angpix}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    map_a, map_b = _blob_maps(box, rng)
    table = _draw_particles(particles, angpix, rng)

    with tempfile.TemporaryDirectory(prefix="relion-dataset-") as tmp:
        work = Path(tmp)
        stack = np.empty((particles, box, box), dtype=np.float32)
        for klass, volume in ((1, map_a), (2, map_b)):
            members = [p for p in table if p.klass == klass]
            name = "A" if klass == 1 else "B"
            _write_mrc(work / f"map_{name}.mrc", volume, angpix)
            write_star(work / f"ang_{name}.star", [_optics_block(box, angpix), _particles_block(members, TRUTH_LABELS)])
            # relion_project reads orientations, origins and CTF from a 3.1 STAR file (optics + particles);
            # run it in the temp dir so its relative output names stay there.
            run_command(
                [
                    "relion_project",
                    "--i", f"map_{name}.mrc",
                    "--ang", f"ang_{name}.star",
                    "--ctf",
                    "--angpix", f"{angpix:g}",
                    "--o", f"proj_{name}",
                ],
                timeout=PROJECT_TIMEOUT,
                cwd=str(work),
            )
            images = _read_projections(work, f"proj_{name}", len(members), box)
            for particle, image in zip(members, images):
                stack[particle.number - 1] = image
        stack = _add_noise_and_normalise(stack, box, angpix, rng)

        _write_mrc(out_dir / "particles.mrcs", stack, angpix, is_stack=True)
        _write_mrc(out_dir / "ref.mrc", map_a, angpix)
        write_star(out_dir / "particles.star", [_optics_block(box, angpix), _particles_block(table, PARTICLE_LABELS)])
        write_star(out_dir / "truth.star", [_optics_block(box, angpix), _particles_block(table, TRUTH_LABELS)])

    tarball = tarball_path(out_dir)
    _pack(out_dir, tarball)
    log.info(
        "dataset %s: %d particles, box %d, %.2f A/px, seed %d -> %s", out_dir, particles, box, angpix, seed, tarball
    )
    return tarball


def _blob_maps(box: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return maps A (NUM_BLOBS Gaussian blobs, no symmetry) and B (A without its last blob)."""
    # Compact, smooth blobs (centres within 0.12*box of the centre, sigma 0.12-0.16*box) keep the
    # angular accuracy RELION estimates above 20 degrees. Auto-refine then converges at its initial
    # 15-degree step (4 iterations, ~12 s with -np 3 and --healpix_order 1). Sharper or wider-spread
    # blobs align better, and auto-refine then goes on to 7.5 and 3.75-degree global searches that take minutes.
    coords = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = np.meshgrid(coords, coords, coords, indexing="ij")
    centres = rng.uniform(-BLOB_SPREAD * box, BLOB_SPREAD * box, size=(NUM_BLOBS, 3))
    sigmas = rng.uniform(BLOB_SIGMA[0], BLOB_SIGMA[1], size=NUM_BLOBS) * box
    heights = rng.uniform(0.6, 1.0, size=NUM_BLOBS)
    blobs = [
        h * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
        for (cx, cy, cz), s, h in zip(centres, sigmas, heights)
    ]
    map_a = np.sum(blobs, axis=0).astype(np.float32)
    map_b = np.sum(blobs[:-1], axis=0).astype(np.float32)
    return map_a, map_b


def _draw_particles(count: int, angpix: float, rng: np.random.Generator) -> list[_Particle]:
    """Draw orientations (uniform on the sphere), shifts, CTF and micrographs; first half from map A."""
    rot = rng.uniform(0.0, 360.0, count)
    tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, count)))
    psi = rng.uniform(0.0, 360.0, count)
    shifts = rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, size=(count, 2)) * angpix
    defocus_u = rng.uniform(10000.0, 25000.0, count)
    defocus_v = defocus_u - rng.uniform(0.0, 800.0, count)
    defocus_angle = rng.uniform(0.0, 180.0, count)
    count_a = count - count // 2
    # Micrographs are contiguous runs of particles, as they would be after extraction.
    mic_index = (np.arange(count) * NUM_MICROGRAPHS) // count
    return [
        _Particle(
            number=i + 1,
            klass=1 if i < count_a else 2,
            micrograph=f"mic{mic_index[i] + 1:03d}.mrc",
            rot=float(rot[i]),
            tilt=float(tilt[i]),
            psi=float(psi[i]),
            origin_x=float(shifts[i, 0]),
            origin_y=float(shifts[i, 1]),
            defocus_u=float(defocus_u[i]),
            defocus_v=float(defocus_v[i]),
            defocus_angle=float(defocus_angle[i]),
        )
        for i in range(count)
    ]


def _optics_block(box: int, angpix: float) -> StarBlock:
    row: dict[str, object] = {
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": angpix,
        "rlnVoltage": VOLTAGE,
        "rlnSphericalAberration": CS,
        "rlnAmplitudeContrast": Q0,
        "rlnImagePixelSize": angpix,
        "rlnImageSize": box,
        "rlnImageDimensionality": 2,
    }
    return loop_block("optics", [row], OPTICS_LABELS)


def _particles_block(table: list[_Particle], labels: tuple[str, ...]) -> StarBlock:
    return loop_block("particles", [p.row() for p in table], labels)


def _read_projections(work: Path, root: str, count: int, box: int) -> np.ndarray:
    """Read relion_project's output stack, checking it has one image per input row in input order."""
    with mrcfile.open(work / f"{root}.mrcs", permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32).reshape(-1, box, box)
    if data.shape[0] != count:
        raise RuntimeError(f"relion_project wrote {data.shape[0]} images to {root}.mrcs, expected {count}")
    star = read_star(work / f"{root}.star")
    names = star["particles"].column("rlnImageName") if "particles" in star else []
    if names and [int(name.split("@")[0]) for name in names] != list(range(1, count + 1)):
        raise RuntimeError(f"relion_project wrote {root}.mrcs out of input order")
    return data


def _add_noise_and_normalise(stack: np.ndarray, box: int, angpix: float, rng: np.random.Generator) -> np.ndarray:
    """Add white noise at SNR 0.5 inside the particle, then set background mean 0 / stddev 1 per image."""
    coords = np.arange(box, dtype=np.float64) - box // 2
    radius = np.hypot(*np.meshgrid(coords, coords, indexing="ij"))
    background = radius > 0.35 * box
    inside = ~background
    out = np.empty_like(stack)
    for i, image in enumerate(stack.astype(np.float64)):
        signal_var = float(np.var(image[inside]))
        noise_sd = np.sqrt(signal_var / SNR) if signal_var > 0 else 1.0
        noisy = image + rng.normal(0.0, noise_sd, size=image.shape)
        bg = noisy[background]
        out[i] = ((noisy - bg.mean()) / bg.std()).astype(np.float32)
    return out


def _write_mrc(path: Path, data: np.ndarray, angpix: float, *, is_stack: bool = False) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        if is_stack:
            mrc.set_image_stack()  # ispg 0: a stack of 2D images, as RELION writes .mrcs
        mrc.voxel_size = angpix
        # mrcfile stamps the creation time into label 0; a fixed label keeps the bytes reproducible.
        mrc.header.label[0] = b"relion-gateway make-dataset"
        mrc.header.nlabl = 1


def _pack(out_dir: Path, tarball: Path) -> None:
    """Pack TARBALL_MEMBERS at the archive root with fixed metadata, so one seed gives identical bytes."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o644
        return info

    partial = tarball.with_name(tarball.name + ".partial")
    with open(partial, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in TARBALL_MEMBERS:
                    tar.add(out_dir / name, arcname=name, recursive=False, filter=normalise)
    partial.replace(tarball)


@click.command("make-dataset")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the dataset into; the tarball goes next to it as DIR.tar.gz.",
)
@click.option("--box", default=32, show_default=True, help="Box size in pixels (even, >= 16).")
@click.option("--particles", default=200, show_default=True, help="Number of particles; half from each map.")
@click.option("--angpix", default=4.0, show_default=True, help="Pixel size in Angstrom.")
@click.option("--seed", default=0, show_default=True, help="Random seed; one seed always gives the same dataset.")
def make_dataset_command(out: Path, box: int, particles: int, angpix: float, seed: int) -> None:
    """Make a tiny synthetic RELION dataset and its tarball."""
    start = time.monotonic()
    try:
        tarball = make_dataset(out, box=box, particles=particles, angpix=angpix, seed=seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    elapsed = time.monotonic() - start
    click.echo(str(tarball))
    for name in (*TARBALL_MEMBERS, "truth.star"):
        click.echo(f"  {out / name}: {(out / name).stat().st_size:,} B")
    click.echo(f"  {tarball}: {tarball.stat().st_size:,} B ({elapsed:.2f} s)")
