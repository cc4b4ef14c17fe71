"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder reads the noisy latents, the timestep and the text like the U-Net does,
plus a control image (edges, a scribble, a segmentation map) through a small hint encoder; every activation the
copy produces where the U-Net keeps a skip connection, and the mid block's output, goes through a "zero
convolution" (a 1×1 convolution initialised to zero, sec. 3.1, eq. 2) and is added to the U-Net's own skip /
mid activation (sec. 3.2, fig. 3):

    hint: c_img (B, 3, H, W) → conv3×3 → SiLU → [conv3×3 → SiLU → conv3×3 stride 2 → SiLU] × (k-1) → conv3×3 (zero)
    x = conv_in(z_t) + hint(c_img)                                       (B, C0, h, w), h = H / 2^(k-1)
    down levels and mid block as in the U-Net → skips s_0 … s_{m-1}, mid output m
    residuals: zero_conv_j(s_j) · scale_j, zero_conv_mid(m) · scale_mid

With all zero convolutions at zero the U-Net's output is untouched, which is why training can start from a
copy of the base U-Net's encoder without harming it. Module names are diffusers' ``ControlNetModel``
(``controlnet_cond_embedding``, ``controlnet_down_blocks``, ``controlnet_mid_block``, and the U-Net's names for
the copied encoder), so a diffusers ControlNet folder loads with ``strict=True`` as is; SD 1.5 single files
(``control_model.`` keys) go through :mod:`estable.checkpoints.controlnet_format`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from estable.config import ControlNetConfig
from estable.nn.embeddings import TimestepEmbedding, timestep_embedding

from .unet import DownBlock, MidBlock, Runner, UNet, _checkpointed, _direct

Residuals = tuple[list[torch.Tensor], torch.Tensor]


