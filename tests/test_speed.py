"""The fastest mode (estable.speed): fused attention projections, channels_last and regionally compiled blocks
compute what the eager networks compute (fp32, CPU), the state dict never changes, and weight changes made in
place after fusing are seen. Compiling on the CPU (Inductor + a C compiler) takes a minute on a cold cache: those
tests are marked heavy."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from estable.config import UNetConfig, VAEConfig
from estable.errors import EstableError
from estable.models.unet import UNet
from estable.models.vae import AutoencoderKL
from estable.nn.attention import Attention, SpatialSelfAttention
from estable.nn.lora import inject_lora
from estable.nn.resnet import Upsample
from estable.speed import SpeedOptions, compile_blocks, fuse_phases, fuse_projections, resolve_speed, unfuse_projections
from tiny_model import tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, True), num_heads=2,
                  context_dim=32, norm_groups=8, sample_size=8)  # context as wide as level 0: cross ≠ self
VAE = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8, latent_channels=4, sample_size=16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500.0] * batch),
            torch.randn(batch, 7, UNET.context_dim, generator=g))


def _unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNET).eval()
    with torch.no_grad():  # non-trivial norms and biases everywhere
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def test_resolve_speed():
    assert resolve_speed(None) is None and resolve_speed("default") is None
    assert resolve_speed("max") == SpeedOptions()
    opts = SpeedOptions(compile=False)
    assert resolve_speed(opts) is opts
    with pytest.raises(EstableError, match="unknown speed"):
        resolve_speed("fast")
    with pytest.raises(EstableError, match="SDPA backend"):
        SpeedOptions(sdpa="triton")
    with pytest.raises(EstableError, match="compile mode 'reduce-overhead'"):
        SpeedOptions(resnet_mode="reduce-overhead")
    with pytest.raises(EstableError, match="needs regional"):
        SpeedOptions(resnet_mode="max-autotune-no-cudagraphs", regional=False)
    with pytest.raises(EstableError, match="decode_batch must be 1 or more"):
        SpeedOptions(decode_batch=0)


def test_fused_projections_equal_unfused_and_keep_the_state_dict():
    torch.manual_seed(1)
    self_attn = Attention(32, heads=4, head_dim=8).eval()
    cross = Attention(32, heads=4, head_dim=8, context_dim=24).eval()
    vae_attn = SpatialSelfAttention(32, groups=8).eval()  # with biases
    square = Attention(32, heads=4, head_dim=8, context_dim=32).eval()  # context as wide as x: still cross
    x, ctx, img = torch.randn(2, 10, 32), torch.randn(2, 7, 24), torch.randn(2, 32, 4, 4)
    ctx32 = torch.randn(2, 7, 32)
    with torch.no_grad():
        before = [self_attn(x), cross(x, ctx), vae_attn(img), square(x, ctx32)]
        keys = [dict(m.state_dict()) for m in (self_attn, cross, vae_attn)]
        for m in (self_attn, cross, vae_attn, square):
            assert m.fuse_projections()
        assert self_attn.fused_weight.shape == (96, 32) and cross.fused_weight.shape == (64, 24)
        assert vae_attn.fused_bias.shape == (96,) and square.fused_weight.shape == (64, 32)
        after = [self_attn(x), cross(x, ctx), vae_attn(img), square(x, ctx32)]
    for a, b in zip(after, before):
        assert rel(a, b) < 1e-6
    for m, sd in zip((self_attn, cross, vae_attn), keys):
        now = m.state_dict()
        assert now.keys() == sd.keys()  # the fused matrix is not saved
        assert all(torch.equal(now[k], v) for k, v in sd.items())
    # The projections are views of the fused matrix: a weight changed in place is seen by the fused path.
    with torch.no_grad():
        cross.to_v.weight.mul_(-2.0)
        plain = Attention(32, heads=4, head_dim=8, context_dim=24).eval()
        plain.load_state_dict(cross.state_dict())
        assert rel(cross(x, ctx), plain(x, ctx)) < 1e-6
        assert rel(cross(x, ctx), before[1]) > 0.1  # the change matters
        cross.unfuse_projections()
        assert cross.fused_weight is None and rel(cross(x, ctx), plain(x, ctx)) < 1e-6
        cross.to_k.weight.zero_()  # its own storage again: the old fused matrix is gone, not stale
        assert rel(cross(x, ctx), plain(x, ctx)) > 1e-3


def test_fused_unet_with_channels_last_equals_eager_and_lora_still_applies():
    unet = _unet()
    sample, t, ctx = _inputs()
    with torch.no_grad():
        expected = unet(sample, t, ctx)
        assert fuse_projections(unet) == 2 * 7  # attn1 + attn2 of 7 transformers (2 down, 1 mid, 4 up)
        unet.to(memory_format=torch.channels_last)
        got = unet(sample.contiguous(memory_format=torch.channels_last), t, ctx)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel(got, expected) < 1e-5

    # A LoRA injected after fusing: the wrapped projections run as themselves (side path included).
    lora = copy.deepcopy(unet)
    unfuse_projections(lora)
    inject_lora(lora, rank=2, alpha=2.0)
    inject_lora(unet, rank=2, alpha=2.0)
    unet.load_state_dict(lora.state_dict())
    with torch.no_grad():
        for m in (unet, lora):
            for name, p in m.named_parameters():
                if "lora_up" in name:
                    p.copy_(0.3 * torch.ones_like(p))
        a, b = unet(sample, t, ctx), lora(sample, t, ctx)
    assert rel(a, b) < 1e-5 and rel(a, expected) > 1e-3


def _plain_upsample(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 8, 4, 4), (3, 4, 1, 1)])
def test_upsample_by_phases_is_upsample_then_conv(shape):
    torch.manual_seed(2)
    up = Upsample(shape[1]).double()
    x = torch.randn(*shape, dtype=torch.float64)
    keys = {k: v.clone() for k, v in up.state_dict().items()}
    with torch.no_grad():
        want = _plain_upsample(x, up.conv)
        assert up.fuse_phases() and not up.fuse_phases()  # the second call finds it fused
        assert up.phase_weight.shape == (4 * shape[1], shape[1], 2, 2)
        assert (up(x) - want).abs().max() < 1e-12
        assert up.state_dict().keys() == keys.keys()  # the phase kernels are derived, not saved
        # channels_last in, channels_last out, the same numbers
        up.to(memory_format=torch.channels_last)
        up.unfuse_phases()
        up.fuse_phases()
        got = up(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last) and (got - want).abs().max() < 1e-12
        # a size that is not 2× (the U-Net's odd skips) takes the interpolating path
        odd = (2 * shape[2] - 1, 2 * shape[3] + 1)
        want_odd = up.conv(torch.nn.functional.interpolate(x, size=odd, mode="nearest"))
        assert torch.equal(up(x, odd), want_odd)
        # a weight changed in place is seen once refreshed, and not before (the kernels are a derived copy)
        up.conv.weight.mul_(-0.5)
        assert (up(x) - _plain_upsample(x, up.conv)).abs().max() > 1e-3
        up.refresh_phases()
        assert (up(x) - _plain_upsample(x, up.conv)).abs().max() < 1e-12


def test_phases_leave_a_quantised_or_wrapped_conv_alone():
    up = Upsample(4)
    up.conv = torch.nn.Sequential(up.conv)  # stands for an int8 or LoRA-wrapped convolution
    assert not up.fuse_phases() and up.phase_weight is None


def test_phase_upsample_in_the_unet_and_decoder_equals_eager_in_fp32():
    unet, vae = _unet(4), AutoencoderKL(VAE).eval()
    sample, t, ctx = _inputs()
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        want_unet, want_vae = unet(sample, t, ctx), vae.decode(z)
        assert fuse_phases(unet) == 1 and fuse_phases(vae.decoder) == 1
        got_unet, got_vae = unet(sample, t, ctx), vae.decode(z)
    assert rel(got_unet, want_unet) < 1e-6 and rel(got_vae, want_vae) < 1e-6


def _upsampler_lora(path: Path, channels: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    name = "lora_unet_up_blocks_0_upsamplers_0_conv"
    save_file({f"{name}.lora_down.weight": 0.2 * torch.randn(2, channels, 3, 3, generator=g),
               f"{name}.lora_up.weight": 0.2 * torch.randn(channels, 2, 1, 1, generator=g),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))
    return path


def test_pipeline_phase_upsample_same_pixels_and_follows_a_lora_on_the_upsampler(tmp_path):
    """The fastest mode's phase kernels are derived from the weights: a LoRA merged into an upsampler's
    convolution (and taken out again) must reach them, as it reaches the eager path."""
    from estable import GenerationParams, load_pipeline
    from estable.extra_networks import LoRASpec

    model = tiny_model_file(tmp_path)
    params = GenerationParams(prompt="a red circle", steps=3, seed=5, width=32, height=32, batch_size=2)
    eager = load_pipeline(model, device="cpu", dtype="fp32")
    fast = load_pipeline(model, device="cpu", dtype="fp32",
                         speed=SpeedOptions(compile=False, phase_upsample=True))
    assert fast.unet.up_blocks[0].upsamplers[0].phase_weight is not None
    assert all(m.phase_weight is not None for m in fast.vae.modules() if isinstance(m, Upsample))

    def pixels(pipe) -> np.ndarray:
        return np.stack([np.asarray(im, dtype=np.int16) for im in pipe.txt2img(params).images])

    base = pixels(eager)
    assert np.abs(pixels(fast) - base).max() <= 1
    lora = _upsampler_lora(tmp_path / "up.safetensors", eager.unet.up_blocks[0].upsamplers[0].conv.in_channels)
    for pipe in (eager, fast):
        pipe.loras = [LoRASpec(lora, unet=3.0)]
    with_lora = pixels(eager)
    assert np.abs(with_lora - base).max() > 10  # the LoRA changes the image
    assert np.abs(pixels(fast) - with_lora).max() <= 1
    for pipe in (eager, fast):
        pipe.loras = []
    assert np.abs(pixels(fast) - base).max() <= 1  # taken out again


def test_pipeline_phase_upsample_follows_a_vae_loaded_in_place(tmp_path, monkeypatch):
    from estable import load_pipeline
    from estable.checkpoints import vae_file

    def fake_load(vae, path, allow_pickle=False):  # what a real load does to the module: weights changed in place
        with torch.no_grad():
            for p in vae.decoder.parameters():
                p.mul_(1.5)
        return {"path": str(path)}

    monkeypatch.setattr(vae_file, "load_vae_into", fake_load)
    model = tiny_model_file(tmp_path)
    eager = load_pipeline(model, device="cpu", dtype="fp32")
    fast = load_pipeline(model, device="cpu", dtype="fp32", speed=SpeedOptions(compile=False, phase_upsample=True))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for pipe in (eager, fast):
        pipe.swap_vae(tmp_path / "other.safetensors")
    with torch.no_grad():
        assert rel(fast.vae.decode(z), eager.vae.decode(z)) < 1e-5


def test_compile_blocks_marks_every_repeated_block():
    unet, vae = _unet(), AutoencoderKL(VAE)
    n = compile_blocks(unet)
    # 2 down resnets + 2 mid + 4 up (2 levels × 2), transformers at both levels: 2 down + 1 mid + 4 up, 1 upsampler
    assert n == 8 + 7 + 1
    assert compile_blocks(vae.decoder) == 1 + 2 + 2 * 2 + 1  # mid attention, 2 mid resnets, 2 levels × 2 resnets, 1 up
    assert all(m._compiled_call_impl is not None for m in unet.down_blocks[0].resnets)
    assert unet.conv_in._compiled_call_impl is None  # the glue between blocks stays eager
    assert all("_orig_mod" not in k for k in unet.state_dict())


def test_resnet_mode_compiles_only_the_resnet_blocks_with_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw["mode"])))
    compile_blocks(_unet(), resnet_mode="max-autotune-no-cudagraphs")
    assert set(calls) == {("ResnetBlock", "max-autotune-no-cudagraphs"), ("SpatialTransformer", "default"),
                          ("Upsample", "default")}
    assert len(calls) == 8 + 7 + 1
    calls.clear()
    compile_blocks(AutoencoderKL(VAE).decoder, mode="default")
    assert set(calls) == {("ResnetBlock", "default"), ("SpatialSelfAttention", "default"), ("Upsample", "default")}


@pytest.mark.heavy
def test_compiled_blocks_equal_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    unet = _unet(3)
    ref = copy.deepcopy(unet)
    sample, t, ctx = _inputs(2, 5)
    compile_blocks(unet)
    fuse_projections(unet)
    with torch.no_grad():
        got, expected = unet(sample, t, ctx), ref(sample, t, ctx)
        assert rel(got, expected) < 1e-5
    # (A new batch size is a new compile of the same blocks — torch's guards, checked without Inductor's minutes in
    # test_dynamic_shapes_with_an_image_by_image_decode_compile_nothing_for_a_new_batch.)


@pytest.mark.heavy
def test_compiled_upsample_by_phases_equals_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(6)
    up = Upsample(16).eval()
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = _plain_upsample(x, up.conv)
        up.to(memory_format=torch.channels_last)
        up.fuse_phases()
        up.compile()
        got = up(x)
    assert got.is_contiguous(memory_format=torch.channels_last) and rel(got, want) < 1e-6


@pytest.mark.heavy
def test_pipeline_speed_max_same_pixels_on_the_cpu(tmp_path, monkeypatch):
    from estable import GenerationParams, load_pipeline

    monkeypatch.setenv("ESTABLE_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = tiny_model_file(tmp_path)
    params = GenerationParams(prompt="a red circle", steps=3, seed=7, width=32, height=32, batch_size=2)
    eager = load_pipeline(model, device="cpu", dtype="fp32").txt2img(params)
    fast_pipe = load_pipeline(model, device="cpu", dtype="fp32", speed="max")
    fast = fast_pipe.txt2img(params)
    for a, b in zip(eager.images, fast.images):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    assert Path(tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())  # Inductor wrote its cache


def test_decode_batch_decodes_image_by_image_with_the_same_pixels(tmp_path):
    from estable import GenerationParams, load_pipeline

    model = tiny_model_file(tmp_path)
    params = GenerationParams(prompt="a red circle", steps=2, seed=3, width=32, height=32, batch_size=3)
    eager = load_pipeline(model, device="cpu", dtype="fp32").txt2img(params)
    pipe = load_pipeline(model, device="cpu", dtype="fp32", speed=SpeedOptions(compile=False, decode_batch=1))
    seen: list[int] = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z: (seen.append(len(z)), decode(z))[1]
    images = pipe.txt2img(params).images
    assert seen == [1, 1, 1]  # one shape for the (compiled) decoder, whatever the batch
    for a, b in zip(eager.images, images, strict=True):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize(("vae_channels_last", "vae_layout"), [(None, True), (False, False)])
def test_vae_layout_follows_the_unets_unless_told(tmp_path, vae_channels_last, vae_layout):
    """The VAE goes channels_last with the U-Net, or stays NCHW beside it (``vae_channels_last=False``): same pixels."""
    from estable import GenerationParams, load_pipeline

    model = tiny_model_file(tmp_path)
    params = GenerationParams(prompt="a red circle", steps=2, seed=3, width=32, height=32)
    eager = load_pipeline(model, device="cpu", dtype="fp32").txt2img(params).images[0]
    pipe = load_pipeline(model, device="cpu", dtype="fp32",
                         speed=SpeedOptions(compile=False, vae_channels_last=vae_channels_last))
    conv = pipe.vae.decoder.conv_in.weight
    assert next(m.weight for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)).is_contiguous(
        memory_format=torch.channels_last)
    nhwc = conv.is_contiguous(memory_format=torch.channels_last)
    assert nhwc if vae_layout else (conv.is_contiguous() and not nhwc)
    got = pipe.txt2img(params).images[0]
    assert np.abs(np.asarray(eager, dtype=np.int16) - np.asarray(got, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize(("decode_batch", "recompiles"), [(1, False), (None, True)])
def test_dynamic_shapes_with_an_image_by_image_decode_compile_nothing_for_a_new_batch(tmp_path, monkeypatch,
                                                                                      decode_batch, recompiles):
    """Dynamo's graphs are what a new batch size costs; traced with the "eager" backend (no Inductor: seconds, not
    minutes), which guards exactly as Inductor's does. Without decode_batch=1 the decoder's blocks, first seen at a
    batch of 1 (which torch specialises), compile again at batch 3."""
    from torch._dynamo.utils import counters

    from estable import GenerationParams, load_pipeline

    plain_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, mode=None, dynamic=None: plain_compile(self, backend="eager", dynamic=dynamic))
    monkeypatch.setenv("ESTABLE_COMPILE_CACHE", str(tmp_path / "cache"))
    torch._dynamo.reset()
    pipe = load_pipeline(tiny_model_file(tmp_path), device="cpu", dtype="fp32",
                         speed=SpeedOptions(dynamic=True, decode_batch=decode_batch))
    graphs = []
    for batch in (1, 3):
        before = counters["stats"]["unique_graphs"]
        pipe.txt2img(GenerationParams(prompt="a red circle", steps=2, seed=1, width=32, height=32, batch_size=batch))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert graphs[0] > 0  # the blocks were compiled at all
    assert (graphs[1] > 0) == recompiles, graphs


def test_compile_cache_folder_choice(tmp_path, monkeypatch):
    """$ESTABLE_COMPILE_CACHE unless the user set TORCHINDUCTOR_CACHE_DIR (torch writes its own default into that
    variable once it has looked, which must not count as the user's choice); an explicit cache_dir wins."""
    from estable.speed import compile_cache_dir

    monkeypatch.setenv("ESTABLE_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    load_model_file = tiny_model_file(tmp_path)
    from estable import load_pipeline

    load_pipeline(load_model_file, device="cpu", dtype="fp32")  # torch may now have written its default
    assert compile_cache_dir(SpeedOptions()) == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir(SpeedOptions()) == tmp_path / "mine"
    assert compile_cache_dir(SpeedOptions(cache_dir=str(tmp_path / "given"))) == tmp_path / "given"
    assert compile_cache_dir(SpeedOptions(cache_dir="")) is None
