"""What goes wrong in count and pair prompts (issue 11): for counts, too many objects, too few, or a shape drawn
as another shape; for pairs, an object wrong or missing, the two swapped, placed along the other axis, or too close.

    PYTHONPATH=src python benchmarks/error_kinds.py default --kind count --prompts 40 --out runs/count_errors
    PYTHONPATH=src python benchmarks/error_kinds.py default --kind pair --prompts 40 --out runs/pair_errors
    PYTHONPATH=src python benchmarks/error_kinds.py default --kind pair --paraphrased --prompts 40 --out runs/p

``--paraphrased`` says the pair prompts with the paraphrase test's held-out relation words ("on top of", "beneath",
"on the left of", "on the right of"): the same scenes asked and the same seeds as without it, so images pair up.

The first ``--prompts`` prompts of that kind in the compositional evaluation's held-out set (``make_prompts(500)``),
two images each with that evaluation's seeds, 25 steps of DPM++ 2M Karras at the model's guidance scale, read by the
shipped judge. Count images are split by (asked, found of the asked shape, found of other shapes) — the count
category scores "found of the asked shape = asked". A pair image is right when some two detections have the asked
shapes and colours and the relation holds (the position category); otherwise its error is, in this order: an
object wrong or missing (no two detections with the asked shapes and colours), swapped (the relation holds with the
objects' roles exchanged), other axis (the offset is mostly along the other axis), or too close (the right
direction, under the relation margin). For pairs it also prints how far from the diagonal the layouts are — the
offset across the relation's axis over the offset along it, for the images with both objects found, against the
same prompts' layouts in the world (10 each, ``scene_from_prompt``): 1 is the diagonal, the judge's line. Writes
``OUT/errors.json`` (every image's detections and verdict) and ``OUT/errors.png`` (up to 4 wrong images of each
error, the commonest first, 8 at most). ``--summary-of OUT/errors.json`` prints the table and the layout line of a
run already made (its detections' centres as saved, to 3 decimals), generating nothing.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from estable.evaluation.compositional import image_seed, make_prompts
from estable.evaluation.judge import Detection, load_default_judge
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.shapes.layout import scene_from_prompt
from estable.training.shapes.scene import PromptSpec, relation_holds
from estable.training.shapes.vocab import RELATION_MARGIN

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def count_verdict(spec: PromptSpec, dets: list[Detection]) -> str:
    same = sum(d.shape == spec.objects[0].shape for d in dets)
    if same == spec.count:
        return "right"
    if same > spec.count:
        return "too many"
    return "too few, another shape found" if len(dets) > same else "too few, missing"


def asked_pairs(spec: PromptSpec, dets: list[Detection]) -> list[tuple[Detection, Detection]]:
    """Every two detections with the shapes and colours of the pair's first and second object."""
    a, b = spec.objects
    return [(p, q) for p, q in itertools.permutations(dets, 2)
            if (p.shape, p.colour) == (a.shape, a.colour) and (q.shape, q.colour) == (b.shape, b.colour)]


def likeliest(pairs: list[tuple[Detection, Detection]]) -> tuple[Detection, Detection]:
    return max(pairs, key=lambda pq: pq[0].score * pq[1].score)


def pair_verdict(spec: PromptSpec, dets: list[Detection], margin: float = RELATION_MARGIN) -> str:
    assert spec.relation is not None
    pairs = asked_pairs(spec, dets)
    if not pairs:
        return "object wrong or missing"
    if any(relation_holds(p.center, q.center, spec.relation, margin) for p, q in pairs):
        return "right"
    p, q = likeliest(pairs)
    if relation_holds(p.center, q.center, OPPOSITE[spec.relation], margin):
        return "swapped"
    dx, dy = q.center[0] - p.center[0], q.center[1] - p.center[1]
    horizontal = spec.relation in ("left of", "right of")
    if (abs(dy) > abs(dx)) if horizontal else (abs(dx) > abs(dy)):
        return "other axis"
    return "too close"


