"""Full-size networks: the presets' U-Net and VAE against diffusers, the SD 1.5 text encoder against transformers.

The key/shape checks build both models on the meta device (no memory, seconds). The heavy test builds the SD 1.5
U-Net and VAE with random weights and compares one forward pass with diffusers; to keep peak memory near one
copy of the weights (3.4 GB for the U-Net in fp32), our model is built on the meta device and takes over the
reference model's tensors with ``assign=True``.
"""

from __future__ import annotations

import gc

import pytest
import torch

from estable.config import PRESETS, preset
from estable.models.unet import UNet
from estable.models.vae import AutoencoderKL
from test_text import build_pair, make_ids, reference_text_model
from test_unet import diffusers_unet_kwargs, randomize_, rel_err
from test_vae import diffusers_vae_kwargs

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_state_dicts_match_diffusers(name: str) -> None:
    cfg = preset(name)
    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(cfg.unet))
        ref_vae = diffusers.AutoencoderKL(**diffusers_vae_kwargs(cfg.vae))
        unet = UNet(cfg.unet)
        vae = AutoencoderKL(cfg.vae)
    assert shapes(unet) == shapes(ref_unet)
    assert shapes(vae) == shapes(ref_vae)
    # Published sizes: SD 1.5 U-Net 859.5 M, SD 2.x U-Net 865.9 M, KL-f8 VAE 83.7 M (± 0.1 M).
    expected_unet = 859.5e6 if cfg.family == "sd1" else 865.9e6
    assert abs(n_params(unet) - expected_unet) <= 0.1e6
    assert abs(n_params(vae) - 83.7e6) <= 0.1e6


@pytest.mark.heavy
def test_sd15_unet_forward_matches_diffusers() -> None:
    cfg = preset("sd15").unet
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(cfg)).eval()
    randomize_(ref, 1)
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(1, 4, 32, 32, generator=g)
    context = torch.randn(1, 77, cfg.context_dim, generator=g)
    t = torch.tensor([421])
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context).sample
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # shares the reference's tensors
    del ref
    gc.collect()
    ours.eval()
    assert abs(n_params(ours) - 859.5e6) <= 0.1e6
    with torch.no_grad():
        got = ours(sample, t, context)
    assert expected.abs().max() > 1e-3
    assert rel_err(got, expected) <= TOL
    del ours
    gc.collect()


@pytest.mark.heavy
def test_sd15_vae_matches_diffusers() -> None:
    cfg = preset("sd15").vae
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**diffusers_vae_kwargs(cfg)).eval()
    randomize_(ref, 1)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        mean_ref, logvar_ref = post_ref.mean, post_ref.logvar
        dec_ref = ref.decode(z).sample
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    del ref
    gc.collect()
    ours.eval()
    assert abs(n_params(ours) - 83.7e6) <= 0.1e6
    with torch.no_grad():
        post = ours.encode(x)
        dec = ours.decode(z)
    assert rel_err(post.mean, mean_ref) <= TOL
    assert rel_err(post.logvar, logvar_ref) <= TOL
    assert dec.shape == (1, 3, 128, 128)
    assert rel_err(dec, dec_ref) <= TOL


@pytest.mark.heavy
def test_sd15_text_encoder_matches_transformers() -> None:
    cfg = preset("sd15").text
    ours, ref = build_pair(cfg, seed=3)
    assert n_params(ours) == n_params(ref) == 123_060_480
    ids = make_ids(cfg, (5, 60), cfg.max_positions, pad=cfg.eos_token_id)  # SD 1.x pads with EOS
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        penultimate = reference_text_model(ref).final_layer_norm(r.hidden_states[-2])
        o1, o2 = ours(ids, clip_skip=1), ours(ids, clip_skip=2)
    assert rel_err(o1.context, r.last_hidden_state) <= TOL
    assert rel_err(o2.context, penultimate) <= TOL
    assert rel_err(o1.pooled, r.pooler_output) <= TOL
    del ours, ref
    gc.collect()
