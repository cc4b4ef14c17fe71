"""Attention blocks: multi-head (cross-)attention, the spatial transformer of the U-Net, and the VAE's
single-head mid-block self-attention.

Attention(Q, K, V) = softmax(Q Kᵀ / √d) V (Vaswani et al. 2017, eq. 1), computed per head by
``torch.nn.functional.scaled_dot_product_attention`` (which picks a fused kernel where one applies). The
spatial transformer is the one of latent diffusion (Rombach et al. 2022, sec. 3.3 and appendix E.2.1): the
feature map is flattened to tokens, passed through pre-LayerNorm blocks of self-attention, cross-attention to
the text context (the conditioning mechanism of eq. 3) and a GEGLU feed-forward (Shazeer 2020), then folded back
and added to its input. Attribute names follow diffusers so that its files load with no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False
) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads of packed projections.

    q: (B, N, H·d), k and v: (B, T, H·d) → (B, N, H·d). The scale is 1/√d. With ``upcast`` and half-precision
    inputs, q·kᵀ and the softmax are computed in float32 (SD 2.x overflows in fp16 otherwise), and the result
    is cast back to the input dtype.
    """
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    q = q.view(b, n, heads, d).transpose(1, 2)  # (B, H, N, d)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # (B, H, T, d)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)  # (B, H, T, d)
    if upcast and dtype in _HALF:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)  # (B, N, H·d)


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) to ``context`` (B, T, context_dim), or to itself.

    Projections ``to_q``, ``to_k``, ``to_v`` (no bias in the U-Net) and ``to_out.0`` (with bias), as diffusers
    names them; the key/value width is ``context_dim`` for cross-attention.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.cross = context_dim is not None  # whether k and v project a context (not x itself)
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        # A list so that the key is ``to_out.0.*``, as in the reference files (their index 1 is a Dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        # Fused projections (see fuse_projections): not part of the state dict.
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        w = self.fused_weight
        if w is not None and self._plain_projections() and (self.cross or context is None):
            if not self.cross:  # self-attention: one (B, N, 3·inner) projection
                q, k, v = F.linear(x, w, self.fused_bias).chunk(3, dim=-1)
            else:  # cross-attention: q from x, one (B, T, 2·inner) projection of the context for k and v
                q = self.to_q(x)
                k, v = F.linear(x if context is None else context, w, self.fused_bias).chunk(2, dim=-1)
            return self.to_out[0](multihead_attention(q, k, v, self.heads, upcast=self.upcast))
        kv = x if context is None else context
        out = multihead_attention(self.to_q(x), self.to_k(kv), self.to_v(kv), self.heads, upcast=self.upcast)
        return self.to_out[0](out)  # (B, N, query_dim)

    def _plain_projections(self) -> bool:
        # A wrapped projection (a LoRA adapter with its side path) must run as itself: no fused shortcut then.
        return type(self.to_q) is nn.Linear and type(self.to_k) is nn.Linear and type(self.to_v) is nn.Linear

    def fuse_projections(self) -> bool:
        """Concatenate the projections into one matrix: [W_q; W_k; W_v] for self-attention (same input width),
        [W_k; W_v] for cross-attention, so that one matrix product replaces two or three.

        The same numbers, laid out in one tensor: the projections' parameters become row slices (views) of the
        fused weight, so the state dict is unchanged and in-place changes to them (``load_state_dict``, merging a
        LoRA) are seen by the fused path. Moving or casting the module afterwards (``.to()``, ``.half()``) copies
        the slices apart: call :meth:`unfuse_projections` first and fuse again after. Returns whether it fused.
        """
        if self.fused_weight is not None or not self._plain_projections():
            return False
        q, k, v = self.to_q, self.to_k, self.to_v
        has_bias = q.bias is not None
        if (k.bias is not None) != has_bias or (v.bias is not None) != has_bias:
            return False
        parts = [k, v] if self.cross else [q, k, v]
        with torch.no_grad():
            weight = torch.cat([m.weight for m in parts])  # (n·inner, in)
            bias = torch.cat([m.bias for m in parts]) if has_bias else None
            start = 0
            for m in parts:
                rows = m.out_features
                m.weight.data = weight[start:start + rows]
                if bias is not None:
                    m.bias.data = bias[start:start + rows]
                start += rows
        self.fused_weight, self.fused_bias = weight, bias
        return True

    def unfuse_projections(self) -> None:
        """Give every projection its own storage again and drop the fused matrix."""
        if self.fused_weight is None:
            return
        with torch.no_grad():
            for m in (self.to_q, self.to_k, self.to_v):
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()
        self.fused_weight = self.fused_bias = None


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2·inner, split into value and gate, value · GELU(gate).

    With ``split`` (see :func:`split_geglu`) the value and the gate are two matrix products over the halves of the
    one weight: the same arithmetic and state dict, but the backward pass no longer concatenates the two halves'
    gradients into one tensor of 2·inner features per token."""

    split = False

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) each
            return value * F.gelu(gate)
        w, b = self.proj.weight, self.proj.bias
        inner = w.shape[0] // 2
        value = F.linear(x, w[:inner], b[:inner])
        gate = F.linear(x, w[inner:], b[inner:])
        return value * F.gelu(gate)


def split_geglu(network: nn.Module) -> int:
    """Compute every GEGLU of ``network`` as two matrix products (``GEGLU.split``); returns how many there are.

    For compiled training: as one projection, the backward pass concatenates the value's and the gate's gradients,
    which Inductor lowers as a kernel evaluating both halves' expressions for every element of the result (the
    largest fused kernel of the SD 1.5-shaped U-Net's compiled step). Split, the step at batch 32 on an H200 ran
    2 % faster (benchmarks/RESULTS.md, fourteenth GPU run). A GEGLU whose projection is not a plain ``nn.Linear``
    (a LoRA layer, say, which adds its own term in its forward) is left as it is."""
    geglus = [m for m in network.modules() if isinstance(m, GEGLU) and type(m.proj) is nn.Linear]
    for m in geglus:
        m.split = True
    return len(geglus)


class FeedForward(nn.Module):
    """GEGLU(dim → inner) → dropout → Linear(inner → dim); kept as ``net.0`` / ``net.2`` for the file keys."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += FF(LN(x))."""

    def __init__(
        self, dim: int, *, heads: int, head_dim: int, context_dim: int, upcast: bool = False, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, dim)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around it (diffusers' Transformer2DModel).

    GroupNorm (eps 1e-6) → proj_in (1×1 conv, or Linear on the tokens when ``linear_projection``, SD 2.x) →
    ``depth`` BasicTransformerBlocks → proj_out → + input.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"SpatialTransformer: {channels} channels are not divisible by {heads} heads")
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                channels, heads=heads, head_dim=channels // heads, context_dim=context_dim, upcast=upcast
            )
            for _ in range(depth)
        )
        if linear_projection:
            self.proj_out: nn.Module = nn.Linear(channels, channels)
        else:
            self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        else:
            x = self.proj_in(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            # Back to the input's memory layout: NCHW, or channels-last (then no copy at all).
            x = self.proj_out(x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=_layout(residual)))
        return x + residual


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels-last 4-D tensor (that is not also plain contiguous), else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class SpatialSelfAttention(Attention):
    """The VAE's mid-block attention: one head over all pixels, with biases, GroupNorm first, residual after.

    x (B, C, H, W) → GN → tokens (B, HW, C) → softmax(QKᵀ/√C)V → to_out → back to (B, C, H, W) → + x.
    diffusers stores its projections as Linear weights named ``group_norm``, ``to_q`` … ``to_out.0``.
    """

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6, upcast: bool = False) -> None:
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True, upcast=upcast)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("SpatialSelfAttention attends to its own input only; do not pass a context")
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = super().forward(tokens)  # (B, HW, C)
        return out.transpose(1, 2).reshape(b, c, h, w) + x
