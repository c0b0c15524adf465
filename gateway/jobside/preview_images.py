"""The image previews: a montage of 2D class averages and the slices and projections of a 3D map.

Both are grayscale PNGs ("L": the images are mostly noise to the encoder, and an RGB file of the
same pixels is three times the bytes), dark as RELION's own viewers show cryo-EM images, with a
bold title, a muted subtitle carrying the numbers (resolution, share of particles, pixel size)
and a scale bar in Å at the subtitle's right end; the image content is contrast-stretched
between its 1st and 99th percentiles. Small boxes are scaled up (bicubic) so that a box
of 32 px still reads at full size, large ones down (Lanczos) so that 50 classes of 256 px stay a
reasonable PNG. Every text drawn is returned with the image, so tests need no OCR.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gateway.jobside.drawing import (
    ACCENT,
    DARK_BG,
    DARK_MUTED,
    DARK_PANEL,
    DARK_TEXT,
    TRACK,
    angstrom,
    clip_contrast,
    contrast_limits,
    fit_font,
    font,
    grid_shape,
    header,
    header_height,
    text_height,
    tile,
)
from gateway.relion.images import AXES, VolumeViews

MAX_MONTAGE_WIDTH = 2048  # px: beyond it tiles shrink (down to MIN_TILE) rather than the PNG growing
MIN_TILE = 96


@dataclass
class Drawn:
    """A rendered preview: the image, every text on it, and what the tests and the caller may check."""

    image: Image.Image
    labels: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def tile_size(box: int, *, smallest: int = 160, largest: int = 256) -> int:
    """Display size of one image: small boxes are enlarged to ``smallest``, large ones capped."""
    return int(min(largest, max(smallest, box)))


def _pixel_text(pixel_size: float | None) -> str:
    return f"{pixel_size:.2f} {angstrom(0.0).split()[-1]}/px" if pixel_size else "pixel size unknown"


def class_montage(
    stack: np.ndarray,
    shares: Sequence[float | None],
    resolutions: Sequence[float | None],
    *,
    iteration: int,
    planned: int | None = None,
    pixel_size: float | None = None,
    resolution: float | None = None,
    low: float = 1.0,
    high: float = 99.0,
) -> Drawn:
    """The class averages sorted by share of particles (largest first), each labelled
    ``#<class>  <share>%  <resolution> Å`` with a bar showing its share against the largest."""
    count, box = stack.shape[0], stack.shape[-1]
    share = [float(shares[i]) if i < len(shares) and shares[i] is not None else 0.0 for i in range(count)]
    res = [resolutions[i] if i < len(resolutions) else None for i in range(count)]
    order = sorted(range(count), key=lambda i: (-share[i], i))
    columns, rows = grid_shape(count)
    size = tile_size(box)
    if columns * size > MAX_MONTAGE_WIDTH:
        size = max(MIN_TILE, MAX_MONTAGE_WIDTH // columns)
    gap = max(6, size // 16)
    margin = max(12, size // 10)
    label_size = max(11, round(size * 0.095))
    bar_height = max(3, size // 36)
    label_height = text_height(label_size) + label_size // 3
    cell_height = size + bar_height + label_height
    width = 2 * margin + columns * size + (columns - 1) * gap
    head_size = max(label_size + 2, min(30, round(width / 32)))
    top = margin + header_height(head_size) + margin
    height = top + rows * cell_height + (rows - 1) * gap + margin

    image = Image.new("L", (width, height), DARK_BG)
    draw = ImageDraw.Draw(image)
    title = f"2D class averages · iteration {iteration}" + (f" of {planned}" if planned else "")
    subtitle = f"{count} classes by share of particles · {angstrom(resolution)} · {_pixel_text(pixel_size)}"
    scale = (size / (box * pixel_size), min(size * 0.6, width * 0.22)) if pixel_size else None
    labels = header(draw, margin, margin, width - 2 * margin, title, subtitle, head_size, scale=scale)

    # One font for every tile: the largest in which the widest label fits its tile.
    texts = [(f"#{i + 1}", f"{100 * share[i]:.1f}%  {angstrom(res[i])}") for i in order]
    widest = max(texts, key=lambda t: draw.textlength(f"{t[0]}   {t[1]}", font=font(label_size)))
    chosen = fit_font(draw, f"{widest[0]}   {widest[1]}", size, label_size)
    bold = font(getattr(chosen, "size", label_size), True)
    top_share = max(share) if max(share) > 0 else 1.0
    tiles = []
    for slot, index in enumerate(order):
        column, row = slot % columns, slot // columns
        x = margin + column * (size + gap)
        y = top + row * (cell_height + gap)
        image.paste(tile(clip_contrast(stack[index], low, high), size), (x, y))
        bar_top = y + size
        draw.rectangle([x, bar_top, x + size - 1, bar_top + bar_height - 1], fill=TRACK)
        filled = round(size * share[index] / top_share)
        if filled > 0:
            draw.rectangle([x, bar_top, x + filled - 1, bar_top + bar_height - 1], fill=ACCENT)
        number, rest = texts[slot]
        text_y = bar_top + bar_height + label_size // 6
        draw.text((x, text_y), number, font=bold, fill=DARK_TEXT)
        draw.text((x + size, text_y), rest, font=chosen, fill=DARK_MUTED, anchor="ra")
        labels += [number, rest]
        tiles.append({"class": index + 1, "share": share[index], "resolution_angstrom": res[index], "label": f"{number} {rest}", "xy": (x, y)})
    return Drawn(image, labels, {"order": [i + 1 for i in order], "tiles": tiles, "tile_px": size, "columns": columns, "rows": rows})


def volume_panels(
    views: VolumeViews,
    *,
    title: str,
    facts: Sequence[str],
    low: float = 1.0,
    high: float = 99.0,
) -> Drawn:
    """Two rows of three panels: the central slices, then the projections, along z, y and x.

    Each row shares one contrast (1st-99th percentile of its three panels), so the three views of
    a row compare directly.
    """
    box = views.box
    size = tile_size(box, smallest=176, largest=320)
    gap = max(8, size // 20)
    margin = max(14, size // 12)
    label_size = max(12, round(size * 0.075))
    width = 2 * margin + 3 * size + 2 * gap
    head_size = max(label_size + 2, min(28, round(width / 30)))
    caption = text_height(label_size) + label_size // 2
    top = margin + header_height(head_size) + margin
    height = top + 2 * (caption + size) + gap + text_height(label_size) + margin

    image = Image.new("L", (width, height), DARK_BG)
    draw = ImageDraw.Draw(image)
    subtitle = " · ".join([*facts, _pixel_text(views.pixel_size)])
    scale = (size / (box * views.pixel_size), size * 0.5) if views.pixel_size else None
    labels = header(draw, margin, margin, width - 2 * margin, title, subtitle, head_size, scale=scale)
    small = font(label_size)
    rows = (("central slices", views.slices), ("projections", views.projections))
    y = top
    for row_label, arrays in rows:
        draw.text((margin, y), row_label, font=small, fill=DARK_MUTED)
        labels.append(row_label)
        y += caption
        limits = contrast_limits(arrays, low, high)
        for column, array in enumerate(arrays):
            x = margin + column * (size + gap)
            panel = tile(clip_contrast(_square(array), limits=limits), size)
            draw.rectangle([x - 1, y - 1, x + size, y + size], outline=DARK_PANEL)
            image.paste(panel, (x, y))
        y += size + gap
    for column, axis in enumerate(AXES):
        text = f"along {axis}"
        draw.text((margin + column * (size + gap) + size / 2, y - gap + label_size // 3), text, font=small, fill=DARK_MUTED, anchor="ma")
        labels.append(text)
    return Drawn(image, labels, {"panel_px": size, "box": box})


def _square(array: np.ndarray) -> np.ndarray:
    """Pad a non-square view (a map that is not a cube) to a square with its median."""
    ny, nx = array.shape
    if ny == nx:
        return array
    side = max(ny, nx)
    out = np.full((side, side), float(np.median(array)), dtype=np.float32)
    out[(side - ny) // 2 : (side - ny) // 2 + ny, (side - nx) // 2 : (side - nx) // 2 + nx] = array
    return out
