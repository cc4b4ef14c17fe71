"""Preference fine-tuning by the judge: a shapes-world model taught from its own images (issue 11).

Diffusion-DPO (Wallace et al. 2023) on pairs the model drew itself:

1. **Images** (:func:`draw_images`). Distinct prompts of one kind from the shapes world's *train* split (the
   compositional benchmark's prompts are held out: each of them names a colour × shape the train split never draws),
   ``seeds`` images each, drawn as issue 11's protocol draws them — DPM++ 2M Karras, 25 steps, the file's guidance
   scale and prompt completion. The judge scores each image as the benchmark does (the whole prompt) and its stray
   pixels are counted (``estable.evaluation.stray``). An image set keeps the verdicts and the VAE latents (posterior
   mean × scaling factor) of the images that can be in a pair, with the completed prompts they were drawn from.
2. **Pairs** (:func:`choose_pairs`), by a grade: ``judge`` pairs every wrong image of a prompt with a right one, in
   turn; ``strays`` pairs a prompt's cleanest right image with its dirtiest when they differ by a margin of stray
   pixels; ``both`` is the two, the judge's winners taken cleanest first.
3. **Fine-tuning** (:func:`fine_tune`, fp32). The U-Net learns, against a frozen copy of itself (the reference), to
   denoise the winner of each pair better and the loser worse than the reference does: the loss is
   −log σ(−β·Δ), Δ = (e_w − e_w,ref) − (e_l − e_l,ref), e the mean squared error of the prediction (the file's
   objective, ε or v) for one noised latent; both images of a pair get the same timestep and noise. Text encoder and
   VAE stay frozen.
4. **Mixing** (:func:`mix_weights`): the U-Net's weights are put ``share`` of the way from the reference to the
   fine-tuned ones (1: the fine-tuned model). On the shipped model, half of the way kept most of the accuracy the
   pairs taught and most of the FID they cost (benchmarks/RESULTS.md).

:func:`preference_fine_tune` runs them on a model file, keeping each kind's images in a work folder for a later
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
from estable.evaluation.stray import count_stray, spec_colours
from estable.images import to_tensor
from estable.params import GenerationParams
from estable.sampling.schedules import alphas_cumprod
from estable.training.objectives import noisy_latents_and_target
from estable.training.shapes import ShapesWorld, caption_for

PAIR_KINDS = ("single", "count", "pair", "colour_binding")


@dataclass
class ImageSet:
    """Images a model drew of some prompts, and what was said of them: ``latents`` (N, C, h, w) fp16 on the CPU, the
    images kept (those that can be in a pair, :func:`draw_images`); ``prompts`` their N completed prompts;
    ``verdicts`` one per prompt: its caption, ``seeds``, which images are ``right``, each image's ``strays`` (stray
    pixels) and where its latent is (``kept``: an index into ``latents``, −1 when not kept); ``drawn`` what they were
    drawn from (the model's sha256, the kind, prompts, seeds and world seed)."""

    latents: torch.Tensor
    prompts: list[str]
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    drawn: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        torch.save({"latents": self.latents, "prompts": self.prompts, "verdicts": self.verdicts,
                    "drawn": self.drawn}, path)

    @classmethod
    def load(cls, path: Path) -> ImageSet:
        d = torch.load(path, weights_only=True)
        return cls(d["latents"], list(d["prompts"]), list(d["verdicts"]), dict(d.get("drawn", {})))


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


def _cleanest_and_dirtiest(right: Sequence[int], strays: Sequence[int]) -> tuple[int, int]:
    return min(right, key=lambda k: strays[k]), max(right, key=lambda k: strays[k])


def _kept(right: Sequence[bool], strays: Sequence[int]) -> list[int]:
    """Which of a prompt's images can be in a pair: all of them when some are right and some wrong; of a prompt whose
    images are all right, the cleanest and the dirtiest (fewest and most stray pixels); none when all are wrong."""
    ok = [k for k, r in enumerate(right) if r]
    if not ok:
        return []
    if len(ok) < len(right):
        return list(range(len(right)))
    return sorted(set(_cleanest_and_dirtiest(ok, strays)))


def draw_images(pipe: Any, judge: Any, specs: Sequence, seeds: int, base_seed: int, batch: int,
                log: Callable[[str], None] = lambda msg: None) -> ImageSet:
    """``specs``' images, judged and their stray pixels counted: prompt i's have seeds base_seed + i·seeds + k,
    ``batch // seeds`` prompts per sampler run (``pipe``: a :class:`estable.pipeline.Pipeline`; ``judge``: the
    compositional benchmark's). The latents of the images that can be in a pair are kept (:func:`_kept`)."""
    params = protocol_params(pipe)
    out = ImageSet(torch.zeros(0), [])
    latents: list[torch.Tensor] = []
    per_run = max(1, batch // seeds)
    for start in range(0, len(specs), per_run):
        chunk = specs[start:start + per_run]
        seed_lists = [[base_seed + (start + i) * seeds + k for k in range(seeds)] for i in range(len(chunk))]
        images = pipe.txt2img_each([caption_for(s) for s in chunk for _ in range(seeds)],
                                   [s for ss in seed_lists for s in ss], params, batch=batch)
        dets, bgs = judge.detect(images), judge.classify_background(images)
        strays = count_stray(images, [spec_colours(s) for s in chunk for _ in range(seeds)], pipe.device)
        for i, spec in enumerate(chunk):
            own = slice(i * seeds, (i + 1) * seeds)
            right = [bool(score_image(spec, d, b)["whole_prompt"]) for d, b in zip(dets[own], bgs[own])]
            keep = _kept(right, strays[own])
            kept = [-1] * seeds
            for k in keep:
                kept[k] = len(out.prompts)
                out.prompts.append(pipe.completed_prompt(params, seed_lists[i][k], caption_for(spec)))
            if keep:
                latents.append(_encode(pipe, [images[i * seeds + k] for k in keep]))
            out.verdicts.append({"prompt": caption_for(spec), "seeds": seed_lists[i], "right": right,
                                 "strays": strays[own], "kept": kept})
        done = start + len(chunk)
        if done // 100 != start // 100 or done == len(specs):
            log(f"{done}/{len(specs)} prompts")
    out.latents = (torch.cat(latents) if latents else torch.zeros(0)).half().cpu()
    return out


GRADES = ("judge", "strays", "both")


def choose_pairs(images: ImageSet, grade: str = "judge", margin: int = 16) -> list[tuple[int, int]]:
    """(winner, loser) latent indices of ``images``' pairs, prompt by prompt.

    ``judge``: each wrong image with a right one of its prompt, in turn (by seed). ``strays``: of a prompt's right
    images, the cleanest with the dirtiest, when the dirtiest has ``margin`` or more stray pixels more. ``both``: the
    judge's pairs with the right images taken cleanest first, and the stray pairs."""
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {', '.join(GRADES)}, not {grade!r}")
    pairs = []
    for v in images.verdicts:
        right = [k for k, r in enumerate(v["right"]) if r]
        wrong = [k for k, r in enumerate(v["right"]) if not r]
        local = []
        if grade != "strays" and right and wrong:
            winners = sorted(right, key=lambda k: v["strays"][k]) if grade == "both" else right
            local += [(winners[j % len(winners)], lo) for j, lo in enumerate(wrong)]
        if grade != "judge" and len(right) >= 2:
            clean, dirty = _cleanest_and_dirtiest(right, v["strays"])
            if v["strays"][dirty] - v["strays"][clean] >= margin:
                local.append((clean, dirty))
        pairs += [(v["kept"][w], v["kept"][lo]) for w, lo in local]
    return pairs


@torch.no_grad()
def _encode(pipe: Any, images: Sequence) -> torch.Tensor:
    pixels = torch.cat([to_tensor(im) for im in images]).to(pipe.device, pipe.dtype)  # (K, 3, H, W) in [-1, 1]
    return pipe.vae.encode(pixels).mean.float().cpu() * pipe.vae.config.scaling_factor


def merge_sets(sets: Sequence[ImageSet]) -> ImageSet:
    """One image set of several: latents, prompts and verdicts end to end, the verdicts' latent indices shifted."""
    merged = ImageSet(torch.cat([s.latents for s in sets]), [], [])
    for s in sets:
        offset = len(merged.prompts)
        merged.prompts += s.prompts
        merged.verdicts += [{**v, "kept": [k + offset if k >= 0 else -1 for k in v["kept"]]} for v in s.verdicts]
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


def fine_tune(pipe: Any, images: ImageSet, pairs: Sequence[tuple[int, int]], *, steps: int, pairs_per_step: int,
              lr: float, beta: float, log_file: Path | None = None, log: Callable[[str], None] = lambda msg: None,
              seed: int = 0) -> torch.nn.Module:
    """Fine-tune ``pipe``'s U-Net (fp32) in place on ``pairs`` of ``images``' latents; returns the frozen reference
    (the U-Net before)."""
    model, device = pipe.model, pipe.device
    used = sorted({i for pair in pairs for i in pair})
    with torch.no_grad():  # the contexts of the completed prompts, once each
        contexts = {p: pipe.encode_prompts(p, "", clip_skip=pipe.config.clip_skip)[0].float()
                    for p in dict.fromkeys(images.prompts[i] for i in used)}
    items = {i: {"latent": images.latents[i].float(), "context": contexts[images.prompts[i]]} for i in used}
    pair_items = [(items[w], items[lo]) for w, lo in pairs]
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
                         work: Path, device: torch.device, grade: str = "judge", margin: int = 16,
                         overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """The model file ``source`` fine-tuned by preference into ``out`` (fp16, with its file's settings).

    Each kind's images are drawn and judged into ``work/images-KIND.pt`` (with the image generation of ``estable eval
    compositional`` on ``device``: fp16 in CUDA graphs on a GPU) unless a set drawn from the same model with the same
    prompts, seeds and world is there; one drawn otherwise is an EstableError. The pairs are chosen from them by
    ``grade`` and ``margin`` (:func:`choose_pairs`). With no pairs (or no steps) ``out`` is ``source``'s weights as
    they were. ``work/log.jsonl`` gets the loss, ``work/summary.json`` the settings."""
    from estable.checkpoints.io import cached_sha256
    from estable.checkpoints.store import load_model, save_model
    from estable.evaluation.judge import load_default_judge
    from estable.pipeline import Pipeline, load_pipeline

    work.mkdir(parents=True, exist_ok=True)
    model_sha = cached_sha256(source)
    sets, drawer, judge = [], None, None
    for kind in kinds:
        path = work / f"images-{kind}.pt"
        wanted = {"model_sha256": model_sha, "kind": kind, "prompts": prompts, "seeds": seeds,
                  "world_seed": world_seed}
        if path.is_file():
            try:
                kept = ImageSet.load(path)
            except Exception as exc:  # truncated, not an image set, or not torch's: say which file, keep it
                raise EstableError(f"cannot read the images in {path} ({exc}); remove it to draw them again") from None
            if kept.drawn != wanted:
                raise EstableError(f"the images in {path} were drawn with {kept.drawn or 'unknown settings'}, not "
                                   f"{wanted}; remove the file or give another work folder")
            sets.append(kept)
            log(f"{kind}: {len(kept.verdicts)} prompts' verdicts read from {path}")
            continue
        if drawer is None:
            drawer, judge = load_pipeline(source, device=device), load_default_judge(device)
        specs = train_prompts(kind, prompts, world_seed)
        drawn = draw_images(drawer, judge, specs, seeds, 10_000, gen_batch, lambda m, kind=kind: log(f"{kind}: {m}"))
        drawn.drawn = wanted
        drawn.save(path)
        sets.append(drawn)
    del drawer, judge
    counts = {}
    for kind, s in zip(kinds, sets):
        right = [r for v in s.verdicts for r in v["right"]]
        strays = [n for v in s.verdicts for n in v["strays"]]
        counts[kind] = len(choose_pairs(s, grade, margin))
        log(f"{kind}: {sum(right)} of {len(right)} images right, {sum(strays) / max(len(strays), 1):.1f} stray "
            f"pixels per image; {counts[kind]} pairs by {grade}")
    images = merge_sets(sets)
    pairs = choose_pairs(images, grade, margin)
    model = load_model(source, dtype=torch.float32, device=device)
    if pairs and steps > 0:
        pipe = Pipeline(model, device=device, dtype=torch.float32, cuda_graphs=False)
        ref = fine_tune(pipe, images, pairs, steps=steps, pairs_per_step=pairs_per_step, lr=lr, beta=beta,
                        log_file=work / "log.jsonl", log=log)
        mix_weights(model.unet, ref, mix)
    else:
        log("no pair to learn from (or no steps); the model is written as it was")
    summary = {"model": str(source), "model_sha256": model_sha, "kinds": list(kinds), "grade": grade,
               "margin": margin, "pairs": counts, "prompts": prompts, "seeds": seeds, "world_seed": world_seed,
               "steps": steps, "pairs_per_step": pairs_per_step, "lr": lr, "beta": beta, "mix": mix}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return save_model(model, out, to="estable", dtype="fp16", overwrite=overwrite)
