"""Probe: do variants of classifier-free guidance help the built-in model? The library has none of them but the
interval's start (``cfg_start``); this script swaps the pipeline's guided model.

    PYTHONPATH=src python benchmarks/guidance_variants.py [MODEL] --prompts 40 --config 4 --config 7.5:0.7 \
        --config 4:0:200 --out FILE                                                  # 2-core CPU, ~1 minute a config
    PYTHONPATH=src python benchmarks/guidance_variants.py --grid 4:0:0 --grid 4:0:200 --out demo.png   # demo seeds

A config is ``W[:PHI[:T_MIN[:T_MAX]]]``, with the guided output g = u + W (c − u) of the unconditional and conditional
outputs u, c:

* guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", sec. 3.4):
  g ← g · (PHI · std(c) / std(g) + 1 − PHI), standard deviations per image; PHI = 0 is plain guidance;
* a guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"): below timestep T_MIN
  and above T_MAX the conditional output alone (no guidance at the last, least noisy steps, or at the first, noisiest
  ones, which the paper found to cost diversity); T_MIN = 0 and T_MAX = 1000 (the defaults) guide every step;

and, after the head, optional ``,key=value`` pairs:

* ``above=A``: the scale above T_MAX (default 1: the conditional output alone), e.g. a weaker guidance in the noisy
  steps instead of none;
* ``high=H`` (``pool=P``, ``t_high=T``): guidance split by spatial frequency (in the spirit of Sadat et al. 2025,
  "Guidance in the frequency domain"): the difference d = c − u is split into its low-pass part L (P × P average
  pooling, bilinear back; default P = 4) and the rest, and g = u + W L + H (d − L); only at steps above timestep T
  (default 0: at every guided step). H = W is plain guidance, H = 1 leaves the fine detail unguided.
* ``bad=MODEL`` (``auto=A``, default 2): autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad
  version of itself"): a second, weaker model of the same schedule and latent space (an earlier built-in model) reads
  the same caption through its own text tower, and g ← g + (A − 1)(c − b) with b its conditional output. With W = 1
  (the generation's CFG 1: no unconditional call) that is b + A (c − b), pure autoguidance; with A = 1 plain CFG.
* ``order=O``: word-order guidance: r, the model's output for the caption's words in reverse order ("square blue a
  above circle red a"), and g ← g + O (c − r). The two captions hold the same words; the hope was that c − r carries
  only what the order says (which object is where). Measured on the built-in model (RESULTS.md, "a fine-tune on other
  background odds changes nothing"): the reversed caption also loses its background and count to the text tower, and
  c − r with them.
* ``swap=S``: role-swap guidance: s, the model's output for a pair caption with its two objects exchanged ("a blue
  square above a red circle" for "a red circle above a blue square": the mirrored scene, same background, same
  relation word), and g ← g + S (c − s); other prompts are their own contrast (no push). Two captions that differ in
  the roles alone, so c − s should carry where each object goes and not the background. Measured on the built-in
  model (RESULTS.md, "guidance away from the mirrored scene"): pairs 52 → 71 % at CFG 1, and the textured
  backgrounds go nearly as with CFG 4.
* ``mask=K``: guidance where the caption acts: per pixel, the norm over channels of d = c − u, averaged over its
  3 × 3 neighbourhood, as a fraction s = min(1, norm / (K × the image's median norm)), and g ← c + s (g − c): full
  guidance where the caption changes the prediction most (K times the median or more), less where it changes it
  little, the conditional output alone where it does not. The hope: the objects guided, the background (which
  guidance turns plain) left to the conditional model. ``gate=K``: the same with s = 1 where the norm is at least
  K × its median and 0 elsewhere (those pixels get the conditional output alone).
* ``contrast=K``: attribute-contrast guidance, the same idea for every kind of prompt: g ← g + K (c − (s₁ + s₂)/2),
  s₁, s₂ the outputs for two captions that differ from the prompt only in what its kind is judged on
  (:func:`attribute_contrasts`: a pair's roles, a colour-binding prompt's colours exchanged, a count's other two
  counts, a single object's colour and its shape), the background kept. Measured: single objects lose, the
  textures go (the same section).

Each config is scored like ``estable eval compositional`` on the first ``--prompts`` held-out prompts, two images
each, the same seeds for every config, 25 steps of DPM++ 2M Karras. ``--grid`` draws the demo prompt at seeds 1–8
per config instead (DPM++ 2M, as ``make demo``), one row per config.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from estable.evaluation.compositional import PROMPT_KINDS, evaluate, make_prompts
from estable.evaluation.judge import load_default_judge
from estable.params import GenerationParams
from estable.pipeline import Pipeline, load_pipeline
from estable.training.shapes.captions import caption_for, parse_caption, swap_pair_roles
from estable.training.shapes.vocab import COLOURS, COUNT_SIZES, COUNT_WORDS, SHAPES


class Variant(NamedTuple):
    """A guidance variant (see the module's docstring); the defaults are plain guidance at every step."""

    w: float
    phi: float = 0.0
    t_min: float = 0.0
    t_max: float = 1000.0
    above: float = 1.0  # the scale above t_max (1: the conditional output alone)
    high: float | None = None  # the scale of the difference's high frequencies (None: w, no split)
    pool: int = 4  # the low-pass: average pooling by this factor, then bilinear upsampling
    t_high: float = 0.0  # the frequency split only at steps above this timestep
    bad: str | None = None  # autoguidance: the weaker model's path (None: no autoguidance)
    auto: float = 2.0  # autoguidance's scale A
    order: float = 0.0  # word-order guidance's scale O (0: none)
    swap: float = 0.0  # role-swap guidance's scale S (0: none)
    contrast: float = 0.0  # attribute-contrast guidance's scale K (0: none)
    mask: float = 0.0  # guidance weighted by where the caption acts: full at K × the median of ‖c − u‖ (0: none)
    gate: float = 0.0  # guidance only where ‖c − u‖ is at least K × its median (0: everywhere)


def low_pass(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``x`` (B, C, h, w) averaged over ``pool`` × ``pool`` cells and interpolated back bilinearly."""
    small = F.avg_pool2d(x, pool, ceil_mode=True)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def combine(u: torch.Tensor, c: torch.Tensor, t: float, v: Variant) -> torch.Tensor:
    """The guided output of ``v`` from the unconditional and conditional outputs ``u``, ``c`` at timestep ``t``."""
    if t < v.t_min:
        return c
    if t > v.t_max:
        return c if v.above == 1 else u + v.above * (c - u)
    d = c - u
    if v.high is not None and v.high != v.w and t > v.t_high:
        low = low_pass(d, v.pool)
        g = u + v.w * low + v.high * (d - low)
    else:
        g = u + v.w * d
    if v.mask > 0 or v.gate > 0:
        norm = F.avg_pool2d(d.norm(dim=1, keepdim=True), 3, stride=1, padding=1, count_include_pad=False)  # (B,1,h,w)
        median = norm.flatten(1).median(dim=1).values.clamp_min(1e-12)[:, None, None, None]
        share = (norm / (v.mask * median)).clamp(max=1.0) if v.mask > 0 else (norm >= v.gate * median).float()
        g = c + share * (g - c)
    if v.phi == 0:
        return g
    ratio = c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True)
    return g * (v.phi * ratio + 1 - v.phi)


def guidance_variant(pipe: Pipeline, variant: Variant) -> None:
    """Make ``pipe`` combine its unconditional and conditional outputs as ``variant`` says (txt2img without
    ControlNet or cfg_start only). ``variant.w`` is not used: the scale is the generation's ``cfg_scale``.

    With autoguidance (``variant.bad``) or guidance away from contrast captions (``variant.order``: the words
    reversed; ``variant.swap``: the pair's roles swapped; ``variant.contrast``: two per prompt, each at half the
    scale) the pipeline's contexts carry the extra ones (the weaker
    model's, the contrast captions') after its own along the token axis (the towers have the same width), so that
    every batching of prompts keeps them together."""
    plain = Pipeline._guided_model.__get__(pipe)
    bad = None if variant.bad is None else load_pipeline(variant.bad, device=pipe.device, dtype=pipe.dtype)
    contrasts = [(scale, text) for scale, text in ((variant.order, reverse_words), (variant.swap, swapped_roles),
                                                   (variant.contrast / 2, lambda p: attribute_contrasts(p)[0]),
                                                   (variant.contrast / 2, lambda p: attribute_contrasts(p)[1]))
                 if scale != 0]  # (scale, the contrast caption of a prompt)
    parts = 1 + (bad is not None) + len(contrasts)
    if parts > 1:
        own_encode = pipe.encode_prompts

        def encode_prompts(prompt, negative_prompt, **kw):
            pieces = [own_encode(prompt, negative_prompt, **kw)]  # (cond, uncond), each (1, L, D)
            if bad is not None:
                pieces.append(bad.encode_prompts(prompt, negative_prompt, **kw))
            pieces += [own_encode(text(prompt), negative_prompt, **kw) for _, text in contrasts]
            cond, uncond = (torch.cat(same, dim=1) for same in zip(*pieces))  # (1, parts·L, D) each
            return cond, uncond

        pipe.encode_prompts = encode_prompts  # type: ignore[method-assign]

    def guided_model(context, scale, extra, control=None, t_guided=None):
        if parts == 1 and (scale is None or variant._replace(w=scale) == Variant(scale)):
            return plain(context, scale, extra, control, t_guided)
        if extra is not None or control is not None or t_guided is not None:
            raise NotImplementedError("the probe handles txt2img without ControlNet or cfg_start only")
        chunks = list(context.split(context.shape[1] // parts, dim=1))
        own_context = chunks.pop(0)
        bad_context = chunks.pop(0) if bad is not None else None
        contrast_contexts = [(scale, chunk) for (scale, _), chunk in zip(contrasts, chunks)]

        def model(x_t: torch.Tensor, t: float) -> torch.Tensor:
            x = x_t.to(pipe.dtype)
            batch = x.shape[0]  # the cond half of an extra context is its last ``batch`` rows
            if scale is None:  # CFG 1: the conditional output alone
                g = c = pipe.unet_forward(x, t, own_context).float()
            else:
                u, c = pipe.unet_forward(torch.cat([x, x]), t, own_context).float().chunk(2)  # (B, 4, h, w) each
                g = combine(u, c, float(t), variant._replace(w=scale))
            if bad_context is not None:
                b = bad.unet_forward(x, t, bad_context[-batch:]).float()
                g = g + (variant.auto - 1) * (c - b)
            for contrast_scale, contrast_context in contrast_contexts:
                r = pipe.unet_forward(x, t, contrast_context[-batch:]).float()
                g = g + contrast_scale * (c - r)
            return g

        return model

    pipe._guided_model = guided_model  # type: ignore[method-assign]


def reverse_words(prompt: str) -> str:
    """The prompt's words in reverse order: the same words, none of the relations their order makes."""
    return " ".join(reversed(prompt.split()))


def swapped_roles(prompt: str) -> str:
    """A pair caption with its two objects exchanged (the mirrored scene: the same words, the background and the
    relation kept); any other prompt unchanged, so that guidance away from it is no guidance."""
    return swap_pair_roles(prompt) or prompt


def attribute_contrasts(prompt: str) -> tuple[str, str]:
    """Two captions that differ from a held-out prompt of the grammar in what its kind is judged on, and in nothing
    else (the background kept): a pair's objects exchanged (twice); a colour-binding prompt's colours exchanged
    (twice); a count prompt's other two counts; a single object in another colour and as another shape. A prompt
    the grammar does not parse is its own contrast."""
    try:
        spec = parse_caption(prompt)
    except ValueError:
        return prompt, prompt
    if spec.kind == "pair":
        mirrored = swapped_roles(prompt)
        return mirrored, mirrored
    a = spec.objects[0]
    body = caption_for(replace(spec, background=None))  # the objects; the prompt's own background words follow
    if not prompt.startswith(body):
        return prompt, prompt
    tail = prompt[len(body):]

    def text(**changes) -> str:
        return caption_for(replace(spec, background=None, **changes)) + tail

    if spec.kind == "colour_binding":
        b = spec.objects[1]
        exchanged = text(objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))
        return exchanged, exchanged
    if spec.kind == "count":
        first, second = (text(count=n, objects=(replace(a, size=a.size if a.size in COUNT_SIZES[n] else None),))
                         for n in COUNT_WORDS if n != spec.count)
        return first, second
    taken = {a.colour} | ({spec.background.colour} if spec.background else set())
    colour = next(c for c in COLOURS if c not in taken)
    shape = SHAPES[(SHAPES.index(a.shape) + 1) % len(SHAPES)]
    return text(objects=(replace(a, colour=colour),)), text(objects=(replace(a, shape=shape),))


