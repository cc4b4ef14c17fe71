"""Parity of estable's U-Net with diffusers' UNet2DConditionModel on identical random weights (CPU, fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from estable.config import UNetConfig
from estable.models import unet as unet_module
from estable.models.unet import UNet
from estable.nn.attention import multihead_attention

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """The UNet2DConditionModel arguments that build the same network as ``cfg``.

    diffusers calls the head count ``attention_head_dim`` (see config.py's glossary); channels per head become a
    per-level head count. Up block i mirrors down level n-1-i.
    """
    n = len(cfg.block_channels)
    heads: int | tuple[int, ...]
    if cfg.head_channels is None and isinstance(cfg.num_heads, int):
        heads = cfg.num_heads
    else:
        heads = tuple(cfg.heads_at(level) for level in range(n))
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if cfg.attention_levels[n - 1 - i] else "UpBlock2D" for i in range(n))
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_layers,
        attention_head_dim=heads,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Perturb the 1-D parameters (norm scales, biases), which default to 1 and 0 and would hide swaps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CONFIGS: dict[str, UNetConfig] = {
    # SD1-like: conv proj, a head count, attention on the first level only, 1 layer per block, 2 levels.
    "conv_heads_2lvl": UNetConfig(
        block_channels=(16, 32), attention_levels=(True, False), layers_per_block=1, num_heads=2,
        context_dim=24, norm_groups=8,
    ),
    # SD2-like: linear proj, channels per head, upcast, no attention on the first level, 2 transformer layers,
    # 2 layers per block, 3 levels.
    "linear_headch_upcast_3lvl": UNetConfig(
        block_channels=(16, 32, 32), attention_levels=(False, True, True), layers_per_block=2,
        num_heads=None, head_channels=8, context_dim=20, use_linear_projection=True, upcast_attention=True,
        transformer_layers=2, norm_groups=8,
    ),
    # Inpainting input (9 channels), a tuple of heads per level, attention on all levels.
    "inpaint_tuple_heads_all_attn": UNetConfig(
        in_channels=9, out_channels=4, block_channels=(16, 32), attention_levels=(True, True), layers_per_block=2,
        num_heads=(2, 4), context_dim=24, norm_groups=8,
    ),
    # Three levels, SD-like attention pattern, tuple heads, [sin, cos] order with a frequency shift, 32 groups.
    "tuple_heads_3lvl_sincos": UNetConfig(
        block_channels=(32, 32, 64), attention_levels=(True, True, False), layers_per_block=1,
        num_heads=(1, 2, 4), context_dim=16, transformer_layers=2, flip_sin_to_cos=False, freq_shift=1,
    ),
}


def build_pair(cfg: UNetConfig, seed: int = 0) -> tuple[torch.nn.Module, UNet]:
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(cfg)).eval()
    randomize_(ref, seed + 1)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: UNetConfig, h: int = 16, w: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, cfg.in_channels, h, w, generator=g)
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    return sample, context


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_and_shapes_match_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
        ours = UNet(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(theirs) - set(mine)) == []
    assert sorted(set(mine) - set(theirs)) == []
    assert {k: s for k, s in mine.items() if theirs[k] != s} == {}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    ref, ours = build_pair(cfg)
    sample, context = inputs(cfg)
    timesteps = [
        torch.tensor([10.5, 999.0]),  # float, one per sample
        torch.tensor(37),  # int, 0-d
        torch.tensor([500], dtype=torch.int64),  # int, broadcast from (1,)
    ]
    with torch.no_grad():
        for t in timesteps:
            expected = ref(sample, t, encoder_hidden_states=context).sample
            got = ours(sample, t, context)
            assert got.shape == expected.shape == (2, cfg.out_channels, *sample.shape[-2:])
            assert expected.abs().max() > 1e-3
            assert rel_err(got, expected) <= TOL, (name, t)
        # Python scalars are accepted too.
        assert rel_err(ours(sample, 250, context), ref(sample, 250, encoder_hidden_states=context).sample) <= TOL


def test_odd_latent_size_matches_diffusers() -> None:
    """Sizes that are not multiples of 2^(levels-1): the upsamplers follow the skips' sizes."""
    cfg = CONFIGS["linear_headch_upcast_3lvl"]
    ref, ours = build_pair(cfg)
    sample, context = inputs(cfg, h=15, w=21)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context).sample
        got = ours(sample, t, context)
    assert got.shape == (2, 4, 15, 21)
    assert rel_err(got, expected) <= TOL


def test_gradient_checkpointing_same_output_and_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CONFIGS["inpaint_tuple_heads_all_attn"]
    torch.manual_seed(0)
    model = UNet(cfg).train()
    randomize_(model, 3)
    sample, context = inputs(cfg)
    t = torch.tensor([100, 900])

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(sample, t, context)
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run()

    calls = []
    real = unet_module.checkpoint

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt = run()

    # 2 levels × 2 (resnet + transformer) pairs down, 2 resnets + 1 transformer mid, 2 × 3 pairs up.
    assert len(calls) == 2 * 2 * 2 + 3 + 2 * 3 * 2
    assert all(flag is False for flag in calls)
    assert rel_err(out_ckpt, out_plain) <= 1e-6
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, g in grads_plain.items():
        assert torch.allclose(grads_ckpt[name], g, rtol=1e-5, atol=1e-7), name

    # Not in eval mode or under no_grad.
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(sample, t, context)
    assert calls == []


def test_meta_construction_then_assign_load() -> None:
    cfg = CONFIGS["linear_headch_upcast_3lvl"]
    ref, ours = build_pair(cfg)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        lazy = UNet(cfg)
    lazy.load_state_dict(sd, assign=True, strict=True)
    lazy.eval()
    assert all(not t.is_meta for t in lazy.state_dict().values())
    assert all(not b.is_meta for b in lazy.buffers())
    sample, context = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(lazy(sample, 5, context), ours(sample, 5, context))


def test_bad_inputs_raise_value_errors() -> None:
    cfg = CONFIGS["conv_heads_2lvl"]
    model = UNet(cfg)
    sample, context = inputs(cfg)
    with pytest.raises(ValueError, match="context"):
        model(sample, 1, context[..., :5])
    with pytest.raises(ValueError, match="timesteps"):
        model(sample, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="sample"):
        model(sample[:, :3], 1, context)


def test_upcast_attention_computes_in_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    out = multihead_attention(q, k, v, heads=2, upcast=True)
    assert out.dtype == torch.bfloat16
    qf, kf, vf = (x.float().view(2, -1, 2, 8).transpose(1, 2) for x in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2).reshape(2, 6, 16)
    assert torch.equal(out, expected.to(torch.bfloat16))