class HintEncoder(nn.Module):
    """The control image → (B, C0, h, w) features at the latent resolution (diffusers'
    ``ControlNetConditioningEmbedding``; ``input_hint_block`` in the original code)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        blocks: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks.append(nn.Conv2d(cin, cin, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=2))  # halves H and W
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)  # a zero convolution

    @torch.no_grad()
    def init_for_training_(self) -> None:
        """He-normal weights and zero biases for every convolution before ``conv_out``.

        With PyTorch's default initialisation each 3×3 convolution shrinks its input's variance about threefold
        and its random biases swamp what is left of a sparse control image (thin edges: under 1 % of the pixels),
        so after the seven layers the embedding of a Canny map differs from that of a blank one by 0.06 % of its
        size, and training hardly moves that path (a shapes ControlNet trained 4,000 steps that way ignored its
        edges entirely). He initialisation (fan-in, ReLU gain) keeps the variance through the SiLUs, and zero
        biases make a blank control embed to zero.
        """
        for conv in [self.conv_in, *self.blocks]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def skip_channels(cfg: ControlNetConfig) -> list[int]:
    """Widths of the encoder activations the U-Net keeps as skips, in push order (conv_in's output first)."""
    u = cfg.unet
    out = [u.block_channels[0]]
    for level, c in enumerate(u.block_channels):
        out += [c] * u.layers_per_block
        if level < len(u.block_channels) - 1:
            out.append(c)  # the downsampler's output
    return out


def guess_mode_scales(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Guess mode's per-residual weights: n + 1 values log-spaced from 0.1 (the first skip) to 1 (the mid block),
    so the shallow, high-resolution residuals count least (diffusers' ``torch.logspace(-1, 0, n + 1)``, float32)."""
    return torch.logspace(-1, 0, n + 1, device=device)


class ControlNet(nn.Module):
    """``forward(sample, timestep, context, control) -> (down residuals, mid residual)`` for :class:`UNet`."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        u = config.unet
        ch = u.block_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], u.time_embed_dim)
        self.controlnet_cond_embedding = HintEncoder(config.conditioning_channels, config.hint_channels, ch[0])
        self.down_blocks = nn.ModuleList(DownBlock(u, level, ch[max(level - 1, 0)]) for level in range(n))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for c in skip_channels(config))
        self.mid_block = MidBlock(u)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], kernel_size=1)

    @classmethod
    def from_unet(cls, unet: UNet, config: ControlNetConfig | None = None) -> ControlNet:
        """A ControlNet whose encoder copies ``unet``'s weights and whose zero convolutions (the hint encoder's
        last convolution and every output convolution) are zero: the starting point of training (sec. 3.2)."""
        config = config or ControlNetConfig(unet=unet.config)
        if config.unet != unet.config:
            raise ValueError("ControlNet.from_unet: the config's U-Net part differs from the U-Net's config")
        net = cls(config).to(device=next(unet.parameters()).device, dtype=next(unet.parameters()).dtype)
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own}
        net.load_state_dict(copied, strict=False)  # the encoder only; the rest is checked just below
        left = set(own) - set(copied)
        expected = {k for k in own if k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.",
                                                     "controlnet_mid_block."))}
        if left != expected:  # a bug, not a user error: the encoder names must be the U-Net's
            raise RuntimeError(f"ControlNet.from_unet: unexpected uncopied keys {sorted(left - expected)[:5]}")
        net.controlnet_cond_embedding.init_for_training_()
        net.zero_outputs_()
        return net

    @torch.no_grad()
    def zero_outputs_(self) -> None:
        """Set the zero convolutions to zero (weights and biases)."""
        for conv in [self.controlnet_cond_embedding.conv_out, *self.controlnet_down_blocks, self.controlnet_mid_block]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        context: torch.Tensor,
        control: torch.Tensor,
        *,
        scale: float = 1.0,
        guess_mode: bool = False,
    ) -> Residuals:
        """Residuals for the U-Net's skips (one per skip, push order) and for its mid block's output.

        ``control``: (B, conditioning_channels, h·f, w·f) in [0, 1], f = ``config.hint_factor`` (8 for SD).
        ``scale`` multiplies every residual; ``guess_mode`` weights them from 0.1 (first skip) to 1 (mid) on top.
        """
        cfg = self.config
        u = cfg.unet
        f = cfg.hint_factor
        if sample.ndim != 4 or sample.shape[1] != u.in_channels:
            raise ValueError(f"ControlNet expects a (B, {u.in_channels}, h, w) sample, got {tuple(sample.shape)}")
        want = (cfg.conditioning_channels, sample.shape[-2] * f, sample.shape[-1] * f)
        if control.ndim != 4 or tuple(control.shape[1:]) != want or control.shape[0] not in (1, sample.shape[0]):
            raise ValueError(
                f"ControlNet expects a control image of shape (B, {want[0]}, {want[1]}, {want[2]}) for latents of "
                f"{tuple(sample.shape)}, got {tuple(control.shape)}"
            )
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        run: Runner = _checkpointed if use_ckpt else _direct
        if cfg.bgr:
            control = control.flip(1)

        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)
        if t.shape[0] not in (1, sample.shape[0]):
            raise ValueError(f"ControlNet: got {t.shape[0]} timesteps for a batch of {sample.shape[0]}")
        t = t.expand(sample.shape[0])
        code = timestep_embedding(
            t, u.block_channels[0], flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=u.freq_shift
        ).to(sample.dtype)  # (B, C0)
        temb = self.time_embedding(code)  # (B, 4·C0)

        x = self.conv_in(sample) + self.controlnet_cond_embedding(control.to(sample.dtype))  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, produced = block(x, temb, context, run)
            skips.extend(produced)
        x = self.mid_block(x, temb, context, run)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]  # zero convolutions
        mid = self.controlnet_mid_block(x)
        if guess_mode:
            w = guess_mode_scales(len(down), sample.device) * scale  # float32 (n + 1,)
            down = [d * wi for d, wi in zip(down, w)]
            mid = mid * w[-1]
        else:
            down = [d * scale for d in down]
            mid = mid * scale
        return down, mid
