"""ControlNet: parity with diffusers' ControlNetModel on random weights, the U-Net's residual inputs, and the
three file layouts (diffusers folder, original single file with ``control_model.`` keys, Estable file)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from estable.checkpoints import controlnet_format as cf
from estable.config import ControlNetConfig, UNetConfig
from estable.errors import CheckpointError
from estable.models.controlnet import ControlNet, skip_channels
from estable.models.unet import UNet
from test_unet import diffusers_unet_kwargs, rel_err

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5

CONFIGS: dict[str, ControlNetConfig] = {
    # SD1-like: conv projections, a head count, attention on the first level, two hint stages (factor 2).
    "sd1ish": ControlNetConfig(
        unet=UNetConfig(block_channels=(16, 32), attention_levels=(True, False), layers_per_block=1, num_heads=2,
                        context_dim=24, norm_groups=8),
        hint_channels=(8, 16),
    ),
    # SD2-like: linear projections, channels per head, upcast, 3 levels, 2 layers, SD's 4-stage hint (factor 8),
    # BGR channel order.
    "sd2ish_bgr": ControlNetConfig(
        unet=UNetConfig(block_channels=(16, 32, 32), attention_levels=(False, True, True), layers_per_block=2,
                        num_heads=None, head_channels=8, context_dim=20, use_linear_projection=True,
                        upcast_attention=True, transformer_layers=2, norm_groups=8),
        hint_channels=(4, 8, 8, 16), bgr=True,
    ),
}


def diffusers_controlnet_kwargs(cfg: ControlNetConfig) -> dict[str, Any]:
    kw = diffusers_unet_kwargs(cfg.unet)
    for key in ("out_channels", "up_block_types", "sample_size"):
        kw.pop(key)
    kw.update(conditioning_channels=cfg.conditioning_channels, conditioning_embedding_out_channels=cfg.hint_channels,
              controlnet_conditioning_channel_order="bgr" if cfg.bgr else "rgb")
    return kw


def randomize_all_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the zero convolutions too, or the outputs would be their biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.05) + (p if p.ndim == 1 else 0))


def build_pair(cfg: ControlNetConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.ControlNetModel(**diffusers_controlnet_kwargs(cfg)).eval()
    randomize_all_(ref, seed + 1)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: ControlNetConfig, h: int = 8, w: int = 12, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    f = cfg.hint_factor
    sample = torch.randn(2, cfg.unet.in_channels, h, w, generator=g)
    context = torch.randn(2, 5, cfg.unet.context_dim, generator=g)
    control = torch.rand(2, cfg.conditioning_channels, h * f, w * f, generator=g)
    return sample, context, control


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_matches_diffusers(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ref = diffusers.ControlNetModel(**diffusers_controlnet_kwargs(cfg))
        ours = ControlNet(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert theirs == mine
    assert len(ours.controlnet_down_blocks) == len(skip_channels(cfg))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize(("scale", "guess"), [(1.0, False), (0.55, False), (0.8, True)])
def test_forward_matches_diffusers(name, scale, guess):
    cfg = CONFIGS[name]
    ref, ours = build_pair(cfg)
    sample, context, control = inputs(cfg)
    t = torch.tensor([20.0, 640.0])
    with torch.no_grad():
        down_ref, mid_ref = ref(sample, t, context, control, conditioning_scale=scale, guess_mode=guess,
                                return_dict=False)
        down, mid = ours(sample, t, context, control, scale=scale, guess_mode=guess)
    assert len(down) == len(down_ref)
    for a, b in zip(down, down_ref):
        assert a.shape == b.shape and b.abs().max() > 1e-3
        assert rel_err(a, b) <= TOL
    assert rel_err(mid, mid_ref) <= TOL


def test_unet_residuals_match_diffusers():
    """UNet(…, down_residuals, mid_residual) = diffusers' down_block_additional_residuals / mid_block_…"""
    from test_unet import build_pair as unet_pair

    cfg = CONFIGS["sd2ish_bgr"]
    ref_unet, unet = unet_pair(cfg.unet)
    ref, net = build_pair(cfg, seed=3)
    sample, context, control = inputs(cfg)
    t = torch.tensor([5.0, 300.0])
    with torch.no_grad():
        down, mid = net(sample, t, context, control)
        expected = ref_unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(down),
                            mid_block_additional_residual=mid).sample
        got = unet(sample, t, context, down, mid)
        plain = unet(sample, t, context)
    assert rel_err(got, expected) <= TOL
    assert (got - plain).abs().max() > 1e-2  # the residuals matter
    with pytest.raises(ValueError, match="down residuals"):
        unet(sample, t, context, down[:-1], mid)


