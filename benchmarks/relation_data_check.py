"""Do the training captions' relations hold in the training pixels? (issue 11, the data candidate)

    PYTHONPATH=src python benchmarks/relation_data_check.py --count 2000

Pair scenes of the shapes world's train split (seed 0, the training default; part 3 of the U-Net used 12), at 256²:
the caption is parsed back (it may read the pair from either end, with the inverse relation), and the relation is
tested on the pixel centroids of the two named objects' colours, with half the margin the world lays scenes out with
(an overlapping object hides part of the other and moves its pixel centroid a little). Pairs of one colour, or with
a background of an object's colour, are skipped (their pixels cannot be told apart by colour).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from estable.training.shapes import COLOURS, RELATION_MARGIN, ShapesWorld, parse_caption, relation_holds


def centroid(arr: np.ndarray, rgb: tuple[int, int, int]) -> tuple[float, float] | None:
    mask = (np.abs(arr.astype(np.int16) - np.array(rgb, np.int16)).sum(-1) < 24)
    if mask.sum() < 20:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean() / arr.shape[1]), float(ys.mean() / arr.shape[0])  # (x, y), y down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000, help="pair scenes to check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    world = ShapesWorld(seed=args.seed, size=256)
    held, checked, skipped = collections.Counter(), collections.Counter(), 0
    index = 0
    while sum(checked.values()) + skipped < args.count:
        scene = world.scene(index)
        index += 1
        if scene.kind != "pair":
            continue
        image, caption, _ = world.sample(index - 1)
        spec = parse_caption(caption)
        a, b = spec.objects
        bg = spec.background.colour if spec.background is not None else None
        if a.colour == b.colour or bg in (a.colour, b.colour):
            skipped += 1
            continue
        arr = np.asarray(image.convert("RGB"))
        ca, cb = centroid(arr, COLOURS[a.colour]), centroid(arr, COLOURS[b.colour])
        if ca is None or cb is None:
            skipped += 1
            continue
        checked[spec.relation] += 1
        held[spec.relation] += relation_holds(ca, cb, spec.relation, RELATION_MARGIN * 0.5)
    for rel in sorted(checked):
        print(f"{rel:>10s}: caption holds in the pixels for {held[rel]}/{checked[rel]} "
              f"({100 * held[rel] / checked[rel]:.1f} %)")
    total = sum(checked.values())
    print(f"all: {sum(held.values())}/{total} ({100 * sum(held.values()) / total:.1f} %); {skipped} skipped; "
          f"{index} scenes drawn")


if __name__ == "__main__":
    main()
