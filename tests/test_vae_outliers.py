"""Whole-VAE fine-tuning against latent spikes (issue 11): the latent-outlier penalty, the anchor to the starting
encoder's latents, their config checks and a tiny ``estable train vae`` run with both on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from estable.cli import main
from estable.errors import EstableError
from estable.models.vae import AutoencoderKL
from estable.training.builders import load_network
from estable.training.config import load_config
from estable.training.objectives import VAEObjective, droplet_terms, latent_norm_ratios, outlier_penalty, worst_pixels
from estable.training.vae_trainer import VAETrainer
from test_train_lora import make_base

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "tensorboard=false"]
ENCODER = ("encoder.", "quant_conv.")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "base.safetensors")


def smooth_latents() -> torch.Tensor:
    """(2, 4, 8, 8) latents whose norms are all within 1.5 × their image's median."""
    return 1 + 0.1 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_outlier_penalty_is_zero_without_spikes_and_pushes_a_spike_down():
    z = smooth_latents()
    assert outlier_penalty(z, 3.0).item() == 0
    z[0, :, 3, 5] = 10.0  # norm 20 against a median of about 2
    z.requires_grad_(True)
    penalty = outlier_penalty(z, 3.0)
    assert penalty.item() > 0
    assert outlier_penalty(z.detach(), 15.0).item() == 0  # below the higher ratio
    ratios = latent_norm_ratios(z.detach())
    assert ratios.shape == (2, 64) and ratios[0].argmax().item() == 3 * 8 + 5 and ratios[0].max() > 9
    penalty.backward()
    grad = z.grad
    others = torch.ones(2, 8, 8, dtype=torch.bool)
    others[0, 3, 5] = False
    assert grad.norm(dim=1)[others].max().item() == 0  # the median is a fixed reference: only the spike is pushed
    stepped = z.detach() - 0.01 * grad
    assert stepped[0, :, 3, 5].norm() < z.detach()[0, :, 3, 5].norm()  # a descent step shrinks the spike


