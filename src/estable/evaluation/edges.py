"""How well a generated image follows a control edge map: edge F1 at a pixel tolerance.

The generated image's edges E_g are found with the same Canny settings as the control edges E_c. With a tolerance
of τ pixels (a disc; the usual relaxation of boundary benchmarks, e.g. Martin, Fowlkes & Malik 2004, sec. 4.1):

    precision = |{p ∈ E_g : dist(p, E_c) ≤ τ}| / |E_g|      (generated edges that the control asked for)
    recall    = |{p ∈ E_c : dist(p, E_g) ≤ τ}| / |E_c|      (control edges that the image reproduces)
    F1        = 2 · precision · recall / (precision + recall)

An empty edge set gives precision (or recall) 0 unless both are empty (then both are 1). Matching is by dilation,
not one-to-one assignment, so it is a slightly lenient F1; it is the same for every model compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..control.preprocess import _dilate, canny_mask

__all__ = ["EdgeScore", "edge_f1", "edge_f1_images"]


@dataclass(frozen=True)
class EdgeScore:
    precision: float
    recall: float

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def edge_f1(generated: np.ndarray, control: np.ndarray, tolerance: int = 2) -> EdgeScore:
    """Precision and recall of boolean edge maps (H, W) at ``tolerance`` pixels."""
    if generated.shape != control.shape:
        raise ValueError(f"edge maps differ in size: {generated.shape} and {control.shape}")
    g, c = generated.astype(bool), control.astype(bool)
    if not g.any() and not c.any():
        return EdgeScore(1.0, 1.0)
    near_c, near_g = _dilate(c, tolerance), _dilate(g, tolerance)
    precision = float((g & near_c).sum() / g.sum()) if g.any() else 0.0
    recall = float((c & near_g).sum() / c.sum()) if c.any() else 0.0
    return EdgeScore(precision, recall)


def edge_f1_images(generated: Image.Image, control_edges: Image.Image, tolerance: int = 2, *, low: float = 100,
                   high: float = 200, sigma: float = 0.0) -> EdgeScore:
    """:func:`edge_f1` of a generated image's Canny edges against a control edge image (white on black)."""
    if generated.size != control_edges.size:
        generated = generated.resize(control_edges.size, Image.Resampling.LANCZOS)
    g = canny_mask(generated, low, high, sigma)
    c = np.asarray(control_edges.convert("L")) >= 128
    return edge_f1(g, c, tolerance)
