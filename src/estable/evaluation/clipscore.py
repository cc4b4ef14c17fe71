"""CLIP score of generated images with our domain CLIP, next to its reference and its floor.

CLIPScore (Hessel et al. 2021, eq. 1), on the torchmetrics scale used by text-to-image papers:
``100 · max(cos(E_image, E_caption), 0)`` (``estable.models.clip.clip_score``). A number alone says little for a
small domain CLIP, so the report puts three means side by side, all over the same held-out prompts
(``compositional.make_prompts``) and image seeds:

    generated    the model's images with their own prompts
    reference    REAL renders of the same prompts (``render_generator``: a layout satisfying each prompt, seeded
                 like the generated images) with their own prompts: what a perfect generator scores
    floor        the real renders with a mismatched prompt: the images of prompt i scored against the caption
                 of prompt i+1 (a cyclic shift, so no image keeps its own caption; the prompts are distinct)

plus ``generated_shuffled`` (the generated images under the same mismatch): the gap generated − generated_shuffled
is how much the model's images depend on their prompt.

Images are brought to the CLIP's training size the way training data is (``training.data.preprocess``: shorter
side resized with Lanczos, centre crop) and scaled to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from ..errors import EstableError
from ..models.clip import CLIPPair, clip_score
from .compositional import EvalPrompt, image_seed, render_generator

__all__ = ["evaluate_clipscore", "format_clipscore", "load_clip", "score_images"]

Generator = Callable[[list[str], list[int]], list[Image.Image]]


def load_clip(source: str | Path, device: str | torch.device = "cpu") -> tuple[CLIPPair, Any]:
    """(pair, tokenizer) from a ``clip.safetensors`` export or a CLIP run folder holding one."""
    from ..training.clip_exports import CLIP_FILE, load_clip_pair

    path = Path(source)
    if path.is_dir():
        path = path / CLIP_FILE
    if not path.is_file():
        raise EstableError(f"no CLIP model at {source}: pass a {CLIP_FILE} file or the folder of an "
                           "`estable train clip` run")
    pair, tok = load_clip_pair(path)
    return pair.to(device).eval(), tok


@torch.no_grad()
def score_images(pair: CLIPPair, tokenizer: Any, images: Sequence[Image.Image], captions: Sequence[str], *,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> torch.Tensor:
    """CLIP score (torchmetrics scale) of image i with caption i, shape (N,), float32 on the CPU."""
    from ..training.data import preprocess

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    size = pair.config.image.image_size
    out = []
    for start in range(0, len(images), batch_size):
        ims = images[start : start + batch_size]
        pixels = torch.stack([preprocess(im, size) for im in ims]).to(device)  # (B, 3, S, S) in [-1, 1]
        ids = tokenizer(list(captions[start : start + batch_size])).to(device)  # (B, T)
        out.append(clip_score(pair, pixels, ids).float().cpu())  # (B,)
    return torch.cat(out)


def evaluate_clipscore(
    generate: Generator,
    pair: CLIPPair,
    tokenizer: Any,
    prompts: Sequence[EvalPrompt],
    images_per_prompt: int = 4,
    seed: int = 0,
    *,
    render_size: int = 256,
    device: str | torch.device = "cpu",
    prompts_per_call: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean CLIP scores of generated images, real renders (reference) and mismatched pairs (floor).

    ``generate(prompts, seeds) -> images`` as in :func:`estable.evaluation.compositional.evaluate`; the real
    renders use the same seeds at ``render_size``.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be positive, got {images_per_prompt}")
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError("the CLIP score floor pairs each image with another prompt: use at least 2 prompts")
    real = render_generator(render_size)
    n = len(prompts)
    rows: dict[str, list[torch.Tensor]] = {"generated": [], "generated_shuffled": [], "reference": [], "floor": []}
    for start in tqdm(range(0, n, prompts_per_call), disable=not progress, desc="clipscore", unit="chunk"):
        chunk = prompts[start : start + prompts_per_call]
        texts = [p.caption for p in chunk for _ in range(images_per_prompt)]
        # The mismatched caption of prompt i is that of prompt i+1 (mod n): a derangement of distinct prompts.
        wrong = [prompts[(p.index + 1) % n].caption for p in chunk for _ in range(images_per_prompt)]
        seeds = [image_seed(p.index, k, seed, images_per_prompt) for p in chunk for k in range(images_per_prompt)]
        fake = generate(texts, seeds)
        if len(fake) != len(texts):
            raise ValueError(f"the generator returned {len(fake)} images for {len(texts)} prompts")
        ref = real(texts, seeds)
        kw = {"device": device}
        rows["generated"].append(score_images(pair, tokenizer, fake, texts, **kw))
        rows["generated_shuffled"].append(score_images(pair, tokenizer, fake, wrong, **kw))
        rows["reference"].append(score_images(pair, tokenizer, ref, texts, **kw))
        rows["floor"].append(score_images(pair, tokenizer, ref, wrong, **kw))
    scores = {k: torch.cat(v) for k, v in rows.items()}  # each (n · images_per_prompt,)
    kinds = [p.kind for p in prompts for _ in range(images_per_prompt)]
    by_kind: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(kinds):
        mask = torch.tensor([k == kind for k in kinds])
        by_kind[kind] = {name: float(s[mask].mean()) for name, s in scores.items()} | {"images": int(mask.sum())}

    def summary(s: torch.Tensor) -> dict[str, float]:
        return {"mean": float(s.mean()), "std": float(s.std()) if len(s) > 1 else 0.0}

    return {
        "metric": "CLIP score, 100 * max(cos, 0) (torchmetrics scale)",
        "prompts": n,
        "images_per_prompt": images_per_prompt,
        "images": len(kinds),
        "seed": seed,
        "clip_image_size": pair.config.image.image_size,
        **{name: summary(s) for name, s in scores.items()},
        # generated relative to the [floor, reference] span: 0 = no better than mismatched pairs, 1 = real renders
        "relative": _relative(scores),
        "by_kind": by_kind,
        "per_image": [
            {"prompt": p.caption, "kind": p.kind, "seed": image_seed(p.index, k, seed, images_per_prompt),
             **{name: float(s[i * images_per_prompt + k]) for name, s in scores.items()}}
            for i, p in enumerate(prompts) for k in range(images_per_prompt)
        ],
    }


def _relative(scores: dict[str, torch.Tensor]) -> float | None:
    span = float(scores["reference"].mean() - scores["floor"].mean())
    if span <= 0:
        return None  # the CLIP does not tell matched from mismatched pairs: no scale to place the model on
    return float(scores["generated"].mean() - scores["floor"].mean()) / span


def format_clipscore(report: dict[str, Any]) -> str:
    """The report as a text table: rows generated / reference / floor, columns overall and prompt kinds."""
    cols = ["overall", *report["by_kind"]]
    width = 16
    names = [("generated", "generated"), ("reference", "real renders"), ("floor", "floor (shuffled)"),
             ("generated_shuffled", "generated, shuffled")]
    lines = [
        f"CLIP score (100 * max(cos, 0)): {report['prompts']} held-out prompts, {report['images']} images",
        f"{'':<22}" + "".join(f"{c:>{width}}" for c in cols),
    ]
    for key, label in names:
        cells = [report[key]["mean"], *(report["by_kind"][k][key] for k in report["by_kind"])]
        lines.append(f"{label:<22}" + "".join(f"{v:>{width}.2f}" for v in cells))
    rel = report["relative"]
    lines.append("generated on the floor→reference scale: " + ("n/a (reference ≤ floor)" if rel is None
                                                               else f"{rel:.3f}"))
    return "\n".join(lines)
