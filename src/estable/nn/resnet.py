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
    """Halve the resolution with a stride-2 convolution.

    ``padding=1`` is the U-Net's symmetric padding. ``padding=0`` is the LDM autoencoder's variant: the input
    is padded by one zero row/column on the bottom/right only, (0, 1, 0, 1), then convolved without padding.
    Either way a 3×3 kernel of stride 2 on an even side samples every other pixel from one edge, half a pixel off
    the centre. ``kernel=4`` (with ``padding=1``) samples centred windows: mirrored in, mirrored out.
    """

    def __init__(self, channels: int, *, padding: int = 1, kernel: int = 3) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"Downsample padding must be 0 (asymmetric, VAE) or 1 (U-Net), not {padding}")
        if kernel not in (3, 4) or (kernel == 4 and padding != 1):
            raise ValueError(f"Downsample takes a 3×3 kernel, or a 4×4 one padded all round; not {kernel}, {padding}")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=kernel, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, ⌈H/2⌉, ⌈W/2⌉)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3×3 convolution.

    ``size`` forces the output size (the U-Net passes the size of the skip connection it will be concatenated
    with, so odd latent sizes work); otherwise the factor is exactly 2.

    :meth:`fuse_phases` (the fastest mode's ``phase_upsample``) computes the same thing without the large
    intermediate: each output pixel of phase (a, b) — row parity a, column parity b — sees the low-resolution input
    through a 2×2 window, with the 3×3 kernel's taps summed where two of them fall on the same input pixel. One
    2×2 convolution of the input with the four phases' kernels stacked (4·C outputs) then an interleave gives the
    result: 16 multiply-adds per output pixel and channel pair instead of 36, the same numbers up to rounding.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        # (4·C, C, 2, 2) once fused. Buffers, not saved: torch.compile then takes their shapes as fixed, as it does
        # the parameters' (plain tensor attributes get symbolic sizes under dynamic=True, and its guards on them
        # pinned the batch size), and they follow the module's .to().
        self.register_buffer("phase_weight", None, persistent=False)
        self.register_buffer("phase_bias", None, persistent=False)
        self.phase_channels_last = False  # the output's layout by phases: the weights' when fused

    def forward(self, x: torch.Tensor, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        out_size = (2 * x.shape[-2], 2 * x.shape[-1]) if size is None else tuple(size)
        if self.phase_weight is not None and out_size == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self._by_phases(x)
        # Nearest-neighbour kernels have failed on very large or channels-last inputs (pytorch#86679 for bf16
        # in torch < 2.1, diffusers#984 for batches ≥ 64, pytorch#141831 for ≥ 2^31 output elements); a
        # contiguous NCHW input avoids those paths. Nearest copies values, so no dtype change is needed: bf16
        # and fp16 are supported natively by the torch versions this package requires (≥ 2.4).
        if x.shape[0] >= 64 or x.numel() * 4 > 2**31:
            x = x.contiguous()
        x = F.interpolate(x, size=out_size, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)

    # -- the fastest mode's form -----------------------------------------------------------------------------
    def _phase_kernels(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.conv.weight
        # Output row 2i+a reads upsampled rows 2i+a-1 … 2i+a+1, i.e. input rows i-1, i, i (a = 0) or i, i, i+1
        # (a = 1): taps[a][r][k] = 1 when the 3×3 kernel's row k lands on the 2×2 window's row r. Columns alike.
        exact = torch.float64 if w.dtype == torch.float64 else torch.float32  # the sums, rounded once to w's dtype
        taps = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=exact, device=w.device)
        k = torch.einsum("ark,oikl,bsl->aboirs", taps, w.detach().to(exact), taps)  # (2, 2, C, C, 2, 2)
        k = k.reshape(-1, *w.shape[1:2], 2, 2).to(w.dtype)  # output channel (2a + b)·C + o
        if self._channels_last():
            k = k.contiguous(memory_format=torch.channels_last)
        bias = self.conv.bias.detach().repeat(4) if self.conv.bias is not None else None
        return k, bias

    def fuse_phases(self) -> bool:
        """Compute upsampling and convolution by phases from now on (see the class); returns whether it fused.
        The phase kernels are derived from ``conv``'s weight: after changing it in place (merging a LoRA, loading
        a VAE) call :meth:`refresh_phases` (they are buffers, so they follow ``.to()``). A quantised or wrapped
        ``conv`` (not a plain Conv2d) is left as it is."""
        if self.phase_weight is not None or type(self.conv) is not nn.Conv2d:
            return False
        self.phase_weight, self.phase_bias = self._phase_kernels()
        self.phase_channels_last = self._channels_last()
        return True

    def _channels_last(self) -> bool:
        w = self.conv.weight
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    def refresh_phases(self) -> None:
        """Derive the phase kernels from ``conv`` again, in place (recorded CUDA graphs keep seeing them)."""
        if self.phase_weight is None:
            return
        k, bias = self._phase_kernels()
        with torch.no_grad():
            self.phase_weight.copy_(k)
            if bias is not None and self.phase_bias is not None:
                self.phase_bias.copy_(bias)

    def unfuse_phases(self) -> None:
        self.phase_weight = self.phase_bias = None

    def _by_phases(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # padding 1 on a 2×2 kernel: (H+1)×(W+1) outputs; phase (a, b)'s pixel (i, j) is output (i+a, j+b)
        y = F.conv2d(x, self.phase_weight, self.phase_bias, padding=1).unflatten(1, (2, 2, c))  # (B, 2, 2, C, ·, ·)
        rows = [torch.stack([y[:, a, s, :, a:a + h, s:s + w] for s in (0, 1)], dim=-1) for a in (0, 1)]
        out = torch.stack(rows, dim=-3).reshape(b, c, 2 * h, 2 * w)  # (B, C, H, 2, W, 2) → (B, C, 2H, 2W)
        if self.phase_channels_last:  # the model's layout, fixed when fused
            out = out.contiguous(memory_format=torch.channels_last)
        return out
