"""What `data.shapes_relation_axis_ratio` changes in the training pairs' layouts (issue 11, part 9).

    PYTHONPATH=src python benchmarks/pair_layouts.py --ratios 1,1.5 --layouts 20

For the held-out pair prompts of the compositional evaluation (``make_prompts(500)``), ``--layouts`` layouts each
(``scene_from_prompt``, seed 0) per ratio: the offset across the relation's axis over the offset along it, the
distance between the two centres, each object's distance to the nearest edge, its radius per size word and the two
objects' overlap (of the smaller one's area). Medians, and the share of objects within 0.15 of an edge.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
from error_kinds import across_over_along  # benchmarks/error_kinds.py, beside this file

from estable.evaluation.compositional import make_prompts
from estable.training.shapes.layout import overlap_fraction, scene_from_prompt


def layout_stats(specs: list, layouts: int, ratio: float, seed: int = 0) -> dict[str, float]:
    """Medians (and shares) of the pair layouts of ``specs`` at ``ratio``, ``layouts`` each."""
    rng = np.random.default_rng(seed)
    across, distance, edge, overlap = [], [], [], []
    radius: dict[str, list[float]] = collections.defaultdict(list)
    for spec in specs:
        for _ in range(layouts):
            a, b = scene_from_prompt(spec, rng, axis_ratio=ratio).objects
            across.append(across_over_along(spec.relation, a.center, b.center))
            distance.append(float(np.hypot(b.center[0] - a.center[0], b.center[1] - a.center[1])))
            overlap.append(overlap_fraction(a, b))
            for o in (a, b):
                edge.append(min(o.center[0], o.center[1], 1 - o.center[0], 1 - o.center[1]))
                radius[o.size].append(o.radius)
    stats = {"across / along": float(np.median(across)), "max across / along": float(np.max(across)),
             "centre distance": float(np.median(distance)), "edge distance": float(np.median(edge)),
             "within 0.15 of an edge": float(np.mean(np.asarray(edge) < 0.15)),
             "overlapping": float(np.mean(np.asarray(overlap) > 0))}
    stats.update({f"radius, {size}": float(np.median(r)) for size, r in sorted(radius.items())})
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="1,1.5", help="comma-separated axis ratios")
    ap.add_argument("--layouts", type=int, default=20, help="layouts per prompt")
    args = ap.parse_args()
    specs = [p.spec for p in make_prompts(500) if p.kind == "pair"]
    ratios = [float(r) for r in args.ratios.split(",")]
    table = {r: layout_stats(specs, args.layouts, r) for r in ratios}
    print(f"{len(specs)} held-out pair prompts × {args.layouts} layouts")
    print("| measure | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for key in table[ratios[0]]:
        print(f"| {key} | " + " | ".join(f"{table[r][key]:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