def test_from_unet_copies_encoder_and_leaves_unet_output_unchanged():
    cfg = CONFIGS["sd1ish"]
    torch.manual_seed(0)
    unet = UNet(cfg.unet).eval()
    net = ControlNet.from_unet(unet, cfg)
    for k, v in net.state_dict().items():
        if k.startswith("controlnet_") and "cond_embedding.conv_in" not in k and "cond_embedding.blocks" not in k:
            assert not v.any(), k  # zero convolutions
        elif not k.startswith("controlnet_"):
            assert torch.equal(v, unet.state_dict()[k]), k
    sample, context, control = inputs(cfg)
    with torch.no_grad():
        down, mid = net(sample, 10, context, control)
        assert torch.equal(unet(sample, 10, context, down, mid), unet(sample, 10, context))


# ------------------------------------------------------------------------------------------- file layouts


def _diffusers_folder(tmp_path, cfg: ControlNetConfig):
    ref, _ = build_pair(cfg, seed=5)
    ref.save_pretrained(tmp_path / "cn_diffusers", safe_serialization=True)
    return ref, tmp_path / "cn_diffusers"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layouts_load_to_the_same_tensors(tmp_path, name):
    cfg = CONFIGS[name]
    ref, folder = _diffusers_folder(tmp_path, cfg)
    expected = ref.state_dict()
    loaded = cf.load_controlnet(folder)
    assert loaded.format == "diffusers" and loaded.model.config == cfg
    # original single-file layout, written by us, read back by diffusers' own converter and by us
    ldm = {k: v.clone() for k, v in cf.controlnet_to_ldm(expected, cfg).items()}
    assert all(k.startswith("control_model.") for k in ldm)
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if len(cfg.hint_channels) == 4:  # diffusers' converter hard-codes SD's hint encoder (conv_out = index 14)
        theirs = convert_controlnet_checkpoint(ldm, {"layers_per_block": cfg.unet.layers_per_block})
        assert set(theirs) == set(expected)
        assert all(torch.equal(theirs[k], expected[k]) for k in expected)
    from safetensors.torch import save_file

    save_file(ldm, tmp_path / "control_x.safetensors")
    single = cf.load_controlnet(tmp_path / "control_x.safetensors", base=cfg.unet)
    assert single.format == "ldm" and single.model.config == cfg.replace(bgr=False)
    # bare names (no control_model. prefix) load too
    save_file({k[len("control_model."):]: v for k, v in ldm.items()}, tmp_path / "bare.safetensors")
    bare = cf.load_controlnet(tmp_path / "bare.safetensors", base=cfg.unet)
    # Estable's own file
    out = cf.save_controlnet(loaded.model, tmp_path / "mine.safetensors")
    own = cf.load_controlnet(out)
    assert own.format == "estable" and own.model.config == cfg
    for model in (loaded.model, single.model, bare.model, own.model):
        sd = model.state_dict()
        assert set(sd) == set(expected)
        assert all(torch.equal(sd[k], expected[k]) for k in expected)
    # and our diffusers writer is read by diffusers
    cf.save_controlnet(loaded.model, tmp_path / "ours_diffusers", to="diffusers")
    again = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours_diffusers")
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "ours_diffusers" / "config.json").read_text())["_class_name"] == "ControlNetModel"


def test_infer_sd15_and_sd21_shapes_without_base():
    """Full-size key sets (meta tensors): SD 1.5's ControlNet comes out with 8 heads, SD 2.1's with 64-channel heads."""
    sd15 = ControlNetConfig()
    sd21 = ControlNetConfig(unet=UNetConfig(num_heads=None, head_channels=64, context_dim=1024,
                                            use_linear_projection=True, upcast_attention=True))
    for cfg in (sd15, sd21):
        keys = {r.ldm: torch.empty(r.ldm_shape, device="meta") for r in cf.controlnet_key_map(cfg)}
        assert "control_model.input_hint_block.14.weight" in keys and "control_model.zero_convs.11.0.weight" in keys
        assert "control_model.middle_block_out.0.weight" in keys and len(keys) == len(set(keys))
        assert cf.infer_controlnet_config(keys) == cfg


