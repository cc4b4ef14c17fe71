"""Fréchet Inception Distance (FID) and its building blocks.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule…", eq. 6) is the Fréchet (2-Wasserstein)
distance between two Gaussians fitted to feature vectors of real and generated images. For Gaussians the
distance has a closed form (Dowson & Landau 1982):

    d²(N(μ1, Σ1), N(μ2, Σ2)) = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})

Computing Tr((Σ1 Σ2)^{1/2}) without scipy: Σ1 Σ2 is not symmetric, but it is similar to the symmetric PSD matrix
M = Σ1^{1/2} Σ2 Σ1^{1/2}  (Σ1^{-1/2} M Σ1^{1/2} = Σ1 Σ2 when Σ1 is invertible, and by continuity the spectra agree
for singular Σ1 too). So the eigenvalues of Σ1 Σ2 are those of M — real and non-negative — and the trace of the
principal square root is Σ_i sqrt(λ_i(M)). Both square roots use ``torch.linalg.eigh`` in float64; eigenvalues
that round-off makes slightly negative (rank-deficient covariances: fewer samples than feature dimensions) are
clamped to 0, which is the exact value they approximate.

Feature extractors are callables ``(B, 3, H, W) float in [0, 1] -> (B, D)``: the judge network's penultimate
features (``estable.evaluation.judge.JudgeFeatures``) or pytorch-fid's Inception-v3 pool3 features
(``estable.evaluation.inception.InceptionFeatures``, loaded from a user-supplied weight file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


class FeatureExtractor(Protocol):
    """Maps a batch of images (B, 3, H, W) in [0, 1] to feature vectors (B, D); resizes internally."""

    input_size: int  # the side images of mixed sizes are resized to before batching

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (N − 1 normalisation, as np.cov)."""
    f = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(dim=0)  # (D,)
    centred = f - mu  # (N, D)
    sigma = centred.T @ centred / (f.shape[0] - 1)  # (D, D)
    return mu, sigma


def _sym_eigvals(m: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a (numerically) symmetric matrix, symmetrised first so eigh sees an exact symmetric input."""
    return torch.linalg.eigvalsh(0.5 * (m + m.T))


def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric PSD matrix via its eigendecomposition (negative round-off clamped)."""
    m = 0.5 * (m + m.T)
    vals, vecs = torch.linalg.eigh(m)  # m = V diag(λ) Vᵀ
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T  # V diag(√λ) Vᵀ


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((Σ1 Σ2)^{1/2}) for symmetric PSD Σ1, Σ2, as Σ sqrt(eig(Σ1^{1/2} Σ2 Σ1^{1/2})) (see module docstring)."""
    s1 = sqrtm_psd(sigma1)  # Σ1^{1/2}
    vals = _sym_eigvals(s1 @ sigma2 @ s1)  # spectrum of Σ1 Σ2, real and ≥ 0 up to round-off
    return vals.clamp(min=0).sqrt().sum()


def frechet_distance(
    mu1: torch.Tensor | np.ndarray,
    sigma1: torch.Tensor | np.ndarray,
    mu2: torch.Tensor | np.ndarray,
    sigma2: torch.Tensor | np.ndarray,
) -> float:
    """Squared Fréchet distance d² between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, eq. 6), in float64."""
    m1, m2 = (torch.as_tensor(m).to("cpu", torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).to("cpu", torch.float64) for s in (sigma1, sigma2))
    d = m1.shape[0]
    if m2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"mismatched statistics: mu {tuple(m1.shape)} / {tuple(m2.shape)}, "
            f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}"
        )
    if not all(bool(torch.isfinite(t).all()) for t in (m1, m2, s1, s2)):
        raise ValueError("the feature statistics contain NaN or infinity")
    diff = m1 - m2
    tr = torch.trace(s1) + torch.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    # Round-off can leave a tiny negative value for identical statistics; the distance itself is ≥ 0.
    return max(float(diff @ diff + tr), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Images -> features -> FID
# ---------------------------------------------------------------------------------------------------------


def pil_to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """Stack PIL images as (B, 3, H, W) float32 in [0, 1]; images whose sizes differ are resized to ``size``."""
    rgb = [im.convert("RGB") for im in images]
    if len({im.size for im in rgb}) > 1:
        if size is None:
            raise ValueError("images of different sizes need a target size")
        rgb = [im.resize((size, size), Image.BICUBIC) if im.size != (size, size) else im for im in rgb]
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in rgb])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)


def _batches(images: Iterable[Image.Image], batch_size: int) -> Iterator[list[Image.Image]]:
    batch: list[Image.Image] = []
    for im in images:
        batch.append(im)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def extract_features(
    images: Iterable[Image.Image],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    total: int | None = None,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """Features (N, D) float32 on the CPU for a stream of PIL images, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    size = getattr(extractor, "input_size", None)
    out: list[torch.Tensor] = []
    with tqdm(total=total, disable=not progress, desc=desc, unit="img") as bar:
        for batch in _batches(images, batch_size):
            x = pil_to_tensor(batch, size).to(device)  # (B, 3, H, W)
            out.append(extractor(x).float().cpu())  # (B, D)
            bar.update(len(batch))
    if not out:
        raise ValueError("no images to compute features of")
    return torch.cat(out)


def compute_fid(
    images_a: Iterable[Image.Image],
    images_b: Iterable[Image.Image],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> float:
    """FID between two image sets under ``extractor``'s features (each set needs at least 2 images)."""
    fa = extract_features(images_a, extractor, batch_size=batch_size, device=device, progress=progress, desc="set A")
    fb = extract_features(images_b, extractor, batch_size=batch_size, device=device, progress=progress, desc="set B")
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


__all__ = [
    "FeatureExtractor",
    "compute_fid",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "pil_to_tensor",
    "sqrtm_psd",
    "trace_sqrt_product",
]
