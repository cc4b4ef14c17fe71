"""The demo prompt at seeds 1–8: a grid (one row per model) and the judge's verdict on each image (issue 11).

    PYTHONPATH=src python benchmarks/demo_seeds.py default runs/model.safetensors --out benchmarks/demo_seeds.png

25 steps of DPM++ 2M Karras (``--steps``, ``--sampler``) at each model's recommended guidance scale (5 when it
records none; ``--cfg-start 0,0.2``: a row per guidance interval), 256², CPU fp32 by default. No seed is picked: the
row is seeds 1..8 as they come. Prints, per row, the seeds whose image the shipped judge reads with the relation
right and with the whole prompt right. ``--paraphrase synonyms`` draws the prompt said in the paraphrase test's words
("on top of" for "above", ...), judged as the prompt.
"""

from __future__ import annotations

import argparse

from PIL import Image

from estable.evaluation.compositional import PARAPHRASE_SETS, paraphrase, score_image
from estable.evaluation.judge import load_default_judge
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.shapes import parse_caption

PROMPT = "a red circle above a blue square"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m_karras")
    ap.add_argument("--cell", type=int, default=128)
    ap.add_argument("--cfg-start", default="0", metavar="LIST",
                    help="comma-separated guidance intervals (GenerationParams.cfg_start), a row each (default 0)")
    ap.add_argument("--paraphrase", choices=tuple(PARAPHRASE_SETS),
                    help="draw the prompt said with this paraphrase set's words (judged as the prompt)")
    ap.add_argument("--out")
    args = ap.parse_args()
    judge = load_default_judge(args.device)
    spec = parse_caption(args.prompt)
    said = paraphrase(args.prompt, args.paraphrase) if args.paraphrase else args.prompt
    rows = []
    for src in args.models:
        pipe = load_pipeline(src, device=args.device)
        cfg = pipe.config.default_cfg or 5.0
        for start in (float(v) for v in args.cfg_start.split(",")):
            images = []
            for seed in range(1, args.seeds + 1):
                params = GenerationParams(prompt=said, steps=args.steps, cfg_scale=cfg, cfg_start=start,
                                          seed=seed, sampler=args.sampler)
                images.append(pipe.txt2img(params).images[0])
            verdicts = [score_image(spec, d) for d in judge.detect(images)]
            right = [s for s, v in zip(range(1, args.seeds + 1), verdicts) if v["position"]]
            whole = [s for s, v in zip(range(1, args.seeds + 1), verdicts) if v["whole_prompt"]]
            print(f"{src}, cfg start {start:g}: relation right at seeds {right} ({len(right)}/{args.seeds}); "
                  f"whole prompt at {whole}", flush=True)
            rows.append(images)
    if args.out:
        c = args.cell
        grid = Image.new("RGB", (c * args.seeds, c * len(rows)), "white")
        for r, images in enumerate(rows):
            for k, im in enumerate(images):
                grid.paste(im.resize((c, c), Image.LANCZOS), (k * c, r * c))
        grid.save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
