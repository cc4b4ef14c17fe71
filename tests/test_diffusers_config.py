"""diffusers / transformers config.json ↔ Estable configs.

Oracles: diffusers' UNet2DConditionModel / AutoencoderKL / schedulers and transformers' CLIPTextConfig build
networks from the dicts we write; their parameter names, shapes and head counts must be what our configs
imply. The published SD 1.5 / SD 2.1 config files (written below from the files on the Hugging Face Hub)
must map onto our presets.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from estable.checkpoints import diffusers_config as dc
from estable.checkpoints.ldm import text_key_map, trim_text_layers, unet_key_map, vae_key_map
from estable.config import PRESETS, ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig, preset
from estable.errors import UnsupportedModelError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# stable-diffusion-v1-5: unet/, vae/, text_encoder/, scheduler/ config.json
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _UP,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1 (768-v)
SD21_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": _DOWN,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": _UP,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD21_VAE = {**SD15_VAE, "_diffusers_version": "0.10.0.dev0", "sample_size": 768}
SD21_TEXT = {
    **SD15_TEXT,
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "transformers_version": "4.25.0.dev0",
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_UNETS = {
    "sd1_like": UNetConfig(block_channels=(32, 64), attention_levels=(True, False), context_dim=48),
    "sd2_like": UNetConfig(
        block_channels=(64, 128), attention_levels=(True, True), num_heads=None, head_channels=32, context_dim=40,
        use_linear_projection=True, upcast_attention=True,
    ),
    "three_levels": UNetConfig(
        block_channels=(32, 32, 64), layers_per_block=1, attention_levels=(False, True, False), num_heads=(1, 2, 8),
        transformer_layers=2, context_dim=24, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, sample_size=16,
    ),
    "inpainting": UNetConfig(
        in_channels=9, block_channels=(32, 64), attention_levels=(True, True), num_heads=(2, 8), context_dim=32,
        norm_groups=16,
    ),
}
TINY_VAES = {
    "two_levels": VAEConfig(block_channels=(32, 64), layers_per_block=1),
    "no_mid_attention": VAEConfig(
        block_channels=(32, 32, 64), layers_per_block=2, latent_channels=8, mid_attention=False, norm_groups=16,
        scaling_factor=0.13025, sample_size=64, in_channels=4, out_channels=4,
    ),
}
TINY_TEXTS = {
    "plain": TextConfig(vocab_size=100, max_positions=16, width=32, layers=2, heads=2, mlp_width=64),
    "projected": TextConfig(
        vocab_size=100, max_positions=16, width=48, layers=3, heads=3, mlp_width=96, activation="gelu",
        projection_dim=24, layer_norm_eps=1e-6, eos_token_id=99,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Round trips and the published configs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    cfg = preset(name)
    assert dc.unet_from_diffusers(dc.unet_to_diffusers(cfg.unet)) == cfg.unet
    assert dc.vae_from_diffusers(dc.vae_to_diffusers(cfg.vae)) == cfg.vae
    # a CLIPTextModel config: the projection, if any, travels with the weights (test_diffusers_export)
    assert dc.text_from_diffusers(dc.text_to_diffusers(cfg.text)) == cfg.text.replace(projection_dim=None)
    assert dc.schedule_from_diffusers(dc.schedule_to_diffusers(cfg.schedule)) == cfg.schedule
    assert dc.schedule_from_diffusers(dc.schedule_to_diffusers(cfg.schedule, "DDIMScheduler")) == cfg.schedule


@pytest.mark.parametrize("name", list(TINY_UNETS))
def test_tiny_unets_round_trip(name):
    cfg = TINY_UNETS[name]
    d = dc.unet_to_diffusers(cfg)
    assert dc.unet_from_diffusers(json.loads(json.dumps(d))) == cfg  # through JSON, as on disk


@pytest.mark.parametrize("name", list(TINY_VAES))
def test_tiny_vaes_round_trip(name):
    cfg = TINY_VAES[name]
    assert dc.vae_from_diffusers(json.loads(json.dumps(dc.vae_to_diffusers(cfg)))) == cfg


@pytest.mark.parametrize("name", list(TINY_TEXTS))
def test_tiny_texts_round_trip(name):
    cfg = TINY_TEXTS[name]
    back = dc.text_from_diffusers(json.loads(json.dumps(dc.text_to_diffusers(cfg))))
    assert back == cfg.replace(projection_dim=None)  # the projection travels with the weights


def test_schedules_round_trip():
    for cfg in (
        ScheduleConfig(),
        ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, steps_offset=0),
        ScheduleConfig(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, timestep_spacing="trailing"),
        ScheduleConfig(prediction_type="v_prediction", timestep_spacing="linspace"),
        ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    ):
        assert dc.schedule_from_diffusers(dc.schedule_to_diffusers(cfg)) == cfg


def test_zero_terminal_snr_schedule_is_written_for_ddim():
    """PNDM has no zero-terminal-SNR option: such a model's folder names DDIMScheduler, which diffusers builds
    with the rescaled betas."""
    from diffusers import DDIMScheduler

    cfg = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    written = dc.schedule_to_diffusers(cfg)
    assert written["_class_name"] == "DDIMScheduler" and written["rescale_betas_zero_snr"] is True
    assert float(DDIMScheduler.from_config(written).alphas_cumprod[-1]) == 0.0
    assert dc.model_index_for(ModelConfig(schedule=cfg))["scheduler"] == ["diffusers", "DDIMScheduler"]
    with pytest.raises(ValueError, match="DDIMScheduler"):
        dc.schedule_to_diffusers(cfg, "PNDMScheduler")


def test_heads_as_a_list_with_constant_channels_per_head_become_head_channels():
    """A per-level head list whose channels per head are constant is read as head_channels (same network)."""
    cfg = UNetConfig(block_channels=(32, 64), attention_levels=(True, True), num_heads=(2, 4), context_dim=32)
    back = dc.unet_from_diffusers(dc.unet_to_diffusers(cfg))
    assert back.head_channels == 16 and back.num_heads is None
    assert [back.heads_at(i) for i in range(2)] == [cfg.heads_at(i) for i in range(2)]
    # an int stays an int; a list of equal counts over unequal widths stays a tuple
    assert dc.unet_from_diffusers({**SD15_UNET, "attention_head_dim": [8, 8, 8, 8]}).num_heads == (8, 8, 8, 8)
    # heads at levels without attention do not matter
    d = {**SD21_UNET, "attention_head_dim": [5, 10, 20, 20], "down_block_types": ["DownBlock2D"] + _DOWN[1:],
         "up_block_types": _UP[:3] + ["UpBlock2D"]}
    assert dc.unet_from_diffusers(d).head_channels == 64
    d["attention_head_dim"] = [7, 10, 20, 20]
    assert dc.unet_from_diffusers(d).head_channels == 64


def test_num_attention_heads_is_read_as_heads():
    d = {**SD15_UNET, "num_attention_heads": [5, 10, 20, 20], "attention_head_dim": 64}
    cfg = dc.unet_from_diffusers(d)
    assert cfg.head_channels == 64


def test_sd15_published_configs_map_to_the_preset():
    cfg = preset("sd15")
    assert dc.unet_from_diffusers(SD15_UNET) == cfg.unet
    assert dc.vae_from_diffusers(SD15_VAE) == cfg.vae
    # eos_token_id 2 is transformers' legacy marker for "pool at the largest id", i.e. EOS 49407
    assert dc.text_from_diffusers(SD15_TEXT) == cfg.text
    assert dc.schedule_from_diffusers(SD15_SCHEDULER) == cfg.schedule


def test_sd21_published_configs_map_to_the_preset():
    cfg = preset("sd21-768-v")
    assert dc.unet_from_diffusers(SD21_UNET) == cfg.unet
    assert dc.vae_from_diffusers(SD21_VAE) == cfg.vae
    # diffusers' SD 2.x text encoder: the 24-layer tower without its last layer and projection
    _, trimmed = trim_text_layers({"text_encoder": {}}, cfg)
    assert dc.text_from_diffusers(SD21_TEXT) == trimmed.text
    assert dc.schedule_from_diffusers(SD21_SCHEDULER) == cfg.schedule
    base = {**SD21_UNET, "sample_size": 64}
    assert dc.unet_from_diffusers(base) == preset("sd21-base").unet


def test_missing_keys_take_diffusers_defaults():
    unet = dc.unet_from_diffusers({"_class_name": "UNet2DConditionModel"})
    assert unet.context_dim == 1280 and unet.block_channels == (320, 640, 1280, 1280) and unet.num_heads == 8
    vae = dc.vae_from_diffusers({})
    assert vae.block_channels == (64,) and vae.layers_per_block == 1 and vae.sample_size == 32
    text = dc.text_from_diffusers({})
    assert (text.width, text.layers, text.heads, text.projection_dim) == (512, 12, 8, None)
    sched = dc.schedule_from_diffusers({"_class_name": "EulerDiscreteScheduler"})
    assert (sched.beta_start, sched.beta_schedule, sched.steps_offset, sched.timestep_spacing) == (
        0.0001, "linear", 0, None
    )
    assert dc.schedule_from_diffusers({"_class_name": "HeunDiscreteScheduler"}).beta_start == 0.00085


def test_ignored_keys():
    d = {**SD15_UNET, "_name_or_path": "x", "dropout": 0.1, "some_new_flag": None, "other_flag": False,
         "transformer_layers_per_block": [1, 1, 1, 1], "only_cross_attention": [False] * 4,
         "mid_block_only_cross_attention": False, "addition_embed_type_num_heads": 64}
    assert dc.unet_from_diffusers(d) == preset("sd15").unet
    # per-level depths only matter where there is attention (the mid block uses the last entry)
    d["transformer_layers_per_block"] = [2, 2, 2, 2]
    assert dc.unet_from_diffusers(d).transformer_layers == 2
    assert dc.vae_from_diffusers({**SD15_VAE, "force_upcast": False}) == preset("sd15").vae


# ---------------------------------------------------------------------------------------------------------
# Refusals name the option
# ---------------------------------------------------------------------------------------------------------

UNET_REFUSED = [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("addition_time_embed_dim", 256),
    ("projection_class_embeddings_input_dim", 2816),
    ("num_class_embeds", 1000),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 1024),
    ("encoder_hid_dim_type", "text_proj"),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("only_cross_attention", [True, False, False, False]),
    ("mid_block_only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("resnet_skip_time_act", True),
    ("resnet_out_scale_factor", 2.0),
    ("conv_in_kernel", 1),
    ("conv_out_kernel", 1),
    ("attention_type", "gated"),
    ("time_embedding_type", "fourier"),
    ("time_embedding_dim", 512),
    ("time_embedding_act_fn", "silu"),
    ("timestep_post_act", "silu"),
    ("class_embeddings_concat", True),
    ("cross_attention_norm", "group_norm"),
    ("center_input_sample", True),
    ("downsample_padding", 0),
    ("mid_block_scale_factor", 1.414),
    ("act_fn", "gelu"),
    ("cross_attention_dim", [768, 768, 768, 768]),
    ("reverse_transformer_layers_per_block", [[1, 1], [1, 1]]),
    ("transformer_layers_per_block", [1, 2, 10, 10]),
    ("transformer_layers_per_block", [[1, 1], [2, 2], [1, 1], [1, 1]]),
    ("mid_block_type", "UNetMidBlock2D"),
    ("mid_block_type", None),
    ("down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("down_block_types", _DOWN[:3]),
    ("up_block_types", ["CrossAttnUpBlock2D"] * 4),
    ("attention_head_dim", [8, 8]),
    ("layers_per_block", [2, 2, 3, 2]),
    ("use_flash_magic", True),
]


@pytest.mark.parametrize(("option", "value"), UNET_REFUSED, ids=[f"{o}={v}" for o, v in UNET_REFUSED])
def test_unsupported_unet_options_are_named(option, value):
    with pytest.raises(UnsupportedModelError, match=option):
        dc.unet_from_diffusers({**SD15_UNET, option: value})


VAE_REFUSED = [
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0] * 4),
    ("latents_std", [1.0] * 4),
    ("use_quant_conv", False),
    ("use_post_quant_conv", False),
    ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("some_new_flag", True),
]


@pytest.mark.parametrize(("option", "value"), VAE_REFUSED, ids=[f"{o}={v}" for o, v in VAE_REFUSED])
def test_unsupported_vae_options_are_named(option, value):
    with pytest.raises(UnsupportedModelError, match=option):
        dc.vae_from_diffusers({**SD15_VAE, option: value})


def test_vae_norm_eps_cannot_be_written():
    with pytest.raises(UnsupportedModelError, match="norm_eps"):
        dc.vae_to_diffusers(VAEConfig(norm_eps=1e-5))


@pytest.mark.parametrize(
    ("option", "value"),
    [("hidden_act", "gelu_new"), ("model_type", "clip"), ("architectures", ["CLIPModel"])],
)
def test_unsupported_text_options_are_named(option, value):
    with pytest.raises(UnsupportedModelError, match=option):
        dc.text_from_diffusers({**SD15_TEXT, option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("trained_betas", [0.1] * 1000),
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "karras"),
    ],
)
def test_unsupported_scheduler_options_are_named(option, value):
    with pytest.raises(UnsupportedModelError, match=option):
        dc.schedule_from_diffusers({**SD15_SCHEDULER, option: value})


# ---------------------------------------------------------------------------------------------------------
# diffusers / transformers build the networks our configs describe
# ---------------------------------------------------------------------------------------------------------


def _attn_heads(blocks) -> list[int | None]:
    return [b.attentions[0].transformer_blocks[0].attn1.heads if hasattr(b, "attentions") else None for b in blocks]


def _check_unet_model(model, cfg: UNetConfig) -> None:
    ours = {r.key: r.shape for r in unet_key_map(cfg)}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n = len(cfg.block_channels)
    want_down = [cfg.heads_at(i) if cfg.attention_levels[i] else None for i in range(n)]
    assert _attn_heads(model.down_blocks) == want_down
    assert _attn_heads(model.up_blocks) == list(reversed(want_down))
    mid = model.mid_block.attentions[0].transformer_blocks[0]
    assert mid.attn1.heads == mid.attn2.heads == cfg.heads_at(n - 1)
    assert model.config.upcast_attention == cfg.upcast_attention
    assert model.mid_block.resnets[0].norm1.eps == cfg.norm_eps
    assert model.time_proj.flip_sin_to_cos == cfg.flip_sin_to_cos
    assert model.time_proj.downscale_freq_shift == cfg.freq_shift


@pytest.mark.parametrize("name", list(TINY_UNETS))
def test_diffusers_builds_the_unet_we_describe(name):
    cfg = TINY_UNETS[name]
    model = diffusers.UNet2DConditionModel.from_config(dc.unet_to_diffusers(cfg))
    _check_unet_model(model, cfg)


@pytest.mark.parametrize("raw", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_published_unet_configs_build_what_we_read(raw):
    """Heads and shapes of diffusers' own model from the published config = what unet_from_diffusers says."""
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel.from_config(raw)
    _check_unet_model(model, dc.unet_from_diffusers(raw))


