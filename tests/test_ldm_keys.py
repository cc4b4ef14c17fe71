"""LDM single-file layout ↔ Estable (diffusers/transformers names), checked against diffusers' own converters.

Stand-ins: Estable's state-dict keys are by contract those of diffusers' UNet2DConditionModel / AutoencoderKL
and transformers' CLIPTextModelWithProjection (``text_model.…``), so random-weight reference models give the
component state dicts. diffusers' single-file converters (LDM → diffusers) are the oracle for our
Estable → LDM direction: they must give back exactly the tensors we started from.
"""

from __future__ import annotations

import logging

import pytest
import torch

from estable.checkpoints import ldm, ldm_infer
from estable.checkpoints.diffusers_config import text_to_diffusers, unet_to_diffusers, vae_to_diffusers
from estable.config import (
    ModelConfig,
    ScheduleConfig,
    TextConfig,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
    preset,
)
from estable.errors import CheckpointError, UnsupportedModelError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------------------
# Tiny configs, written with the conventions infer_config restores (SD1: 8 heads; SD2: 64 channels per head,
# upcast, v-prediction at 96 latent pixels; text heads = width / 64).
# ---------------------------------------------------------------------------------------------------------

_TEXT1 = TextConfig(vocab_size=100, max_positions=16, width=64, layers=2, heads=1, mlp_width=128)
_VAE = VAEConfig(block_channels=(32, 64), layers_per_block=1)

SD1 = ModelConfig(
    family="sd1",
    unet=UNetConfig(block_channels=(32, 64), attention_levels=(True, False), context_dim=64),
    vae=_VAE,
    text=_TEXT1,
)
SD2 = ModelConfig(
    family="sd2",
    unet=UNetConfig(
        block_channels=(64, 128),
        attention_levels=(True, True),
        num_heads=None,
        head_channels=64,
        context_dim=64,
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    ),
    vae=VAEConfig(block_channels=(32, 32, 64), layers_per_block=2, sample_size=768),
    text=TextConfig(
        vocab_size=100, max_positions=16, width=64, layers=3, heads=1, mlp_width=96, activation="gelu",
        projection_dim=48,
    ),
    tokenizer=TokenizerConfig(pad_token_id=0),
    schedule=ScheduleConfig(prediction_type="v_prediction"),
    clip_skip=2,
)
THREE_LEVELS = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        block_channels=(32, 32, 64),
        layers_per_block=1,
        attention_levels=(False, True, False),
        transformer_layers=2,
        context_dim=64,
    ),
    vae=VAEConfig(block_channels=(32, 32, 64), layers_per_block=1, latent_channels=3, mid_attention=True),
    text=_TEXT1,
)
INPAINT = SD1.replace(unet=SD1.unet.replace(in_channels=9))
CASES = {"sd1": SD1, "sd2": SD2, "three_levels": THREE_LEVELS, "inpainting": INPAINT}


def _randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values in every tensor, so that any mix-up between same-shaped tensors shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items()}


def _text_model(cfg: TextConfig):
    tc = transformers.CLIPTextConfig(**text_to_diffusers(cfg.replace(projection_dim=cfg.projection_dim or 8)))
    return transformers.CLIPTextModelWithProjection(tc)


