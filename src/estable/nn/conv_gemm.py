"""A convolution computed as one matrix product over its gathered windows (im2col).

out[b, o, y, x] = bias[o] + Σ_{dy, dx, c} w[o, c, dy, dx] · xpad[b, c, s·y + dy, s·x + dx]

is a product of the (B·Hout·Wout, k·k·C) matrix of the input's windows, each row the k·k shifted pixels'
channels side by side, and the weight laid out as (Cout, k·k·C): the same terms summed, in another order. In
channels-last memory each window row is a concatenation of k·k strided views of the padded input, and the
product's (B·Hout·Wout, Cout) result is the output in channels-last layout with no copy.

Why: at one image with guidance (batch 2), a 3×3 convolution of the SD 1.5-shaped U-Net at 8² or 16² pixels has
128 or 512 output rows and a reduction of 11,520 — few output tiles for the GPU's ~130 multiprocessors, which the
convolution kernels leave mostly idle, while the matrix-product library splits the long reduction across them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, k, k) → (Cout, k·k·Cin), the window order of :func:`conv2d_as_gemm` (row, column, channel)."""
    cout = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(cout, -1).contiguous()


def conv2d_as_gemm(x: torch.Tensor, weight2d: torch.Tensor, bias: torch.Tensor | None, kernel: int,
                   stride: int = 1, padding: int = 0) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, padding)`` for a square ``kernel`` with ``weight2d = gemm_weight(w)``.

    x: (B, C, H, W) in any memory layout → (B, Cout, Hout, Wout), channels-last in memory."""
    b, c, h, w = x.shape
    xh = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view when x is channels-last
    if padding:
        xh = F.pad(xh, (0, 0, padding, padding, padding, padding))
    hout = (h + 2 * padding - kernel) // stride + 1
    wout = (w + 2 * padding - kernel) // stride + 1
    if kernel == 1 and stride == 1:
        cols = xh.reshape(b * hout * wout, c)
    else:
        views = [xh[:, dy:dy + stride * (hout - 1) + 1:stride, dx:dx + stride * (wout - 1) + 1:stride]
                 for dy in range(kernel) for dx in range(kernel)]
        cols = torch.cat(views, dim=-1).reshape(b * hout * wout, kernel * kernel * c)
    out = F.linear(cols, weight2d, bias)  # (B·Hout·Wout, Cout)
    return out.view(b, hout, wout, -1).permute(0, 3, 1, 2)


def _view(weight: torch.Tensor) -> torch.Tensor | None:
    """``gemm_weight(weight)`` as a view (no copy): a channels-last weight's memory is already (Cout, k, k, Cin)."""
    if not weight.is_contiguous(memory_format=torch.channels_last):
        return None
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
           max_rows: int) -> torch.Tensor:
    """``F.conv2d`` of a square kernel, as a matrix product (:func:`conv2d_as_gemm`) when its output has at most
    ``max_rows`` pixels in all (B·Hout·Wout) and the weight is channels-last (its matrix is then a view)."""
    k = weight.shape[-1]
    if max_rows and x.dim() == 4:
        hout, wout = ((n + 2 * padding - k) // stride + 1 for n in x.shape[2:])
        rows = x.shape[0] * hout * wout
        w2 = _view(weight) if rows <= max_rows else None
        if w2 is not None:
            return conv2d_as_gemm(x, w2, bias, k, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding)


class GemmConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict) that runs as one matrix product when its output is
    small: at most ``max_rows`` pixels over the batch (see :func:`conv2d`). Made by :func:`gemm_convs`, which
    changes the class of existing layers in place; :func:`plain_convs` changes it back."""

    max_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.max_rows)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and m.dilation == (1, 1)
            and m.kernel_size[0] == m.kernel_size[1] and m.stride[0] == m.stride[1]
            and isinstance(m.padding, tuple) and m.padding[0] == m.padding[1])


def gemm_convs(model: nn.Module, max_rows: int) -> int:
    """Let every plain square convolution of ``model`` (and every upsampler's phase convolution) run as a matrix
    product when its output has at most ``max_rows`` pixels over the batch; returns how many layers. The weights
    must be channels-last for it to apply (the fastest mode's layout); others keep ``F.conv2d``."""
    from .resnet import Upsample

    n = 0
    for m in model.modules():
        if _eligible(m) or type(m) is GemmConv2d:
            m.__class__ = GemmConv2d
            m.max_rows = max_rows
            n += 1
        elif isinstance(m, Upsample):
            m.gemm_rows = max_rows
    return n


def plain_convs(model: nn.Module) -> None:
    """Undo :func:`gemm_convs`."""
    from .resnet import Upsample

    for m in model.modules():
        if type(m) is GemmConv2d:
            del m.max_rows
            m.__class__ = nn.Conv2d
        elif isinstance(m, Upsample):
            m.gemm_rows = 0
