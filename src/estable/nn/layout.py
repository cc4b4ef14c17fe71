"""Convolutions held to channels_last memory in training, forward and backward.

``network.to(memory_format=torch.channels_last)`` lays the weights out in NHWC, and the activations follow — in the
forward pass. In the backward pass a convolution's output gradient arrives in whatever layout the operator after it
hands back: the gradient of a concatenation (the U-Net's skip connections) is a slice of a larger tensor, the
gradient of a reshape back from tokens may be NCHW. ATen's convolution backward then copies it into the input's
layout before calling cuDNN. On an H200, in the SD 1.5-shaped U-Net's compiled training step at batch 32, such
copies were 94 kernels and 13.6 ms of a 223 ms step (benchmarks/RESULTS.md, twelfth GPU run).

:func:`pin_channels_last` adds two hooks to every convolution, which leave the parameters and the state dict as they
are: before the convolution its input is made channels_last, and after it the output passes through an identity
whose backward makes the incoming gradient channels_last. In eager mode these are the copies ATen would make anyway
(none where the tensor already is channels_last); under ``torch.compile`` they become layout constraints, which
Inductor meets in the kernel that produces the tensor instead of in a copy — the step's copies disappear, and the
step ran 5 % faster (RESULTS.md, thirteenth GPU run). The numbers are the convolution's own: only memory layouts change.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["pin_channels_last"]

_PINNED = "_estable_pinned_channels_last"


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity, whose backward hands its gradient on in channels_last memory."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _input_hook(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest) if x.dim() == 4 else args


def _output_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return _ChannelsLastGrad.apply(out) if out.dim() == 4 and out.requires_grad else out


def pin_channels_last(network: nn.Module) -> int:
    """Hold every 2-D convolution of ``network`` to channels_last memory (its input in the forward pass, its output's
    gradient in the backward pass); returns how many convolutions were pinned. Calling it again pins nothing twice."""
    pinned = 0
    for module in network.modules():
        if isinstance(module, nn.Conv2d) and not getattr(module, _PINNED, False):
            module.register_forward_pre_hook(_input_hook)
            module.register_forward_hook(_output_hook)
            setattr(module, _PINNED, True)
            pinned += 1
    return pinned