def _components(cfg: ModelConfig, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    unet = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(cfg.unet))
    vae = diffusers.AutoencoderKL.from_config(vae_to_diffusers(cfg.vae))
    text = _text_model(cfg.text).state_dict()
    if cfg.text.projection_dim is None:
        del text["text_projection.weight"]
    return {
        "unet": _randomize(unet.state_dict(), seed),
        "vae": _randomize(vae.state_dict(), seed + 1),
        "text_encoder": _randomize(text, seed + 2),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    cfg = CASES[request.param]
    comps = _components(cfg)
    return cfg, comps, ldm.components_to_ldm(comps, cfg)


def test_diffusers_converters_recover_our_tensors(case):
    """diffusers' LDM → diffusers conversion of OUR LDM dict gives back the original tensors bitwise."""
    cfg, comps, sd = case
    _assert_same(sfu.convert_ldm_unet_checkpoint(sd, unet_to_diffusers(cfg.unet)), comps["unet"])
    _assert_same(sfu.convert_ldm_vae_checkpoint(sd, vae_to_diffusers(cfg.vae)), comps["vae"])
    want = dict(comps["text_encoder"])
    if cfg.family == "sd2":
        text = sfu.convert_open_clip_checkpoint(_text_model(cfg.text), sd)
        # diffusers drops open_clip's text_projection (SD 2.x folders have none); its transpose is checked in
        # test_ldm_layout_prefixes_and_reshapes
        del want["text_projection.weight"]
    else:
        text = sfu.convert_ldm_clip_checkpoint(sd)
    _assert_same(text, want)


def test_round_trip_is_bitwise(case):
    cfg, comps, sd = case
    back = ldm.ldm_to_components(sd, cfg)
    for name in comps:
        _assert_same(back[name], comps[name])


def test_ldm_layout_prefixes_and_reshapes(case):
    cfg, comps, sd = case
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in sd)
    # VAE attention projections are 1×1 convolutions in LDM
    c = cfg.vae.block_channels[-1]
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (c, c, 1, 1)
    if cfg.family == "sd2":
        w = cfg.text.width
        fused = sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert fused.shape == (3 * w, w)
        q = comps["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj.weight"]
        v = comps["text_encoder"]["text_model.encoder.layers.0.self_attn.v_proj.weight"]
        assert torch.equal(fused[:w], q) and torch.equal(fused[2 * w :], v)
        proj = comps["text_encoder"]["text_projection.weight"]  # (proj, width)
        assert torch.equal(sd["cond_stage_model.model.text_projection"], proj.T)
    else:
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd


def test_infer_config_recovers_the_config(case):
    cfg, _, sd = case
    assert ldm_infer.infer_config(sd) == cfg


def test_diffusers_model_type_agrees(case):
    cfg, _, sd = case
    # diffusers recognises SD 2.x by a 1024-wide context, which tiny configs lack: all are "v1" to it
    assert sfu.infer_diffusers_model_type(sd) == ("inpainting" if cfg.unet.in_channels == 9 else "v1")


# ---------------------------------------------------------------------------------------------------------
# Full-size presets on the meta device: shapes only, no memory
# ---------------------------------------------------------------------------------------------------------


def _meta_components(cfg: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {r.key: torch.empty(r.shape, device="meta") for r in rows} for name, rows in ldm.key_maps(cfg).items()
    }


@pytest.mark.parametrize("name", ["sd15", "sd21-768-v"])
def test_preset_key_maps_match_reference_models(name):
    cfg = preset(name)
    maps = ldm.key_maps(cfg)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(cfg.unet))
        vae = diffusers.AutoencoderKL.from_config(vae_to_diffusers(cfg.vae))
        text = _text_model(cfg.text)
    refs = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}
    if cfg.text.projection_dim is None:
        del refs["text_encoder"]["text_projection.weight"]
    for comp, rows in maps.items():
        ours = {r.key: r.shape for r in rows}
        assert ours == {k: tuple(v.shape) for k, v in refs[comp].items()}, comp
    assert sum(v.numel() for v in refs["unet"].values()) == sum(
        torch.Size(r.shape).numel() for r in maps["unet"]
    )


