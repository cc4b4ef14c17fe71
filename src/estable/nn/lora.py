"""Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685) for the Linear and Conv2d layers of the U-Net and the text encoder.

For a frozen layer with weight W (out × in), LoRA learns a low-rank update (sec. 4.1, eq. 3):

    h = W x + (α / r) · B A x            A = lora_down (r × in), B = lora_up (out × r), r ≪ min(in, out)

A starts Kaiming-uniform (the nn.Linear default, a = √5, as the paper's reference code and kohya's sd-scripts
do) and B starts at zero, so at step 0 the adapted layer computes exactly what the base layer computes. The
factor α / r (the paper's "α / r" scaling, kohya's ``network_alpha / network_dim``) keeps the update's
magnitude roughly independent of the rank. We add a runtime multiplier ``scale`` on top (A1111's
``<lora:name:0.8>`` weight): the effective update is ``scale · (α / r) · B A``.

For a convolution (out, in, kh, kw) the adapter is a conv ``lora_down`` (r, in, kh, kw) with the base layer's
stride / padding / dilation, followed by a 1×1 conv ``lora_up`` (out, r, 1, 1) (kohya's layout; for 1×1
convolutions, e.g. SD 1.x's ``proj_in``/``proj_out``, this is the Linear case on every pixel). The equivalent
weight update is ΔW[o, i, y, x] = Σ_r B[o, r] · A[r, i, y, x].

State-dict names: ``LoRALinear`` / ``LoRAConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d`` and hold the base
layer's own ``weight`` and ``bias`` Parameters (the same objects, not copies), so while adapters are injected
the base keys keep their names (``…attn1.to_q.weight``) and only ``….lora_down.weight`` / ``….lora_up.weight``
are added; :func:`remove_lora` puts plain layers back with exactly the original key set.

Merging (inference): ``merge()`` computes ΔW in float32 (autocast off), adds it into the base weight in place
and casts back to the weight's dtype; ``unmerge()`` subtracts the same ΔW. The round trip is exact up to
rounding: each element of W comes back within one rounding of the merged value, |W'' − W| ≤ ulp(W + ΔW) in
the weight's dtype. Measured on the tiny test models of tests/test_lora.py: float32 ≤ 3e-8 abs
(tiny U-Net, |W| ≤ 1.33, whole model merged and unmerged), merge vs side path ≤ 7.2e-7 relative on the U-Net
output; float16 exactly ≤ 1 ulp of the merged value (1.2e-4 abs for |W| < 0.25).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# kohya's "LoRA" (not LyCORIS) default targets for SD 1.x/2.x: every Linear and 1×1 Conv2d inside the U-Net's
# Transformer2DModel blocks, and inside the text encoder's CLIPAttention / CLIPMLP. Matched as name suffixes
# on dotted module paths (see :func:`matches`).
UNET_TARGETS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
    "attentions.*.proj_in", "attentions.*.proj_out",
)
TEXT_TARGETS: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2",
)
# The two sets do not overlap on either model, so one default serves both.
DEFAULT_TARGETS: tuple[str, ...] = UNET_TARGETS + TEXT_TARGETS


class LoRALayer:
    """What ``LoRALinear`` and ``LoRAConv2d`` share: the side path, scaling, merge and unmerge.

    Attributes: ``lora_down`` (A), ``lora_up`` (B), ``lora_dropout``, ``rank`` r, ``alpha`` α (a float; not in
    the state dict, the LoRA file stores it as ``.alpha``), ``scale`` (runtime multiplier), ``merged``.
    """

    weight: nn.Parameter
    lora_down: nn.Module
    lora_up: nn.Module
    lora_dropout: nn.Module
    rank: int
    alpha: float
    merged: bool
    _scale: float
    _merged_factor: float

    @staticmethod
    def _check_args(rank: int, dropout: float) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")

    def _init_adapter(self, rank: int, alpha: float | None, dropout: float) -> None:
        self.rank = rank
        # kohya's rule: no alpha (or 0) means α = r, i.e. a scaling of 1.
        self.alpha = float(rank) if alpha is None or float(alpha) == 0.0 else float(alpha)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._scale = 1.0
        self.merged = False
        self._merged_factor = 0.0
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)  # A: the nn.Linear default init
        nn.init.zeros_(self.lora_up.weight)  # B = 0: the adapted layer starts as the base layer

    # -- scaling ---------------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        """Set the runtime multiplier; a merged layer is re-merged so that its weight follows."""
        value = float(value)
        if self.merged:
            self.unmerge()
            self._scale = value
            self.merge()
        else:
            self._scale = value

    @property
    def factor(self) -> float:
        """The total multiplier of B·A: scale · α / r."""
        return self._scale * self.alpha / self.rank

    # -- the side path -------------------------------------------------------------------------------------
    def _side(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """scale · (α/r) · up(down(dropout(x))), returned in ``out_dtype``.

        The adapter may be kept in a wider dtype than the base layer (float32 adapters on a float16 model are
        the usual training setup), so the input is cast to the adapter's dtype; under autocast the matmuls
        run in the autocast dtype anyway.
        """
        h = self.lora_dropout(x).to(self.lora_down.weight.dtype)
        delta = self.lora_up(self.lora_down(h))  # Linear: (..., out); Conv2d: (B, out, H', W')
        return (delta * self.factor).to(out_dtype)

    def delta_weight(self) -> torch.Tensor:
        """(α/r) · B·A as a float32 tensor of the base weight's shape (the ``scale`` is not included)."""
        raise NotImplementedError

    # -- merging -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _add_to_weight(self, factor: float) -> None:
        w = self.weight
        with torch.autocast(device_type=w.device.type, enabled=False):
            delta = self.delta_weight().to(w.device)  # float32, shape of W
            w.copy_((w.float() + factor * delta).to(w.dtype))  # fp32 sum, one rounding to W's dtype
        # Inside an autocast region, autocast keeps a cached low-precision copy of leaf weights that require
        # grad; after an in-place change that copy is stale, so drop it (the next op re-casts).
        if torch.is_autocast_enabled(w.device.type):
            torch.clear_autocast_cache()

    def merge(self) -> None:
        """W ← W + scale·(α/r)·B·A in place, and switch the side path off. No-op when already merged."""
        if self.merged:
            return
        self._merged_factor = self._scale
        self._add_to_weight(self._scale)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the merged update again (exact up to one rounding per element; see the module doc)."""
        if not self.merged:
            return
        self._add_to_weight(-self._merged_factor)
        self.merged = False
        self._merged_factor = 0.0

    def plain(self) -> nn.Module:
        """A plain layer holding this layer's (possibly merged) weight and bias Parameters."""
        raise NotImplementedError

    def lora_extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self._scale:g}, merged={self.merged}"


