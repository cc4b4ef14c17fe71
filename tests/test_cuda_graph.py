"""GraphedForward and GraphedEncoder: the U-Net's forward pass and the prompt's encoding replayed from CUDA graphs
(GPU), eager everywhere else."""

from __future__ import annotations

import pytest
import torch

from estable.config import TextConfig, UNetConfig
from estable.models.text import TextEncoder
from estable.models.unet import UNet
from estable.nn.cuda_graph import CudaGraphs, GraphedEncoder, GraphedForward

CFG = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), num_heads=None,
                 head_channels=8, context_dim=24, norm_groups=4, sample_size=8)


def _inputs(batch: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 5, 24, generator=g).to(device, dtype)
    return x, ctx


def test_cpu_and_autograd_run_eagerly():
    torch.manual_seed(0)
    unet = UNet(CFG).eval()
    graphed = GraphedForward(unet)
    x, ctx = _inputs(2, "cpu")
    with torch.inference_mode():
        assert torch.equal(graphed(x, 10.0, ctx), unet(x, 10.0, ctx))
    out = graphed(x, 10.0, ctx)  # autograd on: eager, and the graph of the output is there
    assert out.requires_grad and not graphed._graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replays_match_eager_on_a_gpu():
    torch.manual_seed(0)
    unet = UNet(CFG).cuda().half().eval()
    graphed = GraphedForward(unet, max_graphs=2)
    with torch.inference_mode():
        for batch, seed, t in ((2, 0, 999.0), (2, 1, 3.0), (4, 2, 500.0), (2, 3, torch.tensor([7.0, 900.0]))):
            x, ctx = _inputs(batch, "cuda", torch.float16, seed)
            t_dev = t.cuda() if isinstance(t, torch.Tensor) else t
            torch.testing.assert_close(graphed(x, t_dev, ctx), unet(x, t_dev, ctx), rtol=0, atol=0)
        # three shapes were recorded; the oldest was dropped
        assert graphed.failed is None and len(graphed._graphs) == 2
        x, ctx = _inputs(3, "cuda", torch.float16)
        graphed(x, 1.0, ctx)
        assert len(graphed._graphs) == 2 and (3, 4, 8, 8) in [k[0] for k in graphed._graphs]


class _CpuGraph:
    """A stand-in for torch.cuda.CUDAGraph: replay() re-runs the recorded function on the static buffers and writes
    the result into the static output, in place, as a replay does on the GPU."""

    def __init__(self, fn, out: torch.Tensor) -> None:
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        self.replays += 1
        self.out.copy_(self.fn())


