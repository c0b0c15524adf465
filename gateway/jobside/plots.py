"""Small line and bar charts drawn with Pillow (FSC curves, resolution and class shares per iteration).

matplotlib would draw these, but its import alone takes ~0.45 s and ~40 MB in every short-lived
renderer (measured: a 6x4 in FSC plot cost 0.44 s and 73 MB RSS, against ~0.1 s and ~45 MB for the
renderer's whole set here). The charts are drawn at twice their size and scaled down with
Lanczos, which gives anti-aliased lines and text.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from gateway.jobside.drawing import Color, font, text_height

WHITE: Color = (255, 255, 255)
INK: Color = (33, 37, 41)
MUTED: Color = (108, 117, 125)
GRID: Color = (226, 230, 234)
BLUE: Color = (31, 119, 180)
RED: Color = (214, 39, 40)
GREY: Color = (120, 120, 120)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^n steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, target)
    exponent = math.floor(math.log10(raw))
    step = next(m * 10**exponent for m in (1, 2, 2.5, 5, 10) if m * 10**exponent >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def tick_text(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


class Figure:
    """A white canvas drawn at ``scale`` times its size; coordinates are given at the final size."""

    def __init__(self, width: int, height: int, *, scale: int = 2, background: Color = WHITE) -> None:
        self.width, self.height, self.scale = width, height, scale
        self.image = Image.new("RGB", (width * scale, height * scale), background)
        self.draw = ImageDraw.Draw(self.image)
        self.texts: list[str] = []

    def text(self, xy: tuple[float, float], text: str, size: int, *, fill: Color = INK, bold: bool = False, anchor: str = "la") -> float:
        """Draw text; return its width at the final size."""
        chosen = font(size * self.scale, bold)
        self.draw.text((xy[0] * self.scale, xy[1] * self.scale), text, font=chosen, fill=fill, anchor=anchor)
        self.texts.append(text)
        return self.draw.textlength(text, font=chosen) / self.scale

    def text_width(self, text: str, size: int, bold: bool = False) -> float:
        return self.draw.textlength(text, font=font(size * self.scale, bold)) / self.scale

    def finish(self) -> Image.Image:
        return self.image.resize((self.width, self.height), Image.Resampling.LANCZOS)


class Axes:
    """A plot area inside ``box`` (left, top, right, bottom) with data limits, grid and labelled ticks."""

    def __init__(
        self,
        figure: Figure,
        box: tuple[float, float, float, float],
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        *,
        size: int = 15,
    ) -> None:
        self.figure = figure
        self.left, self.top, self.right, self.bottom = box
        self.xlim = xlim if xlim[1] > xlim[0] else (xlim[0] - 0.5, xlim[0] + 0.5)
        self.ylim = ylim if ylim[1] > ylim[0] else (ylim[0] - 0.5, ylim[0] + 0.5)
        self.size = size

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Data to scaled canvas pixels."""
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        fx = self.left + (x - x0) / (x1 - x0) * (self.right - self.left)
        fy = self.bottom - (y - y0) / (y1 - y0) * (self.bottom - self.top)
        return fx * self.figure.scale, fy * self.figure.scale

    def frame(
        self,
        xticks: Sequence[tuple[float, str]],
        yticks: Sequence[tuple[float, str]],
        *,
        xlabel: str = "",
        ylabel: str = "",
    ) -> None:
        """Grid lines at the ticks, the axes box, tick labels and axis labels."""
        fig, s, size = self.figure, self.figure.scale, self.size
        draw = fig.draw
        for value, label in yticks:
            _, y = self.px(self.xlim[0], value)
            draw.line([self.left * s, y, self.right * s, y], fill=GRID, width=s)
            fig.text((self.left - size * 0.4, y / s), label, size, fill=MUTED, anchor="rm")
        for value, label in xticks:
            x, _ = self.px(value, self.ylim[0])
            draw.line([x, self.top * s, x, self.bottom * s], fill=GRID, width=s)
            fig.text((x / s, self.bottom + size * 0.35), label, size, fill=MUTED, anchor="ma")
        draw.rectangle([self.left * s, self.top * s, self.right * s, self.bottom * s], outline=MUTED, width=s)
        if xlabel:
            fig.text(((self.left + self.right) / 2, self.bottom + size * 0.35 + text_height(size)), xlabel, size, fill=INK, anchor="ma")
        if ylabel:
            self._vertical_text(ylabel, self.left - size * 0.4 - self._widest(yticks) - size * 0.5, (self.top + self.bottom) / 2)

    def _widest(self, ticks: Sequence[tuple[float, str]]) -> float:
        return max((self.figure.text_width(label, self.size) for _, label in ticks), default=0.0)

    def _vertical_text(self, text: str, right: float, middle: float) -> None:
        fig, s = self.figure, self.figure.scale
        chosen = font(self.size * s)
        width = int(fig.draw.textlength(text, font=chosen)) + 4
        height = text_height(self.size * s)
        label = Image.new("L", (width, height), 0)
        ImageDraw.Draw(label).text((2, 0), text, font=chosen, fill=255)
        label = label.rotate(90, expand=True)
        ink = Image.new("RGB", label.size, INK)
        fig.image.paste(ink, (int(right * s - label.size[0]), int(middle * s - label.size[1] / 2)), label)
        fig.texts.append(text)

    def line(
        self,
        xs: Sequence[float],
        ys: Sequence[float | None],
        color: Color,
        *,
        width: float = 2.5,
        dash: tuple[float, float] | None = None,
        markers: float = 0.0,
    ) -> None:
        """A polyline through the points (a None y breaks it); optional round markers of radius ``markers``."""
        s = self.figure.scale
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                runs.append([])
                continue
            runs[-1].append(self.px(x, self._clamp_y(y)))
        for run in runs:
            if len(run) > 1:
                if dash:
                    self._dashed(run, color, width * s, dash[0] * s, dash[1] * s)
                else:
                    self.figure.draw.line(run, fill=color, width=max(1, round(width * s)), joint="curve")
            if markers:
                r = markers * s
                for x, y in run:
                    self.figure.draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=WHITE, width=s)

    def _clamp_y(self, y: float) -> float:
        low, high = self.ylim
        return min(max(y, low), high)

    def _dashed(self, points: list[tuple[float, float]], color: Color, width: float, on: float, off: float) -> None:
        draw, pen = self.figure.draw, max(1, round(width))
        drawing, left = True, on
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            length = math.hypot(x1 - x0, y1 - y0)
            position = 0.0
            while position < length:
                step = min(left, length - position)
                a = position / length
                b = (position + step) / length
                if drawing:
                    draw.line([x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b], fill=color, width=pen)
                position += step
                left -= step
                if left <= 1e-9:
                    drawing = not drawing
                    left = on if drawing else off

    def hline(self, y: float, color: Color, *, width: float = 1.5, dash: tuple[float, float] | None = (6, 4)) -> None:
        self.line([self.xlim[0], self.xlim[1]], [y, y], color, width=width, dash=dash)

    def vline(self, x: float, color: Color, *, width: float = 1.5, dash: tuple[float, float] | None = (6, 4)) -> None:
        s = self.figure.scale
        px, _ = self.px(x, self.ylim[0])
        points = [(px, self.top * s), (px, self.bottom * s)]
        if dash:
            self._dashed(points, color, width * s, dash[0] * s, dash[1] * s)
        else:
            self.figure.draw.line(points, fill=color, width=max(1, round(width * s)))

    def bar(self, x: float, bottom: float, height: float, width: float, color: Color) -> None:
        """A bar of data width ``width`` centred on ``x`` from ``bottom`` to ``bottom + height``."""
        x0, y0 = self.px(x - width / 2, bottom + height)
        x1, y1 = self.px(x + width / 2, bottom)
        if y1 - y0 >= 0.5:
            self.figure.draw.rectangle([x0, y0, x1, y1], fill=color)

    def note(self, x: float, y: float, text: str, *, color: Color = INK, anchor: str = "la", bold: bool = False) -> None:
        """Text at a data point, kept inside the plot area."""
        px, py = self.px(x, self._clamp_y(y))
        s = self.figure.scale
        width = self.figure.text_width(text, self.size, bold)
        fx = min(max(px / s, self.left + 4 + (width if anchor[0] == "r" else 0)), self.right - 4 - (width if anchor[0] == "l" else 0))
        self.figure.text((fx, py / s), text, self.size, fill=color, anchor=anchor, bold=bold)
