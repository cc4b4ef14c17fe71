"""A contrastive text–image pair in the manner of CLIP (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision"), sized for Estable's own small models.

    ids    (B, T) ─ TextEncoder (CLIP text transformer) ─ text_projection ─ L2 normalise ─ t  (B, D)
    pixels (B, 3, H, W) in [-1, 1] ─ ImageEncoder (small ResNet) ─ Linear ─ L2 normalise ─ v  (B, D)
    logits_per_image = exp(s) · v tᵀ   (B_img, B_txt),   logits_per_text = its transpose

with s the learned log inverse temperature (``logit_scale``), initialised to log(1/0.07) and kept ≤ log(100)
(Radford et al. 2021, sec. 2.5: "clipped to prevent scaling the logits by more than 100"). The loss lives in
``estable.training.clip_objective``.

The text tower is :class:`estable.models.text.TextEncoder` itself, with ``projection_dim = embed_dim``: after
training, ``pair.text`` (state_dict keys ``text_model.…`` and ``text_projection.weight``, the layout of
transformers' CLIPTextModelWithProjection) becomes the frozen text encoder of the U-Net; its pooled output is read
at the first EOS token, so ``TextConfig.eos_token_id`` must be the tokenizer's eos id.

The image tower is a pre-activation ResNet (He et al. 2016) built from the same ``ResnetBlock``/``Downsample``
modules as the U-Net and the VAE (GroupNorm → SiLU → conv, no timestep input): a 3×3 stem conv, then stages of
residual blocks, each stage after the first halving the resolution with a stride-2 conv, then GroupNorm → SiLU →
global average pool → Linear to the joint embedding. GroupNorm keeps it independent of the batch (train and eval
modes compute the same function), and global pooling lets it run at any resolution (64 px in tests, 256 px for
the shapes world).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from estable.config import TextConfig, _Config, _tuple
from estable.models.text import TextEncoder
from estable.nn.resnet import Downsample, ResnetBlock

# CLIP's temperature: initialised at τ = 0.07, i.e. a logit scale of 1/τ ≈ 14.3, and never above 100.
DEFAULT_INIT_LOGIT_SCALE = math.log(1.0 / 0.07)
DEFAULT_MAX_LOGIT_SCALE = math.log(100.0)

# CLIPScore scales (see clip_score).
HESSEL_W = 2.5  # Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", eq. 1
TORCHMETRICS_SCALE = 100.0  # torchmetrics.multimodal.CLIPScore; the convention of text-to-image papers


@dataclass(frozen=True)
class ImageEncoderConfig(_Config):
    """The small convolutional image tower of :class:`CLIPPair`.

    in_channels       channels of the input images (RGB: 3), values in [-1, 1]
    stage_channels    channels of each stage; every stage after the first starts with a stride-2 downsampling
    blocks_per_stage  residual blocks per stage
    stem_stride       stride of the 3×3 stem conv (2 halves the resolution before the first stage)
    norm_groups       GroupNorm groups (must divide every stage's channels)
    image_size        the side the model is trained at (informational: global pooling accepts any size)

    The total downsampling is ``stem_stride · 2^(stages − 1)``: 16 for the default, so 256 px ends at 16×16.
    """

    in_channels: int = 3
    stage_channels: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 2
    stem_stride: int = 2
    norm_groups: int = 8
    norm_eps: float = 1e-5
    image_size: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_channels", _tuple(self.stage_channels))
        if not self.stage_channels or any(not isinstance(c, int) or c < 1 for c in self.stage_channels):
            raise ValueError(
                "ImageEncoderConfig.stage_channels must be a non-empty tuple of positive ints, "
                f"got {self.stage_channels}"
            )
        for c in self.stage_channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"ImageEncoderConfig.stage_channels entry {c} is not divisible by norm_groups={self.norm_groups}"
                )
        if self.blocks_per_stage < 1:
            raise ValueError("ImageEncoderConfig.blocks_per_stage must be at least 1")
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"ImageEncoderConfig.stem_stride must be 1, 2 or 4, got {self.stem_stride}")
        if self.in_channels < 1:
            raise ValueError("ImageEncoderConfig.in_channels must be at least 1")

    @property
    def downsample_factor(self) -> int:
        return self.stem_stride * 2 ** (len(self.stage_channels) - 1)


def _default_text() -> TextConfig:
    # A small text tower for the shapes world (the shipped model must fit in 30 MB fp16): width 256, 4 layers,
    # 4 heads; vocab_size and eos_token_id are placeholders until a learned vocabulary sets them
    # (CLIPPairConfig.with_vocabulary).
    return TextConfig(
        vocab_size=1024, max_positions=77, width=256, layers=4, heads=4, mlp_width=1024,
        projection_dim=256, eos_token_id=1023,
    )


@dataclass(frozen=True)
class CLIPPairConfig(_Config):
    """A text tower, an image tower and the joint embedding they project into.

    text               the CLIP text transformer; ``projection_dim`` must equal ``embed_dim`` and
                       ``eos_token_id`` must be the tokenizer's eos (pooling reads the first eos)
    image              the convolutional image tower
    embed_dim          width D of the joint, L2-normalised embedding
    init_logit_scale   initial log inverse temperature, log(1/0.07) as in CLIP
    max_logit_scale    upper bound of the log inverse temperature, log(100) as in CLIP
    """

    text: TextConfig = field(default_factory=_default_text)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    embed_dim: int = 256
    init_logit_scale: float = DEFAULT_INIT_LOGIT_SCALE
    max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"CLIPPairConfig.embed_dim must be positive, got {self.embed_dim}")
        if self.text.projection_dim != self.embed_dim:
            raise ValueError(
                f"CLIPPairConfig: text.projection_dim ({self.text.projection_dim}) must equal embed_dim "
                f"({self.embed_dim}); set TextConfig(projection_dim={self.embed_dim})"
            )
        if not 0 <= self.text.eos_token_id < self.text.vocab_size:
            raise ValueError(
                f"CLIPPairConfig: text.eos_token_id ({self.text.eos_token_id}) is outside the vocabulary "
                f"(size {self.text.vocab_size}); use with_vocabulary(tokenizer.vocab_size, tokenizer.eos_token_id)"
            )
        if self.init_logit_scale > self.max_logit_scale:
            raise ValueError(
                f"CLIPPairConfig.init_logit_scale ({self.init_logit_scale}) exceeds max_logit_scale "
                f"({self.max_logit_scale})"
            )

    def with_vocabulary(self, vocab_size: int, eos_token_id: int) -> CLIPPairConfig:
        """This config with the text tower sized for a tokenizer: ``with_vocabulary(tok.vocab_size,
        tok.eos_token_id)``."""
        return self.replace(text=self.text.replace(vocab_size=int(vocab_size), eos_token_id=int(eos_token_id)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPPairConfig:
        data = dict(data)
        if isinstance(data.get("text"), dict):
            data["text"] = TextConfig.from_dict(data["text"])
        if isinstance(data.get("image"), dict):
            data["image"] = ImageEncoderConfig.from_dict(data["image"])
        return super().from_dict(data)  # type: ignore[return-value]


class ImageStage(nn.Module):
    """One resolution of the image tower: optional stride-2 downsampling, then residual blocks."""

    def __init__(self, config: ImageEncoderConfig, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = Downsample(in_channels, padding=1) if downsample else None
        self.blocks = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                        groups=config.norm_groups, eps=config.norm_eps)
            for i in range(config.blocks_per_stage)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C_in, H/2, W/2)
        for block in self.blocks:
            x = block(x)
        return x  # (B, C_out, h, w)


class ImageEncoder(nn.Module):
    """Small ResNet image tower: pixels (B, C, H, W) in [-1, 1] → unnormalised embeddings (B, embed_dim)."""

    def __init__(self, config: ImageEncoderConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        chans = config.stage_channels
        self.stem = nn.Conv2d(config.in_channels, chans[0], kernel_size=3, stride=config.stem_stride, padding=1)
        self.stages = nn.ModuleList(
            ImageStage(config, chans[max(i - 1, 0)], c, downsample=i > 0) for i, c in enumerate(chans)
        )
        self.norm_out = nn.GroupNorm(config.norm_groups, chans[-1], eps=config.norm_eps)
        self.proj = nn.Linear(chans[-1], embed_dim)

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixels must have shape (batch, {self.config.in_channels}, height, width), got {tuple(pixels.shape)}"
            )
        h = self.stem(pixels)  # (B, C0, H/stem_stride, W/stem_stride)
        for stage in self.stages:
            h = stage(h)
        h = F.silu(self.norm_out(h))  # (B, C_last, h, w)
        return self.proj(h.mean(dim=(2, 3)))  # global average pool (B, C_last) → (B, embed_dim)


class CLIPPair(nn.Module):
    """The contrastive pair: ``.text`` (a :class:`TextEncoder` with projection), ``.image`` (an
    :class:`ImageEncoder`) and ``logit_scale`` (the learned log inverse temperature, a scalar parameter).

    State-dict keys: ``text.text_model.…``, ``text.text_projection.weight``, ``image.…``, ``logit_scale``.
    """

    def __init__(self, config: CLIPPairConfig) -> None:
        super().__init__()
        self.config = config
        self.text = TextEncoder(config.text)
        self.image = ImageEncoder(config.image, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    def encode_text(self, ids: Tensor) -> Tensor:
        """L2-normalised text embeddings (B, embed_dim) of token ids (B, T), pooled at each row's first eos."""
        embeds = self.text(ids).text_embeds  # (B, D); never None: the config requires a projection
        assert embeds is not None
        return F.normalize(embeds.float(), dim=-1)  # unit norm, in fp32 (DESIGN.md: statistics in fp32)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """L2-normalised image embeddings (B, embed_dim) of images (B, C, H, W) in [-1, 1]."""
        return F.normalize(self.image(pixels).float(), dim=-1)  # (B, D)

    def logit_scale_value(self) -> Tensor:
        """exp(s) with s clamped to ≤ max_logit_scale (the clamp passes no gradient above the bound)."""
        return self.logit_scale.float().clamp(max=self.config.max_logit_scale).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself into [0, max_logit_scale]; call after each optimiser step (as OpenCLIP
        does), so that it cannot drift above the bound where the clamped forward gives it no gradient."""
        self.logit_scale.clamp_(0.0, self.config.max_logit_scale)

    def forward(self, pixels: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)) = exp(s) · cosine similarities.

        Row i of ``logits_per_image`` scores image i against every caption (Radford et al. 2021, fig. 3).
        """
        v = self.encode_image(pixels)  # (B_img, D)
        t = self.encode_text(ids)  # (B_txt, D)
        # Logits in fp32 even under autocast (which would run this matmul in half precision): the softmax of
        # the loss reads differences of up to 2·100 between them.
        with torch.autocast(device_type=v.device.type, enabled=False):
            logits_per_image = self.logit_scale_value() * v @ t.T  # (B_img, B_txt)
        return logits_per_image, logits_per_image.T


def clip_score(pair: CLIPPair, pixels: Tensor, ids: Tensor, *, scale: float = TORCHMETRICS_SCALE) -> Tensor:
    """CLIPScore of each image with its own caption: ``scale · max(cos(E_I, E_C), 0)``, shape (B,).

    Hessel et al. 2021 (eq. 1) define CLIP-S = w · max(cos, 0) with w = 2.5 (``HESSEL_W``), chosen there to
    spread caption scores over about [0, 1]. The default here is ``scale = 100`` (``TORCHMETRICS_SCALE``), the
    convention of torchmetrics' CLIPScore and of the text-to-image literature (SD and GenEval-style reports quote
    "CLIP score 31.5"), so that our judge's numbers read on the familiar scale; the two differ only by the
    constant factor 100 / 2.5 = 40. Call under ``torch.no_grad()`` for evaluation.

    Args:
        pixels: (B, C, H, W) images in [-1, 1].
        ids: (B, T) token ids of the captions, row i describing image i.
    """
    if pixels.shape[0] != ids.shape[0]:
        raise ValueError(
            f"clip_score needs one caption per image, got {pixels.shape[0]} images and {ids.shape[0]} captions"
        )
    cos = (pair.encode_image(pixels) * pair.encode_text(ids)).sum(dim=-1)  # (B,) both unit norm
    return scale * cos.clamp(min=0.0)


__all__ = [
    "DEFAULT_INIT_LOGIT_SCALE",
    "DEFAULT_MAX_LOGIT_SCALE",
    "HESSEL_W",
    "TORCHMETRICS_SCALE",
    "CLIPPair",
    "CLIPPairConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "clip_score",
]