class LoRALinear(LoRALayer, nn.Linear):
    """y = W x + b + scale·(α/r)·B A dropout(x), around an existing ``nn.Linear`` (whose weights it shares)."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        nn.Module.__init__(self)
        self._check_args(rank, dropout)
        if isinstance(base, LoRALayer):
            raise ValueError("this layer already has a LoRA adapter; remove it first (remove_lora)")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # the same Parameter: state-dict key and storage unchanged
        self.register_parameter("bias", base.bias)
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **kw)  # A: (r, in)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **kw)  # B: (out, r)
        self._init_adapter(rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return out
        return out + self._side(x, out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_down.weight.float()  # (r, in)
        b = self.lora_up.weight.float()  # (out, r)
        return (b @ a) * (self.alpha / self.rank)  # (out, in)

    def plain(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = self.weight
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.lora_extra_repr()}"


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """A conv layer plus scale·(α/r)·up(down(dropout(x))): ``down`` has the base kernel, stride and padding,
    ``up`` is 1×1 (kohya's layout). Grouped convolutions are not supported."""

    def __init__(
        self,
        base: nn.Conv2d,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        nn.Module.__init__(self)
        self._check_args(rank, dropout)
        if isinstance(base, LoRALayer):
            raise ValueError("this layer already has a LoRA adapter; remove it first (remove_lora)")
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        # Everything nn.Conv2d.forward reads (see torch.nn.modules.conv._ConvNd).
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(base, name))
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_down = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, bias=False, padding_mode=base.padding_mode, **kw,
        )  # A: (r, in, kh, kw)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw)  # B: (out, r, 1, 1)
        self._init_adapter(rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)  # (B, out, H', W')
        if self.merged:
            return out
        return out + self._side(x, out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_down.weight.float()  # (r, in, kh, kw)
        b = self.lora_up.weight.float().flatten(1)  # (out, r)
        return torch.einsum("or,rihw->oihw", b, a) * (self.alpha / self.rank)  # (out, in, kh, kw)

    def plain(self) -> nn.Conv2d:
        layer = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device="meta",
        )
        layer.weight = self.weight
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.lora_extra_repr()}"


LoRAModule = LoRALinear | LoRAConv2d


