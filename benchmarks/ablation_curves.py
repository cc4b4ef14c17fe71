"""Issue 11's ablation curves: accuracy against training steps, one line per run, from relations_ablation.py's JSONL.

    PYTHONPATH=src python benchmarks/ablation_curves.py "base, run 1=A/capacity-base.jsonl" \
        "wide, run 1=A/capacity-wide.jsonl" ... --out benchmarks/capacity_curves.png \
        [--measure pair:whole_prompt --measure count:count]

Each argument is LABEL=FILE (a file ``recipes/default/relations_ablation.py --out`` wrote: one JSON line per
evaluation and guidance scale). One panel per guidance scale found and per ``--measure`` (KIND:CHECK, e.g. the pair
prompts' whole-prompt accuracy or the count prompts' count check; default both), side by side, accuracy in % against
the step; matplotlib draws it (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from estable.evaluation.plot import Panel, Series, line_plot

NAMES = {"whole_prompt": "whole prompt", "count": "count", "position": "position", "object_present": "objects"}


def read_runs(specs: list[str]) -> dict[str, list[dict]]:
    """LABEL=FILE arguments → {label: the file's evaluations in step order}."""
    runs = {}
    for spec in specs:
        label, sep, file = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"ablation_curves.py: {spec!r} is not LABEL=FILE")
        rows = [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]
        if not rows:
            raise SystemExit(f"ablation_curves.py: {file} holds no evaluations")
        runs[label] = sorted(rows, key=lambda r: (r["step"], r["cfg"]))
    return runs


def panels(runs: dict[str, list[dict]], measures: list[str]) -> list[Panel]:
    """One panel per (guidance scale, measure), each with one series per run."""
    scales = sorted({r["cfg"] for rows in runs.values() for r in rows})
    out = []
    for cfg in scales:
        for measure in measures:
            kind, check = measure.split(":")
            panel = Panel(f"{kind} prompts, {NAMES.get(check, check)}, CFG {cfg:g}", "training step", "accuracy (%)",
                          ylim=(0.0, 100.0))
            for label, rows in runs.items():
                at = [r for r in rows if r["cfg"] == cfg and kind in r["by_kind"]]
                values = [r["by_kind"][kind].get(check) for r in at]
                panel.series.append(Series(label, [r["step"] for r in at],
                                           [None if v is None else 100 * v for v in values]))
            out.append(panel)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=FILE")
    ap.add_argument("--measure", action="append", metavar="KIND:CHECK",
                    help="prompt kind and check to plot (repeatable; default pair:whole_prompt and count:count)")
    ap.add_argument("--out", required=True, help="the image to write (.png, .svg, .pdf)")
    args = ap.parse_args()
    measures = args.measure or ["pair:whole_prompt", "count:count"]
    for m in measures:
        if m.count(":") != 1:
            raise SystemExit(f"ablation_curves.py: --measure {m!r} is not KIND:CHECK")
    print(f"wrote {line_plot(panels(read_runs(args.runs), measures), args.out, panel_size=(400, 330))}")


if __name__ == "__main__":
    main()
