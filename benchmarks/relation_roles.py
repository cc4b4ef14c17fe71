"""Does the order of the objects in the prompt decide which one goes where? (issue 11, the roles)

    PYTHONPATH=src python benchmarks/relation_roles.py default [OTHER_MODEL …] --seeds 16 [--cfg 5] [--swapped-negative]

For each seed and each of "above" and "to the left of", two prompts with the same words in the two orders, "a red
circle R a blue square" and "a blue square R a red circle", from the same initial noise (25 steps DPM++ 2M Karras,
256², fp32, CPU unless ``--device``). The red and blue centres are measured as in relation_layout.py. A model that
reads the roles puts red first in one image and blue first in the other (the arrangement flips with the order); a
model that reads the prompt as a bag of words draws the same arrangement for both. Per model: how often each prompt
is right, and how often the red-blue order along the relation's axis flips between the two prompts of a seed.

``--swapped-negative`` gives each prompt the other order as its negative prompt, so that guidance amplifies only
what the model does differently for the two orders: a diagnostic of whether any role information reaches the
U-Net's output at all, however weakly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from relation_layout import centre  # benchmarks/ is on the path when this script runs

from estable.params import GenerationParams
from estable.pipeline import load_pipeline

RELATIONS = {"above": 0, "to the left of": 1}  # the axis: 0 = vertical (y), 1 = horizontal (x)


def measure(src: str, seeds: list[int], cfg: float | None, swapped_negative: bool = False,
            device: str = "cpu") -> dict:
    pipe = load_pipeline(src, device=device, dtype="fp32")
    cfg = cfg or pipe.config.default_cfg or 5.0
    out: dict[str, dict[str, list[int]]] = {}
    for rel, axis in RELATIONS.items():
        counts = {"red_first_right": [0, 0], "blue_first_right": [0, 0], "flips": [0, 0]}
        for seed in seeds:
            red_first_before = []  # per prompt: is red before blue along the axis (above / left of)?
            for first, second, colour in (("red circle", "blue square", "red"), ("blue square", "red circle", "blue")):
                negative = f"a {second} {rel} a {first}" if swapped_negative else ""
                params = GenerationParams(prompt=f"a {first} {rel} a {second}", negative_prompt=negative, steps=25,
                                          cfg_scale=cfg,
                                          sampler="dpmpp_2m_karras", seed=seed, width=256, height=256)
                arr = np.asarray(pipe.txt2img(params).images[0].convert("RGB"))
                r, b = centre(arr, "red"), centre(arr, "blue")
                if r is None or b is None:
                    break
                red_before = r[axis] < b[axis]
                red_first_before.append(red_before)
                key = f"{colour}_first_right"
                counts[key][0] += int(red_before == (colour == "red"))
                counts[key][1] += 1
            if len(red_first_before) == 2:
                counts["flips"][0] += int(red_first_before[0] != red_first_before[1])
                counts["flips"][1] += 1
        out[rel] = counts
    return {"model": pipe.model_name, "cfg": cfg, "swapped_negative": swapped_negative, "seeds": seeds,
            "relations": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg", type=float, help="guidance scale (default: each model's own, else 5)")
    ap.add_argument("--swapped-negative", action="store_true",
                    help="each prompt's negative prompt is the same words in the other order")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = []
    for src in args.models:
        r = measure(src, list(range(1, args.seeds + 1)), args.cfg, args.swapped_negative, args.device)
        results.append(r)
        parts = [f"{rel}: red-first right {c['red_first_right'][0]}/{c['red_first_right'][1]}, blue-first right "
                 f"{c['blue_first_right'][0]}/{c['blue_first_right'][1]}, flips with the order "
                 f"{c['flips'][0]}/{c['flips'][1]}" for rel, c in r["relations"].items()]
        print(f"{src}: " + "; ".join(parts), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