def test_sd15_published_layout():
    cfg = preset("sd15")
    sd = ldm.components_to_ldm(_meta_components(cfg), cfg)
    # names diffusers uses to recognise SD 1.x files, and famous shapes
    assert sd["model.diffusion_model.output_blocks.11.0.skip_connection.weight"].shape == (320, 640, 1, 1)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert sd["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sfu.infer_diffusers_model_type(sd) == "v1"
    unet_params = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    assert unet_params == 859_520_964  # SD 1.5's U-Net: 859.5 M parameters
    assert ldm_infer.infer_config(sd) == cfg
    assert ldm_infer.detect_family(sd) == "sd1"


def test_sd2_published_layout_and_presets():
    cfg = preset("sd21-768-v")
    sd = ldm.components_to_ldm(_meta_components(cfg), cfg)
    assert sd["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear
    assert sd["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert sd["cond_stage_model.model.text_projection"].shape == (1024, 1024)
    assert sd["cond_stage_model.model.positional_embedding"].shape == (77, 1024)
    assert sfu.infer_diffusers_model_type(sd) == "v2"
    assert ldm_infer.detect_family(sd) == "sd2"
    assert ldm_infer.infer_config(sd) == cfg  # v-prediction by default, as diffusers decides
    assert ldm_infer.infer_config(sd, prediction_type="epsilon") == preset("sd21-base")
    sd["global_step"] = torch.tensor(875000)  # SD 2.0-base's checkpoint
    assert ldm_infer.infer_config(sd) == preset("sd21-base")


def test_sd2_prediction_type_rule():
    cfg = preset("sd21-768-v")
    sd = ldm.components_to_ldm(_meta_components(cfg), cfg)
    assert ldm_infer.sd2_prediction_type(sd) == "v_prediction"
    assert ldm_infer.sd2_prediction_type({**sd, "global_step": 875000}) == "epsilon"
    assert ldm_infer.sd2_prediction_type({**sd, "global_step": 110000}) == "v_prediction"
    inpaint = cfg.replace(unet=cfg.unet.replace(in_channels=9))
    sd9 = ldm.components_to_ldm(_meta_components(inpaint), inpaint)
    assert ldm_infer.sd2_prediction_type(sd9) == "epsilon"
    assert sfu.infer_diffusers_model_type(sd9) == "inpainting_v2"
    assert ldm_infer.infer_config(sd9).schedule.prediction_type == "epsilon"


def test_sd2_trimmed_tower_round_trip():
    """A diffusers SD 2.x folder (23 layers, no projection) written to LDM reads back with clip_skip=1."""
    cfg = preset("sd21-768-v")
    comps, trimmed = ldm.trim_text_layers(_meta_components(cfg), cfg)
    assert trimmed.text.layers == 23 and trimmed.clip_skip == 1 and trimmed.text.projection_dim is None
    sd = ldm.components_to_ldm(comps, trimmed)
    assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" not in sd
    assert "cond_stage_model.model.text_projection" not in sd
    assert ldm_infer.infer_config(sd) == trimmed


# ---------------------------------------------------------------------------------------------------------
# trim_text_layers keeps the conditioning
# ---------------------------------------------------------------------------------------------------------


def test_trim_text_layers_keeps_the_conditioning():
    cfg = SD2
    comps = _components(cfg, seed=5)
    trimmed_comps, trimmed = ldm.trim_text_layers(comps, cfg)
    assert trimmed.text.layers == cfg.text.layers - 1 and trimmed.clip_skip == 1
    assert "text_projection.weight" not in trimmed_comps["text_encoder"]
    assert "text_projection.weight" in comps["text_encoder"]  # input untouched
    for k, v in trimmed_comps["text_encoder"].items():
        assert v is comps["text_encoder"][k]

    full = _text_model(cfg.text)
    full.load_state_dict(comps["text_encoder"])
    small_cfg = transformers.CLIPTextConfig(**text_to_diffusers(trimmed.text))
    small = transformers.CLIPTextModel(small_cfg)
    small_state = {k.removeprefix("text_model."): v for k, v in trimmed_comps["text_encoder"].items()}
    if not any(k.startswith("text_model.") for k in small.state_dict()):
        small.load_state_dict(small_state)
    else:
        small.load_state_dict(trimmed_comps["text_encoder"])
    ids = torch.randint(0, cfg.text.vocab_size - 1, (2, 16))
    with torch.no_grad():
        out = full(ids, output_hidden_states=True)
        penultimate = full.text_model.final_layer_norm(out.hidden_states[-2])  # what SD 2.x conditions on
        last = small(ids).last_hidden_state
    torch.testing.assert_close(last, penultimate, rtol=0, atol=1e-6)
    # clip_skip=1 is a no-op
    same, same_cfg = ldm.trim_text_layers(comps, SD1)
    assert same_cfg is SD1 and same.keys() == comps.keys()


# ---------------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------------


def test_ema_extraction(case):
    cfg, comps, sd = case
    ema_unet = _randomize(comps["unet"], seed=99)
    with_ema = dict(sd)
    for r in ldm.unet_key_map(cfg.unet):  # the U-Net map is pure renaming
        with_ema[ldm.ema_key(r.ldm)] = ema_unet[r.key]
    with_ema["model_ema.decay"] = torch.tensor(0.9999)
    with_ema["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    _assert_same(ldm.ldm_to_components(with_ema, cfg, ema=True)["unet"], ema_unet)
    _assert_same(ldm.ldm_to_components(with_ema, cfg, ema=False)["unet"], comps["unet"])
    if sum(k.startswith("model_ema") for k in with_ema) > 100:  # diffusers' own EMA threshold
        oracle = sfu.convert_ldm_unet_checkpoint(with_ema, unet_to_diffusers(cfg.unet), extract_ema=True)
        _assert_same(oracle, ema_unet)
    # an EMA-only file (the U-Net only under model_ema.) also loads with ema=True
    ema_only = {k: v for k, v in with_ema.items() if not k.startswith("model.diffusion_model.")}
    _assert_same(ldm.ldm_to_components(ema_only, cfg, ema=True)["unet"], ema_unet)


def test_ema_key_naming():
    assert ldm.ema_key("model.diffusion_model.input_blocks.0.0.weight") == (
        "model_ema.diffusion_modelinput_blocks00weight"
    )
    with pytest.raises(ValueError):
        ldm.ema_key("first_stage_model.encoder.conv_in.weight")


def test_ema_requested_but_absent(case):
    cfg, _, sd = case
    with pytest.raises(CheckpointError, match="model_ema"):
        ldm.ldm_to_components({**sd, "model_ema.decay": torch.tensor(0.9999)}, cfg, ema=True)


# ---------------------------------------------------------------------------------------------------------
# Errors name the keys
# ---------------------------------------------------------------------------------------------------------


def test_known_extras_are_ignored(case):
    cfg, comps, sd = case
    extras = {
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.zeros(1000),
        "alphas_cumprod_prev": torch.zeros(1000),
        "sqrt_recipm1_alphas_cumprod": torch.zeros(1000),
        "posterior_mean_coef2": torch.zeros(1000),
        "log_one_minus_alphas_cumprod": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None],
        "cond_stage_model.model.logit_scale": torch.tensor(4.6),
    }
    back = ldm.ldm_to_components({**sd, **extras}, cfg)
    _assert_same(back["unet"], comps["unet"])


def test_renamed_key_is_reported(case):
    cfg, _, sd = case
    old = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    bad = dict(sd)
    bad[old + "_renamed"] = bad.pop(old)
    with pytest.raises(CheckpointError) as e:
        ldm.ldm_to_components(bad, cfg)
    msg = str(e.value)
    assert "1 missing key(s): " + old in msg
    assert "1 unexpected key(s): " + old + "_renamed" in msg


def test_renamed_attention_key_does_not_change_the_inferred_structure(case):
    # Inferring the config from a file with one renamed transformer weight must still see the attention
    # level, so that the error names that key instead of every key of the block.
    cfg, _, sd = case
    old = next(k for k in sd if k.startswith("model.diffusion_model.input_blocks.") and ".1.proj_in.weight" in k)
    bad = dict(sd)
    bad[old.replace("proj_in", "proj_inn")] = bad.pop(old)
    inferred = ldm_infer.infer_config(bad, family=cfg.family if cfg.family != "estable" else "sd1")
    assert inferred.unet.attention_levels == cfg.unet.attention_levels
    with pytest.raises(CheckpointError) as e:
        ldm.ldm_to_components(bad, inferred)
    msg = str(e.value)
    assert "1 missing key(s): " + old in msg
    assert "1 unexpected key(s): " + old.replace("proj_in", "proj_inn") in msg


def test_missing_keys_are_reported_with_a_count(case):
    cfg, _, sd = case
    gone = sorted(k for k in sd if k.startswith("first_stage_model.decoder."))
    bad = {k: v for k, v in sd.items() if k not in gone}
    with pytest.raises(CheckpointError) as e:
        ldm.ldm_to_components(bad, cfg)
    msg = str(e.value)
    assert f"{len(gone)} missing key(s)" in msg
    assert f"(and {len(gone) - 5} more)" in msg
    assert "first_stage_model.decoder." in msg
    assert "unexpected" not in msg


def test_wrong_shape_is_reported(case):
    cfg, _, sd = case
    key = "model.diffusion_model.out.2.weight"
    bad = {**sd, key: torch.zeros(7, cfg.unet.block_channels[0], 3, 3)}
    with pytest.raises(CheckpointError) as e:
        ldm.ldm_to_components(bad, cfg)
    c = cfg.unet.block_channels[0]
    assert f"{key} (7, {c}, 3, 3), expected ({cfg.unet.out_channels}, {c}, 3, 3)" in str(e.value)


def test_wrong_shape_in_fused_projection_is_reported():
    sd = ldm.components_to_ldm(_components(SD2), SD2)
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    sd[key] = sd[key][:-1]
    with pytest.raises(CheckpointError, match=r"1 key\(s\) with the wrong shape: " + key.replace(".", r"\.")):
        ldm.ldm_to_components(sd, SD2)


def test_sdxl_and_partial_files_are_refused(case):
    cfg, _, sd = case
    sdxl = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    sdxl["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 64)
    with pytest.raises(CheckpointError, match="SDXL is not supported"):
        ldm_infer.detect_family(sdxl)
    with pytest.raises(CheckpointError, match="SDXL"):
        ldm_infer.infer_config(sdxl)
    vae_only = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError) as e:
        ldm_infer.detect_family(vae_only)
    msg = str(e.value)
    assert "no U-Net (model.diffusion_model.)" in msg and "first_stage_model.encoder." in msg
    unet_only = {k[len("model.diffusion_model.") :]: v for k, v in sd.items() if k.startswith("model.diffusion")}
    with pytest.raises(CheckpointError, match="input_blocks"):  # a bare U-Net: names its prefixes
        ldm_infer.detect_family(unet_only)


def test_unsupported_structures_name_the_option():
    sd = ldm.components_to_ldm(_components(SD1), SD1)
    with pytest.raises(UnsupportedModelError, match="label_emb"):
        ldm_infer.infer_config({**sd, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)})
    # transformer depth per level (SDXL-style) is not representable
    deeper = THREE_LEVELS.replace(unet=THREE_LEVELS.unet.replace(attention_levels=(True, True, False)))
    sd3 = ldm.components_to_ldm(_meta_components(deeper), deeper)
    blk = "model.diffusion_model.input_blocks.1.1.transformer_blocks.1."
    sd3 = {k: v for k, v in sd3.items() if not k.startswith(blk)}
    with pytest.raises(UnsupportedModelError, match="transformer depth"):
        ldm_infer.infer_config(sd3)


def test_components_to_ldm_checks_its_input(case):
    cfg, comps, _ = case
    bad = {name: dict(state) for name, state in comps.items()}
    bad["vae"]["decoder.extra.weight"] = torch.zeros(1)
    k = "text_model.final_layer_norm.bias"
    bad["text_encoder"][k] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        ldm.components_to_ldm(bad, cfg)
    assert "vae: decoder.extra.weight" in str(e.value) and f"text_encoder: {k} (3)" in str(e.value)
    with pytest.raises(CheckpointError, match="'unet'"):
        ldm.components_to_ldm({"vae": comps["vae"], "text_encoder": comps["text_encoder"]}, cfg)


def test_estable_family_uses_the_sd1_layout():
    cfg = SD1.replace(family="estable", text=SD1.text.replace(projection_dim=32))
    comps = _components(cfg, seed=3)
    sd = ldm.components_to_ldm(comps, cfg)
    assert "cond_stage_model.transformer.text_projection.weight" in sd
    assert ldm_infer.detect_family(sd) == "sd1"
    back = ldm.ldm_to_components(sd, cfg)
    _assert_same(back["text_encoder"], comps["text_encoder"])
    inferred = ldm_infer.infer_config(sd)
    assert inferred.text.projection_dim == 32 and inferred.unet == cfg.unet
    with pytest.raises(ValueError, match="estable"):
        ldm_infer.infer_config(sd, family="estable")
