"""LoRA adapters (estable.nn.lora) and the kohya/A1111 LoRA file format (estable.checkpoints.lora_format).

Oracles: the LoRA formula W' = W + scale·(α/r)·B·A computed by hand; diffusers' own kohya → diffusers → PEFT
key conversion (``StableDiffusionLoraLoaderMixin.lora_state_dict`` + ``convert_*_to_peft``) and a diffusers
UNet2DConditionModel with the converted adapters added to its weights; diffusers' sgm → diffusers block
renaming for LDM-named files.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from estable.checkpoints import lora_format as lf
from estable.checkpoints.io import read_safetensors, write_safetensors
from estable.checkpoints.ldm import unet_key_map
from estable.config import TextConfig, UNetConfig
from estable.errors import CheckpointError, EstableError, UnsupportedModelError
from estable.models.text import TextEncoder
from estable.models.unet import UNet
from estable.nn.lora import (
    LoRAConv2d,
    LoRALinear,
    inject_lora,
    lora_modules,
    lora_parameters,
    merge_lora,
    remove_lora,
    set_lora_scale,
    unmerge_lora,
)

UNET_CFG = UNetConfig(
    block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, num_heads=2, context_dim=32
)
UNET_LINEAR_CFG = UNET_CFG.replace(use_linear_projection=True)
TEXT_CFG = TextConfig(vocab_size=64, max_positions=16, width=32, layers=2, heads=2, mlp_width=64, eos_token_id=63)


def randomize_lora_(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every B a nonzero value (B = 0 at init would make every adapter test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_up.weight.copy_(std * torch.randn(layer.lora_up.weight.shape, generator=g))


def perturb_(model: nn.Module, seed: int) -> None:
    """Move the 1-D parameters (norms, biases) off their 1/0 defaults so that mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def tiny_unet(cfg: UNetConfig = UNET_CFG, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    perturb_(model, seed + 1)
    # inference state: requires_grad changes which CPU kernels run (a ~1e-6 difference even under no_grad)
    return model.requires_grad_(False)


def tiny_text(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    model = TextEncoder(TEXT_CFG).eval()
    perturb_(model, seed + 1)
    return model.requires_grad_(False)


def unet_inputs(cfg: UNetConfig = UNET_CFG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]), torch.randn(2, 5, cfg.context_dim,
                                                                                           generator=g)


def text_ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 63, 63, 63], [1, 7, 2, 30, 12, 63]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def n_transformers(cfg: UNetConfig) -> int:
    """Spatial transformers in a U-Net: L per attention level going down, 1 in the middle, L+1 going up."""
    levels = sum(cfg.attention_levels)
    return levels * cfg.layers_per_block + 1 + levels * (cfg.layers_per_block + 1)


# ----------------------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------------------


def _linear(dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(24, 16).to(dtype)


def test_linear_equals_base_at_init_and_delta_is_alpha_over_r_BA() -> None:
    base = _linear()
    x = torch.randn(3, 5, 24)
    ref = base(x)
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, rank=4, alpha=2.0)
    assert lora.weight is base.weight and lora.bias is base.bias  # shared, not copied
    assert torch.equal(lora(x), ref)  # B = 0
    assert lora.lora_down.weight.abs().sum() > 0  # A is initialised (Kaiming-uniform), B is zero
    assert torch.count_nonzero(lora.lora_up.weight) == 0

    with torch.no_grad():
        lora.lora_up.weight.normal_()
    a, b = lora.lora_down.weight, lora.lora_up.weight  # (4, 24), (16, 4)
    expected = ref + (2.0 / 4) * x @ (b @ a).T  # W x + b + (α/r) B A x
    assert rel(lora(x), expected) < 1e-5
    lora.scale = 0.5
    assert rel(lora(x) - ref, 0.5 * (2.0 / 4) * x @ (b @ a).T) < 1e-5
    lora.scale = 0.0
    assert torch.equal(lora(x), ref)
    assert torch.equal(base.weight, w0)  # the side path never touches W


