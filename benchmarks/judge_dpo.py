"""Issue 11: preference fine-tuning by the judge (Diffusion-DPO, Wallace et al. 2023), a pilot.

    PYTHONPATH=src python benchmarks/judge_dpo.py [MODEL] --out DIR [--kind count] [--prompts 200] [--seeds 4] \
        [--steps 300] [--pairs-per-step 8] [--lr 1e-5] [--beta 2000] [--device cpu]

1. Pairs. ``--prompts`` distinct prompts of one kind from the shapes world's *train* split (the evaluation's prompts
   are held out), ``--seeds`` images each, drawn as issue 11's protocol draws them: DPM++ 2M Karras, 25 steps, the
   file's guidance scale and prompt completion. The judge scores each image as the compositional benchmark does;
   for each prompt with right and wrong images (whole prompt), every wrong image is paired with a right one.
2. Fine-tuning. The U-Net learns, against a frozen copy of itself (the reference), to denoise the right image of
   each pair better and the wrong one worse than the reference does: the loss is −log σ(−β·Δ), Δ = (e_w − e_w,ref)
   − (e_l − e_l,ref), e the mean squared error of the model's prediction (the file's objective, ε or v) of one noised
   latent; both images of a pair get the same timestep and noise. The latents are the images encoded by the file's
   VAE (posterior mean), the contexts those of the completed prompts they were drawn with; text encoder and VAE
   stay frozen.
3. The model, with its file's settings, into ``DIR/model.safetensors`` (fp16), the pairs' verdicts into
   ``DIR/pairs.json`` and the loss into ``DIR/log.jsonl``; score it with ``estable eval compositional``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from estable.checkpoints.store import load_model, save_model
from estable.evaluation.compositional import score_image
from estable.evaluation.judge import load_default_judge
from estable.params import GenerationParams
from estable.pipeline import DEFAULT_MODEL, Pipeline, default_model_path
from estable.sampling.schedules import alphas_cumprod
from estable.training.objectives import noisy_latents_and_target
from estable.training.shapes import ShapesWorld, caption_for


def train_prompts(kind: str, n: int, seed: int) -> list:
    """``n`` distinct train-split prompt specs of ``kind`` (the world's own prompt sampler)."""
    world = ShapesWorld("train", seed, kind_weights={kind: 1.0})
    specs, seen, index = [], set(), 0
    while len(specs) < n:
        spec = world.scene(index).spec
        index += 1
        if caption_for(spec) not in seen:
            seen.add(caption_for(spec))
            specs.append(spec)
    return specs


def make_pairs(pipe: Pipeline, judge, specs: list, seeds: int, base_seed: int, log) -> tuple[list, list]:
    """(pairs, verdicts): pairs are (winner, loser) dicts of latent (C, h, w) and context (1, L, D)."""
    params = GenerationParams(sampler="dpmpp_2m_karras", steps=25, cfg_scale=float(pipe.config.default_cfg or 7.0))
    pairs, verdicts = [], []
    for i, spec in enumerate(specs):
        caption = caption_for(spec)
        image_seeds = [base_seed + i * seeds + k for k in range(seeds)]
        images = pipe.txt2img_each([caption] * seeds, image_seeds, params, batch=8)
        dets, bgs = judge.detect(images), judge.classify_background(images)
        right = [score_image(spec, d, b)["whole_prompt"] for d, b in zip(dets, bgs)]
        verdicts.append({"prompt": caption, "seeds": image_seeds, "right": right})
        if any(right) and not all(right):
            pairs += _pairs_of(pipe, params, caption, images, image_seeds, right)
        if (i + 1) % 10 == 0:
            log(f"{i + 1}/{len(specs)} prompts, {len(pairs)} pairs")
    return pairs, verdicts


def _pairs_of(pipe: Pipeline, params: GenerationParams, caption: str, images: list, seeds: list[int],
              right: list[bool]) -> list:
    """Every wrong image paired with a right one (in turn), as VAE latents and completed prompts' contexts."""
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
        pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1).to(pipe.device, pipe.dtype)
        latents = pipe.vae.encode(pixels).mean.float() * pipe.vae.config.scaling_factor  # (K, C, h, w)
    items = []
    for k, s in enumerate(seeds):
        cond, _ = pipe.encode_prompts(pipe.completed_prompt(params, s, caption), "", clip_skip=pipe.config.clip_skip)
        items.append({"latent": latents[k], "context": cond.float()})
    winners = [item for item, ok in zip(items, right) if ok]
    losers = [item for item, ok in zip(items, right) if not ok]
    return [(winners[j % len(winners)], loser) for j, loser in enumerate(losers)]


