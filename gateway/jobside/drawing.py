"""Pillow pieces the previews are drawn with: contrast, tiles, fonts, labels, scale bars, PNG files.

Fonts: DejaVu Sans, the TrueType font matplotlib ships in its package data (found without
importing matplotlib: its import alone costs ~0.45 s and ~40 MB, paid per render), so "Å" and
"%" render the same on every node; Pillow's built-in font when it is missing (it has no "Å", so
labels then say "A").
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]
Ink = int | Color  # a grey level for the grayscale ("L") image previews, RGB for the plots

# The image previews are grayscale and dark, as RELION's own viewers show cryo-EM images: an "L"
# PNG is a third of the RGB one for the same pixels (the images are mostly noise to the encoder).
DARK_BG = 20
DARK_PANEL = 0
DARK_TEXT = 240
DARK_MUTED = 160
ACCENT = 250  # share bars and scale bars
TRACK = 62

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=1)
def _font_dir() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")  # locates the package; does not import it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "mpl-data" / "fonts" / "ttf"
        if (candidate / "DejaVuSans.ttf").is_file():
            return candidate
    return None


@lru_cache(maxsize=64)
def font(size: int, bold: bool = False) -> Font:
    directory = _font_dir()
    if directory is not None:
        return ImageFont.truetype(str(directory / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), max(6, size))
    return ImageFont.load_default(size=max(6, size))


def has_angstrom() -> bool:
    return _font_dir() is not None


def angstrom(value: float | None, digits: int = 1) -> str:
    """``25.6 Å`` (``-`` when unknown or infinite, as RELION's it000 is)."""
    unit = "Å" if has_angstrom() else "A"
    if value is None or not np.isfinite(value):
        return f"- {unit}"
    return f"{value:.{digits}f} {unit}"


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100.0 * share:.1f}%"


# -- contrast ----------------------------------------------------------------------------------


def contrast_limits(values: np.ndarray | Iterable[np.ndarray], low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of the finite values (of several arrays together)."""
    arrays = [values] if isinstance(values, np.ndarray) else list(values)
    flat = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat, [low, high])
    return float(lo), float(hi)


def clip_contrast(
    values: np.ndarray, low: float = 1.0, high: float = 99.0, *, limits: tuple[float, float] | None = None
) -> np.ndarray:
    """Map values to 0-255 (uint8) with the ``low``/``high`` percentiles (or ``limits``) as black and white.

    Percentile clipping keeps a few hot pixels or a deep mask edge from flattening the rest. A flat
    image (an empty class) comes out black; NaN and inf come out black too.
    """
    lo, hi = limits if limits is not None else contrast_limits(values, low, high)
    values = np.asarray(values, dtype=np.float64)
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.clip((np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def tile(gray: np.ndarray, size: int) -> Image.Image:
    """A uint8 image as a ``size`` x ``size`` Pillow image (bicubic up, Lanczos down)."""
    image = Image.fromarray(np.ascontiguousarray(gray), mode="L")
    if image.size == (size, size):
        return image
    method = Image.Resampling.BICUBIC if size > max(image.size) else Image.Resampling.LANCZOS
    return image.resize((size, size), method)


# -- text and bars -----------------------------------------------------------------------------


def fit_font(draw: ImageDraw.ImageDraw, text: str, width: float, size: int, *, bold: bool = False, smallest: int = 8) -> Font:
    """The largest font up to ``size`` in which ``text`` fits ``width`` pixels."""
    for candidate in range(size, smallest - 1, -1):
        chosen = font(candidate, bold)
        if draw.textlength(text, font=chosen) <= width:
            return chosen
    return font(smallest, bold)


def text_height(size: int) -> int:
    """Line height for a font size (ascent + descent of DejaVu is ~1.17 em)."""
    return int(round(size * 1.2))


def nice_length(limit: float) -> float:
    """The largest 1, 2, 2.5 or 5 x 10^n not above ``limit`` (a scale bar's length in Å)."""
    if not limit > 0:
        return 0.0
    exponent = np.floor(np.log10(limit))
    for mantissa in (5.0, 2.5, 2.0, 1.0):
        value = mantissa * 10.0**exponent
        if value <= limit:
            return float(value)
    return float(10.0**exponent)


def draw_scale_bar(
    draw: ImageDraw.ImageDraw, right: float, middle: float, px_per_angstrom: float, max_width: float, size: int, color: Ink
) -> str:
    """A bar of a round length in Å ending at ``right``, its label before it; return the label."""
    length = nice_length(max_width / px_per_angstrom)
    if not length:
        return ""
    bar = length * px_per_angstrom
    label = f"{length:g} {'Å' if has_angstrom() else 'A'}"
    thickness = max(3, size // 4)
    draw.rectangle([right - bar, middle - thickness / 2, right, middle + thickness / 2], fill=color)
    chosen = font(size)
    draw.text((right - bar - size * 0.4, middle), label, font=chosen, fill=color, anchor="rm")
    return label


def header(
    draw: ImageDraw.ImageDraw,
    left: float,
    top: float,
    width: float,
    title: str,
    subtitle: str,
    size: int,
    *,
    text: Ink = DARK_TEXT,
    muted: Ink = DARK_MUTED,
    scale: tuple[float, float] | None = None,
) -> list[str]:
    """A bold title line and a muted subtitle line; optionally a scale bar at the subtitle's right end.

    ``scale`` is (pixels per Å in the image below, the bar's widest length in pixels). Return the
    texts drawn.
    """
    drawn = [title, subtitle]
    title_font = fit_font(draw, title, width, int(size * 1.25), bold=True)
    draw.text((left, top), title, font=title_font, fill=text)
    sub_top = top + text_height(int(size * 1.25)) + size * 0.2
    sub_width = width
    if scale is not None:
        px_per_a, bar_max = scale
        bar_label = draw_scale_bar(draw, left + width, sub_top + text_height(size) / 2, px_per_a, bar_max, size, ACCENT)
        if bar_label:
            drawn.append(bar_label)
            sub_width = width - bar_max - draw.textlength(bar_label, font=font(size)) - size * 1.5
    draw.text((left, sub_top), subtitle, font=fit_font(draw, subtitle, max(sub_width, size * 4), size), fill=muted)
    return drawn


def header_height(size: int) -> int:
    return text_height(int(size * 1.25)) + int(size * 0.2) + text_height(size)


# -- files -------------------------------------------------------------------------------------


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically: a temporary file in the same directory, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", compress_level=6)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def grid_shape(count: int, aspect: float = 1.5, max_columns: int | None = None) -> tuple[int, int]:
    """Columns and rows for ``count`` tiles, about ``aspect`` times wider than tall."""
    columns = max(1, min(count, int(np.ceil(np.sqrt(count * aspect)))))
    if max_columns:
        columns = min(columns, max_columns)
    return columns, max(1, int(np.ceil(count / columns)))


def palette(count: int) -> Sequence[Color]:
    """Distinct colours for classes (matplotlib's tab10, then tab20's lighter halves)."""
    base = [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
        (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
    ]
    return [base[i % len(base)] for i in range(count)]
