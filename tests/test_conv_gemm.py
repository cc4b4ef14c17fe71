"""Convolutions as one matrix product over their gathered windows (estable.nn.conv_gemm, the fastest mode's
``gemm_rows``): the same numbers as ``F.conv2d``, the same state dict, weights changed in place seen."""

from __future__ import annotations

import copy
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from estable.config import UNetConfig, VAEConfig
from estable.errors import EstableError
from estable.models.unet import UNet
from estable.models.vae import AutoencoderKL
from estable.nn import conv_gemm
from estable.nn.conv_gemm import GemmConv2d, conv2d_as_gemm, gemm_convs, gemm_weight, plain_convs
from estable.nn.resnet import Upsample
from estable.speed import SpeedOptions, fuse_phases
from tiny_model import tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, True), num_heads=2,
                  context_dim=32, norm_groups=8, sample_size=8)
VAE = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8, latent_channels=4, sample_size=16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("c,h,w,o,k,s,p", [(8, 9, 7, 5, 3, 2, 1), (8, 8, 8, 6, 3, 1, 1), (4, 5, 6, 3, 1, 1, 0),
                                            (4, 6, 6, 3, 2, 1, 1), (3, 7, 7, 2, 3, 2, 0), (4, 6, 5, 3, 1, 2, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_as_one_matrix_product_is_the_convolution(c, h, w, o, k, s, p, channels_last):
    g = torch.Generator().manual_seed(c * h + k)
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(o, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64)
    want = F.conv2d(x, weight, bias, s, p)
    got = conv2d_as_gemm(x, gemm_weight(weight), bias, k, s, p)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-12
    assert got.is_contiguous(memory_format=torch.channels_last)  # the product's rows are pixels, its columns channels


def _unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNET).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _count_products():
    return mock.patch.object(conv_gemm, "conv2d_as_gemm", wraps=conv_gemm.conv2d_as_gemm)


def test_unet_and_decoder_with_convolutions_as_products_equal_the_plain_ones():
    unet, vae = _unet(1), AutoencoderKL(VAE).eval()
    g = torch.Generator().manual_seed(2)
    sample, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 7, 32, generator=g)
    z = torch.randn(2, 4, 4, 4, generator=g)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        want_unet, want_vae = unet(sample, t, ctx), vae.decode(z)
        for m in (unet, vae):
            m.to(memory_format=torch.channels_last)
        fuse_phases(unet)
        fuse_phases(vae.decoder)
        n = gemm_convs(unet, 2 * 4 * 4)  # the 4² level (32 output pixels over the batch) and the downsampler to it
        assert n == sum(type(m) is GemmConv2d for m in unet.modules()) > 10
        with _count_products() as products:
            got_some = unet(sample, t, ctx)
        assert 0 < products.call_count < n  # the 8² level's convolutions stay convolutions
        assert rel(got_some, want_unet) < 1e-5
        gemm_convs(unet, 10**6)
        gemm_convs(vae.decoder, 10**6)
        with _count_products() as products:
            got_unet, got_vae = unet(sample, t, ctx), vae.decode(z)
        assert products.call_count >= n  # every convolution and upsampler
    assert rel(got_unet, want_unet) < 1e-5 and rel(got_vae, want_vae) < 1e-5
    after = unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    plain_convs(unet)
    assert not any(type(m) is GemmConv2d for m in unet.modules())
    assert all(m.gemm_rows == 0 for m in unet.modules() if isinstance(m, Upsample))


def test_weights_not_channels_last_keep_the_convolution():
    """A 3×3 weight's matrix is a view only in channels-last memory; otherwise every call would copy the weight, so
    the layer stays a convolution (a 1×1 weight is both layouts at once: its matrix is always a view)."""
    unet = _unet(2)
    sample, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 1.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        want = unet(sample, t, ctx)
        gemm_convs(unet, 10**6)
        with _count_products() as products:
            got = unet(sample, t, ctx)
    kernels = {call.args[3] for call in products.call_args_list}
    assert kernels == {1} and rel(got, want) < 1e-5


def test_a_weight_changed_in_place_is_seen():
    conv = nn.Conv2d(8, 4, 3, padding=1).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    gemm_convs(conv, 10**6)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in (conv, ref):
            m.weight.mul_(-2.0)  # what merging a LoRA does
            m.bias.add_(1.0)
        assert rel(conv(x), ref(x)) < 1e-6


def test_gemm_rows_must_not_be_negative():
    with pytest.raises(EstableError, match="gemm_rows"):
        SpeedOptions(gemm_rows=-1)


def _conv_lora(path: Path, name: str, channels_in: int, channels_out: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    save_file({f"{name}.lora_down.weight": 0.3 * torch.randn(2, channels_in, 3, 3, generator=g),
               f"{name}.lora_up.weight": 0.3 * torch.randn(channels_out, 2, 1, 1, generator=g),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))
    return path


def test_pipeline_with_convolutions_as_products_same_pixels_and_follows_a_lora(tmp_path):
    from estable import GenerationParams, load_pipeline
    from estable.extra_networks import LoRASpec

    model = tiny_model_file(tmp_path)
    params = GenerationParams(prompt="a red circle", steps=3, seed=5, width=32, height=32, batch_size=2)
    eager = load_pipeline(model, device="cpu", dtype="fp32")
    fast = load_pipeline(model, device="cpu", dtype="fp32", speed=SpeedOptions(compile=False, gemm_rows=10**6))
    assert any(type(m) is GemmConv2d for m in fast.unet.modules())
    assert any(type(m) is GemmConv2d for m in fast.vae.decoder.modules())

    def pixels(pipe) -> np.ndarray:
        return np.stack([np.asarray(im, dtype=np.int16) for im in pipe.txt2img(params).images])

    base = pixels(eager)
    with _count_products() as products:
        assert np.abs(pixels(fast) - base).max() <= 1
    assert products.call_count > 0
    conv = eager.unet.down_blocks[0].resnets[0].conv1
    lora = _conv_lora(tmp_path / "conv.safetensors", "lora_unet_down_blocks_0_resnets_0_conv1", conv.in_channels,
                      conv.out_channels)
    for pipe in (eager, fast):
        pipe.loras = [LoRASpec(lora, unet=3.0)]
    with_lora = pixels(eager)
    assert np.abs(with_lora - base).max() > 10  # the LoRA changes the image
    assert np.abs(pixels(fast) - with_lora).max() <= 1


@pytest.mark.heavy
def test_compiled_resnet_block_with_convolutions_as_products_equals_eager(tmp_path, monkeypatch):
    from estable.nn.resnet import ResnetBlock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(3)
    block = ResnetBlock(16, 32, temb_channels=8, groups=8).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 8)
    with torch.no_grad():
        want = block(x, temb)
        gemm_convs(block, 10**6)
        block.compile()
        got = block(x, temb)
    assert rel(got, want) < 1e-5
