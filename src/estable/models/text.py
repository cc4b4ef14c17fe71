"""The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sec. 2.4): the prompt encoder of Stable Diffusion.

Architecture (a GPT-2-style decoder-only transformer, Radford et al. 2019, with pre-LayerNorm blocks):

    h_0 = E_tok[ids] + E_pos[0..T)                          (B, T, d)
    for l in 1..L:                                          causal mask: token t sees tokens ≤ t
        h = h + Attn(LN1(h))                                multi-head, q/k/v/out projections with bias
        h = h + W2 · act(W1 · LN2(h) + b1) + b2             act = quick-GELU x·σ(1.702x) or exact GELU
    last_hidden_state = LN_final(h_L)
    pooled            = last_hidden_state[b, first EOS position of row b]        (B, d)
    text_embeds       = pooled · Wᵀ_proj                                         (B, projection_dim)

Stable Diffusion conditions its U-Net on a whole hidden-state sequence (the "context"), not on the pooled
vector: SD 1.x on LN_final(h_L), SD 2.x on LN_final(h_{L-1}) (the "penultimate layer").

Attribute names are those of transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` as stored on disk
(``text_model.embeddings.token_embedding.weight`` … ``text_model.final_layer_norm.weight``,
``text_projection.weight``), so a diffusers ``text_encoder/model.safetensors`` loads with ``strict=True`` and no
renaming. Position ids are not stored: there is no ``position_ids`` buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from estable.config import TextConfig

# transformers' CLIP configs written before its PR #24773 carry eos_token_id = 2 (a wrong value that was
# never used for pooling); for them transformers pools at argmax(input_ids), which is the first EOS because
# EOS (49407) is the highest id of CLIP's vocabulary. We keep that rule for such configs so that every
# config transformers accepts pools at the same position.
_LEGACY_EOS_ID = 2


@dataclass
class TextEncoderOutput:
    """What :meth:`TextEncoder.forward` returns.

    context:           (B, T, width) the hidden state chosen by ``clip_skip``, after the final LayerNorm;
                       this conditions the U-Net's cross-attention.
    last_hidden_state: (B, T, width) the last block's output after the final LayerNorm.
    pooled:            (B, width) ``last_hidden_state`` at each row's first EOS token.
    text_embeds:       (B, projection_dim) ``pooled`` through the text projection, or None without one.
    """

    context: Tensor
    last_hidden_state: Tensor
    pooled: Tensor
    text_embeds: Tensor | None


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, sec. 2): x·σ(1.702x)."""
    return x * torch.sigmoid(1.702 * x)


def _embedding(n: int, width: int) -> nn.Embedding:
    """``nn.Embedding(n, width)`` with its own N(0, 1) initialisation, skipped on the meta device (a shell about to be
    filled from a file): there torch's ``normal_`` runs a Python reference that imports torch._dynamo, over a
    second of every fresh process's load."""
    weight = torch.empty(n, width)  # on the default device: meta inside ``with torch.device("meta")``
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(n, width, _weight=weight)


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding.

    ``extra_tokens`` (None, or a (K, d) tensor that is not part of the state dict) gives token ids
    ``vocab_size … vocab_size + K − 1`` their vectors: textual-inversion embeddings (:mod:`estable.embeddings`),
    which may require grad while one is trained.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.max_positions, config.width)
        self.extra_tokens: Tensor | None = None

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,) computed, not stored
        extra = self.extra_tokens
        n = self.token_embedding.num_embeddings
        if extra is None:
            tokens = self.token_embedding(input_ids)  # (B, T, d)
        else:
            is_extra = input_ids >= n  # (B, T)
            tokens = self.token_embedding(input_ids.clamp(max=n - 1))
            vectors = extra.to(tokens)[(input_ids - n).clamp(min=0, max=extra.shape[0] - 1)]  # (B, T, d)
            tokens = torch.where(is_extra[..., None], vectors, tokens)
        # (B, T, d) + (T, d) broadcast over the batch
        return tokens + self.position_embedding(positions)


class TextSelfAttention(nn.Module):
    """Causal multi-head self-attention (Vaswani et al. 2017, eq. 1) through PyTorch's fused SDPA kernel."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.heads = config.heads
        d = config.width
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        head_dim = d // self.heads

        def split(y: Tensor) -> Tensor:  # (B, T, d) -> (B, heads, T, d / heads)
            return y.view(b, t, self.heads, head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # softmax(q kᵀ / √head_dim + causal mask) v; SDPA's default scale is 1/√head_dim, stated here for clarity.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(head_dim))
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, d): heads concatenated
        return self.out_proj(out)


class TextMLP(nn.Module):
    """Position-wise feed-forward network: fc2(act(fc1(x)))."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        self.activation = config.activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (B, T, mlp_width)
        h = quick_gelu(h) if self.activation == "quick_gelu" else F.gelu(h)  # exact (erf) GELU
        return self.fc2(h)  # (B, T, width)