class _CpuGraphs(CudaGraphs):
    """Records "graphs" of CPU tensors, so the wrapper's bookkeeping runs on the CPU."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.recorded: list[_CpuGraph] = []
        self.fail_on = fail_on

    def can_record(self, *tensors) -> bool:
        return True

    def pool(self):
        return object()

    def synchronize(self, device) -> None:
        pass

    def record(self, fn, device, pool, warmup):
        if self.fail_on is not None and len(self.recorded) == self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        out = fn().clone()  # the static output lives in the graph's pool: a buffer of its own
        graph = _CpuGraph(fn, out)
        self.recorded.append(graph)
        return graph, out


def test_graph_bookkeeping_on_the_cpu():
    """Every call's output equals the eager module's for new inputs of a recorded shape (a replay that does nothing,
    or inputs / timesteps not copied into the static buffers, return the first call's output instead); outputs
    are copies; one recording per key; the least recently used graph is dropped first."""
    torch.manual_seed(0)
    unet = UNet(CFG).eval()
    backend = _CpuGraphs()
    graphed = GraphedForward(unet, max_graphs=2, backend=backend)
    with torch.inference_mode():
        first = None
        for seed, t in ((0, 999.0), (1, 3.0), (2, 500), (3, torch.tensor([7.0, 900.0]))):
            x, ctx = _inputs(2, "cpu", seed=seed)
            out = graphed(x, t, ctx)
            torch.testing.assert_close(out, unet(x, t, ctx), rtol=1e-5, atol=1e-5)
            if first is None:
                first, kept = out, out.clone()
        assert torch.equal(first, kept)  # later replays did not write into an earlier result
        # (2, …) with a scalar t and (2, …) with a tensor of 2 timesteps are two keys; both recorded once
        assert len(backend.recorded) == 2 and [g.replays for g in backend.recorded] == [3, 1]
        x, ctx = _inputs(2, "cpu", seed=4)
        graphed(x, 1.0, ctx)  # the scalar-t graph is now the most recent
        x3, ctx3 = _inputs(3, "cpu", seed=5)
        torch.testing.assert_close(graphed(x3, 2.0, ctx3), unet(x3, 2.0, ctx3), rtol=1e-5, atol=1e-5)
        shapes = [(k[0], k[-1]) for k in graphed._graphs]
        assert shapes == [((2, 4, 8, 8), 1), ((3, 4, 8, 8), 1)]  # the tensor-t graph was dropped
        graphed.reset()
        graphed(x, 1.0, ctx)
        assert len(backend.recorded) == 4 and graphed.failed is None


def test_a_failed_recording_falls_back_to_eager_with_one_warning():
    torch.manual_seed(0)
    unet = UNet(CFG).eval()
    graphed = GraphedForward(unet, backend=_CpuGraphs(fail_on=0))
    x, ctx = _inputs(2, "cpu")
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="CUDA graphs turned off"):
            out = graphed(x, 10.0, ctx)
        torch.testing.assert_close(out, unet(x, 10.0, ctx), rtol=0, atol=0)
        assert graphed.failed == "RuntimeError: operation not permitted when stream is capturing"
        x2, ctx2 = _inputs(2, "cpu", seed=1)
        torch.testing.assert_close(graphed(x2, 5.0, ctx2), unet(x2, 5.0, ctx2), rtol=0, atol=0)
        assert not graphed._graphs


TEXT = TextConfig(vocab_size=50, max_positions=12, width=32, layers=3, heads=2, mlp_width=64, eos_token_id=49)


def _ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (batch, 12), generator=torch.Generator().manual_seed(seed))


def test_encoder_graph_bookkeeping_on_the_cpu():
    """New ids of a recorded shape give the eager encoding (a replay that ignored its input would repeat the first);
    one recording per (shape, clip skip); bad requests raise the encoder's own error, and record nothing."""
    torch.manual_seed(0)
    enc = TextEncoder(TEXT).eval()
    backend = _CpuGraphs()
    graphed = GraphedEncoder(enc, backend=backend)
    with torch.inference_mode():
        for seed, skip in ((0, 1), (1, 1), (2, 2), (3, 1), (4, 2)):
            ids = _ids(2, seed)
            torch.testing.assert_close(graphed(ids, skip), enc.encode(ids, skip), rtol=0, atol=0)
        assert len(backend.recorded) == 2 and [g.replays for g in backend.recorded] == [3, 2]
        first = graphed(_ids(2, 0), 1)
        kept = first.clone()
        graphed(_ids(2, 5), 1)
        assert torch.equal(first, kept)  # outputs are copies, not the static buffer
        with pytest.raises(ValueError, match="clip_skip"):
            graphed(_ids(2, 0), 4)
        assert len(backend.recorded) == 2 and graphed.failed is None
    assert graphed(_ids(2, 0), 1).requires_grad  # autograd on: eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoder_replays_match_eager_on_a_gpu():
    torch.manual_seed(0)
    enc = TextEncoder(TEXT).cuda().half().eval()
    graphed = GraphedEncoder(enc)
    with torch.inference_mode():
        for batch, seed, skip in ((1, 0, 1), (1, 1, 1), (2, 2, 2), (1, 3, 2)):
            ids = _ids(batch, seed).cuda()
            torch.testing.assert_close(graphed(ids, skip), enc.encode(ids, skip), rtol=0, atol=0)
        assert graphed.failed is None and len(graphed._graphs) == 3


def test_static_inputs_are_built_only_when_recording():
    """A replay must not build the recording's inputs: for the U-Net that is a host-to-device copy of the timestep,
    which waits for the GPU at every step."""
    from estable.nn.cuda_graph import _Graphs

    graphs = _Graphs(max_graphs=2, warmup=0, backend=_CpuGraphs())
    built = []

    def inputs():
        built.append(1)
        return (torch.ones(3),)

    for _ in range(3):
        rec = graphs._graph(("k",), inputs, lambda x: x * 2, torch.device("cpu"))
    assert rec is not None and len(built) == 1 and torch.equal(rec.out, torch.full((3,), 2.0))
