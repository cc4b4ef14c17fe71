"""Replaying a network's forward pass as a CUDA graph.

A small U-Net at 32×32 latents spends most of an eager forward pass launching kernels from Python: a few hundred
launches of a few microseconds of work each. A CUDA graph records those launches once and replays them with one
call, which is what brings the default model under its per-image time on a GPU.

``GraphedForward(module)`` is called like ``module(sample, timestep, context)``. The first call with a given
(sample shape, context shape, dtypes, device) records a graph on static input buffers; later calls copy their
inputs into those buffers, replay, and return a copy of the static output. Anything it cannot record (CPU
tensors, autograd on) runs eagerly, and so does everything after a recording fails (with one warning). The graphs
read the module's parameters where they are: in-place weight changes (merging a LoRA, ``load_state_dict``) are
seen, but swapping modules or changing Python attributes is not — call :meth:`reset` after such changes.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class _Recorded:
    graph: Any  # torch.cuda.CUDAGraph
    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor


class CudaGraphs:
    """The CUDA side of :class:`GraphedForward`: which inputs can be recorded, and how a graph is recorded.

    Kept apart so that the wrapper's bookkeeping (keys, static buffers, copies in and out, the LRU, the fallback)
    can be tested on the CPU with a stand-in whose "graph" re-runs the recorded function on the static buffers
    (tests/test_cuda_graph.py): a replay that did nothing, or inputs not copied in, then give wrong outputs."""

    def can_record(self, sample: torch.Tensor, context: torch.Tensor) -> bool:
        return sample.is_cuda and context.is_cuda

    def pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def record(self, fn: Any, device: torch.device, pool: Any, warmup: int) -> tuple[Any, torch.Tensor]:
        """(graph, static output) of ``fn()``, which reads only static buffers."""
        # Warm-up on a side stream (cuDNN/cuBLAS choose their algorithms and workspaces outside the recording).
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out


class GraphedForward:
    """``module(sample, timestep, context)`` through recorded CUDA graphs (at most ``max_graphs``, least recently
    used dropped first). ``backend`` records the graphs (:class:`CudaGraphs`; tests pass a CPU stand-in)."""

    def __init__(self, module: nn.Module, *, max_graphs: int = 8, warmup: int = 2,
                 backend: CudaGraphs | None = None) -> None:
        self.module, self.max_graphs, self.warmup = module, max_graphs, warmup
        self.backend = backend or CudaGraphs()
        self._graphs: OrderedDict[tuple, _Recorded] = OrderedDict()
        self._pool: Any = None
        self.failed: str | None = None  # why recording failed; eager from then on

    def reset(self) -> None:
        """Forget every recorded graph (after changing the module other than in place)."""
        self._graphs.clear()
        self._pool = None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                 context: torch.Tensor) -> torch.Tensor:
        if self.failed or not self.backend.can_record(sample, context) or torch.is_grad_enabled():
            return self.module(sample, timestep, context)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() not in (1, sample.shape[0]):
            return self.module(sample, timestep, context)  # let the module raise its own error
        key = (tuple(sample.shape), sample.dtype, tuple(context.shape), context.dtype, sample.device, t.numel())
        rec = self._graphs.get(key)
        if rec is None:
            try:
                rec = self._record(key, sample, t, context)
            except RuntimeError as exc:  # an operation that cannot be recorded (a host sync, a CPU tensor)
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.reset()
                self.backend.synchronize(sample.device)
                warnings.warn(f"CUDA graphs turned off, the network runs eagerly: {self.failed}", RuntimeWarning,
                              stacklevel=2)
                return self.module(sample, timestep, context)
        else:
            self._graphs.move_to_end(key)
        rec.sample.copy_(sample)
        if t.is_cuda or t.numel() > 1:
            rec.timestep.copy_(t)
        else:  # a scalar from the sampler: a fill kernel, not a host-to-device copy that would wait for the GPU
            rec.timestep.fill_(float(t))
        rec.context.copy_(context)
        rec.graph.replay()
        return rec.out.clone()

    def _record(self, key: tuple, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> _Recorded:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = self.backend.pool()
        static_sample, static_ctx = sample.clone(), context.clone()
        static_t = t.to(sample.device)
        graph, out = self.backend.record(lambda: self.module(static_sample, static_t, static_ctx), sample.device,
                                         self._pool, self.warmup)
        rec = _Recorded(graph, static_sample, static_t, static_ctx, out)
        self._graphs[key] = rec
        return rec


__all__ = ["CudaGraphs", "GraphedForward"]
