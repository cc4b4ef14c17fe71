"""Convolutional building blocks shared by the U-Net and the VAE: residual block, down- and upsampling.

The residual block is the pre-activation ResNet unit of the DDPM U-Net (Ho et al. 2020, appendix B; He et
al. 2016): GroupNorm (Wu & He 2018) → SiLU → conv, the timestep embedding added as a per-channel bias after
the first convolution, GroupNorm → SiLU → dropout → conv, and a skip path. Attribute names follow diffusers
(``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``) so that its files load as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock(nn.Module):
    """x + F(x) with F = conv(drop(SiLU(GN(conv(SiLU(GN(x))) + W·SiLU(temb))))).

    ``temb_channels=None`` builds the block without a time projection (the VAE's use). When the channel count
    changes, the skip path is a 1×1 convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock was built with a time projection and needs a timestep embedding")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Cout, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution.

    ``padding=1`` is the U-Net's symmetric padding. ``padding=0`` is the LDM autoencoder's variant: the input
    is padded by one zero row/column on the bottom/right only, (0, 1, 0, 1), then convolved without padding.
    """

    def __init__(self, channels: int, *, padding: int = 1) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"Downsample padding must be 0 (asymmetric, VAE) or 1 (U-Net), not {padding}")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, ⌈H/2⌉, ⌈W/2⌉)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3×3 convolution.

    ``size`` forces the output size (the U-Net passes the size of the skip connection it will be concatenated
    with, so odd latent sizes work); otherwise the factor is exactly 2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        out_size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else tuple(size)
        # Nearest-neighbour kernels have failed on very large or channels-last inputs (pytorch#86679 for bf16
        # in torch < 2.1, diffusers#984 for batches ≥ 64, pytorch#141831 for ≥ 2^31 output elements); a
        # contiguous NCHW input avoids those paths. Nearest copies values, so no dtype change is needed: bf16
        # and fp16 are supported natively by the torch versions this package requires (≥ 2.4).
        if x.shape[0] >= 64 or x.numel() * 4 > 2**31:
            x = x.contiguous()
        x = F.interpolate(x, size=out_size, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)
