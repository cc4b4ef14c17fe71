"""The output check: an image's CLIP embedding against a list of concept prompts, with a threshold.

Each generated image is scored against every concept of a list (one prompt per line, ``#`` comments) with a
CLIP pair (an Estable ``clip.safetensors``, as ``estable train clip`` exports it): score = 100 · max(cos(E_image,
E_concept), 0), the CLIPScore scale (Hessel et al. 2021, eq. 1, without its w = 2.5 weight, as torchmetrics
reports it). An image whose best score reaches the threshold is refused: the CLI does not write it (the other
images of the run are written) and ends with an error naming the concept; each refusal is logged on the
``estable.filters`` logger.

The built-in model ships its CLIP's text tower only, so the check needs ``--output-clip`` (a CLIP pair file).
How well it works is exactly as good as that CLIP's grasp of the concepts: a domain CLIP trained on the shapes
world knows shapes and colours, not the concepts a deployment would want to refuse. Choose the threshold from the
scores of known positive and negative images (``OutputCheck.scores``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from estable.errors import EstableError

__all__ = ["OutputCheck", "load_concepts"]

log = logging.getLogger("estable.filters")


def load_concepts(path: str | Path) -> list[str]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EstableError(f"concept list not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EstableError(f"cannot read the concept list {p}: {exc}") from None
    concepts = [line.split("#", 1)[0].strip() for line in lines]
    concepts = [c for c in concepts if c]
    if not concepts:
        raise EstableError(f"the concept list {p} holds no prompts")
    return concepts


@dataclass
class OutputCheck:
    pair: Any  # estable.models.clip.CLIPPair
    tokenizer: Any
    concepts: list[str]
    threshold: float
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, clip: str | Path, concepts: str | Path | list[str], threshold: float,
             device: str | torch.device = "cpu") -> OutputCheck:
        from estable.evaluation.clipscore import load_clip

        if not 0.0 < threshold <= 100.0:
            raise EstableError(f"the output-check threshold is a CLIP score in (0, 100], not {threshold:g}")
        pair, tok = load_clip(clip, device)
        names = concepts if isinstance(concepts, list) else load_concepts(concepts)
        return cls(pair, tok, names, float(threshold), torch.device(device))

    @torch.no_grad()
    def scores(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP scores (N images, K concepts), float32 on the CPU."""
        from estable.training.data import preprocess

        size = self.pair.config.image.image_size
        pixels = torch.stack([preprocess(im, size) for im in images]).to(self.device)  # (N, 3, S, S) in [-1, 1]
        ids = self.tokenizer(self.concepts).to(self.device)  # (K, T)
        e_img = F.normalize(self.pair.encode_image(pixels).float(), dim=-1)  # (N, D)
        e_txt = F.normalize(self.pair.encode_text(ids).float(), dim=-1)  # (K, D)
        return (100.0 * (e_img @ e_txt.T).clamp(min=0)).cpu()

    def check(self, images: list[Image.Image]) -> list[tuple[str, float] | None]:
        """Per image: None (allowed) or (concept, score) of the best-matching concept at or over the threshold."""
        if not images:
            return []
        s = self.scores(images)
        best, idx = s.max(dim=1)
        out: list[tuple[str, float] | None] = []
        for b, i in zip(best.tolist(), idx.tolist()):
            if b >= self.threshold:
                log.warning("image refused by the output check: concept %r, CLIP score %.2f ≥ %.2f",
                            self.concepts[i], b, self.threshold)
                out.append((self.concepts[i], b))
            else:
                out.append(None)
        return out
