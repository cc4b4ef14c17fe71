"""Guidance variants against both of issue 11's measures at once: compositional accuracy and the judge-feature FID
with the background kinds behind it.

    PYTHONPATH=src python benchmarks/guidance_front.py [MODEL] --config 4 --config 4,high=1 \
        --prompts 500 --images-per-prompt 2 --fid-count 1000 --device cuda --out FILE.json

For each ``--config`` (the syntax of ``benchmarks/guidance_variants.py``): the first ``--prompts`` held-out prompts
of ``estable eval compositional`` (its seeds), ``--images-per-prompt`` images each, scored by the judge; then the
first ``--fid-count`` captions and seeds of ``estable eval fid --fake model:M --split heldout``, their FID (judge
features) against as many held-out renders (world seed 31, as the FID's real side; computed once), and the kinds
the judge sees in the backgrounds their captions do not name (``benchmarks/background_kinds.py``'s count). 25 steps
of DPM++ 2M Karras, the evaluations' sampler. One pipeline per config; rows are written after each config.
``--kind K`` restricts both measures to one kind of prompt: the held-out prompts of that kind, and an FID between
images of that kind's captions and renders of that kind's scenes (worlds that draw only that kind).
``--name-grey`` completes every caption that names no background, in both measures, with the grey background the
world would draw for it (``shapes.captions.name_grey_background``, seeded by the image's seed): for a model trained
with ``data.shapes_grey_named`` > 0, which knows the word. A completion the model's file names
(``estable.prompt_completion``) is turned off, so the captions are as written unless ``--name-grey``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from guidance_variants import describe, guidance_variant, parse_config  # beside this script

from estable.cli_eval import FID_PROMPT_SEED, FID_REAL_SEED
from estable.evaluation.compositional import PROMPT_KINDS, evaluate, make_prompts
from estable.evaluation.fid import extract_features, feature_stats, frechet_distance
from estable.evaluation.judge import JudgeFeatures, load_judge_or_default
from estable.params import GenerationParams
from estable.pipeline import load_pipeline, resolve_device
from estable.training.shapes import ShapesWorld, render
from estable.training.shapes.captions import name_grey_background


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--config", action="append", required=True, metavar="W[:PHI[:T_MIN[:T_MAX]]][,key=value...]")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--fid-count", type=int, default=1000)
    ap.add_argument("--kind", choices=PROMPT_KINDS,
                    help="prompts of this kind only, for the accuracy and for the FID (both sides: the renders too)")
    ap.add_argument("--name-grey", action="store_true",
                    help="name the grey background of every caption that names none (its kind drawn at the world's "
                    "odds from the image's seed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, help="images per sampler run (default 32 on a GPU, 8 on the CPU)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    variants = [parse_config(c) for c in args.config]
    device = resolve_device(args.device)
    judge = load_judge_or_default(None, device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    if args.kind:
        prompts = make_prompts(args.prompts, mix={args.kind: 1.0})
    else:
        prompts = make_prompts(500)[: args.prompts] if args.prompts <= 500 else make_prompts(args.prompts)
    only = {"kind_weights": {args.kind: 1.0}} if args.kind else {}

    world = ShapesWorld("heldout", FID_PROMPT_SEED, **only)
    scenes = [world.scene(i) for i in range(args.fid_count)]
    captions = [s.caption for s in scenes]
    fid_seeds = [FID_PROMPT_SEED * 100_000 + i for i in range(args.fid_count)]  # as `estable eval fid --fake model:M`
    unnamed = [i for i, s in enumerate(scenes) if not s.background.mentioned]
    fid_kinds = dict(Counter(s.spec.kind for s in scenes))  # the FID captions' kinds (one with --kind)
    features = JudgeFeatures(judge)
    reference = ShapesWorld("heldout", FID_REAL_SEED, **only)
    t = time.perf_counter()
    real_stats = feature_stats(extract_features(
        (render(reference.scene(i), 256) for i in range(args.fid_count)), features, device=device))
    print(f"real features of {args.fid_count} renders: {time.perf_counter() - t:.0f} s", flush=True)

    rows = []
    for v in variants:
        t = time.perf_counter()
        pipe = load_pipeline(args.model, device=device)
        guidance_variant(pipe, v)
        # DPM++ 2M Karras, as the evaluations; captions as written unless --name-grey (whatever the file asks)
        base = GenerationParams(steps=25, cfg_scale=v.w, complete_prompt=False)

        def generate(texts, seeds, p=pipe, b=base):
            if args.name_grey:
                texts = [name_grey_background(t, s) for t, s in zip(texts, seeds)]
            return p.txt2img_each(texts, seeds, b, batch=batch)

        report = evaluate(generate, judge, prompts, args.images_per_prompt, 0,
                          prompts_per_call=max(1, batch // args.images_per_prompt))
        fake = generate(captions, fid_seeds)
        fid = frechet_distance(*feature_stats(extract_features(fake, features, device=device)), *real_stats)
        kinds = [k for k, _ in judge.classify_background([fake[i] for i in unnamed])]
        o = report["overall"]
        row = {"config": describe(v), **v._asdict(), **o, "by_kind": report["by_kind"], "fid": fid,
               "fid_count": args.fid_count, "fid_kinds": fid_kinds, "name_grey": args.name_grey,
               "images_per_prompt": args.images_per_prompt,
               "unnamed_backgrounds": dict(Counter(kinds)), "seconds": time.perf_counter() - t}
        rows.append(row)
        scores = ", ".join(f"{k} {val:.1%}" for k, val in o.items() if isinstance(val, float))
        print(f"{describe(v)}: {scores}; FID {fid:.1f} ({args.fid_count} a side); unnamed backgrounds "
              f"{row['unnamed_backgrounds']} of {len(unnamed)} ({row['seconds']:.0f} s)", flush=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
