"""benchmarks/ablation_curves.py: relations_ablation.py's JSONL lines become one panel per scale and measure, one
line per run, in step order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ablation_curves import panels, read_runs  # noqa: E402


def write_run(path: Path, rows: list[tuple[int, float, float, float]]) -> str:
    """(step, cfg, pair whole prompt, count check) per line, out of order as a resumed run may append them."""
    lines = [json.dumps({"step": s, "cfg": c, "by_kind": {"pair": {"whole_prompt": p}, "count": {"count": n}}})
             for s, c, p, n in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_panels_per_scale_and_measure_with_runs_in_step_order(tmp_path):
    a = write_run(tmp_path / "a.jsonl", [(3000, 3.5, 0.5, 0.25), (1500, 3.5, 0.1, 0.2), (1500, 1.0, 0.0, 0.05)])
    b = write_run(tmp_path / "b.jsonl", [(1500, 3.5, 0.2, 0.3)])
    runs = read_runs([f"arm a=run 1={a}", f"b={b}"])  # the label may hold '='; the file is after the last one
    assert list(runs) == ["arm a=run 1", "b"]
    got = panels(runs, ["pair:whole_prompt", "count:count"])
    assert [p.title for p in got] == ["pair prompts, whole prompt, CFG 1", "count prompts, count, CFG 1",
                                      "pair prompts, whole prompt, CFG 3.5", "count prompts, count, CFG 3.5"]
    pair35 = got[2].series
    assert [s.label for s in pair35] == ["arm a=run 1", "b"]
    assert list(pair35[0].x) == [1500, 3000] and list(pair35[0].y) == pytest.approx([10.0, 50.0])
    assert list(pair35[1].x) == [1500] and list(pair35[1].y) == pytest.approx([20.0])
    assert list(got[0].series[1].x) == []  # run b was not scored at CFG 1


def test_the_script_writes_the_figure_and_rejects_bad_arguments(tmp_path, monkeypatch, capsys):
    import ablation_curves

    a = write_run(tmp_path / "a.jsonl", [(100, 1.0, 0.1, 0.2), (200, 1.0, 0.3, 0.4)])
    out = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["ablation_curves.py", f"a={a}", "--out", str(out)])
    ablation_curves.main()
    with Image.open(out) as im:
        assert im.size == (800, 330)  # two panels (one scale × two measures) of 400 × 330
    for argv in ([str(a), "--out", str(out)], [f"a={a}", "--measure", "pair", "--out", str(out)]):
        monkeypatch.setattr(sys, "argv", ["ablation_curves.py", *argv])
        with pytest.raises(SystemExit):
            ablation_curves.main()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no evaluations"):
        read_runs([f"e={tmp_path / 'empty.jsonl'}"])
