"""Does the starting noise decide the layout? The terminal-SNR leak (issue 11)

    PYTHONPATH=src python benchmarks/relation_noise_leak.py default --seeds 16 --out runs/leak.json

The schedule SD 1.x uses (scaled-linear betas 0.00085–0.012 over 1,000 steps) does not reach pure noise: at its
last step x_T = √ᾱ_T·z0 + √(1-ᾱ_T)·ε with √ᾱ_T ≈ 0.068 (σ_max ≈ 14.6). A scene's layout lives in the latent's
lowest frequencies, and averaged over a quarter of the latent the noise shrinks by the side of the block while the
signal does not, so in training the layout is still readable at the noisiest step (Lin et al., "Common Diffusion
Noise Schedules and Sample Steps are Flawed", WACV 2024). A model that learns to read it there takes its layout from
the noise at generation time, whatever the prompt says.

Two measurements:
1. the layout's signal-to-noise ratio at t = T, per block size: the variance of block means of the scenes' latents
   against the variance of block means of σ_max·ε;
2. img2img at strength 1 (x̃ = z0 + σ_max·ε: the training input at the noisiest step) from a rendered scene of "a red
   circle R a blue square", prompted with the opposite relation R'. If the model follows the scene rather than the
   prompt, it reads the layout from the residue of z0 in the noise. The prompt that agrees with the scene and
   plain txt2img from the same seeds are the controls.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from relation_layout import centre, right  # benchmarks/ is on the path when this script runs

from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.sampling.schedules import training_sigmas
from estable.training.shapes import parse_caption, render, scene_from_prompt

OPPOSITE = {"above": "below", "below": "above", "to the left of": "to the right of",
            "to the right of": "to the left of"}


def holds(rel: str, arr: np.ndarray) -> bool | None:
    """Whether the red centre lies on the named side of the blue one; None when either is missing."""
    red, blue = centre(arr, "red"), centre(arr, "blue")
    return None if red is None or blue is None else right(rel, red, blue)


def block_snr(pipe, scenes: list, sigma: float) -> dict[str, float]:
    """Variance of block means of the scenes' scaled latents over that of σ·ε, per block side (in latent pixels)."""
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(np.asarray(s.convert("RGB"), dtype=np.float32) / 127.5 - 1)
                         .permute(2, 0, 1) for s in scenes])
        vae = pipe.model.vae
        z = vae.encode(x.to(pipe.device, pipe.dtype)).mean.float().cpu() * pipe.config.vae.scaling_factor
    side = z.shape[-1]
    out = {}
    for block in (1, 4, 8, side // 2):
        means = torch.nn.functional.avg_pool2d(z, block)
        signal = float(means.var(dim=0).mean())  # variation across scenes at each block and channel
        noise = sigma ** 2 / block ** 2
        out[str(block)] = signal / noise
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    pipe = load_pipeline(args.model, device=args.device, dtype="fp32")
    cfg = pipe.config.default_cfg or 5.0
    sigma_max = float(training_sigmas(pipe.config.schedule)[-1])
    size = pipe.native_size[0]
    counts = {k: [0, 0] for k in ("follows_scene_opposite_prompt", "follows_prompt_opposite_prompt",
                                  "follows_scene_same_prompt", "txt2img_right")}
    scenes = []
    rows = []
    for rel in OPPOSITE:
        caption = f"a red circle {rel} a blue square"
        spec = parse_caption(caption)
        for seed in range(1, args.seeds + 1):
            scene = render(scene_from_prompt(spec, 1000 * seed + len(rel)), size)
            scenes.append(scene)
            row = {"scene": rel, "seed": seed}
            for prompt_rel, key in ((OPPOSITE[rel], "opposite"), (rel, "same")):
                params = GenerationParams(prompt=f"a red circle {prompt_rel} a blue square", steps=25,
                                          cfg_scale=cfg, sampler="dpmpp_2m_karras", seed=seed, width=size,
                                          height=size, strength=1.0)
                arr = np.asarray(pipe.img2img(scene, params).images[0].convert("RGB"))
                row[key] = {"scene_holds": holds(rel, arr), "prompt_holds": holds(prompt_rel, arr)}
            params = GenerationParams(prompt=caption, steps=25, cfg_scale=cfg, sampler="dpmpp_2m_karras",
                                      seed=seed, width=size, height=size)
            arr = np.asarray(pipe.txt2img(params).images[0].convert("RGB"))
            row["txt2img"] = holds(rel, arr)
            rows.append(row)
            for key, val in (("follows_scene_opposite_prompt", row["opposite"]["scene_holds"]),
                             ("follows_prompt_opposite_prompt", row["opposite"]["prompt_holds"]),
                             ("follows_scene_same_prompt", row["same"]["scene_holds"]),
                             ("txt2img_right", row["txt2img"])):
                if val is not None:
                    counts[key][0] += int(val)
                    counts[key][1] += 1
        print(f"{rel}: {counts}", flush=True)
    snr = block_snr(pipe, scenes, sigma_max)
    result = {"model": pipe.model_name, "cfg": cfg, "sigma_max": sigma_max, "seeds": args.seeds,
              "counts": counts, "layout_snr_at_T_by_block": snr, "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
