"""Weight-only int8 layers: per-output-channel symmetric quantisation of Linear and Conv2d weights.

For an output channel o with weights w_o (one row of a Linear, one filter of a convolution):

    s_o = max |w_o| / 127                  (fp32; 1 where the row is all zeros)
    q_o = clamp(round(w_o / s_o), -127, 127)  as int8
    ŵ_o = s_o · q_o                        |ŵ − w| ≤ s_o / 2 elementwise

(the symmetric "absmax" scheme of LLM.int8(), Dettmers et al. 2022, sec. 3.1, applied per output channel as
in weight-only quantisation). Biases, norms and embeddings stay in floating point.

The layers keep the floating-point module's state-dict names: ``weight`` holds the int8 matrix, and a new
``weight_scale`` (out_channels,) holds s. An Estable file with int8 layers therefore has the usual keys plus
one ``….weight_scale`` per quantised layer, from which :func:`int8_layout` rebuilds the same modules before the
strict load (store.py), so that the int8 tensors are loaded as they are: nothing is dequantised up front. Each
forward dequantises its own weight to the activations' dtype (one layer's weight at a time) and calls the
floating-point op.

Dynamic activation quantisation (CPU): with ``dynamic`` set, a Linear also quantises its input per row
(absmax, int8), multiplies int8 × int8 → int32 with ``torch._int_mm`` and rescales by both scales. It is off by
default: measured on the 2-core CPU it was not faster for the built-in model (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QUANTIZATION",
    "Int8Conv2d",
    "Int8Linear",
    "int8_layout",
    "is_quantized",
    "quantize_model",
    "quantize_weight",
    "set_dynamic",
]

#: The value of the ``quantization`` metadata entry of Estable files with int8 layers.
QUANTIZATION = "int8-weight-per-channel"
SCALE_SUFFIX = ".weight_scale"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 of weight's shape, s float32 (out,)) with ``weight ≈ s[:, None, …] · q`` (see the module doc)."""
    w = weight.detach().float()
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(w / scale.view(-1, *([1] * (w.ndim - 1)))).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype).view(-1, *([1] * (q.ndim - 1)))


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (out, in) and per-row scales; same state-dict names plus weight_scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype or torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.dynamic = False

    @classmethod
    def from_float(cls, layer: nn.Linear) -> Int8Linear:
        q, s = quantize_weight(layer.weight)
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device,
                  dtype=layer.weight.dtype)
        out.weight.copy_(q)
        out.weight_scale = s.to(q.device)  # float32 whatever the weights' dtype
        if layer.bias is not None:
            assert out.bias is not None
            out.bias.data.copy_(layer.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic and _int_mm_fits(x, self.weight):
            return self._dynamic(x)
        return F.linear(x, _dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """x ≈ s_x · q_x per row; y = (q_x q_wᵀ) · s_x · s_wᵀ + b, the product in int32 (torch._int_mm)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, in)
        sx = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)  # (M, 1)
        qx = torch.round(x2 / sx).clamp_(-127, 127).to(torch.int8)
        acc = torch._int_mm(qx, self.weight.t().contiguous())  # (M, out) int32
        y = acc.float() * sx * self.weight_scale.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, dynamic={self.dynamic}"


def _int_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._int_mm's shape rules on the CPU: more than 16 rows, in and out multiples of 8."""
    rows = x.numel() // x.shape[-1]
    return x.device.type == "cpu" and rows > 16 and x.shape[-1] % 8 == 0 and w.shape[0] % 8 == 0


class Int8Conv2d(nn.Module):
    """``nn.Conv2d`` with an int8 weight (out, in/groups, kh, kw) and per-filter scales."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        shape = (out_channels, in_channels // groups, *kernel_size)
        self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=dtype or torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, layer: nn.Conv2d) -> Int8Conv2d:
        if layer.padding_mode != "zeros":
            raise ValueError(f"int8 convolutions support zero padding only, not {layer.padding_mode!r}")
        out = cls.like(layer, device=layer.weight.device, dtype=layer.weight.dtype)
        q, s = quantize_weight(layer.weight)
        out.weight.copy_(q)
        out.weight_scale = s.to(q.device)
        if layer.bias is not None:
            assert out.bias is not None
            out.bias.data.copy_(layer.bias.detach())
        return out

    @classmethod
    def like(cls, layer: nn.Conv2d, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> Int8Conv2d:
        return cls(layer.in_channels, layer.out_channels, tuple(layer.kernel_size),  # type: ignore[arg-type]
                   stride=tuple(layer.stride), padding=layer.padding if isinstance(layer.padding, str)  # type: ignore[arg-type]
                   else tuple(layer.padding), dilation=tuple(layer.dilation),  # type: ignore[arg-type]
                   groups=layer.groups, bias=layer.bias is not None, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _dequantize(self.weight, self.weight_scale, x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_model(module: nn.Module, *, min_weights: int = 0) -> list[str]:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``module`` (with at least ``min_weights`` weights) by its
    int8 version, in place; returns the names of the replaced layers."""
    names = []
    for name, layer in list(module.named_modules()):
        if type(layer) is nn.Linear and layer.weight.numel() >= min_weights:
            _replace(module, name, Int8Linear.from_float(layer))
        elif type(layer) is nn.Conv2d and layer.weight.numel() >= min_weights:
            _replace(module, name, Int8Conv2d.from_float(layer))
        else:
            continue
        names.append(name)
    return names


def int8_layout(module: nn.Module, keys: Iterable[str]) -> list[str]:
    """Turn the layers of ``module`` that ``keys`` (a state dict's keys) store as int8, i.e. those with a
    ``<layer>.weight_scale`` key, into empty int8 layers on ``module``'s device (meta while loading), so that the
    state dict loads strictly. Returns the layers' names; ValueError if one is not a Linear or Conv2d."""
    names = sorted(k[: -len(SCALE_SUFFIX)] for k in keys if k.endswith(SCALE_SUFFIX))
    for name in names:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name}{SCALE_SUFFIX}: the model has no layer {name!r}") from None
        if type(layer) is nn.Linear:
            new: nn.Module = Int8Linear(layer.in_features, layer.out_features, layer.bias is not None,
                                        device=layer.weight.device)
        elif type(layer) is nn.Conv2d:
            new = Int8Conv2d.like(layer, device=layer.weight.device)
        else:
            raise ValueError(f"{name}{SCALE_SUFFIX}: {name!r} is a {type(layer).__name__}, not a Linear or Conv2d")
        _replace(module, name, new)
    return names


def is_quantized(sd: Mapping[str, torch.Tensor] | Iterable[str]) -> bool:
    """Whether a state dict (or its keys) holds int8 layers."""
    return any(k.endswith(SCALE_SUFFIX) for k in sd)


def set_dynamic(module: nn.Module, on: bool = True) -> int:
    """Switch dynamic activation quantisation on (or off) for every Int8Linear; returns how many."""
    n = 0
    for layer in module.modules():
        if isinstance(layer, Int8Linear):
            layer.dynamic = on
            n += 1
    return n
