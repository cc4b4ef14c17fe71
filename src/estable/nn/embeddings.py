"""Timestep embeddings for the denoiser.

The diffusion step t enters the U-Net as a sinusoidal code (the positional encoding of Vaswani et al. 2017,
sec. 3.5, used for timesteps by Ho et al. 2020, appendix B), followed by a two-layer MLP whose output is
added inside every residual block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal code of a vector of (possibly fractional) timesteps; returns float32 (N, dim).

    With half = dim // 2 and i = 0 .. half-1, frequency ω_i = max_period^(-i / (half - freq_shift)) and the code
    is [sin(t·ω), cos(t·ω)], or [cos(t·ω), sin(t·ω)] when ``flip_sin_to_cos`` (Stable Diffusion's order).
    An odd ``dim`` gets one trailing zero. The frequencies are computed here, not stored as a buffer, so that
    a model built on the meta device has nothing left to fill after loading its weights.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D tensor of timesteps, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = timesteps.float()[:, None] * freqs[None, :]  # (N, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2·half)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (N, dim)
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal code: Linear → SiLU → Linear (diffusers' ``time_embedding``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(code)))  # (B, out_dim)
