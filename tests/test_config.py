import pytest

from estable.config import PRESETS, ModelConfig, UNetConfig, preset


def test_presets_round_trip_through_json():
    for name, cfg in PRESETS.items():
        again = ModelConfig.from_dict(cfg.to_dict())
        assert again == cfg, name


def test_sd2_heads_from_channels_per_head():
    cfg = preset("sd21-base").unet
    assert [cfg.heads_at(i) for i in range(4)] == [5, 10, 20, 20]


def test_bad_config_messages_name_the_option():
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(True, False))
    with pytest.raises(ValueError, match="num_heads and head_channels"):
        UNetConfig(num_heads=None, head_channels=None)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("sdxl")
    with pytest.raises(ValueError, match="context_dim"):
        ModelConfig(unet=UNetConfig(context_dim=1024))
    with pytest.raises(ValueError, match="default_sampler: unknown sampler 'warp'"):
        ModelConfig(default_sampler="warp")


def test_default_sampler_is_stored_by_our_name_and_round_trips():
    cfg = ModelConfig(default_sampler="DPM++ 2M")  # A1111's label
    assert cfg.default_sampler == "dpmpp_2m"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig().default_sampler is None


def test_head_channels_must_divide_only_the_levels_with_attention():
    # levels without attention may have any width; an attention level that cannot be split is refused
    cfg = UNetConfig(block_channels=(48, 96, 192), attention_levels=(False, True, True), norm_groups=16,
                     num_heads=None, head_channels=32)
    assert [cfg.heads_at(i) for i in (1, 2)] == [3, 6]
    with pytest.raises(ValueError, match="do not split into heads of 64"):
        UNetConfig(block_channels=(32, 64), attention_levels=(True, False), num_heads=None, head_channels=64)
    with pytest.raises(ValueError, match="head_channels must be at least 1"):
        UNetConfig(num_heads=None, head_channels=0)
