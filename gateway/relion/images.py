"""Read RELION's image files (MRC stacks and maps) with mrcfile, for previews.

RELION 3.1 writes 2D class averages as one MRC stack (``_itNNN_classes.mrcs``: K images of box x
box, float32) and every 3D map as an MRC volume (``_itNNN_class00K.mrc``, ``_half1_class001.mrc``,
``_class001.mrc``: box^3, float32), both with the pixel size in the header's voxel size. mrcfile
indexes a volume ``[z, y, x]``.

Files are opened strictly (``permissive=False``): a file RELION is still writing, shorter than its
header says, is a ``ValueError`` (the caller retries), never a half image. A volume is memory-mapped
and reduced to its three central slices and three projections, so a 256^3 map (64 MB) costs its
pages once and nothing is copied whole.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

AXES = ("z", "y", "x")  # a view "along z" looks down the first array axis


@dataclass(frozen=True)
class VolumeViews:
    """Central slices and projections (sums) of one map, each along z, y and x (mrcfile's axes 0, 1, 2)."""

    slices: tuple[np.ndarray, np.ndarray, np.ndarray]
    projections: tuple[np.ndarray, np.ndarray, np.ndarray]
    box: int
    pixel_size: float | None

    @staticmethod
    def mean(views: list[VolumeViews]) -> VolumeViews:
        """The views of the average of several maps of one box (slices and sums are linear)."""
        first = views[0]
        if any(v.slices[0].shape != first.slices[0].shape for v in views):
            raise ValueError("maps of different sizes cannot be averaged")

        def avg(index: int, attr: str) -> np.ndarray:
            return np.mean([getattr(v, attr)[index] for v in views], axis=0)

        return VolumeViews(
            tuple(avg(i, "slices") for i in range(3)),  # type: ignore[arg-type]
            tuple(avg(i, "projections") for i in range(3)),  # type: ignore[arg-type]
            first.box,
            first.pixel_size,
        )


def _pixel_size(mrc: mrcfile.mrcfile.MrcFile) -> float | None:
    size = float(mrc.voxel_size.x)
    return size if np.isfinite(size) and size > 0 else None


def read_stack(path: str | Path) -> tuple[np.ndarray, float | None]:
    """An image stack as float32 ``(n, y, x)`` (a single 2D image gives n = 1) and its pixel size (Å)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # header quirks (ispg 0 for a stack) are not errors here
        with mrcfile.open(str(path), mode="r", permissive=False) as mrc:
            if mrc.data is None:
                raise ValueError(f"{path}: no image data")
            data = np.array(mrc.data, dtype=np.float32)
            pixel = _pixel_size(mrc)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a stack of 2D images, got shape {data.shape}")
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), pixel


def read_volume_views(path: str | Path) -> VolumeViews:
    """The central slices and projections of a map, read through a memory map."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.mmap(str(path), mode="r", permissive=False) as mrc:
            volume = mrc.data
            if volume is None or volume.ndim != 3:
                raise ValueError(f"{path}: expected a 3D map, got {None if volume is None else volume.shape}")
            nz, ny, nx = volume.shape
            slices = (
                np.array(volume[nz // 2], dtype=np.float32),
                np.array(volume[:, ny // 2, :], dtype=np.float32),
                np.array(volume[:, :, nx // 2], dtype=np.float32),
            )
            projections = tuple(np.asarray(volume.sum(axis=axis, dtype=np.float64), dtype=np.float32) for axis in range(3))
            pixel = _pixel_size(mrc)
    clean = lambda a: np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return VolumeViews(
        tuple(clean(s) for s in slices),  # type: ignore[arg-type]
        tuple(clean(p) for p in projections),  # type: ignore[arg-type]
        max(nz, ny, nx),
        pixel,
    )
