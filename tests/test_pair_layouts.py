"""benchmarks/pair_layouts.py: the layout measures of the training pairs at two axis ratios."""

from __future__ import annotations

import sys
from pathlib import Path

from estable.training.shapes import parse_caption

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from pair_layouts import layout_stats  # noqa: E402


def test_the_ratio_bounds_the_layouts_off_the_diagonal_and_leaves_the_sizes():
    captions = ("a red circle above a blue square", "a green star to the left of a yellow heart")
    specs = [parse_caption(c) for c in captions]
    world, kept = layout_stats(specs, 40, 1.0), layout_stats(specs, 40, 1.5)
    assert world["max across / along"] <= 1.0 and kept["max across / along"] <= 1 / 1.5 + 1e-9
    assert kept["across / along"] < world["across / along"]
    assert 0 < world["centre distance"] < 1 and 0 < world["edge distance"] <= 0.5
    # the size words' radii come from the same ranges at either ratio
    assert abs(kept["radius, large"] - world["radius, large"]) < 0.02
