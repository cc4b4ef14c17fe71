"""Parity of estable's AutoencoderKL with diffusers' AutoencoderKL on identical random weights (CPU, fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from estable.config import VAEConfig
from estable.models.vae import AutoencoderKL, DiagonalGaussian
from test_unet import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict[str, Any]:
    """The diffusers AutoencoderKL arguments that build the same network as ``cfg`` (its norm eps is fixed 1e-6)."""
    n = len(cfg.block_channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor,
        mid_block_add_attention=cfg.mid_attention,
    )


CONFIGS: dict[str, VAEConfig] = {
    "3lvl_1layer": VAEConfig(block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8),
    "4lvl_2layers": VAEConfig(block_channels=(16, 16, 32, 32), layers_per_block=2, norm_groups=8),
    "3lvl_2layers_32groups": VAEConfig(block_channels=(32, 64, 64), layers_per_block=2, norm_groups=32),
    "3lvl_no_mid_attention": VAEConfig(block_channels=(16, 32, 64), layers_per_block=1, norm_groups=16,
                                       mid_attention=False, scaling_factor=0.13025),
}


def build_pair(cfg: VAEConfig, seed: int = 0) -> tuple[torch.nn.Module, AutoencoderKL]:
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**diffusers_vae_kwargs(cfg)).eval()
    randomize_(ref, seed + 1)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def image(cfg: VAEConfig, seed: int = 2) -> torch.Tensor:
    f = cfg.downsample_factor
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, cfg.in_channels, 4 * f, 6 * f, generator=g) * 2 - 1  # non-square, in [-1, 1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_and_shapes_match_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**diffusers_vae_kwargs(cfg))
        ours = AutoencoderKL(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(theirs) - set(mine)) == []
    assert sorted(set(mine) - set(theirs)) == []
    assert {k: s for k, s in mine.items() if theirs[k] != s} == {}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_decode_match_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    ref, ours = build_pair(cfg)
    x = image(cfg)
    with torch.no_grad():
        theirs = ref.encode(x).latent_dist
        mine = ours.encode(x)
        assert mine.mean.shape == (2, cfg.latent_channels, 4, 6)
        for attr in ("mean", "logvar", "std"):
            assert getattr(theirs, attr).abs().max() > 1e-3
            assert rel_err(getattr(mine, attr), getattr(theirs, attr)) <= TOL, attr
        assert rel_err(mine.kl(), theirs.kl()) <= TOL
        assert torch.equal(mine.mode(), mine.mean)
        # Same generator state → same sample.
        z_mine = mine.sample(torch.Generator().manual_seed(7))
        z_theirs = theirs.sample(torch.Generator().manual_seed(7))
        assert rel_err(z_mine, z_theirs) <= TOL

        z = torch.randn(2, cfg.latent_channels, 5, 3, generator=torch.Generator().manual_seed(3))
        expected = ref.decode(z).sample
        got = ours.decode(z)
        assert got.shape == (2, cfg.out_channels, 5 * cfg.downsample_factor, 3 * cfg.downsample_factor)
        assert expected.abs().max() > 1e-3
        assert rel_err(got, expected) <= TOL


def test_scaled_latent_helpers() -> None:
    cfg = CONFIGS["3lvl_no_mid_attention"]
    _, ours = build_pair(cfg)
    x = image(cfg)
    with torch.no_grad():
        post = ours.encode(x)
        assert torch.equal(ours.encode_latents(x, sample=False), post.mean * cfg.scaling_factor)
        sampled = ours.encode_latents(x, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(sampled, post.sample(torch.Generator().manual_seed(1)) * cfg.scaling_factor)
        assert not torch.allclose(sampled, post.mean * cfg.scaling_factor)
        z = post.mean
        # z·s/s differs from z by rounding only.
        assert rel_err(ours.decode_latents(z * cfg.scaling_factor), ours.decode(z)) <= TOL


def test_logvar_is_clamped_like_ldm() -> None:
    mean = torch.zeros(1, 4, 2, 2)
    logvar = torch.tensor([-100.0, -5.0, 3.0, 100.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert post.logvar[0, :, 0, 0].tolist() == [-30.0, -5.0, 3.0, 20.0]
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar))
    # KL(N(0, σ²) ‖ N(0, 1)) per element = ½(σ² − 1 − log σ²).
    expected = 0.5 * (post.var - 1 - post.logvar).sum()
    assert torch.allclose(post.kl(), expected.view(1))


def test_meta_construction_then_assign_load() -> None:
    cfg = CONFIGS["3lvl_1layer"]
    ref, ours = build_pair(cfg)
    with torch.device("meta"):
        lazy = AutoencoderKL(cfg)
    lazy.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True, strict=True)
    lazy.eval()
    assert all(not t.is_meta for t in lazy.state_dict().values())
    z = torch.randn(1, 4, 3, 4)
    with torch.no_grad():
        assert torch.equal(lazy.decode(z), ours.decode(z))


def test_bad_inputs_raise_value_errors() -> None:
    cfg = CONFIGS["3lvl_1layer"]
    model = AutoencoderKL(cfg)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode(torch.zeros(1, 3, 10, 12))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 3, 4, 4))


def test_centred_downsampling_is_mirror_equivariant_and_the_ldm_one_is_not() -> None:
    """A 3×3 stride-2 convolution samples half a pixel off centre whichever side it pads; a 4×4 one padded all round
    samples centred windows: with a mirror-symmetric kernel, mirroring the input mirrors the output."""
    from estable.nn.resnet import Downsample

    x = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    for kwargs, equivariant in (({"padding": 0}, False), ({"padding": 1}, False), ({"padding": 1, "kernel": 4}, True)):
        down = Downsample(2, **kwargs)
        with torch.no_grad():
            down.conv.weight.copy_((down.conv.weight + down.conv.weight.flip(-1)) / 2)
            out, mirrored = down(x), down(x.flip(-1)).flip(-1)
        assert out.shape == (1, 2, 4, 8)
        assert torch.allclose(out, mirrored, atol=1e-6) == equivariant, kwargs
    with pytest.raises(ValueError, match="4×4 one padded all round"):
        Downsample(2, padding=0, kernel=4)


def test_a_vae_with_centred_downsampling_round_trips_in_estables_format_only(tmp_path) -> None:
    from estable.checkpoints.diffusers_config import vae_to_diffusers
    from estable.errors import UnsupportedModelError

    cfg = VAEConfig(block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8, downsample_kernel=4)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    assert vae.encoder.down_blocks[0].downsamplers[0].conv.weight.shape[-2:] == (4, 4)
    x = image(cfg)
    with torch.no_grad():
        z = vae.encode(x).mean
        assert z.shape[-2:] == (4, 6) and vae.decode(z).shape == x.shape
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UnsupportedModelError, match="keep the model in Estable's format"):
        vae_to_diffusers(cfg)
    with pytest.raises(ValueError, match="downsample_kernel must be 3"):
        VAEConfig(downsample_kernel=5)


def test_a_model_with_centred_downsampling_saves_as_estable_and_refuses_the_sd_layouts(tmp_path) -> None:
    import dataclasses

    from estable.checkpoints.store import load_model, save_model
    from estable.errors import UnsupportedModelError
    from tiny_model import tiny_model_file

    base = load_model(tiny_model_file(tmp_path), dtype="fp32")
    cfg = base.config.vae.replace(downsample_kernel=4)
    torch.manual_seed(1)
    model = dataclasses.replace(base, config=base.config.replace(vae=cfg), vae=AutoencoderKL(cfg).eval())
    path = save_model(model, tmp_path / "centred.safetensors", to="estable", dtype="fp32")
    back = load_model(path, dtype="fp32")
    assert back.config.vae.downsample_kernel == 4
    x = image(cfg)
    with torch.no_grad():
        assert torch.equal(back.vae.encode(x).mean, model.vae.encode(x).mean)
    for to, dst in (("ldm", tmp_path / "sd.safetensors"), ("diffusers", tmp_path / "folder")):
        with pytest.raises(UnsupportedModelError, match="keep the model in Estable's format"):
            save_model(model, dst, to=to)
        assert not dst.exists()