def across_over_along(relation: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """The offset between centres a and b across the relation's axis over the offset along it (1: the diagonal)."""
    dx, dy = abs(b[0] - a[0]), abs(b[1] - a[1])
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    return across / max(along, 1e-9)


def drawn_layout(spec: PromptSpec, dets: list[Detection]) -> float | None:
    """``across_over_along`` of the likeliest two detections with the asked shapes and colours (None: not both)."""
    pairs = asked_pairs(spec, dets)
    if not pairs:
        return None
    p, q = likeliest(pairs)
    return across_over_along(spec.relation, p.center, q.center)


def layout_summary(ratios: list[float]) -> str:
    if not ratios:
        return "none"
    r = np.asarray(ratios)
    return f"median {np.median(r):.3f}, above 0.8: {(r > 0.8).mean():.1%}, past the diagonal: {(r > 1).mean():.1%}"


def detections_of(row: dict) -> list[Detection]:
    """A saved image's detections (``errors.json``'s rows) as the judge's ``Detection`` (its size word not saved)."""
    return [Detection(colour=c, shape=s, size="", center=(x, y), score=score)
            for s, c, (x, y), score in row["detections"]]


def report(kind: str, prompts: list, rows: list[dict]) -> None:
    """Print the verdicts per count or relation and, for pairs, the layout line (``rows``: two images per prompt)."""
    asked = [p for p in prompts for _ in range(2)]  # the prompt of each image
    if [r["prompt"] for r in rows] != [p.caption for p in asked]:
        raise ValueError("the images are not two per prompt of the evaluation's held-out prompts, in order")
    table = collections.Counter((p.spec.count if kind == "count" else p.spec.relation, r["verdict"])
                                for p, r in zip(asked, rows))
    if kind == "pair":
        drawn = [d for d in (drawn_layout(p.spec, detections_of(r)) for p, r in zip(asked, rows)) if d is not None]
        rng = np.random.default_rng(0)
        world = [across_over_along(p.spec.relation, *(o.center for o in scene_from_prompt(p.spec, rng).objects))
                 for p in prompts for _ in range(10)]
        print(f"layouts, across the relation's axis over along it: drawn ({len(drawn)} images with both objects) "
              f"{layout_summary(drawn)}; the world's ({len(world)}) {layout_summary(world)}")
    verdicts = sorted({v for _, v in table})
    print(f"| {'asked' if kind == 'count' else 'relation'} | images | " + " | ".join(verdicts) + " |")
    print("|---|---|" + "---|" * len(verdicts))
    for group in sorted({g for g, _ in table}, key=str):
        n = sum(c for (g, _), c in table.items() if g == group)
        print(f"| {group} | {n} | " + " | ".join(str(table[(group, v)]) for v in verdicts) + " |")
    print(f"| all | {len(rows)} | " + " | ".join(str(sum(c for (_, vv), c in table.items() if vv == v))
                                             for v in verdicts) + " |")


def held_out(kind: str, n: int, paraphrased: bool = False) -> list:
    return [p for p in make_prompts(500, paraphrased=paraphrased) if p.kind == kind][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--kind", choices=("count", "pair"), default="count")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--paraphrased", action="store_true",
                    help="pair prompts said with the paraphrase test's held-out relation words (\"on top of\", ...)")
    ap.add_argument("--cfg", type=float, help="guidance scale (default: the model's recommended one, else 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary-of", type=Path, metavar="ERRORS_JSON",
                    help="print the table and layout line of a saved run's errors.json instead of generating")
    args = ap.parse_args()
    if args.summary_of is not None:
        saved = json.loads(args.summary_of.read_text())
        print(f"{saved['model']}, {saved['kind']} prompts, CFG {saved['cfg']}")
        report(saved["kind"], held_out(saved["kind"], len(saved["images"]) // 2, saved.get("paraphrased", False)),
               saved["images"])
        return
    if args.model is None or args.out is None:
        ap.error("a model and --out are needed (or --summary-of a saved errors.json)")
    if args.paraphrased and args.kind != "pair":
        ap.error("--paraphrased says pair prompts' relations in other words; use it with --kind pair")
    pipe = load_pipeline(args.model, device=args.device)
    judge = load_default_judge(args.device)
    cfg = args.cfg if args.cfg is not None else float(pipe.config.default_cfg or 5.0)
    verdict = count_verdict if args.kind == "count" else pair_verdict
    prompts = held_out(args.kind, args.prompts, args.paraphrased)
    rows, wrong = [], []
    for p in prompts:
        for k in range(2):
            seed = image_seed(p.index, k, 0, 4)
            with torch.inference_mode():
                image = pipe.txt2img(GenerationParams(prompt=p.caption, seed=seed, steps=25, cfg_scale=cfg)).images[0]
            dets = judge.detect([image])[0]
            v = verdict(p.spec, dets)
            rows.append({"prompt": p.caption, "seed": seed, "verdict": v,
                         "detections": [[d.shape, d.colour, [round(c, 3) for c in d.center], round(float(d.score), 3)]
                                        for d in dets]})
            if v != "right":
                wrong.append((v, image))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "errors.json").write_text(json.dumps({"model": args.model, "kind": args.kind, "cfg": cfg,
                                                      "paraphrased": args.paraphrased, "images": rows}, indent=1))
    # up to 4 images of each error, the commonest error first, 8 at most
    by_verdict = collections.defaultdict(list)
    for v, im in wrong:
        by_verdict[v].append(im)
    shown = [(v, im) for v in sorted(by_verdict, key=lambda v: -len(by_verdict[v])) for im in by_verdict[v][:4]][:8]
    if shown:
        side = shown[0][1].width
        grid = Image.new("RGB", (side * min(4, len(shown)), side * ((len(shown) + 3) // 4)))
        for i, (_, im) in enumerate(shown):
            grid.paste(im, ((i % 4) * side, (i // 4) * side))
        grid.save(args.out / "errors.png")
        print("errors.png, in order: " + ", ".join(v for v, _ in shown))
    report(args.kind, prompts, rows)


if __name__ == "__main__":
    main()
