"""Which background kinds a model draws for the FID's captions, against the renders of the same scenes (issue 11).

    PYTHONPATH=src python benchmarks/background_kinds.py [MODEL] --count 200 --out DIR   # 2-core CPU, ~6 min

`benchmarks/fid_sensitivity.py` found the judge-feature FID blind to blur, noise and a few wrong objects and very
sensitive to the backgrounds' kind (plain / gradient / textured). This script generates images for the captions
``estable eval fid --fake model:M --split heldout`` uses (same captions and seeds) and asks the judge which kind each
background is, for the renders of those scenes and for the model's images, split by whether the caption names the
background: a caption that does not leaves the kind to chance (half plain, a quarter gradient, a quarter textured),
and a model drawing one kind for all of them would shift the FID's features; how much the background's brightness
varies (its gradient's ramp, its texture's contrast) in the renders and in the model's images (the sensitivity
study found half the contrast alone worth an FID of 157); with ``--fid``, the set's FID. ``--append PHRASE`` adds
a phrase to every caption that names no background (e.g. "on a textured background", a kind without a colour,
which the world's grammar never says), to see whether naming the kind at generation time could give silent captions
the world's kinds — the judged colours of those backgrounds say whether they stay the world's grey; ``--name-grey``
names instead the grey background the world would draw (``shapes.captions.name_grey_background``, seeded by the
image's seed), for a model trained with ``data.shapes_grey_named`` (a completion the model's file names is turned
off: the captions are as written unless ``--name-grey``). Writes
DIR/background_kinds.json and a grid of the first images (renders above, the model's below).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from estable.cli_eval import FID_PROMPT_SEED, FID_REAL_SEED, load_model_pipeline, model_generator
from estable.evaluation.fid import extract_features, feature_stats, frechet_distance
from estable.evaluation.judge import JudgeFeatures, load_judge_or_default
from estable.pipeline import resolve_device
from estable.training.shapes import ShapesWorld, render
from estable.training.shapes.captions import name_grey_background
from estable.training.shapes.vocab import BACKGROUND_KINDS, DEFAULT_BACKGROUND


def border_range(image: Image.Image, width: int = 6) -> float:
    """Brightness spread of the background: the 10th to 90th percentile of luminance over the image's outer ring of
    ``width`` pixels (objects keep clear of the border; a stray one moves a percentile little). About 0 for a plain
    background; a gradient's ramp or a texture's contrast otherwise."""
    a = np.asarray(image.convert("L"), dtype=np.float32)
    ring = np.concatenate([a[:width].ravel(), a[-width:].ravel(), a[width:-width, :width].ravel(),
                           a[width:-width, -width:].ravel()])
    lo, hi = np.percentile(ring, [10, 90])
    return float(hi - lo)


def caption(scene, append: str | None) -> str:
    """The scene's caption, with ``append`` after it when it names no background."""
    return scene.caption if not append or scene.background.mentioned else f"{scene.caption} {append}"