class TextBlock(nn.Module):
    """One pre-LN transformer block: h + Attn(LN1(h)), then h + MLP(LN2(h))."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = TextSelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = TextMLP(config)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class TextTransformerBody(nn.Module):
    """The block stack; its only role is the ``encoder.layers.N`` level of the state_dict names."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TextBlock(config) for _ in range(config.layers))


class TextTransformer(nn.Module):
    """Container of the parameters stored under ``text_model.``; the computation lives in :class:`TextEncoder`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextTransformerBody(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class TextEncoder(nn.Module):
    """CLIP text encoder with the state_dict layout of transformers' CLIPTextModel (projection_dim None)
    or CLIPTextModelWithProjection (projection_dim set).

    ``clip_skip`` follows A1111: 1 = the last block's output, 2 = the penultimate block's, …, always followed
    by the final LayerNorm. diffusers' pipelines count one lower: their ``clip_skip=k`` reads
    ``hidden_states[-(k + 1)]`` of a tuple (embeddings, block 1, …, block L), i.e. block L - k, then applies
    ``final_layer_norm``; their ``clip_skip=None`` uses ``last_hidden_state``. So
    ours = diffusers' + 1, and diffusers' None = our 1.

    Set ``gradient_checkpointing = True`` to recompute each block's activations in the backward pass
    (only in training mode with autograd on).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.text_projection: nn.Linear | None = (
            nn.Linear(config.width, config.projection_dim, bias=False) if config.projection_dim is not None else None
        )
        self.gradient_checkpointing = False

    # -- helpers -------------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids: Tensor, clip_skip: int) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but the text encoder has only "
                f"{self.config.max_positions} positions; truncate the prompt or split it into chunks"
            )
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= self.config.layers:
            raise ValueError(
                f"clip_skip must be an integer in 1..{self.config.layers} (1 = last layer), got {clip_skip!r}"
            )

    def _run_block(self, block: TextBlock, h: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)  # type: ignore[return-value]
        return block(h)

    def _hidden(self, input_ids: Tensor, blocks: int) -> Tensor:
        """Embeddings followed by the first ``blocks`` blocks, without the final LayerNorm. (B, T, width)"""
        h = self.text_model.embeddings(input_ids.long())  # (B, T, width)
        for block in self.text_model.encoder.layers[:blocks]:
            h = self._run_block(block, h)
        return h

    def pool(self, last_hidden_state: Tensor, input_ids: Tensor) -> Tensor:
        """The hidden state at each row's first EOS token: (B, T, width) -> (B, width).

        A row without EOS pools at position 0 (argmax of an all-false row), as transformers does.
        """
        ids = input_ids.to(last_hidden_state.device)
        if self.config.eos_token_id == _LEGACY_EOS_ID:
            position = ids.argmax(dim=-1)  # (B,) see _LEGACY_EOS_ID
        else:
            position = (ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,) argmax = first True
        rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        return last_hidden_state[rows, position]  # (B, width)

    # -- public API ----------------------------------------------------------------------------------------
    def encode(self, input_ids: Tensor, clip_skip: int = 1) -> Tensor:
        """The U-Net context only: LN_final(output of block ``layers - clip_skip + 1``), (B, T, width).

        Runs only the blocks needed: with clip_skip = 2 the last block is skipped entirely.
        """
        self._check_inputs(input_ids, clip_skip)
        h = self._hidden(input_ids, self.config.layers - clip_skip + 1)
        return self.text_model.final_layer_norm(h)

    def forward(self, input_ids: Tensor, *, clip_skip: int = 1) -> TextEncoderOutput:
        """All outputs; see :class:`TextEncoderOutput`. ``input_ids``: (B, T) integer token ids."""
        self._check_inputs(input_ids, clip_skip)
        final_ln = self.text_model.final_layer_norm
        keep = self.config.layers - clip_skip + 1  # number of blocks whose output is the context
        h = self._hidden(input_ids, keep)
        context = final_ln(h) if clip_skip > 1 else None
        for block in self.text_model.encoder.layers[keep:]:
            h = self._run_block(block, h)
        last_hidden_state = final_ln(h)  # (B, T, width)
        pooled = self.pool(last_hidden_state, input_ids)  # (B, width)
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return TextEncoderOutput(
            context=last_hidden_state if context is None else context,
            last_hidden_state=last_hidden_state,
            pooled=pooled,
            text_embeds=text_embeds,
        )
