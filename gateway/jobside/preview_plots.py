"""The plot previews: the half-map FSC of an auto-refine, and resolution and class shares per iteration.

Light charts (white, grey grid) whose title line carries the figure that matters in large bold type
at its right end (the resolution), so a thumbnail still says it; the details (ticks, the 0.143
threshold, the legend) are for the full size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.jobside.drawing import angstrom, has_angstrom, palette, text_height
from gateway.jobside.plots import (
    BLUE,
    GREY,
    INK,
    MUTED,
    RED,
    Axes,
    Figure,
    nice_ticks,
    tick_text,
)
from gateway.jobside.preview_images import Drawn

FSC_THRESHOLD = 0.143
WIDTH = 760
TEXT = 16


@dataclass(frozen=True)
class IterationPoint:
    """What one iteration's model.star says, for the history plot."""

    iteration: int
    resolution: float | None
    shares: tuple[float, ...]


def _title(figure: Figure, title: str, subtitle: str, value: str) -> float:
    """Title and subtitle on the left, ``value`` big and bold on the right; return the text's bottom."""
    margin = 18
    big = 30
    figure.text((WIDTH - margin, margin), value, big, bold=True, anchor="ra")
    figure.text((margin, margin), title, 20, bold=True)
    figure.text((margin, margin + text_height(20) + 4), subtitle, TEXT, fill=MUTED)
    return margin + max(text_height(big), text_height(20) + 4 + text_height(TEXT))


