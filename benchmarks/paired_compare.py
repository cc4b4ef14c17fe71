"""Two models' compositional reports compared image by image (the same prompts and seeds in both).

    python benchmarks/paired_compare.py A.json B.json [--kind pair] [--check position ...]

A and B are `estable eval compositional --out` files of one protocol (same prompts, images per prompt and seed).
For each check (default: every check the reports hold) the images where only A is right and where only B is right
are counted; z = (B-only − A-only) / sqrt(A-only + B-only) is McNemar's statistic for paired verdicts. It measures
the evaluation's noise on these prompts and seeds only: two training runs of one recipe differ by more than that.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def verdicts(report: dict) -> dict[tuple[int, int], tuple[str, dict]]:
    """(prompt index, image index) → (prompt kind, that image's verdicts)."""
    return {(p["index"], i): (p["kind"], image)
            for p in report["per_prompt"] for i, image in enumerate(p["images"])}


def compare(a: dict, b: dict, check: str, kind: str | None = None) -> dict:
    va, vb = verdicts(a), verdicts(b)
    if va.keys() != vb.keys():
        raise ValueError("the two reports do not hold the same prompts and images")
    a_only = b_only = images = 0
    for key, (k, image) in va.items():
        if (kind is not None and k != kind) or check not in image:
            continue
        images += 1
        x, y = image[check], vb[key][1][check]
        a_only += x and not y
        b_only += y and not x
    z = (b_only - a_only) / math.sqrt(a_only + b_only) if a_only + b_only else 0.0
    return {"check": check, "kind": kind, "images": images, "a_only": a_only, "b_only": b_only, "z": z}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--kind", action="append", help="prompt kinds to compare within (repeatable; default: all)")
    ap.add_argument("--check", action="append", help="checks to compare (repeatable; default: all)")
    args = ap.parse_args(argv)
    a, b = (json.loads(p.read_text()) for p in (args.a, args.b))
    checks = args.check or sorted({c for _, (_, image) in verdicts(a).items() for c in image})
    print(f"{'kind':<15} {'check':<15} {'images':>6} {'A only':>7} {'B only':>7} {'z':>6}")
    for kind in args.kind or [None]:
        for check in checks:
            r = compare(a, b, check, kind)
            if r["images"]:
                print(f"{kind or 'all':<15} {check:<15} {r['images']:>6} {r['a_only']:>7} {r['b_only']:>7} "
                      f"{r['z']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
