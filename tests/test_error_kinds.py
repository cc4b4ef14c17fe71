"""benchmarks/error_kinds.py's verdicts on hand-made detections: each kind of count and pair error is told apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from estable.evaluation.judge import Detection
from estable.training.shapes import parse_caption

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import error_kinds  # noqa: E402
from error_kinds import count_verdict, drawn_layout, held_out, layout_summary, pair_verdict  # noqa: E402


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



def test_a_saved_run_is_summarised_from_its_detections(tmp_path, capsys, monkeypatch):
    prompts = held_out("pair", 2)
    rows = []
    for p in prompts:  # per prompt: one image right on the asked axis, one with the objects across it
        a, b = p.spec.objects
        horizontal = p.spec.relation in ("left of", "right of")
        sign = 1 if p.spec.relation in ("right of", "below") else -1
        first = (0.5 + 0.3 * sign, 0.5) if horizontal else (0.5, 0.5 + 0.3 * sign)
        across = (0.5, 0.5 + 0.3) if horizontal else (0.5 + 0.3, 0.5)
        for centre in (first, across):
            dets = [det(a.colour, a.shape, *centre), det(b.colour, b.shape, 0.5, 0.5)]
            rows.append({"prompt": p.caption, "seed": 0, "verdict": pair_verdict(p.spec, dets),
                         "detections": [[d.shape, d.colour, list(d.center), d.score] for d in dets]})
    saved = tmp_path / "errors.json"
    saved.write_text(json.dumps({"model": "m", "kind": "pair", "cfg": 3.5, "images": rows}))
    monkeypatch.setattr(sys, "argv", ["error_kinds.py", "--summary-of", str(saved)])
    error_kinds.main()
    out = capsys.readouterr().out
    # half the layouts on the axis (ratio 0), half across it (no offset along: past the diagonal)
    assert "drawn (4 images with both objects) median " in out and "past the diagonal: 50.0%" in out
    assert "| all | 4 | 2 | 2 |" in out and "| relation | images | other axis | right |" in out
    with pytest.raises(ValueError, match="two per prompt"):
        error_kinds.report("pair", prompts, rows[:3])


def test_paraphrased_prompts_ask_the_same_scenes_in_held_out_words(tmp_path, capsys, monkeypatch):
    plain, said = held_out("pair", 6), held_out("pair", 6, paraphrased=True)
    assert [p.spec for p in said] == [p.spec for p in plain] and [p.index for p in said] == [p.index for p in plain]
    held_out_words = ("on top of", "beneath", "on the left of", "on the right of")
    assert all(any(w in p.caption for w in held_out_words) for p in said)
    assert not any(any(w in p.caption for w in held_out_words) for p in plain)
    # a saved paraphrased run is read back against the paraphrased prompts (its captions would not match otherwise)
    rows = [{"prompt": p.caption, "seed": 0, "verdict": "object wrong or missing", "detections": []}
            for p in said[:2] for _ in range(2)]
    saved = tmp_path / "errors.json"
    saved.write_text(json.dumps({"model": "m", "kind": "pair", "cfg": 3.5, "paraphrased": True, "images": rows}))
    monkeypatch.setattr(sys, "argv", ["error_kinds.py", "--summary-of", str(saved)])
    error_kinds.main()
    out = capsys.readouterr().out
    assert "| all | 4 | 4 |" in out and "drawn (0 images with both objects) none;" in out
    monkeypatch.setattr(sys, "argv", ["error_kinds.py", "m", "--kind", "count", "--paraphrased", "--out", "x"])
    with pytest.raises(SystemExit):
        error_kinds.main()