def table(truth: list[str], judged: list[str]) -> dict[str, dict[str, int]]:
    """Counts of judged kinds per true kind."""
    out = {k: dict.fromkeys(BACKGROUND_KINDS, 0) for k in BACKGROUND_KINDS}
    for t, j in zip(truth, judged):
        out[t][j] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--cfg", type=float, help="guidance scale (default: the file's)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", metavar="W[:PHI[:T_MIN[:T_MAX]]][,key=value...]",
                    help="a guidance variant of benchmarks/guidance_variants.py (e.g. 4:0:0:800: no guidance above "
                    "t = 800); its W replaces --cfg")
    ap.add_argument("--empty-prompt", action="store_true", help="generate every image from the empty prompt (the "
                    "unconditional model, which guidance extrapolates away from) and report the kinds and colours of "
                    "all its backgrounds against the world's")
    ap.add_argument("--append", metavar="PHRASE",
                    help="add this to every caption that does not name the background (its image keeps its seed)")
    ap.add_argument("--name-grey", action="store_true",
                    help="complete every caption that names no background with the grey one the world would draw")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fid", action="store_true", help="also the FID (judge features) of the --count images against "
                    "as many held-out renders, as `estable eval fid --real shapes:N --split heldout --fake model:M`")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    world = ShapesWorld("heldout", FID_PROMPT_SEED)
    scenes = [world.scene(i) for i in range(args.count)]
    gen_args = argparse.Namespace(model=args.model, cfg=args.cfg, steps=args.steps, sampler=None, size=None,
                                  device=args.device, dtype="auto", complete_prompt=False)  # --name-grey names it
    pipe = load_model_pipeline(gen_args)
    if args.guidance:
        from guidance_variants import guidance_variant, parse_config  # beside this script

        variant = parse_config(args.guidance)
        gen_args.cfg = variant.w
        guidance_variant(pipe, variant)
    generate = model_generator(gen_args, pipe)
    seeds = [FID_PROMPT_SEED * 100_000 + i for i in range(args.count)]  # as `estable eval fid --fake model:M`
    fake: list[Image.Image] = []
    for start in range(0, args.count, 32):
        texts = [("" if args.empty_prompt else caption(s, args.append)) for s in scenes[start:start + 32]]
        if args.name_grey:
            texts = [name_grey_background(t, seed) for t, seed in zip(texts, seeds[start:start + 32])]
        fake += generate(texts, seeds[start:start + 32])
        print(f"generated {len(fake)} of {args.count}", flush=True)
    real = [render(s, 256) for s in scenes]

    device = resolve_device(args.device)
    judge = load_judge_or_default(None, device)
    kinds_real = [k for k, _ in judge.classify_background(real)]
    judged_fake = judge.classify_background(fake)
    kinds_fake = [k for k, _ in judged_fake]
    truth = [s.background.kind for s in scenes]
    spread_real, spread_fake = [border_range(im) for im in real], [border_range(im) for im in fake]
    res: dict = {"model": args.model, "cfg": gen_args.cfg, "guidance": args.guidance, "steps": args.steps,
                 "count": args.count, "empty_prompt": args.empty_prompt, "append": args.append,
                 "name_grey": args.name_grey}
    if args.empty_prompt:  # the captions' split below then says which scene's seed an image shares, nothing more
        res["all backgrounds: world's kinds / the empty prompt's, judged"] = [dict(Counter(truth)),
                                                                              dict(Counter(kinds_fake))]
        grey = [sum(s.background.colour == DEFAULT_BACKGROUND for s in scenes),
                sum(c == DEFAULT_BACKGROUND for _, c in judged_fake)]
        res["all backgrounds: world's grey ones / the empty prompt's, judged"] = grey
        # guidance weighs a grey image by p(x | caption) / p(x): what counts is the kind odds among grey backgrounds
        grey_kinds = [dict(Counter(s.background.kind for s in scenes if s.background.colour == DEFAULT_BACKGROUND)),
                      dict(Counter(k for k, c in judged_fake if c == DEFAULT_BACKGROUND))]
        res["grey backgrounds' kinds: world's / the empty prompt's, judged"] = grey_kinds
        print(f"all {args.count}: world's kinds {dict(Counter(truth))}, the empty prompt's {dict(Counter(kinds_fake))}"
              f"; grey backgrounds {grey[0]} / {grey[1]}, their kinds {grey_kinds[0]} / {grey_kinds[1]}", flush=True)
    for name, keep in (("caption names the background", True), ("caption does not", False)):
        idx = [i for i, s in enumerate(scenes) if s.background.mentioned == keep]
        res[name] = {
            "scenes": len(idx),
            "true kinds": dict(Counter(truth[i] for i in idx)),
            "renders, judged (true kind → judged)": table([truth[i] for i in idx], [kinds_real[i] for i in idx]),
            "model, judged (true kind → judged)": table([truth[i] for i in idx], [kinds_fake[i] for i in idx]),
            "model, judged kinds": dict(Counter(kinds_fake[i] for i in idx)),
            "model, judged colours": dict(Counter(judged_fake[i][1] for i in idx)),
            "background spread, median per true kind (renders / model), levels": {
                k: [float(np.median([spread_real[i] for i in idx if truth[i] == k] or [np.nan])),
                    float(np.median([spread_fake[i] for i in idx if truth[i] == k] or [np.nan]))]
                for k in BACKGROUND_KINDS},
        }
        print(f"{name}: {len(idx)} scenes; true {res[name]['true kinds']}; the model's, judged "
              f"{res[name]['model, judged kinds']}, colours {res[name]['model, judged colours']}; "
              f"background spread (renders / model) "
              f"{res[name]['background spread, median per true kind (renders / model), levels']}", flush=True)
    if args.fid:
        features = JudgeFeatures(judge)
        reference = ShapesWorld("heldout", FID_REAL_SEED)
        f_real = extract_features((render(reference.scene(i), 256) for i in range(args.count)), features,
                                  device=device)
        f_fake = extract_features(fake, features, device=device)
        res["fid"] = frechet_distance(*feature_stats(f_fake), *feature_stats(f_real))
        print(f"FID (judge features, {args.count} vs {args.count}): {res['fid']:.2f}", flush=True)
    (args.out / "background_kinds.json").write_text(json.dumps(res, indent=1) + "\n")
    cols = min(8, args.count)
    grid = Image.new("RGB", (cols * 128, 2 * 128))
    for c in range(cols):
        grid.paste(real[c].resize((128, 128)), (c * 128, 0))
        grid.paste(fake[c].resize((128, 128)), (c * 128, 128))
    grid.save(args.out / "background_kinds.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
