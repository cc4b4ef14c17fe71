"""What goes wrong in count prompts (issue 11): too many objects, too few, or a shape drawn as another shape?

    PYTHONPATH=src python benchmarks/count_errors.py default --prompts 40 --out runs/count_errors

The first ``--prompts`` count prompts of the compositional evaluation's held-out set (``make_prompts(500)``), two
images each with that evaluation's seeds, 25 steps of DPM++ 2M Karras at the model's guidance scale. For each image
the shipped judge's detections are split into objects of the asked shape and of other shapes; the table counts
images by (asked, found of the asked shape, found of other shapes). ``found == asked`` is what the evaluation's
count category scores. Writes ``OUT/count_errors.json`` (every image's detections) and ``OUT/count_errors.png``
(up to 8 wrong images: too many first, then too few).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from PIL import Image

from estable.evaluation.compositional import image_seed, make_prompts
from estable.evaluation.judge import load_default_judge
from estable.params import GenerationParams
from estable.pipeline import load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pipe = load_pipeline(args.model, device=args.device)
    judge = load_default_judge(args.device)
    cfg = float(pipe.config.default_cfg or 5.0)
    prompts = [p for p in make_prompts(500) if p.kind == "count"][: args.prompts]
    table: collections.Counter = collections.Counter()
    rows, wrong = [], {"too many": [], "too few": []}
    for p in prompts:
        want = p.spec.objects[0]
        for k in range(2):
            seed = image_seed(p.index, k, 0, 4)
            with torch.inference_mode():
                image = pipe.txt2img(GenerationParams(prompt=p.caption, seed=seed, steps=25, cfg_scale=cfg)).images[0]
            dets = judge.detect([image])[0]
            same = sum(d.shape == want.shape for d in dets)
            table[(p.spec.count, same, len(dets) - same)] += 1
            rows.append({"prompt": p.caption, "seed": seed, "asked": p.spec.count, "asked_shape": same,
                         "other_shapes": len(dets) - same,
                         "detections": [[d.shape, d.colour, round(float(d.score), 3)] for d in dets]})
            if same != p.spec.count:
                wrong["too many" if same > p.spec.count else "too few"].append(image)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "count_errors.json").write_text(json.dumps({"model": args.model, "cfg": cfg, "images": rows}, indent=1))
    shown = (wrong["too many"][:4] + wrong["too few"])[:8]
    if shown:
        side = shown[0].width
        grid = Image.new("RGB", (side * min(4, len(shown)), side * ((len(shown) + 3) // 4)))
        for i, im in enumerate(shown):
            grid.paste(im, ((i % 4) * side, (i // 4) * side))
        grid.save(args.out / "count_errors.png")
    print("| asked | found, asked shape | found, other shapes | images |\n|---|---|---|---|")
    for (asked, same, other), n in sorted(table.items()):
        print(f"| {asked} | {same} | {other} | {n} |")
    for asked in sorted({r["asked"] for r in rows}):
        mine = [r for r in rows if r["asked"] == asked]
        print(f"asked {asked}: {len(mine)} images, right {sum(r['asked_shape'] == asked for r in mine)}, too many "
              f"{sum(r['asked_shape'] > asked for r in mine)}, too few {sum(r['asked_shape'] < asked for r in mine)} "
              f"(of which with another shape found: "
              f"{sum(r['asked_shape'] < asked and r['other_shapes'] > 0 for r in mine)})")


if __name__ == "__main__":
    main()
