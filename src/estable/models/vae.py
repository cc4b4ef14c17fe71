"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1 and appendix G).

The encoder maps an image x ∈ [-1, 1]^(3×H×W) to the parameters of a diagonal Gaussian posterior
q(z|x) = N(μ, σ²) over latents of shape (latent_channels, H/f, W/f), f = 2^(levels-1); the decoder maps a latent
back to an image. ``encode``/``decode`` work on unscaled latents, as diffusers' AutoencoderKL does; diffusion
runs on z · scaling_factor (≈ unit variance), which ``encode_latents``/``decode_latents`` apply.

Layout (the names are diffusers', so that its files load with ``strict=True``):

    encoder: conv_in → per level L × ResnetBlock (+ Downsample with (0,1,0,1) padding, all but the last;
             ``downsample_kernel=4``: 4×4 kernels padded all round, Estable's own)
             → mid (ResnetBlock, single-head attention, ResnetBlock) → GroupNorm → SiLU → conv_out (2·latent)
    quant_conv (1×1) → moments (μ, log σ²)
    post_quant_conv (1×1) → decoder: conv_in → mid → per level, deepest first, (L+1) × ResnetBlock
             (+ Upsample, all but the last) → GroupNorm → SiLU → conv_out
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from estable.config import VAEConfig
from estable.nn.attention import SpatialSelfAttention
from estable.nn.resnet import Downsample, ResnetBlock, Upsample


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)) per latent element, built from moments (B, 2·C, h, w) = [mean, logvar].

    log σ² is clamped to [-30, 20] as in the LDM code, which keeps exp() finite.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I) drawn on the generator's device (e.g. a CPU generator for reproducibility)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over (C, h, w): shape (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class EncoderDownBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                        groups=cfg.norm_groups, eps=cfg.norm_eps)
            for i in range(cfg.layers_per_block)
        )
        # 3: LDM's asymmetric (0, 1, 0, 1) padding, then a stride-2 3×3 convolution without padding;
        # 4: a stride-2 4×4 convolution padded all round (centred windows)
        k = cfg.downsample_kernel
        self.downsamplers = (nn.ModuleList([Downsample(out_channels, padding=0 if k == 3 else 1, kernel=k)])
                             if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderUpBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                        groups=cfg.norm_groups, eps=cfg.norm_eps)
            for i in range(cfg.layers_per_block + 1)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class VAEMidBlock(nn.Module):
    """ResnetBlock → single-head self-attention (optional) → ResnetBlock, no time embedding."""

    def __init__(self, cfg: VAEConfig, channels: int) -> None:
        super().__init__()
        if cfg.mid_attention:
            self.attentions = nn.ModuleList(
                [SpatialSelfAttention(channels, groups=cfg.norm_groups, eps=cfg.norm_eps)]
            )
        else:
            self.attentions = nn.ModuleList()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_channels=None, groups=cfg.norm_groups, eps=cfg.norm_eps)
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.block_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderDownBlock(cfg, ch[max(i - 1, 0)], ch[i], downsample=i < n - 1) for i in range(n)
        )
        self.mid_block = VAEMidBlock(cfg, ch[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2·latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev = tuple(reversed(cfg.block_channels))
        n = len(rev)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = VAEMidBlock(cfg, rev[0])
        self.up_blocks = nn.ModuleList(
            DecoderUpBlock(cfg, rev[max(i - 1, 0)], rev[i], upsample=i < n - 1) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, rev[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, h·f, w·f)


class AutoencoderKL(nn.Module):
    """Image ↔ latent autoencoder. ``encode(x) -> DiagonalGaussian``; ``decode(z) -> x`` (unscaled latents)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior q(z|x) for images x (B, in_channels, H, W) in [-1, 1]; H and W multiples of f."""
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"AutoencoderKL.encode expects (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"AutoencoderKL.encode: image size {tuple(x.shape[-2:])} must be a multiple of {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2·latent, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, out_channels, h·f, w·f), roughly in [-1, 1], from unscaled latents z (B, latent, h, w)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode expects (B, {self.config.latent_channels}, h, w) latents, got {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Scaled latents for diffusion: (a sample of q(z|x), or its mean when ``sample=False``) × scaling_factor."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return z * self.config.scaling_factor

    def decode_latents(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Images from latents in diffusion scale (divides by scaling_factor, then decodes)."""
        return self.decode(z_scaled / self.config.scaling_factor)
