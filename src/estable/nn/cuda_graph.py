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
``GraphedEncoder(text_encoder)`` does the same for the prompt's encoding (``encode(input_ids, clip_skip)``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class _Recorded:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the static input buffers the graph reads
    out: torch.Tensor  # the static output it writes


class CudaGraphs:
    """The CUDA side of the graphed wrappers: which inputs can be recorded, and how a graph is recorded.

    Kept apart so that the wrappers' bookkeeping (keys, static buffers, copies in and out, the LRU, the fallback)
    can be tested on the CPU with a stand-in whose "graph" re-runs the recorded function on the static buffers
    (tests/test_cuda_graph.py): a replay that did nothing, or inputs not copied in, then give wrong outputs."""

    def can_record(self, *tensors: torch.Tensor) -> bool:
        return all(t.is_cuda for t in tensors)

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


class _Graphs:
    """What the graphed wrappers share: recorded graphs by key (at most ``max_graphs``, least recently used dropped
    first), one memory pool, and the fallback to eager for good once a recording fails."""

    def __init__(self, max_graphs: int, warmup: int, backend: CudaGraphs | None) -> None:
        self.max_graphs, self.warmup = max_graphs, warmup
        self.backend = backend or CudaGraphs()
        self._graphs: OrderedDict[tuple, _Recorded] = OrderedDict()
        self._pool: Any = None
        self.failed: str | None = None  # why recording failed; eager from then on

    def reset(self) -> None:
        """Forget every recorded graph (after changing the module other than in place)."""
        self._graphs.clear()
        self._pool = None

    def _graph(self, key: tuple, inputs: Callable[[], tuple[torch.Tensor, ...]], fn: Callable[..., torch.Tensor],
               device: torch.device) -> _Recorded | None:
        """The graph of ``fn(*static inputs)`` for ``key``, recorded on copies of ``inputs()`` when new (called only
        then: a replay must not pay for building them); None when the recording failed (warned once; the caller
        runs eagerly)."""
        rec = self._graphs.get(key)
        if rec is not None:
            self._graphs.move_to_end(key)
            return rec
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        try:
            if self._pool is None:
                self._pool = self.backend.pool()
            static = tuple(x.clone() for x in inputs())
            graph, out = self.backend.record(lambda: fn(*static), device, self._pool, self.warmup)
        except RuntimeError as exc:  # an operation that cannot be recorded (a host sync, a CPU tensor)
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.reset()
            self.backend.synchronize(device)
            warnings.warn(f"CUDA graphs turned off, the network runs eagerly: {self.failed}", RuntimeWarning,
                          stacklevel=3)
            return None
        rec = self._graphs[key] = _Recorded(graph, static, out)
        return rec


class GraphedForward(_Graphs):
    """``module(sample, timestep, context)`` through recorded CUDA graphs (at most ``max_graphs``, least recently
    used dropped first). ``backend`` records the graphs (:class:`CudaGraphs`; tests pass a CPU stand-in)."""

    def __init__(self, module: nn.Module, *, max_graphs: int = 8, warmup: int = 2,
                 backend: CudaGraphs | None = None) -> None:
        super().__init__(max_graphs, warmup, backend)
        self.module = module

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                 context: torch.Tensor) -> torch.Tensor:
        if self.failed or not self.backend.can_record(sample, context) or torch.is_grad_enabled():
            return self.module(sample, timestep, context)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() not in (1, sample.shape[0]):
            return self.module(sample, timestep, context)  # let the module raise its own error
        key = (tuple(sample.shape), sample.dtype, tuple(context.shape), context.dtype, sample.device, t.numel())
        rec = self._graph(key, lambda: (sample, t.to(sample.device), context), self.module, sample.device)
        if rec is None:
            return self.module(sample, timestep, context)
        static_sample, static_t, static_ctx = rec.inputs
        static_sample.copy_(sample)
        if t.is_cuda or t.numel() > 1:
            static_t.copy_(t)
        else:  # a scalar from the sampler: a fill kernel, not a host-to-device copy that would wait for the GPU
            static_t.fill_(float(t))
        static_ctx.copy_(context)
        rec.graph.replay()
        return rec.out.clone()


class GraphedEncoder(_Graphs):
    """``text_encoder.encode(input_ids, clip_skip)`` through recorded CUDA graphs, one per (ids shape, clip skip).

    Encoding a prompt eagerly launches a few hundred small kernels (a dozen per block); on a fast GPU that takes
    longer than the kernels themselves run, and the GPU waits. Replaying reads the encoder's weights in place, as
    :class:`GraphedForward` does: a textual-inversion session that swaps the token embedding must run eagerly."""

    def __init__(self, encoder: nn.Module, *, max_graphs: int = 8, warmup: int = 2,
                 backend: CudaGraphs | None = None) -> None:
        super().__init__(max_graphs, warmup, backend)
        self.encoder = encoder

    def __call__(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        if self.failed or not self.backend.can_record(input_ids) or torch.is_grad_enabled():
            return self.encoder.encode(input_ids, clip_skip)
        self.encoder._check_inputs(input_ids, clip_skip)  # a bad request raises here, not inside a recording
        key = (tuple(input_ids.shape), input_ids.dtype, input_ids.device, clip_skip)
        rec = self._graph(key, lambda: (input_ids,), lambda ids: self.encoder.encode(ids, clip_skip),
                          input_ids.device)
        if rec is None:
            return self.encoder.encode(input_ids, clip_skip)
        rec.inputs[0].copy_(input_ids)
        rec.graph.replay()
        return rec.out.clone()


__all__ = ["CudaGraphs", "GraphedEncoder", "GraphedForward"]