def test_strict_loading_errors(tmp_path):
    cfg = CONFIGS["sd1ish"]
    ref, _ = build_pair(cfg)
    ldm = {k: v.clone() for k, v in cf.controlnet_to_ldm(ref.state_dict(), cfg).items()}
    from safetensors.torch import save_file

    broken = dict(ldm)
    del broken["control_model.zero_convs.1.0.bias"]
    broken["control_model.something_else.weight"] = torch.zeros(1)
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: zero_convs\.1\.0\.bias.*unexpected: something_else"):
        cf.load_controlnet(tmp_path / "broken.safetensors", base=cfg.unet)
    save_file(ldm, tmp_path / "ok.safetensors")
    other = cfg.unet.replace(block_channels=(16, 48), norm_groups=8)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        cf.load_controlnet(tmp_path / "ok.safetensors", base=other)
    with pytest.raises(CheckpointError, match="no such"):
        cf.load_controlnet(tmp_path / "absent.safetensors")


def test_diffusers_config_options():
    cfg = CONFIGS["sd2ish_bgr"]
    d = cf.controlnet_to_diffusers(cfg)
    assert d["controlnet_conditioning_channel_order"] == "bgr" and "up_block_types" not in d
    assert cf.controlnet_from_diffusers(d) == cfg
    from estable.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="global_pool_conditions"):
        cf.controlnet_from_diffusers({**d, "global_pool_conditions": True})
    with pytest.raises(UnsupportedModelError, match="channel_order"):
        cf.controlnet_from_diffusers({**d, "controlnet_conditioning_channel_order": "rgba"})
    with pytest.raises(UnsupportedModelError, match="class_embed_type"):
        cf.controlnet_from_diffusers({**d, "class_embed_type": "timestep"})


def test_info_describes_controlnets(tmp_path):
    from safetensors.torch import save_file

    from estable.checkpoints.info import describe, format_info

    cfg = CONFIGS["sd2ish_bgr"]
    ref, folder = _diffusers_folder(tmp_path, cfg)
    save_file({k: v.contiguous() for k, v in cf.controlnet_to_ldm(ref.state_dict(), cfg).items()},
              tmp_path / "single.safetensors")
    own = cf.save_controlnet(cf.load_controlnet(folder).model, tmp_path / "own.safetensors", dtype=torch.float16)
    n = sum(v.numel() for v in ref.state_dict().values())
    for path, fmt in ((folder, "diffusers"), (tmp_path / "single.safetensors", "ldm"), (own, "estable")):
        info = describe(path, hashes=False)
        assert info["kind"] == "controlnet" and info["format"] == fmt and info["parameters"] == n, path
        assert info["fits"]["block_channels"] == list(cfg.unet.block_channels) and info["hint"]["factor"] == 8
        text = format_info(info)
        assert "ControlNet" in text and "widths [16, 32, 32]" in text
    assert describe(own, hashes=False)["dtypes"] == ["F16"]


def test_convert_command_between_layouts(tmp_path, capsys):
    import estable.cli as cli

    cfg = CONFIGS["sd2ish_bgr"]
    ref, folder = _diffusers_folder(tmp_path, cfg)
    expected = ref.state_dict()
    single = tmp_path / "single.safetensors"
    assert cli.main(["convert", str(folder), str(single), "--to", "ldm"]) == 0
    assert "ControlNet" in capsys.readouterr().out
    back = tmp_path / "back"
    assert cli.main(["convert", str(single), str(back), "--to", "diffusers"]) == 0
    again = diffusers.ControlNetModel.from_pretrained(back)
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    assert cf.load_controlnet(back).model.config == cfg  # heads and groups kept through the single file's metadata
    half = tmp_path / "half.safetensors"
    assert cli.main(["convert", str(single), str(half), "--to", "estable", "--dtype", "fp16"]) == 0
    assert cf.load_controlnet(half).model.conv_in.weight.dtype == torch.float16
    assert cli.main(["convert", str(single), str(half), "--to", "estable"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(single), str(tmp_path / "x.safetensors"), "--to", "estable", "--ema"]) == 2
    assert "not to a ControlNet" in capsys.readouterr().err
