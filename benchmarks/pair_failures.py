"""What the built-in model gets wrong on pair prompts: for each named object the judge does not find (with its colour
and shape), whether an object of its colour was drawn as another shape, of its shape in another colour, or neither.

    PYTHONPATH=src python benchmarks/pair_failures.py [MODEL] --cfg 1 --cfg 4 --prompts 150 [--device cpu] [--out F]

The held-out pair prompts and seeds of ``estable eval compositional --kinds pair --images-per-prompt 1``, 25 steps
of DPM++ 2M Karras (the evaluations' protocol; ``--sampler`` for another), scored by the shipped judge. Prints, per
guidance scale, how many images have an object wrong, what happened to each missed object, how many objects the
judge saw per image, the commonest shape confusions ("star drawn as diamond": the star's colour is there, on
another shape), and the objects asked and missed per shape and per size word ("-": none).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from estable.evaluation.compositional import image_seed, make_prompts, score_image
from estable.evaluation.judge import Detection, load_default_judge
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.shapes.captions import PromptSpec, parse_caption


def missed_objects(spec: PromptSpec, detections: list[Detection]) -> list[tuple[str, str, str | None]]:
    """(the object's shape, what happened, the shape drawn instead) for each object of ``spec`` whose colour and
    shape no detection has."""
    seen = [(d.colour, d.shape) for d in detections]
    out: list[tuple[str, str, str | None]] = []
    for o in spec.objects:
        if (o.colour, o.shape) in seen:
            continue
        instead = [shape for colour, shape in seen if colour == o.colour]
        if instead:
            out.append((o.shape, "right colour, wrong shape", instead[0]))
        elif any(shape == o.shape for _, shape in seen):
            out.append((o.shape, "right shape, wrong colour", None))
        else:
            out.append((o.shape, "missing", None))
    return out


def object_tally(specs: list[PromptSpec], detections: list[list[Detection]]) -> dict[str, dict[str, list[int]]]:
    """{"shape": {shape: [asked, missed]}, "size": {size word or "-": [asked, missed]}} over the named objects; an
    object is missed when no detection has its colour and shape."""
    asked: Counter = Counter()
    missed: Counter = Counter()
    for spec, found in zip(specs, detections):
        seen = {(d.colour, d.shape) for d in found}
        for o in spec.objects:
            keys = [("shape", o.shape), ("size", o.size or "-")]
            asked.update(keys)
            if (o.colour, o.shape) not in seen:
                missed.update(keys)
    return {axis: {name: [asked[(a, name)], missed[(a, name)]] for a, name in sorted(asked) if a == axis}
            for axis in ("shape", "size")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--cfg", type=float, action="append", help="guidance scale (repeatable; default 1 and 4)")
    ap.add_argument("--prompts", type=int, default=150)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m_karras")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="also write the tallies as JSON")
    args = ap.parse_args()
    prompts = make_prompts(args.prompts, mix={"pair": 1.0})
    specs = [parse_caption(p.caption) for p in prompts]
    seeds = [image_seed(p.index, 0, 0, 1) for p in prompts]
    judge = load_default_judge(args.device)
    pipe = load_pipeline(args.model, device=args.device)
    rows = []
    for cfg in args.cfg or [1.0, 4.0]:
        base = GenerationParams(steps=args.steps, cfg_scale=cfg, sampler=args.sampler)
        images = pipe.txt2img_each([p.caption for p in prompts], seeds, base, batch=32 if args.device == "cuda" else 8)
        what, confusions, per_image = Counter(), Counter(), Counter()
        wrong = 0
        detections = judge.detect(images)
        for spec, found in zip(specs, detections):
            per_image[len(found)] += 1
            if score_image(spec, found)["colour_binding"]:
                continue
            wrong += 1
            for shape, kind, instead in missed_objects(spec, found):
                what[kind] += 1
                if instead is not None:
                    confusions[f"{shape} drawn as {instead}"] += 1
        per = object_tally(specs, detections)
        row = {"cfg": cfg, "sampler": args.sampler, "images": len(prompts), "objects_wrong": wrong,
               "missed": dict(what), "detections_per_image": dict(sorted(per_image.items())),
               "confusions": confusions.most_common(), "asked_missed": per}
        rows.append(row)
        print(f"CFG {cfg:g}: {wrong} of {len(prompts)} images with an object wrong; missed objects: {dict(what)}; "
              f"objects seen per image: {row['detections_per_image']}", flush=True)
        print("  commonest confusions:", ", ".join(f"{k} {n}" for k, n in confusions.most_common(10)), flush=True)
        for axis, tally in per.items():
            print(f"  missed of asked, per {axis}:", ", ".join(f"{k} {m}/{n}" for k, (n, m) in tally.items()),
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