def parse_config(text: str) -> Variant:
    """``W[:PHI[:T_MIN[:T_MAX]]]`` then optional ``,key=value`` pairs for the other fields of :class:`Variant`."""
    head, *pairs = text.split(",")
    values = [float(v) for v in head.split(":")]
    if not 1 <= len(values) <= 4:
        raise SystemExit(f"a config is W[:PHI[:T_MIN[:T_MAX]]][,key=value...], not {text!r}")
    fields: dict[str, float | int | str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in ("above", "high", "pool", "t_high", "bad", "auto", "order", "swap", "contrast", "mask",
                       "gate") or not value:
            raise SystemExit(f"unknown option {pair!r} in {text!r}: above=, high=, pool=, t_high=, bad=, auto=, "
                             "order=, swap=, contrast=, mask=, gate=")
        fields[key] = int(value) if key == "pool" else value if key == "bad" else float(value)
    return Variant(*values, **fields)


def describe(v: Variant) -> str:
    text = f"CFG {v.w:g}, phi {v.phi:g}, guided for {v.t_min:g} ≤ t ≤ {v.t_max:g}"
    if v.t_max < 1000 and v.above != 1:
        text += f" (scale {v.above:g} above)"
    if v.high is not None and v.high != v.w:
        text += f", high frequencies (pool {v.pool}) at scale {v.high:g}" + (
            f" above t = {v.t_high:g}" if v.t_high > 0 else "")
    if v.bad is not None:
        text += f", autoguidance {v.auto:g} against {Path(v.bad).name}"
    if v.order != 0:
        text += f", word order {v.order:g}"
    if v.swap != 0:
        text += f", role swap {v.swap:g}"
    if v.contrast != 0:
        text += f", attribute contrast {v.contrast:g}"
    if v.mask != 0:
        text += f", weighted by ‖c − u‖, full from {v.mask:g} × its median"
    if v.gate != 0:
        text += f", only where ‖c − u‖ ≥ {v.gate:g} × its median"
    return text


def demo_grid(model: str, configs: list[Variant], device: str, out: Path) -> None:
    from PIL import Image

    from estable.evaluation.compositional import score_image
    from estable.training.shapes.captions import parse_caption

    prompt = "a red circle above a blue square"
    judge, spec = load_default_judge(device), parse_caption(prompt)
    grid = Image.new("RGB", (8 * 128, 128 * len(configs)), "white")
    for r, v in enumerate(configs):
        pipe = load_pipeline(model, device=device)
        guidance_variant(pipe, v)
        images = [pipe.txt2img(GenerationParams(prompt=prompt, sampler="dpmpp_2m", cfg_scale=v.w, seed=seed))
                  .images[0] for seed in range(1, 9)]
        right = sum(score_image(spec, d)["whole_prompt"] for d in judge.detect(images))
        print(f"{describe(v)}: the demo prompt right at {right} of 8", flush=True)
        for k, im in enumerate(images):
            grid.paste(im.resize((128, 128), Image.LANCZOS), (k * 128, r * 128))
    grid.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="src/estable/assets/default_model.safetensors")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--kind", choices=PROMPT_KINDS, help="held-out prompts of this kind only (default: the mix)")
    ap.add_argument("--config", action="append", metavar="W[:PHI[:T_MIN[:T_MAX]]][,key=value...]",
                    help="repeatable (default 4 and 4:0.7)")
    ap.add_argument("--grid", action="append", metavar="W[:PHI[:T_MIN[:T_MAX]]][,key=value...]",
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
    prompts = make_prompts(args.prompts, mix={args.kind: 1.0}) if args.kind else make_prompts(500)[: args.prompts]
    rows = []
    for v in configs:
        pipe = load_pipeline(args.model, device=args.device)
        guidance_variant(pipe, v)
        base = GenerationParams(steps=25, cfg_scale=v.w)
        t = time.perf_counter()
        report = evaluate(lambda texts, seeds, p=pipe, b=base: p.txt2img_each(texts, seeds, b, batch=8), judge, prompts,
                          args.images_per_prompt, 0)
        o = report["overall"]
        rows.append({"cfg": v.w, **v._asdict(), **o})
        scores = ", ".join(f"{k} {val:.1%}" for k, val in o.items() if isinstance(val, float))
        print(f"{describe(v)}: {scores}"
              + f" ({o['images']} images, {time.perf_counter() - t:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
