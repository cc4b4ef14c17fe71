"""Teaching a model's text tower words its captions never used (issue 11's paraphrases).

A text tower trained only on the shapes world's captions has never read "beneath" or "on top of": a prompt said
with them is drawn as if the relation were not there (the paraphrase test of ``estable eval compositional``). A
user's dictionary closes that gap: each synonym (a new phrase → a phrase the model knows, e.g. "beneath" → "below")
is distilled into the text encoder, the U-Net and VAE frozen.

- **Synonym term**: train-split pair scenes are rendered and encoded once; at each step some are noised at random
  timesteps, and the U-Net's prediction from the caption said with the new phrase (the text encoder being trained)
  is pulled to its prediction from the caption as written (a frozen copy of the text encoder). Matching the U-Net's
  outputs, not the contexts, lets the phrases tokenize to different lengths.
- **Keeping term**: captions of every kind in the model's own words keep their per-token context: the mean squared
  difference from the frozen copy's, weighted by ``keep_weight``. The empty prompt is among them.
- **Own keeping term** (``keep_own_weight``, off by default): the same step's pair captions as written keep what
  the U-Net draws from them — its prediction from the trained encoder's context pulled to its prediction from the
  frozen copy's, at the same noised latents: the relation words the synonyms share their meaning with are the ones
  the synonym term moves.

Captions are completed as the file's generation completes them (``estable.prompt_completion``), so the contexts are
those generation uses. Only train-split scenes are used: the compositional benchmark's prompts (held-out colour ×
shape combinations) are never seen, in either phrasing. :func:`teach_synonyms` runs it on a model file and
``estable train synonyms`` (cli_train.py) is its command.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from estable.errors import EstableError
from estable.evaluation.compositional import PARAPHRASES
from estable.images import to_tensor
from estable.prompt_completion import complete_prompt
from estable.sampling.schedules import alphas_cumprod
from estable.training.objectives import noisy_latents_and_target
from estable.training.shapes import ShapesWorld, caption_for

# The paraphrase test's "synonyms" set as {new: known}: what the recipe teaches.
PARAPHRASE_SYNONYMS = {new.strip(): known.strip() for known, new in PARAPHRASES.items()}


def parse_synonyms(items: Sequence[str]) -> dict[str, str]:
    """{new: known} from "NEW=KNOWN" strings; an EstableError for a malformed or repeated one."""
    out: dict[str, str] = {}
    for item in items:
        new, sep, known = (part.strip() for part in item.partition("="))
        if not sep or not new or not known or new == known:
            raise EstableError(f"a synonym is NEW=KNOWN with two different phrases (e.g. \"beneath=below\"), "
                               f"not {item!r}")
        if new in out:
            raise EstableError(f"the phrase {new!r} is given twice")
        out[new] = known
    return out


def say_with(caption: str, synonyms: Mapping[str, str]) -> str:
    """``caption`` with each known phrase (a whole-word match) said with its new synonym."""
    for new, known in synonyms.items():
        caption = re.sub(rf"(?<!\w){re.escape(known)}(?!\w)", new, caption)
    return caption


def says_known(caption: str, synonyms: Mapping[str, str]) -> bool:
    return say_with(caption, synonyms) != caption


def _world_captions(world: ShapesWorld, n: int, synonyms: Mapping[str, str], completion: str | None,
                    need_known: bool) -> list[tuple[int, str]]:
    """(scene index, completed caption) of the first ``n`` scenes whose captions say a known phrase (or of any)."""
    out, index = [], 0
    while len(out) < n:
        caption = caption_for(world.scene(index))
        if not need_known or says_known(caption, synonyms):
            out.append((index, complete_prompt(completion, caption, index)))
        index += 1
        if index > 50 * n + 1000:
            raise EstableError("the world's captions say none of the known phrases; check the synonyms' right-hand "
                               "sides (e.g. \"below\", \"to the left of\")")
    return out


@torch.no_grad()
def _scene_latents(model, world: ShapesWorld, indices: Sequence[int], device, batch: int = 32) -> torch.Tensor:
    """The scenes rendered at the world's size and encoded: posterior means × the VAE's scaling factor (fp32)."""
    vae = model.vae
    out = []
    for start in range(0, len(indices), batch):
        pixels = torch.cat([to_tensor(world.sample(i)[0]) for i in indices[start:start + batch]])
        out.append(vae.encode(pixels.to(device, torch.float32)).mean * vae.config.scaling_factor)
    return torch.cat(out)


def prediction_losses(unet, student, teacher, z, ids_known, ids_students: Sequence[torch.Tensor], t, noise, ac,
                      objective: str, clip_skip: int) -> list[torch.Tensor]:
    """For each of ``ids_students``, the mean squared difference of the U-Net's prediction from it (``student``) and
    from the known phrasing (``teacher``; computed once) at noised latents ``z`` (timesteps ``t``, noise ``noise``)."""
    z_t, _ = noisy_latents_and_target(z, noise, ac[t.cpu()].to(z.device), objective)
    with torch.no_grad():
        target = unet(z_t, t, teacher.encode(ids_known, clip_skip)).float()
    return [F.mse_loss(unet(z_t, t, student.encode(ids, clip_skip)).float(), target) for ids in ids_students]


def synonym_loss(unet, student, teacher, z, ids_new, ids_known, t, noise, ac, objective: str,
                 clip_skip: int) -> torch.Tensor:
    """Mean squared difference of the U-Net's predictions from the new phrasing (``student``) and the known one
    (``teacher``) at noised latents ``z`` (timesteps ``t``, noise ``noise``)."""
    return prediction_losses(unet, student, teacher, z, ids_known, [ids_new], t, noise, ac, objective, clip_skip)[0]


def keep_loss(student, teacher, ids, clip_skip: int) -> torch.Tensor:
    with torch.no_grad():
        target = teacher.encode(ids, clip_skip).float()
    return F.mse_loss(student.encode(ids, clip_skip).float(), target)


def teach_synonyms(source: Path, out: Path, synonyms: Mapping[str, str], *, scenes: int = 512, steps: int = 200,
                   batch: int = 32, keep_batch: int = 64, val_scenes: int = 256, lr: float = 1e-4,
                   keep_weight: float = 1.0, keep_own_weight: float = 0.0, world_seed: int = 103,
                   device: torch.device | str = "cpu",
                   work: Path | None = None, overwrite: bool = False, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """The model file ``source`` with its text encoder taught ``synonyms`` ({new: known}), written to ``out`` (fp16,
    with the file's settings). Returns (and writes to ``work/summary.json`` when given, with the loss per step in
    ``work/log.jsonl``) the settings and the synonym term on ``val_scenes`` held-out scenes before and after, at fixed
    timesteps and noise (``val_before``, ``val_after``; "held-out" here: the world's heldout split, whose captions the
    training never reads)."""
    from estable.checkpoints.store import load_model, save_model

    if not synonyms:
        raise EstableError("no synonym to teach")
    device = torch.device(device)
    model = load_model(source, dtype=torch.float32, device=device)
    tok = model.require_tokenizer()
    completion, clip_skip = model.config.prompt_completion, model.config.clip_skip
    size = model.config.unet.sample_size * model.config.vae.downsample_factor  # the model's native size
    train_world = ShapesWorld("train", world_seed, size=size, kind_weights={"pair": 1.0})
    val_world = ShapesWorld("heldout", world_seed, size=size, kind_weights={"pair": 1.0})
    any_world = ShapesWorld("train", world_seed + 1)
    log(f"rendering and encoding {scenes} train-split pair scenes and {val_scenes} held-out ones at {size}²")
    train = _world_captions(train_world, scenes, synonyms, completion, need_known=True)
    val = _world_captions(val_world, val_scenes, synonyms, completion, need_known=True)
    z_train = _scene_latents(model, train_world, [i for i, _ in train], device)
    z_val = _scene_latents(model, val_world, [i for i, _ in val], device)
    keep = [""] + [c for _, c in _world_captions(any_world, 4 * scenes, synonyms, completion, need_known=False)]

    def ids(texts: Sequence[str]) -> torch.Tensor:
        return tok(list(texts)).to(device)

    ids_known = ids([c for _, c in train])
    ids_new = ids([say_with(c, synonyms) for _, c in train])
    val_known, val_new = ids([c for _, c in val]), ids([say_with(c, synonyms) for _, c in val])
    ids_keep = ids(keep)

    unet = model.unet.eval().requires_grad_(False)
    student = model.text_encoder
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    objective = "v" if model.config.schedule.prediction_type == "v_prediction" else "eps"
    ac = alphas_cumprod(model.config.schedule)
    gen = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(seed + 1)
    val_t = torch.randint(0, len(ac), (len(val),), generator=val_gen)
    val_noise = torch.randn(z_val.shape, generator=val_gen)

    @torch.no_grad()
    def validate() -> float:
        student.eval()
        total = 0.0
        for s in range(0, len(val), 64):
            part = slice(s, s + 64)
            total += synonym_loss(unet, student, teacher, z_val[part], val_new[part], val_known[part],
                                  val_t[part].to(device), val_noise[part].to(device), ac, objective,
                                  clip_skip).item() * len(val_t[part])
        return total / len(val)

    before = validate()
    log(f"held-out synonym loss before: {before:.5f}")
    student.train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    records = []
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(train), (batch,), generator=gen)
        t = torch.randint(0, len(ac), (batch,), generator=gen)
        noise = torch.randn((batch, *z_train.shape[1:]), generator=gen)
        z, known = z_train[pick.to(device)], ids_known[pick.to(device)]
        t, noise = t.to(device), noise.to(device)
        # with the own term, the known phrasing's own prediction too, held where the frozen copy puts it
        students = [ids_new[pick.to(device)]] + ([known] if keep_own_weight else [])
        syn, *own = prediction_losses(unet, student, teacher, z, known, students, t, noise, ac, objective, clip_skip)
        kept = torch.randint(0, len(keep), (keep_batch,), generator=gen).to(device)
        kl = keep_loss(student, teacher, ids_keep[kept], clip_skip)
        loss = syn + keep_weight * kl
        record = {"step": step, "synonym": syn.item(), "keep": kl.item()}
        if own:
            loss = loss + keep_own_weight * own[0]
            record["keep_own"] = own[0].item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        records.append(record)
        if step % 50 == 0 or step == steps:
            log(f"step {step}/{steps}: synonym {syn.item():.5f}, keep {kl.item():.2e}")
    student.eval().requires_grad_(False)
    after = validate()
    log(f"held-out synonym loss after: {after:.5f}")
    summary = {"model": str(source), "synonyms": dict(synonyms), "scenes": scenes, "steps": steps, "batch": batch,
               "keep_batch": keep_batch, "lr": lr, "keep_weight": keep_weight, "keep_own_weight": keep_own_weight,
               "world_seed": world_seed,
               "seed": seed, "val_before": before, "val_after": after}
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (work / "summary.json").write_text(json.dumps(summary, indent=1))
    save_model(model, out, to="estable", dtype="fp16", overwrite=overwrite)
    return summary
