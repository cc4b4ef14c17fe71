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