def dpo_step(unet, ref, pairs, ac, objective: str, beta: float, generator: torch.Generator, device) -> dict:
    n = len(pairs)
    z = torch.stack([w["latent"] for w, _ in pairs] + [lo["latent"] for _, lo in pairs]).to(device)  # (2n, C, h, w)
    ctx = torch.cat([w["context"] for w, _ in pairs] + [lo["context"] for _, lo in pairs]).to(device)
    t = torch.randint(0, len(ac), (n,), generator=generator).repeat(2)  # the same t and noise for both of a pair
    noise = torch.randn(z[:n].shape, generator=generator).repeat(2, 1, 1, 1).to(device)
    z_t, target = noisy_latents_and_target(z, noise, ac[t].to(device), objective)
    t = t.to(device)
    err = (unet(z_t, t, ctx).float() - target).pow(2).mean(dim=(1, 2, 3))  # (2n,)
    with torch.no_grad():
        err_ref = (ref(z_t, t, ctx).float() - target).pow(2).mean(dim=(1, 2, 3))
    delta = (err[:n] - err_ref[:n]) - (err[n:] - err_ref[n:])  # < 0: the winner gained on the loser
    loss = -F.logsigmoid(-beta * delta).mean()
    delta = delta.detach()
    return {"loss": loss, "acc": float((delta < 0).float().mean()), "delta": float(delta.mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kind", default="count", choices=("single", "count", "pair", "colour_binding"))
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt")
    ap.add_argument("--world-seed", type=int, default=101, help="the train-split world the prompts come from")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=2000.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    source = default_model_path() if args.model == DEFAULT_MODEL else Path(args.model)
    device = torch.device(args.device)
    model = load_model(source, dtype=torch.float32, device=device)
    pipe = Pipeline(model, device=device, dtype=torch.float32, cuda_graphs=False)
    specs = train_prompts(args.kind, args.prompts, args.world_seed)
    pairs, verdicts = make_pairs(pipe, load_default_judge(device), specs, args.seeds, 10_000, log)
    right = sum(sum(v["right"]) for v in verdicts)
    log(f"{len(pairs)} pairs from {len(specs)} prompts; {right} of {len(specs) * args.seeds} images right")
    (args.out / "pairs.json").write_text(json.dumps({"kind": args.kind, "verdicts": verdicts, "pairs": len(pairs)}))
    if not pairs:
        print("no prompt had both right and wrong images: nothing to learn from", file=sys.stderr)
        return 1

    unet = model.unet.train().requires_grad_(True)
    ref = copy.deepcopy(unet).eval().requires_grad_(False)
    objective = "v" if model.config.schedule.prediction_type == "v_prediction" else "eps"
    ac = alphas_cumprod(model.config.schedule)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    with (args.out / "log.jsonl").open("w") as logf:
        for step in range(1, args.steps + 1):
            pick = torch.randint(0, len(pairs), (min(args.pairs_per_step, len(pairs)),), generator=gen).tolist()
            out = dpo_step(unet, ref, [pairs[i] for i in pick], ac, objective, args.beta, gen, device)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            record = {"step": step, "loss": out["loss"].item(), "acc": out["acc"], "delta": out["delta"]}
            logf.write(json.dumps(record) + "\n")
            if step % 25 == 0 or step == args.steps:
                log(f"step {step}: loss {record['loss']:.4f}, pairs ordered {record['acc']:.2f}")
    unet.eval().requires_grad_(False)
    path = save_model(model, args.out / "model.safetensors", to="estable", dtype="fp16", overwrite=True)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
