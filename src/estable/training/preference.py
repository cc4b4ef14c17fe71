"""Preference fine-tuning by the judge: a shapes-world model taught from its own images (issue 11).

Diffusion-DPO (Wallace et al. 2023) on pairs the model drew itself:

1. **Pairs** (:func:`draw_pairs`). Distinct prompts of one kind from the shapes world's *train* split (the
   compositional benchmark's prompts are held out: each of them names a colour × shape the train split never draws),
   ``seeds`` images each, drawn as issue 11's protocol draws them — DPM++ 2M Karras, 25 steps, the file's guidance
   scale and prompt completion. The judge scores each image as the benchmark does (the whole prompt); for each prompt
   with right and wrong images, every wrong image is paired with a right one, in turn. A pair set keeps the images'
   VAE latents (posterior mean × scaling factor) and the completed prompts they were drawn from.
2. **Fine-tuning** (:func:`fine_tune`, fp32). The U-Net learns, against a frozen copy of itself (the reference), to
   denoise the right image of each pair better and the wrong one worse than the reference does: the loss is
   −log σ(−β·Δ), Δ = (e_w − e_w,ref) − (e_l − e_l,ref), e the mean squared error of the prediction (the file's
   objective, ε or v) for one noised latent; both images of a pair get the same timestep and noise. Text encoder and
   VAE stay frozen.
3. **Mixing** (:func:`mix_weights`): the U-Net's weights are put ``share`` of the way from the reference to the
   fine-tuned ones (1: the fine-tuned model). On the shipped model, half of the way kept most of the accuracy the
   pairs taught and most of the FID they cost (benchmarks/RESULTS.md).

:func:`preference_fine_tune` runs the three on a model file, keeping each kind's pairs in a work folder for a later
call; ``estable train preference`` (cli_train.py) is its command.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from estable.errors import EstableError
from estable.evaluation.compositional import score_image
from estable.images import to_tensor
from estable.params import GenerationParams
from estable.sampling.schedules import alphas_cumprod
from estable.training.objectives import noisy_latents_and_target
from estable.training.shapes import ShapesWorld, caption_for

PAIR_KINDS = ("single", "count", "pair", "colour_binding")


@dataclass
class PairSet:
    """Images of some prompts, and which of them pair up: ``latents`` (N, C, h, w) fp16 on the CPU, ``prompts`` the N
    completed prompts, ``pairs`` (winner, loser) indices; ``verdicts`` per prompt (its caption, seeds and rights);
    ``drawn`` what they were drawn from (the model's sha256, the kind, prompts, seeds and world seed)."""

    latents: torch.Tensor
    prompts: list[str]
    pairs: list[tuple[int, int]]
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    drawn: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        torch.save({"latents": self.latents, "prompts": self.prompts, "pairs": self.pairs,
                    "verdicts": self.verdicts, "drawn": self.drawn}, path)

    @classmethod
    def load(cls, path: Path) -> PairSet:
        d = torch.load(path, weights_only=True)
        return cls(d["latents"], list(d["prompts"]), [tuple(p) for p in d["pairs"]], list(d["verdicts"]),
                   dict(d.get("drawn", {})))


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


def protocol_params(pipe: Any) -> GenerationParams:
    """Issue 11's protocol: DPM++ 2M Karras, 25 steps, the file's guidance scale (its completion is on by default)."""
    return GenerationParams(sampler="dpmpp_2m_karras", steps=25, cfg_scale=float(pipe.config.default_cfg or 7.0))


def draw_pairs(pipe: Any, judge: Any, specs: Sequence, seeds: int, base_seed: int, batch: int,
               log: Callable[[str], None] = lambda msg: None) -> PairSet:
    """The pairs of ``specs``' images: prompt i's have seeds base_seed + i·seeds + k, ``batch // seeds`` prompts per
    sampler run (``pipe``: a :class:`estable.pipeline.Pipeline`; ``judge``: the compositional benchmark's)."""
    params = protocol_params(pipe)
    out = PairSet(torch.zeros(0), [], [])
    latents: list[torch.Tensor] = []
    per_run = max(1, batch // seeds)
    for start in range(0, len(specs), per_run):
        chunk = specs[start:start + per_run]
        seed_lists = [[base_seed + (start + i) * seeds + k for k in range(seeds)] for i in range(len(chunk))]
        images = pipe.txt2img_each([caption_for(s) for s in chunk for _ in range(seeds)],
                                   [s for ss in seed_lists for s in ss], params, batch=batch)
        dets, bgs = judge.detect(images), judge.classify_background(images)
        for i, spec in enumerate(chunk):
            own = slice(i * seeds, (i + 1) * seeds)
            right = [bool(score_image(spec, d, b)["whole_prompt"]) for d, b in zip(dets[own], bgs[own])]
            out.verdicts.append({"prompt": caption_for(spec), "seeds": seed_lists[i], "right": right})
            if any(right) and not all(right):
                latents.append(_encode(pipe, images[own]))
                first = len(out.prompts)
                out.prompts += [pipe.completed_prompt(params, s, caption_for(spec)) for s in seed_lists[i]]
                winners = [first + k for k, ok in enumerate(right) if ok]
                losers = [first + k for k, ok in enumerate(right) if not ok]
                out.pairs += [(winners[j % len(winners)], loser) for j, loser in enumerate(losers)]
        done = start + len(chunk)
        if done // 100 != start // 100 or done == len(specs):
            log(f"{done}/{len(specs)} prompts, {len(out.pairs)} pairs")
    out.latents = (torch.cat(latents) if latents else torch.zeros(0)).half().cpu()
    return out


@torch.no_grad()
def _encode(pipe: Any, images: Sequence) -> torch.Tensor:
    pixels = torch.cat([to_tensor(im) for im in images]).to(pipe.device, pipe.dtype)  # (K, 3, H, W) in [-1, 1]
    return pipe.vae.encode(pixels).mean.float().cpu() * pipe.vae.config.scaling_factor


def merge_pairs(sets: Sequence[PairSet]) -> PairSet:
    """One pair set of several: latents, prompts and verdicts end to end, the indices shifted."""
    merged = PairSet(torch.cat([s.latents for s in sets]), [], [], [])
    for s in sets:
        offset = len(merged.prompts)
        merged.pairs += [(w + offset, lo + offset) for w, lo in s.pairs]
        merged.prompts += s.prompts
        merged.verdicts += s.verdicts
    return merged


def dpo_step(unet, ref, pairs: Sequence, ac: torch.Tensor, objective: str, beta: float, generator: torch.Generator,
             device) -> dict:
    """The DPO loss of ``pairs``, (winner, loser) dicts of "latent" (C, h, w) and "context" (1, L, D); with the
    share of pairs ordered (winner gained more than the loser) and the mean Δ."""
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


def fine_tune(pipe: Any, pairs: PairSet, *, steps: int, pairs_per_step: int, lr: float, beta: float,
              log_file: Path | None = None, log: Callable[[str], None] = lambda msg: None,
              seed: int = 0) -> torch.nn.Module:
    """Fine-tune ``pipe``'s U-Net (fp32) in place on ``pairs``; returns the frozen reference (the U-Net before)."""
    model, device = pipe.model, pipe.device
    with torch.no_grad():  # the contexts of the completed prompts, once each
        contexts = {p: pipe.encode_prompts(p, "", clip_skip=pipe.config.clip_skip)[0].float()
                    for p in dict.fromkeys(pairs.prompts)}
    items = [{"latent": z.float(), "context": contexts[p]} for z, p in zip(pairs.latents, pairs.prompts)]
    pair_items = [(items[w], items[lo]) for w, lo in pairs.pairs]
    unet = model.unet.train().requires_grad_(True)
    ref = copy.deepcopy(unet).eval().requires_grad_(False)
    objective = "v" if model.config.schedule.prediction_type == "v_prediction" else "eps"
    ac = alphas_cumprod(model.config.schedule)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(pair_items), (min(pairs_per_step, len(pair_items)),), generator=gen).tolist()
        out = dpo_step(unet, ref, [pair_items[i] for i in pick], ac, objective, beta, gen, device)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        records.append({"step": step, "loss": out["loss"].item(), "acc": out["acc"], "delta": out["delta"]})
        if step % 25 == 0 or step == steps:
            log(f"step {step}/{steps}: loss {records[-1]['loss']:.4f}, pairs ordered {out['acc']:.2f}")
    unet.eval().requires_grad_(False)
    if log_file is not None:
        log_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ref


@torch.no_grad()
def mix_weights(unet: torch.nn.Module, ref: torch.nn.Module, share: float) -> None:
    """``unet``'s weights ← ref + share · (unet − ref), in place (share 1: unchanged; 0: the reference's)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be between 0 and 1, not {share!r}")
    theirs = ref.state_dict()
    for name, value in unet.state_dict().items():
        if value.is_floating_point():
            value.copy_(theirs[name] + share * (value - theirs[name]))


def preference_fine_tune(source: Path, out: Path, *, kinds: Sequence[str], prompts: int, seeds: int, gen_batch: int,
                         world_seed: int, steps: int, pairs_per_step: int, lr: float, beta: float, mix: float,
                         work: Path, device: torch.device, overwrite: bool = False,
                         log: Callable[[str], None] = print) -> Path:
    """The model file ``source`` fine-tuned by preference into ``out`` (fp16, with its file's settings).

    Each kind's pairs are drawn into ``work/pairs-KIND.pt`` (with the image generation of ``estable eval
    compositional`` on ``device``: fp16 in CUDA graphs on a GPU) unless a set drawn from the same model with the same
    prompts, seeds and world is there; one drawn otherwise is an EstableError. With no pairs (or no steps) ``out``
    is ``source``'s weights as they were. ``work/log.jsonl`` gets the loss, ``work/summary.json`` the settings."""
    from estable.checkpoints.io import cached_sha256
    from estable.checkpoints.store import load_model, save_model
    from estable.evaluation.judge import load_default_judge
    from estable.pipeline import Pipeline, load_pipeline

    work.mkdir(parents=True, exist_ok=True)
    model_sha = cached_sha256(source)
    sets, drawer, judge = [], None, None
    for kind in kinds:
        path = work / f"pairs-{kind}.pt"
        wanted = {"model_sha256": model_sha, "kind": kind, "prompts": prompts, "seeds": seeds,
                  "world_seed": world_seed}
        if path.is_file():
            try:
                kept = PairSet.load(path)
            except Exception as exc:  # truncated, not a pair set, or not torch's: say which file, keep it
                raise EstableError(f"cannot read the pairs in {path} ({exc}); remove it to draw them again") from None
            if kept.drawn != wanted:
                raise EstableError(f"the pairs in {path} were drawn with {kept.drawn or 'unknown settings'}, not "
                                   f"{wanted}; remove the file or give another work folder")
            sets.append(kept)
            log(f"{kind}: {len(kept.pairs)} pairs read from {path}")
            continue
        if drawer is None:
            drawer, judge = load_pipeline(source, device=device), load_default_judge(device)
        specs = train_prompts(kind, prompts, world_seed)
        drawn = draw_pairs(drawer, judge, specs, seeds, 10_000, gen_batch, lambda m, kind=kind: log(f"{kind}: {m}"))
        drawn.drawn = wanted
        right = sum(sum(v["right"]) for v in drawn.verdicts)
        log(f"{kind}: {len(drawn.pairs)} pairs; {right} of {len(specs) * seeds} images right")
        drawn.save(path)
        sets.append(drawn)
    del drawer, judge
    pairs = merge_pairs(sets)
    model = load_model(source, dtype=torch.float32, device=device)
    if pairs.pairs and steps > 0:
        pipe = Pipeline(model, device=device, dtype=torch.float32, cuda_graphs=False)
        ref = fine_tune(pipe, pairs, steps=steps, pairs_per_step=pairs_per_step, lr=lr, beta=beta,
                        log_file=work / "log.jsonl", log=log)
        mix_weights(model.unet, ref, mix)
    else:
        log("no prompt had both right and wrong images (or no steps): nothing to learn from; the model is written as "
            "it was")
    summary = {"model": str(source), "model_sha256": model_sha, "kinds": list(kinds),
               "pairs": {k: len(s.pairs) for k, s in zip(kinds, sets)}, "prompts": prompts, "seeds": seeds,
               "world_seed": world_seed, "steps": steps, "pairs_per_step": pairs_per_step, "lr": lr, "beta": beta,
               "mix": mix}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return save_model(model, out, to="estable", dtype="fp16", overwrite=overwrite)
