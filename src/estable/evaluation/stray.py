"""Stray pixels: pixels of a shapes-world image whose colour no render of its prompt could hold (issue 11).

A render of the shapes world holds its objects' colours and its background's colour (the named one, else grey),
each made lighter or darker by a texture or a gradient, and blends of two of these where anti-aliased edges meet. A
pixel further than ``threshold`` levels (Euclidean RGB, default 40) from every such colour is stray: the spots a
decoder draws at shape rims are (yellow, green or magenta on a red circle over grey), a slightly off red is not.

benchmarks/stray_pixels.py counts them on the demo prompt and the sample grid; the preference fine-tune
(``estable.training.preference``) uses them to choose the cleaner of two right images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from estable.training.shapes import BACKGROUND_COLOURS, COLOURS, DEFAULT_BACKGROUND, parse_caption

THRESHOLD = 40.0
RGB = tuple[int, int, int]


def allowed_segments(colours: Sequence[RGB]) -> tuple[np.ndarray, np.ndarray]:
    """(S, 3) starts and ends of the colour segments a render may hold: each colour towards black and towards
    white (shading by a texture or gradient), and between every two colours (anti-aliased edges)."""
    pts = [np.array(c, dtype=np.float64) for c in dict.fromkeys(colours)]  # each colour once
    ends = [np.zeros(3), np.full(3, 255.0)]
    segs = [(p, e) for p in pts for e in ends]
    segs += [(pts[i], pts[j]) for i in range(len(pts)) for j in range(i + 1, len(pts))]
    a, b = zip(*segs)
    return np.stack(a), np.stack(b)


def stray_mask_tensor(image: torch.Tensor, colours: Sequence[RGB], threshold: float = THRESHOLD) -> torch.Tensor:
    """(H, W) bool on ``image``'s device: the pixels of an (H, W, 3) 0–255 tensor further than ``threshold`` from
    every allowed segment (computed in float64, a segment at a time)."""
    a, b = (torch.from_numpy(x).to(image.device) for x in allowed_segments(colours))
    p = image.reshape(-1, 3).to(torch.float64)
    nearest = torch.full(p.shape[:1], float("inf"), dtype=torch.float64, device=image.device)
    for start, end in zip(a, b):
        ab = end - start
        t = (((p - start) @ ab) / max(float(ab @ ab), 1e-9)).clamp(0.0, 1.0)
        nearest = torch.minimum(nearest, (p - (start + t[:, None] * ab)).norm(dim=1))
    return (nearest > threshold).reshape(image.shape[:2])


def stray_mask(image: np.ndarray, colours: Sequence[RGB], threshold: float = THRESHOLD) -> np.ndarray:
    """(H, W) bool: the stray pixels of an (H, W, 3) uint8 image whose prompt allows ``colours``."""
    return stray_mask_tensor(torch.from_numpy(np.array(image)), colours, threshold).numpy()


def spec_colours(spec) -> list[RGB]:
    """The colours a render of a prompt spec holds: its objects', then its background's (grey when unnamed)."""
    bg = spec.background.colour if spec.background is not None else DEFAULT_BACKGROUND
    return [COLOURS[o.colour] for o in spec.objects] + [BACKGROUND_COLOURS[bg]]


def object_colours(prompt: str) -> list[RGB]:
    return [COLOURS[o.colour] for o in parse_caption(prompt).objects]


def prompt_colours(prompt: str) -> list[RGB]:
    return spec_colours(parse_caption(prompt))


def count_stray(images: Sequence, colours: Sequence[Sequence[RGB]], device: torch.device | str = "cpu",
                threshold: float = THRESHOLD) -> list[int]:
    """The stray pixels of each image (PIL, RGB) with the colours its prompt allows, counted on ``device``."""
    counts = []
    for image, allowed in zip(images, colours, strict=True):
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).to(device)
        counts.append(int(stray_mask_tensor(pixels, allowed, threshold).sum()))
    return counts