def test_alpha_none_means_rank() -> None:
    lora = LoRALinear(_linear(), rank=8, alpha=None)
    assert lora.alpha == 8.0 and lora.factor == 1.0


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_delta_matches_by_hand(kernel: int) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(8, 12, kernel, padding=kernel // 2, stride=1)
    x = torch.randn(2, 8, 6, 5)
    ref = base(x)
    lora = LoRAConv2d(base, rank=3, alpha=6.0)
    assert torch.equal(lora(x), ref)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    a = lora.lora_down.weight  # (3, 8, k, k)
    b = lora.lora_up.weight[:, :, 0, 0]  # (12, 3)
    delta_w = torch.einsum("or,rihw->oihw", b, a) * (6.0 / 3)
    expected = ref + nn.functional.conv2d(x, delta_w, padding=kernel // 2)
    assert rel(lora(x), expected) < 1e-5


def _trained(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.lora_up.weight.normal_(0, 0.2)  # type: ignore[union-attr]
    return layer


@pytest.mark.parametrize(
    "make, x_shape",
    [
        (lambda: LoRALinear(_linear(), rank=4, alpha=3.0), (4, 24)),
        (lambda: LoRAConv2d(nn.Conv2d(8, 8, 1), rank=4, alpha=4.0), (2, 8, 5, 5)),
        (lambda: LoRAConv2d(nn.Conv2d(8, 8, 3, padding=1), rank=4, alpha=1.0), (2, 8, 5, 5)),
    ],
    ids=["linear", "conv1x1", "conv3x3"],
)
def test_merge_matches_side_path_and_unmerge_restores(make, x_shape) -> None:
    torch.manual_seed(1)
    lora = _trained(make())
    lora.scale = 0.7
    x = torch.randn(x_shape)
    w0 = lora.weight.detach().clone()
    side = lora(x)
    lora.merge()
    assert lora.merged and not torch.equal(lora.weight, w0)
    merged = lora(x)
    assert rel(merged, side) <= 1e-5
    lora.scale = 0.35  # a merged layer follows its scale (re-merged)
    assert lora.merged
    lora.unmerge()
    side_half = lora(x)
    lora.merge()
    assert rel(lora(x), side_half) <= 1e-5
    lora.unmerge()
    err = (lora.weight - w0).abs().max().item()
    assert err <= 1e-6, err  # measured: ≤ 3e-8 (one fp32 rounding of W + ΔW, |W + ΔW| < 1)
    lora.unmerge()  # unmerging twice is a no-op
    assert (lora.weight - w0).abs().max().item() == err


def test_fp16_base_weights() -> None:
    base = _linear(torch.float16)
    lora = _trained(LoRALinear(base, rank=4, alpha=4.0))
    assert lora.lora_down.weight.dtype == torch.float32  # trainable factors stay float32
    x = torch.randn(3, 24, dtype=torch.float16)
    side = lora(x)
    assert side.dtype == torch.float16
    ref = (x.float() @ (base.weight.float() + lora.delta_weight()).T + base.bias.float())
    assert rel(side.float(), ref) < 2e-3  # fp16 rounding of the activations

    w0 = base.weight.detach().clone()
    lora.merge()
    assert base.weight.dtype == torch.float16
    assert rel(lora(x).float(), side.float()) < 2e-3
    merged_w = base.weight.detach().clone()
    lora.unmerge()
    err = (base.weight.float() - w0.float()).abs()
    # One fp16 rounding of the merged sum: |error| ≤ ulp(|W + ΔW|) (ulp = 2^(e-10) for |v| in [2^e, 2^(e+1))).
    ulp = torch.exp2(torch.floor(torch.log2(merged_w.float().abs().clamp_min(2**-14))) - 10)
    assert bool((err <= ulp).all()), (err / ulp).max()
    assert err.max().item() <= 2.5e-4  # weights and deltas here are below 0.5


def test_bf16_autocast_forward() -> None:
    base = _linear()
    lora = _trained(LoRALinear(base, rank=4, alpha=4.0))
    x = torch.randn(3, 24)
    ref = lora(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
        lora.merge()  # merge under autocast still does fp32 math
        ym = lora(x)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), ref) < 2e-2 and rel(ym.float(), ref) < 2e-2
    lora.unmerge()
    assert torch.allclose(lora(x), ref, atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(_linear(), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(_linear(), rank=2, alpha=1.0, dropout=1.5)
    with pytest.raises(ValueError, match="grouped"):
        LoRAConv2d(nn.Conv2d(8, 8, 3, groups=2), rank=2, alpha=1.0)


# ----------------------------------------------------------------------------------------------------------
# Injection into the models
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [UNET_CFG, UNET_LINEAR_CFG], ids=["conv_proj", "linear_proj"])
def test_inject_unet_targets(cfg: UNetConfig) -> None:
    unet = tiny_unet(cfg)
    keys = set(unet.state_dict())
    injected = inject_lora(unet, rank=4, alpha=4.0)
    per = 2 + cfg.transformer_layers * 10  # proj_in/out + (4 q/k/v/out × 2 attentions + 2 ff) per block
    assert len(injected) == n_transformers(cfg) * per
    suffixes = sorted({n.split("attentions.")[-1].split(".", 1)[-1] for n in injected})
    assert suffixes == sorted(
        ["proj_in", "proj_out"]
        + [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
        + ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]
    )
    proj_type = LoRALinear if cfg.use_linear_projection else LoRAConv2d
    assert isinstance(injected["mid_block.attentions.0.proj_in"], proj_type)
    # base keys unchanged while injected; only the adapters' factors are added
    now = set(unet.state_dict())
    assert keys <= now
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in now - keys)
    assert len(now - keys) == 2 * len(injected)
    # only the adapters train
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(injected) and all(".lora_" in n for n in trainable)
    assert {id(p) for p in lora_parameters(unet)} == {id(p) for p in unet.parameters() if p.requires_grad}


def test_inject_text_targets_and_custom_patterns() -> None:
    text = tiny_text()
    injected = inject_lora(text, rank=2, alpha=1.0)
    assert len(injected) == TEXT_CFG.layers * 6
    assert "text_model.encoder.layers.1.mlp.fc2" in injected
    assert "text_model.encoder.layers.0.self_attn.out_proj" in injected
    with pytest.raises(ValueError, match="already has a LoRA"):
        inject_lora(text, rank=2, alpha=1.0)

    unet = tiny_unet()
    only = inject_lora(unet, rank=2, alpha=1.0, targets=["attn2.to_k", "attn2.to_v"])
    assert len(only) == 2 * n_transformers(UNET_CFG)
    unet2 = tiny_unet()
    first = inject_lora(unet2, rank=2, alpha=1.0, targets=["^down_blocks.0.*.attn1.to_q"])
    assert list(first) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(ValueError, match="no module"):
        inject_lora(tiny_unet(), rank=2, alpha=1.0, targets=["q_proj"])
    with pytest.raises(ValueError, match="LayerNorm"):
        inject_lora(tiny_unet(), rank=2, alpha=1.0, targets=["norm1"])


def test_training_steps_change_outputs_and_leave_base_bit_identical() -> None:
    unet, text = tiny_unet(), tiny_text()
    base_u = {k: v.clone() for k, v in unet.state_dict().items()}
    base_t = {k: v.clone() for k, v in text.state_dict().items()}
    inject_lora(unet, rank=4, alpha=4.0, dropout=0.1)
    inject_lora(text, rank=4, alpha=4.0)
    sample, t, _ = unet_inputs()
    ids = text_ids()
    with torch.no_grad():
        before = unet(sample, t, text(ids).context[:, :5]).clone()
    params = lora_parameters(unet) + lora_parameters(text)
    opt = torch.optim.AdamW(params, lr=1e-2)
    unet.train()
    text.train()
    for _ in range(3):
        loss = unet(sample, t, text(ids).context[:, :5]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    text.eval()
    with torch.no_grad():
        after = unet(sample, t, text(ids).context[:, :5])
    assert rel(after, before) > 1e-4
    for model, base in ((unet, base_u), (text, base_t)):
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in base.items())
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_remove_lora_merged_saves_and_loads_as_a_plain_model() -> None:
    unet = tiny_unet()
    keys = list(unet.state_dict())
    sample, t, ctx = unet_inputs()
    base_out = unet(sample, t, ctx).detach()
    inject_lora(unet, rank=4, alpha=2.0)
    randomize_lora_(unet, 3)
    with torch.no_grad():
        side = unet(sample, t, ctx)
        merge_lora(unet)
        merged = unet(sample, t, ctx)
        set_lora_scale(unet, 0.0)  # merged layers follow the scale
        zero = unet(sample, t, ctx)
        set_lora_scale(unet, 1.0)
    assert rel(merged, side) < 1e-5 and rel(side, base_out) > 1e-3
    assert rel(zero, base_out) < 1e-5
    unmerge_lora(unet)
    removed = remove_lora(unet, merge=True)
    assert len(removed) == 84 and not lora_modules(unet)
    assert list(unet.state_dict()) == keys
    assert all(type(m) in (nn.Linear, nn.Conv2d) for n, m in unet.named_modules() if n in removed)
    fresh = UNet(UNET_CFG).eval()
    fresh.load_state_dict(unet.state_dict(), strict=True)
    with torch.no_grad():
        assert rel(fresh(sample, t, ctx), side) < 1e-5


def test_remove_lora_unmerged_restores_base() -> None:
    unet = tiny_unet()
    sd0 = {k: v.clone() for k, v in unet.state_dict().items()}
    inject_lora(unet, rank=4, alpha=2.0)
    randomize_lora_(unet, 3)
    merge_lora(unet)
    remove_lora(unet, merge=False)
    sd = unet.state_dict()
    assert list(sd) == list(sd0)
    err = max((sd[k] - v).abs().max().item() for k, v in sd0.items())
    assert err <= 1e-6, err


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def trained_pair(seed: int = 3, cfg: UNetConfig = UNET_CFG) -> tuple[UNet, TextEncoder]:
    unet, text = tiny_unet(cfg), tiny_text()
    inject_lora(unet, rank=4, alpha=2.0)
    inject_lora(text, rank=4, alpha=2.0)
    randomize_lora_(unet, seed)
    randomize_lora_(text, seed + 1)
    return unet, text


def outputs(unet: UNet, text: TextEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    sample, t, _ = unet_inputs()
    with torch.no_grad():
        ctx = text(text_ids()).context
        return unet(sample, t, ctx[:, :5]), ctx


def test_save_load_apply_roundtrip(tmp_path: Path) -> None:
    unet, text = trained_pair()
    want_u, want_t = outputs(unet, text)
    path = tmp_path / "style.safetensors"
    meta = lf.save_lora(path, unet, text, info={"steps": 3})
    tensors, file_meta = read_safetensors(path)
    assert file_meta == meta
    for key in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight",
        "lora_unet_up_blocks_1_attentions_1_proj_out.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha",
    ):
        assert key in tensors, key
    assert len(tensors) == 3 * (84 + 12)
    assert tensors["lora_unet_up_blocks_1_attentions_1_proj_out.alpha"].shape == ()
    assert tensors["lora_unet_up_blocks_1_attentions_1_proj_out.lora_down.weight"].shape == (4, 32, 1, 1)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    ours = json.loads(meta["estable_lora"])
    assert ours["rank"] == 4 and ours["modules"] == 96 and ours["steps"] == 3

    state = lf.load_lora(path)
    assert state.naming == "kohya" and len(state) == 96 and state.ranks() == {4: 96}
    unet2, text2 = tiny_unet(), tiny_text()
    applied = lf.apply_lora(unet2, text2, state)
    assert len(applied) == 96 and "text_encoder.text_model.encoder.layers.0.mlp.fc1" in applied
    got_u, got_t = outputs(unet2, text2)
    assert torch.equal(got_t, want_t) and torch.equal(got_u, want_u)

    # merged application gives the same outputs; a scale of 0.5 halves the LoRA's effect on a linear layer
    unet3, text3 = tiny_unet(), tiny_text()
    lf.apply_lora(unet3, text3, state, merge=True)
    got_u3, got_t3 = outputs(unet3, text3)
    assert rel(got_u3, want_u) < 1e-5 and rel(got_t3, want_t) < 1e-5
    assert all(m.merged for m in lora_modules(unet3).values())
    q = text3.text_model.encoder.layers[0].self_attn.q_proj
    w_full = q.weight.detach().clone()
    q.scale = 0.5
    w_base = tiny_text().text_model.encoder.layers[0].self_attn.q_proj.weight
    assert rel(q.weight - w_base, 0.5 * (w_full - w_base)) < 1e-5


def test_fp16_save_and_unet_only(tmp_path: Path) -> None:
    unet, _ = trained_pair()
    path = tmp_path / "u.safetensors"
    lf.save_lora(path, unet, dtype=torch.float16)
    tensors, meta = read_safetensors(path)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert tensors[next(k for k in tensors if k.endswith("lora_up.weight"))].dtype == torch.float16
    state = lf.load_lora(path)
    assert not state.text_encoder
    fresh = tiny_unet()
    lf.apply_lora(fresh, None, state)
    sample, t, ctx = unet_inputs()
    with torch.no_grad():
        assert rel(fresh(sample, t, ctx), unet(sample, t, ctx)) < 1e-3  # fp16-rounded factors


def test_diffusers_reads_our_file_as_the_same_modules(tmp_path: Path) -> None:
    """Oracle: diffusers' kohya → diffusers → PEFT conversion maps our keys to the right modules of a real
    diffusers UNet2DConditionModel; adding (α/r)·B·A there reproduces our LoRA U-Net's output."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    from estable.checkpoints.diffusers_config import unet_to_diffusers

    unet, text = trained_pair()
    path = tmp_path / "k.safetensors"
    lf.save_lora(path, unet, text)
    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(load_file(str(path)))
    assert set(alphas.values()) == {2.0} and len(alphas) == 96
    peft_u = convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")})
    peft_t = convert_state_dict_to_peft(
        {k[13:]: v for k, v in converted.items() if k.startswith("text_encoder.")}
    )
    for peft, model in ((peft_u, unet), (peft_t, text)):
        paths = {k.rsplit(".lora_", 1)[0] for k in peft}
        mine = lora_modules(model)
        assert paths == set(mine)
        for p, layer in mine.items():
            assert torch.equal(peft[f"{p}.lora_A.weight"], layer.lora_down.weight)
            assert torch.equal(peft[f"{p}.lora_B.weight"], layer.lora_up.weight)

    ref = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(UNET_CFG)).eval()
    base = tiny_unet()
    ref.load_state_dict(base.state_dict(), strict=True)
    with torch.no_grad():
        for p in {k.rsplit(".lora_", 1)[0] for k in peft_u}:
            layer = ref.get_submodule(p)
            a, b = peft_u[f"{p}.lora_A.weight"], peft_u[f"{p}.lora_B.weight"]
            delta = (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape) * (2.0 / a.shape[0])
            layer.weight += delta
        sample, t, ctx = unet_inputs()
        theirs = ref(sample, t, encoder_hidden_states=ctx).sample
        assert rel(unet(sample, t, ctx), theirs) < 1e-5


def test_reads_ldm_named_unet_lora(tmp_path: Path) -> None:
    """Files that name the U-Net in the original LDM layout (lora_unet_input_blocks_1_1_…) load the same."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    unet, text = trained_pair()
    tensors = lf.lora_tensors(unet, text)
    rename = {
        lf.kohya_name("unet", r.key[:-7]): lf.UNET_PREFIX + r.ldm[:-7].replace(".", "_")
        for r in unet_key_map(UNET_CFG, prefix="")
        if r.key.endswith(".weight")
    }
    ldm = {}
    for k, v in tensors.items():
        name, _, rest = k.partition(".")
        ldm[f"{rename.get(name, name)}.{rest}"] = v
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in ldm
    assert "lora_unet_middle_block_1_proj_in.alpha" in ldm
    assert "lora_unet_output_blocks_3_1_proj_out.alpha" in ldm  # 2 levels × (L + 1) = 4 output blocks
    # the oracle: diffusers' sgm → diffusers block renumbering followed by its kohya conversion gives the same
    # diffusers state dict for the LDM-named file as for our diffusers-named one
    renumbered = _maybe_map_sgm_blocks_to_diffusers(dict(ldm), types.SimpleNamespace(layers_per_block=1))
    theirs, _ = _convert_non_diffusers_lora_to_diffusers(renumbered)
    ours, _ = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)

    path = tmp_path / "ldm.safetensors"
    write_safetensors(path, ldm)
    unet2, text2 = tiny_unet(), tiny_text()
    lf.apply_lora(unet2, text2, lf.load_lora(path))
    want, got = outputs(unet, text), outputs(unet2, text2)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_reads_diffusers_peft_file(tmp_path: Path) -> None:
    unet, text = trained_pair()
    tensors = {}
    for component, model in (("unet", unet), ("text_encoder", text)):
        for p, layer in lora_modules(model).items():
            tensors[f"{component}.{p}.lora_A.weight"] = layer.lora_down.weight
            tensors[f"{component}.{p}.lora_B.weight"] = layer.lora_up.weight
    # diffusers' lora_adapter_metadata: α per component, with a per-module override that must be honoured
    odd = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    meta = {lf.PEFT_METADATA_KEY: json.dumps({"unet.lora_alpha": 2.0, "unet.alpha_pattern": {odd: 8.0},
                                              "unet.r": 4, "text_encoder.lora_alpha": 2.0})}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_safetensors(path, tensors, meta)
    state = lf.load_lora(path)
    assert state.naming == "peft" and len(state) == 96
    assert state.unet[odd].alpha == 8.0 and state.unet["mid_block.attentions.0.proj_in"].alpha == 2.0
    unet2, text2 = tiny_unet(), tiny_text()
    lf.apply_lora(unet2, text2, state)
    lora_modules(unet)[odd].alpha = 8.0
    want, got = outputs(unet, text), outputs(unet2, text2)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_lora_for_another_model_is_refused_and_leaves_models_untouched(tmp_path: Path) -> None:
    unet, text = trained_pair()
    path = tmp_path / "sd1.safetensors"
    lf.save_lora(path, unet, text)
    state = lf.load_lora(path)

    wider = tiny_unet(UNET_CFG.replace(context_dim=48))  # attn2.to_k/to_v take 48-wide context
    with pytest.raises(CheckpointError, match=r"do not fit.*attn2_to_k.*\[4, 32\].*\[4, 48\]"):
        lf.apply_lora(wider, None, lf.LoRAState(unet=state.unet, source=state.source))
    assert not lora_modules(wider)

    shallow = TextEncoder(TEXT_CFG.replace(layers=1))
    with pytest.raises(CheckpointError, match=r"6 LoRA module\(s\) do not exist") as info:
        lf.apply_lora(tiny_unet(), shallow, state)
    assert "lora_te_text_model_encoder_layers_1_" in str(info.value) and "text encoder" in str(info.value)
    assert not lora_modules(shallow)

    bad = dict(lf.lora_tensors(unet))
    bad["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    bad["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(CheckpointError, match="lora_unet_down_blocks_7_attentions_0_proj_in"):
        lf.apply_lora(tiny_unet(), None, lf.lora_state_from_tensors(bad))

    with pytest.raises(ValueError, match="pass the text_encoder"):
        lf.apply_lora(tiny_unet(), None, state)
    fresh = tiny_unet()
    lf.apply_lora(fresh, None, lf.lora_state_from_tensors(lf.lora_tensors(unet)))
    with pytest.raises(ValueError, match="already has a LoRA"):
        lf.apply_lora(fresh, None, lf.lora_state_from_tensors(lf.lora_tensors(unet)))


def test_malformed_files() -> None:
    down = torch.zeros(4, 32)
    with pytest.raises(CheckpointError, match="no lora_up"):
        lf.lora_state_from_tensors({"lora_unet_x.lora_down.weight": down})
    with pytest.raises(CheckpointError, match="rank mismatch"):
        lf.lora_state_from_tensors(
            {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": torch.zeros(8, 3)}
        )
    with pytest.raises(UnsupportedModelError, match="LoHa"):
        lf.lora_state_from_tensors({"lora_unet_x.hada_w1_a": down})
    with pytest.raises(UnsupportedModelError, match="SDXL"):
        lf.lora_state_from_tensors({"lora_te1_x.lora_down.weight": down, "lora_te1_x.lora_up.weight": down.T})
    with pytest.raises(UnsupportedModelError, match="full weight difference"):
        lf.lora_state_from_tensors({"lora_unet_x.diff": down})
    with pytest.raises(CheckpointError, match="does not look like a LoRA"):
        lf.lora_state_from_tensors({"model.diffusion_model.out.2.weight": down})
    with pytest.raises(CheckpointError, match=".safetensors only"):
        lf.load_lora("x.ckpt")
    with pytest.raises(ValueError, match="no LoRA layers"):
        lf.save_lora("/nonexistent/never.safetensors", tiny_unet())
    # a missing or zero alpha means α = r
    st = lf.lora_state_from_tensors({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": down.T,
                                     "lora_unet_x.alpha": torch.tensor(0.0)})
    assert st.unet["lora_unet_x"].alpha == 4.0


# ----------------------------------------------------------------------------------------------------------
# Prompt tags
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, clean, tags",
    [
        ("a cat <lora:x:0.5>", "a cat ", [("x", 0.5)]),
        ("a cat <lora:ink_v2:0.6>, sketch <lora:Film Grain>", "a cat , sketch ",
         [("ink_v2", 0.6), ("Film Grain", 1.0)]),
        ("<lora:a:-1>portrait, <LORA:b:1.2:0.4>", "portrait, ", [("a", -1.0), ("b", 1.2)]),
        ("plain prompt, no tags", "plain prompt, no tags", []),
        ("x <lora:c:te=0.3>", "x ", [("c", 0.3)]),
    ],
)
def test_extract_lora_tags(prompt: str, clean: str, tags: list[tuple[str, float]]) -> None:
    assert lf.extract_lora_tags(prompt) == (clean, tags)


def test_extract_lora_tags_bad_weight() -> None:
    with pytest.raises(EstableError, match="not a number"):
        lf.extract_lora_tags("a <lora:x:strong>")
