"""A tiny line-plot helper drawn with Pillow's ImageDraw (no plotting library is a dependency).

``line_plot([Panel(...), ...])`` lays panels out side by side; each panel has a title, axis labels, "nice" ticks
(1, 2, 2.5 or 5 × 10^k steps, Heckbert 1990, "Nice numbers for graph labels", Graphics Gems), any number of
series drawn as lines with round markers, optional horizontal reference lines drawn dashed, and a legend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

__all__ = ["HLine", "Panel", "Series", "PALETTE", "line_plot", "nice_ticks"]

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))
_BLACK, _GREY, _LIGHT = (0, 0, 0), (110, 110, 110), (225, 225, 225)


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float | None]  # None (or NaN) leaves a gap
    colour: tuple[int, int, int] | None = None  # None: the palette, in order


@dataclass
class HLine:
    label: str
    y: float
    colour: tuple[int, int, int] = _GREY


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)
    ylim: tuple[float, float] | None = None  # None: fitted to the data (and the reference lines)


def _nice(value: float, rounding: bool) -> float:
    """A "nice" number near ``value`` > 0: 1, 2, 5 (or 2.5 when rounding) times a power of ten."""
    exp = math.floor(math.log10(value))
    frac = value / 10**exp
    if rounding:
        nice = 1.0 if frac < 1.5 else 2.0 if frac < 2.25 else 2.5 if frac < 3.5 else 5.0 if frac < 7.5 else 10.0
    else:
        nice = 1.0 if frac <= 1 else 2.0 if frac <= 2 else 5.0 if frac <= 5 else 10.0
    return nice * 10**exp


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` evenly spaced round tick values covering [lo, hi] (the first ≤ lo, the last ≥ hi)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # a flat series: a unit-wide band around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice(_nice(hi - lo, False) / max(target - 1, 1), True)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = start
    while v < hi + step * 0.5 - 1e-9 * step or len(ticks) < 2:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(v, 10))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.2g}"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: tuple[int, int, int]) -> None:
    x, dash = x0, 6
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=2)
        x += 2 * dash


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int],
                font: ImageFont.ImageFont) -> None:
    bx0, by0, bx1, by1 = box
    # Plot area inside the panel box: room for the title above, tick labels and axis labels left and below.
    px0, py0, px1, py1 = bx0 + 70, by0 + 34, bx1 - 16, by1 - 52
    xs = [float(v) for s in panel.series for v in s.x]
    ys = [float(v) for s in panel.series for v in s.y if v is not None and math.isfinite(v)]
    ys += [h.y for h in panel.hlines if math.isfinite(h.y)]
    if not xs:
        xs = [0.0, 1.0]
    if not ys:
        ys = [0.0, 1.0]
    xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(*(panel.ylim or (min(ys), max(ys))))
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def sx(v: float) -> float:
        return px0 + (v - xlo) / (xhi - xlo) * (px1 - px0)

    def sy(v: float) -> float:
        return py1 - (v - ylo) / (yhi - ylo) * (py1 - py0)

    # Grid, ticks and tick labels.
    for t in yt:
        y = sy(t)
        draw.line([(px0, y), (px1, y)], fill=_LIGHT)
        label = _fmt(t)
        w, h = _text_size(draw, label, font)
        draw.line([(px0 - 4, y), (px0, y)], fill=_BLACK)
        draw.text((px0 - 8 - w, y - h / 2 - 1), label, fill=_BLACK, font=font)
    for t in xt:
        x = sx(t)
        draw.line([(x, py0), (x, py1)], fill=_LIGHT)
        label = _fmt(t)
        w, _ = _text_size(draw, label, font)
        draw.line([(x, py1), (x, py1 + 4)], fill=_BLACK)
        draw.text((x - w / 2, py1 + 7), label, fill=_BLACK, font=font)
    draw.rectangle([px0, py0, px1, py1], outline=_BLACK)

    # Titles and axis labels (the y label is written horizontally above the axis: PIL has no rotated text).
    w, _ = _text_size(draw, panel.title, font)
    draw.text(((px0 + px1) / 2 - w / 2, by0 + 6), panel.title, fill=_BLACK, font=font)
    w, _ = _text_size(draw, panel.xlabel, font)
    draw.text(((px0 + px1) / 2 - w / 2, py1 + 26), panel.xlabel, fill=_BLACK, font=font)
    draw.text((bx0 + 6, by0 + 6), panel.ylabel, fill=_BLACK, font=font)

    # Reference lines (dashed), then the series (lines with round markers).
    legend: list[tuple[str, tuple[int, int, int], bool]] = []
    drawn_y: list[float] = []  # screen y of every marker and reference line, to keep the legend off the data
    for h in panel.hlines:
        _dashed(draw, px0, px1, sy(h.y), h.colour)
        drawn_y.append(sy(h.y))
        legend.append((h.label, h.colour, True))
    for i, s in enumerate(panel.series):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        pts = [(sx(float(x)), sy(float(y))) if y is not None and math.isfinite(y) else None for x, y in zip(s.x, s.y)]
        for a, b in zip(pts, pts[1:]):
            if a is not None and b is not None:
                draw.line([a, b], fill=colour, width=2)
        for p in pts:
            if p is not None:
                drawn_y.append(p[1])
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        legend.append((s.label, colour, False))

    # Legend in the right-hand corner (top or bottom) with fewer data points near it, on a white box.
    if legend:
        rows = [(_text_size(draw, label, font), label, colour, dashed) for label, colour, dashed in legend]
        lw = max(w for (w, _), *_ in rows) + 34
        lh = 16 * len(rows) + 6
        upper = sum(y < py0 + lh + 12 for y in drawn_y)
        lower = sum(y > py1 - lh - 12 for y in drawn_y)
        lx0, ly0 = px1 - lw - 6, (py1 - lh - 6 if upper > lower else py0 + 6)
        draw.rectangle([lx0, ly0, lx0 + lw, ly0 + lh], fill=(255, 255, 255), outline=_GREY)
        for k, ((_, th), label, colour, dashed) in enumerate(rows):
            y = ly0 + 6 + 16 * k + 5
            if dashed:
                _dashed(draw, lx0 + 6, lx0 + 24, y, colour)
            else:
                draw.line([(lx0 + 6, y), (lx0 + 24, y)], fill=colour, width=2)
            draw.text((lx0 + 30, y - th / 2 - 1), label, fill=_BLACK, font=font)


def line_plot(panels: Sequence[Panel], *, panel_size: tuple[int, int] = (480, 360)) -> Image.Image:
    """An RGB image of ``len(panels)`` panels side by side, each ``panel_size`` (width, height) pixels."""
    if not panels:
        raise ValueError("line_plot needs at least one panel")
    pw, ph = panel_size
    if pw < 200 or ph < 160:
        raise ValueError(f"panel_size {panel_size} is too small to draw axes in; use at least (200, 160)")
    image = Image.new("RGB", (pw * len(panels), ph), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, (i * pw, 0, (i + 1) * pw, ph), font)
    return image
