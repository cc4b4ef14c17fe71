"""Shared by the speed tests: the backward graph that torch.compile's autograd tracing makes of a module's step, on
the CPU, without Inductor — so that a test can read the operators and the memory layouts a GPU compile would get.
Not a test module itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd


def traced_backward(module: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], *args,
                    autocast: bool = False) -> torch.fx.GraphModule:
    """Compile ``module`` with AOTAutograd (no code generation), run ``loss(module(*args)).backward()`` once and
    return the traced backward graph; ``autocast``: the forward under bf16 autocast, as the GPU benchmarks train."""
    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(gm, _):
        graphs["bw"] = gm
        return make_boxed_func(gm)

    torch._dynamo.reset()
    try:
        f = torch.compile(module, backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm),
                                                       bw_compiler=keep))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(*args)
        loss(y).backward()
    finally:
        torch._dynamo.reset()
    return graphs["bw"]
