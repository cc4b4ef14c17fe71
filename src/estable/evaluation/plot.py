"""Line plots for the evaluation's reports, drawn with matplotlib (the ``plot`` extra: ``pip install 'estable[plot]'``).

``line_plot([Panel(...), ...], path)`` lays panels out side by side, each with a title, axis labels, any number of
series drawn as lines with round markers (``None`` in a series leaves a gap), optional horizontal reference lines
drawn dashed, and a legend; the file's suffix picks the format (PNG, SVG, PDF).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from estable.errors import EstableError

__all__ = ["INSTALL_HINT", "HLine", "Panel", "Series", "line_plot", "plotting_available"]

INSTALL_HINT = "drawing plots needs matplotlib: pip install 'estable[plot]'"


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float | None]  # None (or NaN) leaves a gap


@dataclass
class HLine:
    label: str
    y: float


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)
    ylim: tuple[float, float] | None = None  # None: fitted to the data (and the reference lines)


def plotting_available() -> bool:
    """Whether matplotlib imports here (``line_plot`` raises a clear error when it does not)."""
    return importlib.util.find_spec("matplotlib") is not None


def line_plot(panels: Sequence[Panel], path: str | Path, *, panel_size: tuple[int, int] = (480, 360)) -> Path:
    """Draw ``panels`` side by side into ``path`` (``panel_size`` pixels each, at 100 dpi); returns the path."""
    if not panels:
        raise ValueError("line_plot needs at least one panel")
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    except ImportError:
        raise EstableError(INSTALL_HINT) from None
    width, height = panel_size
    fig = Figure(figsize=(width * len(panels) / 100, height / 100), dpi=100, layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for s in panel.series:
            ax.plot(list(s.x), [math.nan if v is None else float(v) for v in s.y], marker="o", markersize=4,
                    label=s.label)
        for h in panel.hlines:
            ax.axhline(h.y, linestyle="--", color="0.45", linewidth=1, label=h.label)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        if panel.series or panel.hlines:
            ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
