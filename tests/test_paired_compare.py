"""benchmarks/paired_compare.py on hand-made reports: images right in one report only are counted per check and kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paired_compare import compare, main  # noqa: E402


def report(count_verdicts: list[bool], position_verdicts: list[bool]) -> dict:
    return {"per_prompt": [
        {"index": 0, "kind": "count", "images": [{"count": v, "whole_prompt": v} for v in count_verdicts]},
        {"index": 1, "kind": "pair", "images": [{"position": v, "whole_prompt": v} for v in position_verdicts]},
    ]}


def test_counts_each_side_and_the_statistic():
    a = report([True, True, False, False], [True, False, True, False])
    b = report([True, False, True, True], [True, False, True, False])
    r = compare(a, b, "count")
    assert (r["images"], r["a_only"], r["b_only"]) == (4, 1, 2)
    assert r["z"] == pytest.approx(1 / 3 ** 0.5)
    assert compare(a, b, "position")["z"] == 0.0  # the same verdicts on every image
    whole = compare(a, b, "whole_prompt", kind="count")
    assert (whole["images"], whole["a_only"], whole["b_only"]) == (4, 1, 2)
    assert compare(a, b, "whole_prompt")["images"] == 8


def test_reports_of_other_prompts_are_refused(tmp_path, capsys):
    a, b = report([True], [True]), report([True, False], [True])
    with pytest.raises(ValueError, match="same prompts"):
        compare(a, b, "count")
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(report([False], [True])))
    assert main([str(pa), str(pb), "--check", "count"]) == 0
    assert "count" in capsys.readouterr().out