@pytest.mark.parametrize("name", list(TINY_VAES))
def test_diffusers_builds_the_vae_we_describe(name):
    cfg = TINY_VAES[name]
    model = diffusers.AutoencoderKL.from_config(dc.vae_to_diffusers(cfg))
    ours = {r.key: r.shape for r in vae_key_map(cfg)}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model.encoder.mid_block.resnets[0].norm1.eps == cfg.norm_eps
    assert model.encoder.conv_norm_out.num_groups == cfg.norm_groups
    assert model.config.scaling_factor == cfg.scaling_factor


def _text_model(cfg: TextConfig):
    tc = transformers.CLIPTextConfig(**dc.text_to_diffusers(cfg))
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim is not None else transformers.CLIPTextModel
    return cls(tc)


@pytest.mark.parametrize("name", list(TINY_TEXTS))
def test_transformers_builds_the_text_model_we_describe(name):
    cfg = TINY_TEXTS[name]
    model = _text_model(cfg)
    state = model.state_dict()
    # transformers >= 5.6 flattens CLIPTextModel (no "text_model." prefix); Estable keeps the prefix
    got = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): tuple(v.shape)
           for k, v in state.items()}
    assert got == {r.key: r.shape for r in text_key_map(cfg, "sd1")}
    core = model.text_model if hasattr(model, "text_model") else model
    layer = core.encoder.layers[0]
    assert layer.self_attn.num_heads == cfg.heads
    assert layer.layer_norm1.eps == cfg.layer_norm_eps
    assert model.config.hidden_act == cfg.activation
    assert model.config.eos_token_id == cfg.eos_token_id