class FixedMoments(nn.Module):
    """Stands in for the frozen starting encoder: always returns the given moments [μ, log σ²]."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.moments = torch.cat([mean, torch.zeros_like(mean)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moments


def test_the_anchor_skips_the_starting_encoders_outliers():
    obj = VAEObjective(AutoencoderKL(load_config("vae", "tiny-vae", []).model), anchor_weight=1.0)
    start = smooth_latents()
    start[0, :, 3, 5] = 10.0  # an outlier of the starting encoder
    obj.anchor = FixedMoments(start)
    x = torch.zeros(2, 3, 64, 64)
    moved_spike = start.clone()
    moved_spike[0, :, 3, 5] = 1.0  # the spike flattened: no anchor cost
    assert obj.latent_terms(x, moved_spike)["anchor"].item() == 0
    moved_other = start.clone()
    moved_other[1, :, 2, 2] += 1.0  # an ordinary latent moved: the anchor pulls it back
    assert obj.latent_terms(x, moved_other)["anchor"].item() == pytest.approx(4 / (4 * 128 - 4))


def test_anchor_is_zero_at_the_start_and_grows_as_the_encoder_moves(base, tmp_path):
    cfg = load_config("vae", "tiny-vae", [*QUIET, f"init_from={base}", "outlier_weight=0.5", "outlier_ratio=1",
                                          "anchor_weight=2", "save_every=0"])
    tr = VAETrainer(cfg, tmp_path / "vae", progress=False)
    obj = tr.objective
    assert obj.anchor is not None and not any(p.requires_grad for p in obj.anchor.parameters())
    assert {id(p) for g in tr.param_groups() for p in g["params"]}.isdisjoint(id(p) for p in obj.anchor.parameters())
    batch = tr.prepare({"pixel_values": torch.stack([it["pixel_values"] for it in tr.val_items])})
    draws = obj.draw(len(tr.val_items), torch.Generator().manual_seed(0), 32)
    loss, metrics = obj(batch, draws)
    assert {"l1", "kl", "ssim", "outlier", "anchor", "peak_ratio"} == set(metrics)
    assert metrics["anchor"].item() < 1e-10  # the same weights
    assert metrics["outlier"].item() > 0  # ratio 1: about half of the latent pixels count as outliers
    plain = VAEObjective(obj.vae)  # no outlier or anchor term: the loss differs by exactly the weighted terms
    base_loss, base_metrics = plain(batch, draws)
    assert set(base_metrics) == {"l1", "kl", "ssim"}
    expected = base_loss + 0.5 * metrics["outlier"] + 2 * metrics["anchor"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for n, p in obj.vae.named_parameters() if n.startswith(ENCODER))
    with torch.no_grad():
        obj.vae.quant_conv.bias[:4] += 0.3  # the encoder moves; its frozen copy does not
    loss, metrics = obj(batch, draws)
    assert metrics["anchor"].item() == pytest.approx(0.09, rel=1e-3)
    torch.testing.assert_close(loss, plain(batch, draws)[0] + 0.5 * metrics["outlier"] + 2 * metrics["anchor"])
    obj.train()
    assert not obj.anchor.training


@pytest.mark.parametrize(("overrides", "words"), [
    (["anchor_weight=1"], "needs init_from"),
    (["outlier_weight=-1"], "outlier_weight must be"),
    (["anchor_weight=-0.5"], "anchor_weight must be"),
    (["outlier_ratio=0"], "outlier_ratio must be"),
    (["droplet_weight=-1"], "droplet_weight must be"),
    (["droplet_ratio=0"], "droplet_ratio must be"),
    (["worst_weight=-1"], "worst_weight must be"),
    (["worst_fraction=0"], "worst_fraction is a share"),
    (["worst_fraction=1.5"], "worst_fraction is a share"),
    (["init_from=x.safetensors", "train_encoder=false", "outlier_weight=1"], "need train_encoder=true"),
    (["init_from=x.safetensors", "train_encoder=false", "anchor_weight=1"], "need train_encoder=true"),
])
def test_config_errors(overrides, words):
    with pytest.raises(EstableError, match=words):
        load_config("vae", "tiny-vae", overrides)


def test_defaults_leave_the_objective_unchanged():
    cfg = load_config("vae", "tiny-vae", [])
    assert (cfg.outlier_weight, cfg.outlier_ratio, cfg.anchor_weight, cfg.droplet_weight) == (0.0, 3.0, 0.0, 0.0)


def test_train_vae_with_outlier_and_anchor_terms(base, tmp_path):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--config", "tiny-vae", "--run-dir", str(run), "--no-progress", *QUIET,
                 f"init_from={base}", "outlier_weight=1", "outlier_ratio=2", "anchor_weight=1", "max_steps=3",
                 "save_every=3", "optim.lr=1e-2", "optim.warmup_steps=0"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)
    assert all({"outlier", "anchor", "peak_ratio"} <= set(r) for r in train)
    assert train[0]["anchor"] < 1e-10 < train[-1]["anchor"]  # the encoder moved away from its start
    _, before = load_network("vae", base)
    _, after = load_network("vae", run)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(ENCODER))


def test_droplet_penalty_is_zero_without_a_peak_and_pushes_only_the_peak():
    a = smooth_latents().repeat(1, 8, 1, 1)  # (2, 32, 8, 8) feature maps, norms within 1.5 × the median
    assert droplet_terms([a, a[:, :16]], 16.0)[0].item() == 0
    a[1, :, 6, 2] = 40.0  # one position's norm ≈ 226 against a median of about 5.7: a droplet
    a.requires_grad_(True)
    penalty, peak = droplet_terms([a], 16.0)
    assert penalty.item() > 0 and droplet_terms([a.detach()], 100.0)[0].item() == 0
    assert 15 < peak.item() < 25 and not peak.requires_grad  # the mean over the two images of about 39 and 1.3
    penalty.backward()
    moved = a.grad.norm(dim=1) > 0
    assert moved.sum().item() == 1 and moved[1, 6, 2]  # the median is a fixed reference: only the peak is pushed
    assert (a.detach() - 0.01 * a.grad)[1, :, 6, 2].norm() < a.detach()[1, :, 6, 2].norm()


def test_the_droplet_term_sees_every_decoder_groupnorm_once_per_forward(base, tmp_path):
    cfg = load_config("vae", "tiny-vae", [*QUIET, f"init_from={base}", "train_encoder=false", "kl_weight=0",
                                          "droplet_weight=3", "droplet_ratio=1.5", "save_every=0"])
    tr = VAETrainer(cfg, tmp_path / "vae", progress=False)
    obj = tr.objective
    norms = [m for m in obj.vae.decoder.modules() if isinstance(m, nn.GroupNorm)]
    seen = []
    for m in norms:
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    batch = tr.prepare({"pixel_values": torch.stack([it["pixel_values"] for it in tr.val_items])})
    draws = obj.draw(len(tr.val_items), torch.Generator().manual_seed(0), 32)
    loss, metrics = obj(batch, draws)
    assert {"l1", "kl", "ssim", "droplet", "decoder_peak"} == set(metrics)
    assert len(seen) == len(norms) > 0  # the decoder's norms only, each once (the encoder's are not taken)
    torch.testing.assert_close(metrics["droplet"], droplet_terms(seen, 1.5)[0])
    assert metrics["droplet"].item() > 0  # ratio 1.5: many positions stand out
    plain = VAEObjective(obj.vae, kl_weight=0, train_encoder=False)  # its hooks are the first objective's
    torch.testing.assert_close(loss, plain(batch, draws)[0] + 3 * metrics["droplet"])
    seen.clear()
    with torch.no_grad():
        obj.vae.decode(obj.vae.encode(batch["pixel_values"]).mean)  # outside forward nothing is kept
    assert obj._norm_inputs is None and len(seen) == len(norms)
    loss.backward()
    assert all(p.grad is None for n, p in obj.vae.named_parameters() if n.startswith(ENCODER))


def test_train_vae_decoder_with_the_droplet_term(base, tmp_path):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--config", "tiny-vae", "--run-dir", str(run), "--no-progress", *QUIET,
                 f"init_from={base}", "train_encoder=false", "kl_weight=0", "droplet_weight=1", "droplet_ratio=1.5",
                 "max_steps=2", "save_every=2"]) == 0
    train = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in train if r["type"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["droplet"]) and r["decoder_peak"] > 1 for r in train)


def test_worst_pixels_weighs_a_small_spot_as_the_image_does_not():
    x = torch.zeros(2, 3, 32, 32)
    x_hat = x + 0.01  # a small error everywhere
    x_hat[1, :, 4:6, 7:9] = 1.0  # and one 2 × 2 spot of large error in the second image
    assert worst_pixels(x, x, 0.01).item() == 0
    spot = worst_pixels(x, x_hat, 4 / 1024)  # each image's 4 worst pixels: the spot, and 0.01 in the first
    assert spot.item() == pytest.approx((0.01 + 1.0) / 2)
    assert (x_hat - x).abs().mean().item() < 0.02  # where the mean L1 hardly sees it
    assert worst_pixels(x, x_hat, 1.0).item() == pytest.approx((x_hat - x).abs().mean().item())


def test_train_vae_decoder_with_the_worst_pixel_term(base, tmp_path):
    cfg = load_config("vae", "tiny-vae", [*QUIET, f"init_from={base}", "train_encoder=false", "kl_weight=0",
                                          "worst_weight=2", "worst_fraction=0.05", "save_every=0"])
    tr = VAETrainer(cfg, tmp_path / "vae", progress=False)
    batch = tr.prepare({"pixel_values": torch.stack([it["pixel_values"] for it in tr.val_items])})
    draws = tr.objective.draw(len(tr.val_items), torch.Generator().manual_seed(0), 32)
    loss, metrics = tr.objective(batch, draws)
    plain = VAEObjective(tr.objective.vae, kl_weight=0, train_encoder=False)
    torch.testing.assert_close(loss, plain(batch, draws)[0] + 2 * metrics["worst"])
    assert metrics["worst"].item() > metrics["l1"].item() > 0
    run = tmp_path / "run"
    assert main(["train", "vae", "--config", "tiny-vae", "--run-dir", str(run), "--no-progress", *QUIET,
                 f"init_from={base}", "train_encoder=false", "kl_weight=0", "worst_weight=1", "max_steps=2",
                 "save_every=2"]) == 0
    train = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [math.isfinite(r["worst"]) for r in train if r["type"] == "train"] == [True, True]
