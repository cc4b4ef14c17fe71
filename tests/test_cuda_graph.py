"""GraphedForward: the U-Net's forward pass replayed from CUDA graphs (GPU), eager everywhere else."""

from __future__ import annotations

import pytest
import torch

from estable.config import UNetConfig
from estable.models.unet import UNet
from estable.nn.cuda_graph import GraphedForward

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
