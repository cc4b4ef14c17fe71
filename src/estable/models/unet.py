"""The conditional U-Net ε_θ(z_t, t, c) of latent diffusion (Rombach et al. 2022, sec. 3.3, fig. 3).

Layout (n = len(block_channels) levels, L = layers_per_block):

    conv_in → down level 0 … n-1: L × [ResnetBlock (+ SpatialTransformer)] (+ Downsample, all but the last)
            → mid: ResnetBlock, SpatialTransformer, ResnetBlock
            → up level 0 … n-1 (mirroring down level n-1-i): (L+1) × [concat skip → ResnetBlock (+ transformer)]
              (+ Upsample, all but the last) → GroupNorm → SiLU → conv_out

Every activation a down level produces (conv_in's output, each resnet/transformer pair, each downsampler) is
kept as a skip connection and consumed, last-in first-out, by the up path. Module and parameter names are
those of diffusers' ``UNet2DConditionModel`` so that a diffusers folder loads with ``strict=True`` as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from estable.config import UNetConfig
from estable.nn.attention import SpatialTransformer
from estable.nn.embeddings import TimestepEmbedding, timestep_embedding
from estable.nn.resnet import Downsample, ResnetBlock, Upsample

Runner = Callable[..., torch.Tensor]


def _direct(module: nn.Module, *args: Any) -> torch.Tensor:
    return module(*args)


def _checkpointed(module: nn.Module, *args: Any) -> torch.Tensor:
    # Recompute the block's activations in the backward pass instead of storing them (Chen et al. 2016).
    return checkpoint(module, *args, use_reentrant=False)


def _transformer(cfg: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels,
        heads=cfg.heads_at(level),
        context_dim=cfg.context_dim,
        depth=cfg.transformer_layers,
        groups=cfg.norm_groups,
        linear_projection=cfg.use_linear_projection,
        upcast=cfg.upcast_attention,
    )


class DownBlock(nn.Module):
    """One resolution level of the encoder half; returns the output and the skips it produced."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int) -> None:
        super().__init__()
        out = cfg.block_channels[level]
        temb = cfg.time_embed_dim
        if cfg.attention_levels[level]:
            self.attentions = nn.ModuleList(_transformer(cfg, out, level) for _ in range(cfg.layers_per_block))
        else:
            self.attentions = nn.ModuleList()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out, out, temb_channels=temb, groups=cfg.norm_groups,
                        eps=cfg.norm_eps)
            for i in range(cfg.layers_per_block)
        )
        is_last = level == len(cfg.block_channels) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample(out, padding=1)])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, run: Runner
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips: list[torch.Tensor] = []
        for i, resnet in enumerate(self.resnets):
            x = run(resnet, x, temb)
            if len(self.attentions):
                x = run(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, ⌈H/2⌉, ⌈W/2⌉)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResnetBlock → SpatialTransformer → ResnetBlock at the lowest resolution (the last level's heads)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        level = len(cfg.block_channels) - 1
        ch = cfg.block_channels[level]
        self.attentions = nn.ModuleList([_transformer(cfg, ch, level)])
        self.resnets = nn.ModuleList(
            ResnetBlock(ch, ch, temb_channels=cfg.time_embed_dim, groups=cfg.norm_groups, eps=cfg.norm_eps)
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, run: Runner) -> torch.Tensor:
        x = run(self.resnets[0], x, temb)
        x = run(self.attentions[0], x, context)
        return run(self.resnets[1], x, temb)


class UpBlock(nn.Module):
    """Up block i mirrors down level n-1-i: L+1 resnets, each fed the running features concatenated with a skip.

    Input widths: resnet 0 gets the previous up block's width, the others this level's width; the skip is
    this level's width, except for the last resnet, whose skip comes from the level above (or conv_in).
    """

    def __init__(self, cfg: UNetConfig, index: int) -> None:
        super().__init__()
        n = len(cfg.block_channels)
        level = n - 1 - index
        out = cfg.block_channels[level]
        prev = cfg.block_channels[min(level + 1, n - 1)]  # width coming up from below
        skip_last = cfg.block_channels[max(level - 1, 0)]  # width of the skip taken from the level above
        layers = cfg.layers_per_block + 1
        if cfg.attention_levels[level]:
            self.attentions = nn.ModuleList(_transformer(cfg, out, level) for _ in range(layers))
        else:
            self.attentions = nn.ModuleList()
        self.resnets = nn.ModuleList(
            ResnetBlock(
                (prev if i == 0 else out) + (skip_last if i == layers - 1 else out),
                out,
                temb_channels=cfg.time_embed_dim,
                groups=cfg.norm_groups,
                eps=cfg.norm_eps,
            )
            for i in range(layers)
        )
        self.upsamplers = None if index == n - 1 else nn.ModuleList([Upsample(out)])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        run: Runner,
        size: torch.Size | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = run(resnet, x, temb)
            if len(self.attentions):
                x = run(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)  # (B, C, 2H, 2W) or the skip's size
        return x


class UNet(nn.Module):
    """ε-(or v-)prediction network; ``forward(sample, timestep, context) -> (B, out_channels, h, w)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        ch = config.block_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim)
        self.down_blocks = nn.ModuleList(DownBlock(config, level, ch[max(level - 1, 0)]) for level in range(n))
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList(UpBlock(config, i) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, kernel_size=3, padding=1)

    def _timesteps(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        """Any scalar or (B,) timestep → float32 (B,). Integer steps up to 2^24 are exact in float32."""
        t = torch.as_tensor(timestep, device=device).float().reshape(-1)
        if t.shape[0] not in (1, batch):
            raise ValueError(f"UNet: got {t.shape[0]} timesteps for a batch of {batch}; pass one or one per sample")
        return t.expand(batch)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        context: torch.Tensor,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``down_residuals`` (one per skip, in push order) and ``mid_residual`` are added to the skips and to the
        mid block's output: a ControlNet's outputs (:mod:`estable.models.controlnet`; diffusers'
        ``down_block_additional_residuals`` / ``mid_block_additional_residual``)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"UNet expects a (B, {cfg.in_channels}, h, w) sample, got shape {tuple(sample.shape)}"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"UNet expects a (B, T, {cfg.context_dim}) context, got shape {tuple(context.shape)}; "
                "does the text encoder match this U-Net?"
            )
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        run: Runner = _checkpointed if use_ckpt else _direct

        t = self._timesteps(timestep, sample.shape[0], sample.device)  # (B,)
        code = timestep_embedding(
            t, cfg.block_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        ).to(sample.dtype)  # (B, C0)
        temb = self.time_embedding(code)  # (B, 4·C0)

        x = self.conv_in(sample)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, produced = block(x, temb, context, run)
            skips.extend(produced)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"UNet: got {len(down_residuals)} down residuals for {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        x = self.mid_block(x, temb, context, run)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            mine = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsample to the size of the skip the next block starts with: exactly 2× when h, w are multiples
            # of 2^(n-1), and the right size for odd intermediate sizes otherwise.
            size = skips[-1].shape[-2:] if block.upsamplers is not None else None
            x = block(x, mine, temb, context, run, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, Cout, h, w)