@pytest.mark.parametrize("class_name", ["PNDMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("name", ["sd15", "sd21-768-v"])
def test_schedulers_accept_our_config(class_name, name):
    cfg = preset(name).schedule
    d = dc.schedule_to_diffusers(cfg, class_name)
    cls = getattr(diffusers, class_name)
    _, unused, _ = cls.extract_init_dict(d)
    assert {k: v for k, v in unused.items() if not k.startswith("_")} == {}  # every key is a real option
    s = cls.from_config(d)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset"):
        assert s.config[key] == getattr(cfg, key), key
    assert s.config.timestep_spacing == "leading"  # absent in our file: the class default, as SD's own files


def test_model_index_lists_the_pipeline_parts():
    idx = dc.model_index_for(preset("sd15"))
    assert idx["_class_name"] == "StableDiffusionPipeline"
    assert idx["safety_checker"] == [None, None] and idx["feature_extractor"] == [None, None]
    assert idx["requires_safety_checker"] is False
    assert idx["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert idx["scheduler"] == ["diffusers", "PNDMScheduler"]
    # the pipeline cross-attends to hidden states: CLIPTextModel even where the tower has a projection (issue 16)
    assert dc.model_index_for(preset("sd21-768-v"))["text_encoder"][1] == "CLIPTextModel"
    assert dc.text_to_diffusers(preset("sd21-768-v").text)["architectures"] == ["CLIPTextModel"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_stable_diffusion_pipeline_loads_our_folder_offline(tmp_path, monkeypatch):
    """A folder with our config files loads in diffusers with no warning about its configs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet_cfg, vae_cfg = TINY_UNETS["sd1_like"].replace(context_dim=32), TINY_VAES["two_levels"]
    text_cfg = TINY_TEXTS["plain"].replace(eos_token_id=99)
    model_cfg = preset("sd15").replace(unet=unet_cfg, vae=vae_cfg, text=text_cfg)

    def write(sub: str, name: str, data: dict) -> None:
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / name).write_text(json.dumps(data))

    diffusers.UNet2DConditionModel.from_config(dc.unet_to_diffusers(unet_cfg)).save_pretrained(tmp_path / "unet")
    write("unet", "config.json", dc.unet_to_diffusers(unet_cfg))
    diffusers.AutoencoderKL.from_config(dc.vae_to_diffusers(vae_cfg)).save_pretrained(tmp_path / "vae")
    write("vae", "config.json", dc.vae_to_diffusers(vae_cfg))
    _text_model(text_cfg).save_pretrained(tmp_path / "text_encoder")
    write("text_encoder", "config.json", dc.text_to_diffusers(text_cfg))
    write("scheduler", "scheduler_config.json", dc.schedule_to_diffusers(model_cfg.schedule))
    (tmp_path / "model_index.json").write_text(json.dumps(dc.model_index_for(model_cfg)))
    vocab = {"<|startoftext|>": 98, "<|endoftext|>": 99, **{c: i for i, c in enumerate("abcdefghij")}}
    write("tokenizer", "vocab.json", vocab)
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")

    collect = _Collect()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.WARNING)
    try:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(collect)
            lg.setLevel(level)
    environment = ("accelerate", "torchvision")  # about this machine's installed packages, not our files
    assert [m for m in collect.messages if not any(e in m for e in environment)] == []
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.unet.config.cross_attention_dim == 32
    assert pipe.text_encoder.config.num_hidden_layers == text_cfg.layers
