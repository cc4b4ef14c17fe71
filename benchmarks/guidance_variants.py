"""Probe: do two variants of classifier-free guidance help the built-in model? The library has neither; this script
swaps the pipeline's guided model.

    PYTHONPATH=src python benchmarks/guidance_variants.py [MODEL] --prompts 40 --config 4 --config 7.5:0.7 \
        --config 4:0:200 --out FILE                                                  # 2-core CPU, ~1 minute a config
    PYTHONPATH=src python benchmarks/guidance_variants.py --grid 4:0:0 --grid 4:0:200 --out demo.png   # demo seeds

A config is ``W[:PHI[:T_MIN[:T_MAX]]]``, with the guided output g = u + W (c − u) of the unconditional and conditional
outputs u, c:

* guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", sec. 3.4):
  g ← g · (PHI · std(c) / std(g) + 1 − PHI), standard deviations per image; PHI = 0 is plain guidance;
* a guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"): below timestep T_MIN
  and above T_MAX the conditional output alone (no guidance at the last, least noisy steps, or at the first, noisiest
  ones, which the paper found to cost diversity); T_MIN = 0 and T_MAX = 1000 (the defaults) guide every step.

Each config is scored like ``estable eval compositional`` on the first ``--prompts`` held-out prompts, two images
each, the same seeds for every config, 25 steps of DPM++ 2M Karras. ``--grid`` draws the demo prompt at seeds 1–8
per config instead (DPM++ 2M, as ``make demo``), one row per config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from estable.evaluation.compositional import evaluate, make_prompts
from estable.evaluation.judge import load_default_judge
from estable.params import GenerationParams
from estable.pipeline import Pipeline, load_pipeline


def guidance_variant(pipe: Pipeline, phi: float, t_min: float, t_max: float = 1000.0) -> None:
    """Make ``pipe`` combine guided outputs with rescale ``phi`` and no guidance below timestep ``t_min`` or above
    ``t_max`` (txt2img without ControlNet only)."""
    plain = Pipeline._guided_model.__get__(pipe)

    def guided_model(context, scale, extra, control=None, t_guided=None):
        if scale is None or (phi == 0 and t_min == 0 and t_max >= 1000):
            return plain(context, scale, extra, control, t_guided)
        if extra is not None or control is not None or t_guided is not None:
            raise NotImplementedError("the probe handles txt2img without ControlNet or cfg_start only")

        def model(x_t: torch.Tensor, t: float) -> torch.Tensor:
            out = pipe.unet_forward(torch.cat([x_t, x_t]).to(pipe.dtype), t, context).float()
            u, c = out.chunk(2)  # (B, 4, h, w) each
            if float(t) < t_min or float(t) > t_max:
                return c
            g = u + scale * (c - u)
            ratio = c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True)
            return g * (phi * ratio + 1 - phi)

        return model

    pipe._guided_model = guided_model  # type: ignore[method-assign]


def parse_config(text: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in text.split(":")]
    if not 1 <= len(values) <= 4:
        raise SystemExit(f"a config is W[:PHI[:T_MIN[:T_MAX]]], not {text!r}")
    w, phi, t_min, t_max = values + [0.0, 0.0, 1000.0][len(values) - 1:]
    return w, phi, t_min, t_max


def demo_grid(model: str, configs: list[tuple[float, float, float, float]], device: str, out: Path) -> None:
    from PIL import Image

    from estable.evaluation.compositional import score_image
    from estable.training.shapes.captions import parse_caption

    prompt = "a red circle above a blue square"
    judge, spec = load_default_judge(device), parse_caption(prompt)
    grid = Image.new("RGB", (8 * 128, 128 * len(configs)), "white")
    for r, (cfg, phi, t_min, t_max) in enumerate(configs):
        pipe = load_pipeline(model, device=device)
        guidance_variant(pipe, phi, t_min, t_max)
        images = [pipe.txt2img(GenerationParams(prompt=prompt, sampler="dpmpp_2m", cfg_scale=cfg, seed=seed))
                  .images[0] for seed in range(1, 9)]
        right = sum(score_image(spec, d)["whole_prompt"] for d in judge.detect(images))
        print(f"CFG {cfg:g}, phi {phi:g}, guided for {t_min:g} ≤ t ≤ {t_max:g}: the demo prompt right at {right} of 8",
              flush=True)
        for k, im in enumerate(images):
            grid.paste(im.resize((128, 128), Image.LANCZOS), (k * 128, r * 128))
    grid.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="src/estable/assets/default_model.safetensors")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--config", action="append", metavar="W[:PHI[:T_MIN[:T_MAX]]]",
                    help="repeatable (default 4 and 4:0.7)")
    ap.add_argument("--grid", action="append", metavar="W[:PHI[:T_MIN[:T_MAX]]]",
                    help="draw the demo prompt at seeds 1–8 with these configs instead (repeatable; needs --out)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.grid:
        if args.out is None:
            ap.error("--grid needs --out FILE.png")
        demo_grid(args.model, [parse_config(c) for c in args.grid], args.device, args.out)
        return
    configs = [parse_config(c) for c in (args.config or ["4", "4:0.7"])]
    judge = load_default_judge(args.device)
    prompts = make_prompts(500)[: args.prompts]
    rows = []
    for cfg, phi, t_min, t_max in configs:
        pipe = load_pipeline(args.model, device=args.device)
        guidance_variant(pipe, phi, t_min, t_max)
        base = GenerationParams(steps=25, cfg_scale=cfg)
        t = time.perf_counter()
        report = evaluate(lambda texts, seeds, p=pipe, b=base: p.txt2img_each(texts, seeds, b, batch=8), judge, prompts,
                          args.images_per_prompt, 0)
        o = report["overall"]
        rows.append({"cfg": cfg, "phi": phi, "t_min": t_min, "t_max": t_max, **o})
        scores = ", ".join(f"{k} {v:.1%}" for k, v in o.items() if isinstance(v, float))
        print(f"CFG {cfg:g}, phi {phi:g}, guided for {t_min:g} ≤ t ≤ {t_max:g}: {scores}"
              + f" ({o['images']} images, {time.perf_counter() - t:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