# ----------------------------------------------------------------------------------------------------------
# Injection into whole models
# ----------------------------------------------------------------------------------------------------------


def matches(name: str, pattern: str) -> bool:
    """Whether a dotted module path matches a target pattern.

    A pattern is a suffix on dot boundaries (``"attn1.to_q"`` matches ``"…transformer_blocks.0.attn1.to_q"``);
    ``*`` / ``?`` / ``[…]`` are glob wildcards within that suffix (``"attentions.*.proj_in"``). A pattern
    starting with ``^`` must match the whole path (``"^down_blocks.0.*"``).
    """
    if pattern.startswith("^"):
        return fnmatch.fnmatchcase(name, pattern[1:])
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` by its dotted path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _candidates(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of every module, skipping the adapters' own inner layers."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALayer):
            inside.append(name)
        yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_layer(
    layer: nn.Module, *, rank: int, alpha: float | None, dropout: float = 0.0,
    dtype: torch.dtype | None = torch.float32,
) -> LoRALayer:
    """A LoRA layer around ``layer`` (an ``nn.Linear`` or ``nn.Conv2d``)."""
    if isinstance(layer, LoRALayer):
        raise ValueError("this layer already has a LoRA adapter; remove it first (remove_lora)")
    if isinstance(layer, nn.Linear):
        return LoRALinear(layer, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
    if isinstance(layer, nn.Conv2d):
        return LoRAConv2d(layer, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
    raise ValueError(f"LoRA supports nn.Linear and nn.Conv2d layers, not {type(layer).__name__}")


def find_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Dotted paths of the layers that ``targets`` select (see :func:`matches`), in module order.

    Raises ValueError when a selected module is not a Linear/Conv2d, already carries an adapter, or when
    nothing matches.
    """
    if isinstance(targets, str):
        targets = (targets,)
    names: list[str] = []
    for name, module in _candidates(model):
        if not name or not any(matches(name, p) for p in targets):
            continue
        if isinstance(module, LoRALayer):
            raise ValueError(f"module {name!r} already has a LoRA adapter; call remove_lora(model, ...) first")
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"target pattern selects {name!r}, a {type(module).__name__}; LoRA applies to Linear and Conv2d "
                "layers only, so make the pattern more specific"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"no module of this {type(model).__name__} matches the LoRA targets {list(targets)}; targets are "
            "dotted-path suffixes such as 'attn1.to_q' or 'self_attn.q_proj'"
        )
    return names


def inject_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    dtype: torch.dtype | None = torch.float32,
    freeze: bool = True,
) -> dict[str, LoRALayer]:
    """Replace the target layers of ``model`` by LoRA layers in place; return them by dotted path.

    ``alpha`` None means α = r. The adapters are created in ``dtype`` (float32 by default, also for a half
    precision model: the optimizer then updates float32 numbers; None = the base weight's dtype) on the base
    weight's device. With ``freeze`` (the default) every other parameter of the model gets
    ``requires_grad = False``, so that ``model.parameters()`` with grad are exactly :func:`lora_parameters`.
    """
    names = find_targets(model, targets)
    if freeze:
        model.requires_grad_(False)
    injected: dict[str, LoRALayer] = {}
    for name in names:
        layer = wrap_layer(model.get_submodule(name), rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
        layer.weight.requires_grad_(not freeze and layer.weight.requires_grad)
        _replace(model, name, layer)  # type: ignore[arg-type]
        injected[name] = layer
    return injected


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable parameters (every A and B), for the optimizer."""
    params: list[nn.Parameter] = []
    for layer in lora_modules(model).values():
        params.extend(layer.lora_down.parameters())
        params.extend(layer.lora_up.parameters())
    return params


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the runtime multiplier of every adapter of ``model`` (merged ones are re-merged)."""
    for layer in lora_modules(model).values():
        layer.scale = scale


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (see :meth:`LoRALayer.merge`)."""
    for layer in lora_modules(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`."""
    for layer in lora_modules(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, *, merge: bool) -> list[str]:
    """Put plain layers back in place of every adapter; return their paths.

    ``merge=True`` keeps the adapters' effect baked into the weights (merging those not merged yet);
    ``merge=False`` restores the base weights (unmerging those that were merged). Either way the model's
    state-dict keys are again exactly those of the model before injection. ``requires_grad`` flags are
    left as they are.
    """
    removed: list[str] = []
    for name, layer in lora_modules(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace(model, name, layer.plain())
        removed.append(name)
    return removed
