"""benchmarks/error_kinds.py's verdicts on hand-made detections: each kind of count and pair error is told apart."""

from __future__ import annotations

import sys
from pathlib import Path

from estable.evaluation.judge import Detection
from estable.training.shapes import parse_caption

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from error_kinds import count_verdict, drawn_layout, layout_summary, pair_verdict  # noqa: E402


def det(colour: str, shape: str, x: float, y: float, score: float = 0.9) -> Detection:
    return Detection(colour=colour, shape=shape, size="medium", center=(x, y), score=score)


def test_count_verdicts():
    spec = parse_caption("three green triangles")
    tri = [det("green", "triangle", 0.2 * k, 0.5) for k in range(1, 5)]
    assert count_verdict(spec, tri[:3]) == "right"
    assert count_verdict(spec, tri) == "too many"
    assert count_verdict(spec, tri[:2] + [det("green", "hexagon", 0.8, 0.8)]) == "too few, another shape found"
    assert count_verdict(spec, tri[:2]) == "too few, missing"


def test_pair_verdicts():
    spec = parse_caption("a red circle above a blue square")  # y grows downwards: the circle's y is smaller
    circle, square = ("red", "circle"), ("blue", "square")
    assert pair_verdict(spec, [det(*circle, 0.5, 0.2), det(*square, 0.5, 0.7)]) == "right"
    assert pair_verdict(spec, [det(*circle, 0.5, 0.7), det(*square, 0.5, 0.2)]) == "swapped"
    assert pair_verdict(spec, [det(*circle, 0.2, 0.45), det(*square, 0.8, 0.5)]) == "other axis"
    assert pair_verdict(spec, [det(*circle, 0.5, 0.47), det(*square, 0.5, 0.5)]) == "too close"
    assert pair_verdict(spec, [det("green", "circle", 0.5, 0.2), det(*square, 0.5, 0.7)]) == "object wrong or missing"
    assert pair_verdict(spec, [det(*square, 0.5, 0.7)]) == "object wrong or missing"
    # a second square that makes the relation hold is enough, as in the position category
    assert pair_verdict(spec, [det(*circle, 0.5, 0.7), det(*square, 0.5, 0.2), det(*square, 0.5, 0.9)]) == "right"


def test_drawn_layouts_measure_the_distance_from_the_diagonal():
    spec = parse_caption("a red circle above a blue square")
    circle, square = ("red", "circle"), ("blue", "square")
    # 0.5 down and 0.1 across: 0.2 of the way to the diagonal; the likelier of two squares is the one measured
    dets = [det(*circle, 0.5, 0.2), det(*square, 0.6, 0.7, score=0.9), det(*square, 0.9, 0.3, score=0.4)]
    assert abs(drawn_layout(spec, dets) - 0.2) < 1e-9
    assert abs(drawn_layout(spec, [det(*circle, 0.2, 0.2), det(*square, 0.8, 0.5)]) - 2.0) < 1e-9
    assert drawn_layout(spec, [det(*circle, 0.5, 0.2)]) is None
    assert layout_summary([0.2, 0.5, 0.9, 1.5]) == "median 0.700, above 0.8: 50.0%, past the diagonal: 25.0%"

