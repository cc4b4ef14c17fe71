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