def fsc_plot(
    curve: Sequence[tuple[float, float | None]],
    *,
    iteration: int,
    resolution: float | None,
    pixel_size: float | None,
    final: bool,
) -> Drawn:
    """FSC against spatial frequency (ticks labelled in Å), the 0.143 line and the resolution."""
    height = 470
    figure = Figure(WIDTH, height)
    unit = "Å" if has_angstrom() else "A"
    what = "final, half-maps joined" if final else "half-maps"
    top = _title(
        figure,
        f"Gold-standard FSC · iteration {iteration}",
        f"{what} · resolution at FSC = {FSC_THRESHOLD} (unmasked)",
        angstrom(resolution),
    )
    frequencies = [f for f, _ in curve]
    nyquist = 1.0 / (2.0 * pixel_size) if pixel_size else (max(frequencies) if frequencies else 0.5)
    axes = Axes(figure, (78, top + 22, WIDTH - 24, height - 64), (0.0, nyquist), (-0.1, 1.05), size=TEXT)
    xticks = [(f, f"{1.0 / f:.3g}") for f in nice_ticks(0.0, nyquist, 5) if f > 0]
    yticks = [(v, tick_text(v)) for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    axes.frame(xticks, yticks, xlabel=f"resolution ({unit})", ylabel="FSC")
    axes.hline(FSC_THRESHOLD, RED, width=1.5)
    axes.note(nyquist, FSC_THRESHOLD + 0.02, f"{FSC_THRESHOLD}", color=RED, anchor="rb")
    axes.hline(0.0, GREY, width=1.0, dash=None)
    if resolution:
        axes.vline(1.0 / resolution, GREY, width=1.5)
        axes.note(1.0 / resolution + nyquist * 0.012, 0.97, angstrom(resolution), color=INK, anchor="lt", bold=True)
    axes.line(frequencies, [y for _, y in curve], BLUE, width=3.0, markers=3.5 if len(curve) <= 60 else 0.0)
    if not curve:
        axes.note(nyquist / 2, 0.5, "no FSC in model.star", color=MUTED, anchor="mm")
    return Drawn(figure.finish(), figure.texts, {"points": len(curve), "nyquist_per_angstrom": nyquist})


def history_plot(points: Sequence[IterationPoint], *, iteration: int, classes: bool, final: bool = False) -> Drawn:
    """Resolution per iteration and, for classifications of more than one class, the class shares
    per iteration as stacked bars (one colour per class, class 1 at the bottom)."""
    shares_panel = classes and any(len(p.shares) > 1 for p in points)
    height = 700 if shares_panel else 440
    figure = Figure(WIDTH, height)
    unit = "Å" if has_angstrom() else "A"
    latest = next((p.resolution for p in reversed(points) if p.resolution), None)
    top = _title(
        figure,
        f"Resolution per iteration · iteration {iteration}",
        "lower is better" + (" · the last point is the final map" if final else ""),
        angstrom(latest),
    )
    iterations = [p.iteration for p in points] or [iteration]
    xlim = (min(iterations) - 0.6, max(iterations) + 0.6)
    xticks = [(v, f"{v:g}") for v in _integer_ticks(min(iterations), max(iterations))]
    resolutions = [p.resolution for p in points if p.resolution]
    low, high = (min(resolutions), max(resolutions)) if resolutions else (0.0, 1.0)
    pad = max((high - low) * 0.15, high * 0.05, 0.5)
    ylim = (max(0.0, low - pad), high + pad)
    panel_bottom = top + 22 + (250 if shares_panel else height - top - 22 - 64)
    axes = Axes(figure, (78, top + 22, WIDTH - 24, panel_bottom), xlim, ylim, size=TEXT)
    axes.frame(xticks, [(v, tick_text(v)) for v in nice_ticks(ylim[0], ylim[1], 4)], xlabel="" if shares_panel else "iteration", ylabel=f"resolution ({unit})")
    axes.line([p.iteration for p in points], [p.resolution for p in points], BLUE, width=3.0, markers=4.5)
    if latest is None:
        axes.note(sum(xlim) / 2, sum(ylim) / 2, "no resolution yet", color=MUTED, anchor="mm")
    details: dict[str, object] = {"iterations": [p.iteration for p in points], "resolutions": [p.resolution for p in points]}
    if shares_panel:
        groups = share_groups(points)
        shares_top = panel_bottom + 30 + 2 * text_height(TEXT) + 8
        figure.text((18, panel_bottom + 26), "share of particles per class (%)", TEXT, fill=INK)
        _legend(figure, groups, 18, panel_bottom + 30 + text_height(TEXT) + text_height(TEXT) // 2)
        bars = Axes(figure, (78, shares_top, WIDTH - 24, height - 64), xlim, (0.0, 100.0), size=TEXT)
        bars.frame(xticks, [(v, f"{v:g}") for v in (0, 25, 50, 75, 100)], xlabel="iteration")
        for point in points:
            bottom = 0.0
            for _, members, colour in groups:
                share = 100.0 * sum(point.shares[k - 1] for k in members if k - 1 < len(point.shares))
                bars.bar(point.iteration, bottom, share, 0.7, colour)
                bottom += share
        details["shares"] = [list(p.shares) for p in points]
        details["legend"] = [label for label, _, _ in groups]
    return Drawn(figure.finish(), figure.texts, details)


def share_groups(points: Sequence[IterationPoint], most: int = 8) -> list[tuple[str, list[int], tuple[int, int, int]]]:
    """The stacks of the shares panel as (legend label, class numbers, colour), bottom first.

    Up to ``most`` classes each get a colour (in class order); beyond that, the ``most - 1``
    largest classes of the latest iteration do and the rest are one grey "others" stack.
    """
    count = max(len(p.shares) for p in points)
    colours = palette(count)
    if count <= most:
        return [(f"class {k}", [k], colours[k - 1]) for k in range(1, count + 1)]
    latest = points[-1].shares
    largest = sorted(range(1, count + 1), key=lambda k: (-(latest[k - 1] if k - 1 < len(latest) else 0.0), k))[: most - 1]
    groups = [(f"class {k}", [k], colours[i]) for i, k in enumerate(sorted(largest))]
    others = [k for k in range(1, count + 1) if k not in largest]
    return [*groups, (f"{len(others)} others", others, (199, 199, 199))]


def _legend(figure: Figure, groups: Sequence[tuple[str, list[int], tuple[int, int, int]]], left: float, middle: float) -> None:
    """Coloured chips with their labels in one row."""
    s, x = figure.scale, left
    for label, _, colour in groups:
        figure.draw.rectangle([x * s, (middle - 6) * s, (x + 12) * s, (middle + 6) * s], fill=colour)
        x += 16 + figure.text((x + 16, middle), label, TEXT - 2, fill=INK, anchor="lm") + 14


def _integer_ticks(first: int, last: int) -> list[float]:
    ticks = [t for t in nice_ticks(first, last, min(8, max(1, last - first))) if float(t).is_integer()]
    return ticks or [float(first)]


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
