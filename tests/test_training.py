"""Trainers on tiny CPU configs: configs and overrides, objectives against hand formulas, SSIM against a direct
numpy implementation, EMA math, data order, and short U-Net / VAE runs that write a complete run folder."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from estable.cli_train import add_train_commands
from estable.errors import EstableError
from estable.models.vae import AutoencoderKL
from estable.sampling.schedules import alphas_cumprod
from estable.training.builders import collate, load_network, shapes_tokenizer
from estable.training.config import UNetTrainConfig, apply_overrides, load_config
from estable.training.ema import EMA
from estable.training.loop import ResumableBatchSampler, lr_factor
from estable.training.objectives import min_snr_weights, noisy_latents_and_target, ssim
from estable.training.runs import load_checkpoint
from estable.training.shapes import ShapesWorld, caption_for
from estable.training.unet_trainer import UNetTrainer
from estable.training.vae_trainer import VAETrainer

pytestmark = pytest.mark.usefixtures("one_thread")


QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false"]


def tiny_unet(tmp_path, *over: str, name: str = "run") -> UNetTrainer:
    cfg = load_config("unet", "tiny-unet", [*QUIET, *over])
    return UNetTrainer(cfg, tmp_path / name, progress=False)


# ------------------------------------------------------------------------------------------------ configs


def test_overrides_parse_nested_and_lists():
    cfg = load_config("unet", "tiny-unet", ["optim.lr=3e-4", "model.block_channels=[32, 64]",
                                            "model.attention_levels=[false,true]", "min_snr_gamma=5",
                                            "sample.prompts=[\"a red star\"]", "data.source=/some/folder",
                                            "optim.max_grad_norm=null"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.block_channels == (32, 64) and cfg.model.attention_levels == (False, True)
    assert cfg.min_snr_gamma == 5 and cfg.sample.prompts == ("a red star",)
    assert cfg.data.source == "/some/folder" and cfg.optim.max_grad_norm is None
    # objective decides the prediction type; the resolved config round-trips through JSON
    v = load_config("unet", "tiny-unet", ["objective=v"])
    assert v.schedule.prediction_type == "v_prediction"
    assert UNetTrainConfig.from_dict(json.loads(v.to_json())) == v


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "valid keys under 'optim'", "lr"]),
    ("nope=1", ["'nope'", "valid keys", "batch_size"]),
    ("optim.lr.x=1", ["optim.lr", "not a section"]),
    ("optim.lr", ["key=value"]),
    ("batch_size=0", ["batch_size", "positive integer"]),
    ("precision=fp8", ["precision", "fp32"]),
    ("model=[1]", ["config model", "expected an object, got list"]),
    ("optim=3", ["config optim", "expected an object, got int"]),
])
def test_bad_overrides_are_clear_errors(override, words):
    with pytest.raises(EstableError) as err:
        load_config("unet", "tiny-unet", [override])
    for w in words:
        assert w in str(err.value)


def test_config_file_partial_and_presets(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"optim": {"lr": 0.01}, "model": {"block_channels": [16, 32], "norm_groups": 8}}))
    cfg = load_config("vae", str(f), ["kl_weight=1e-5"])
    assert cfg.optim.lr == 0.01 and cfg.optim.betas == (0.9, 0.999)  # the rest keeps its defaults
    assert cfg.model.block_channels == (16, 32) and cfg.kl_weight == 1e-5
    (tmp_path / "bad.json").write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(EstableError, match="optim.learning_rate"):
        load_config("vae", str(tmp_path / "bad.json"))
    with pytest.raises(EstableError, match="for the unet trainer"):
        load_config("vae", "tiny-unet")
    with pytest.raises(EstableError, match="neither a file nor a preset"):
        load_config("vae", "tiny-vea")
    assert apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


# ------------------------------------------------------------------------------------------------ objectives


def test_eps_and_v_targets_match_hand_formula():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    table = alphas_cumprod(UNetTrainConfig().schedule)
    t = torch.tensor([0, 10, 500, 998, 999])
    ab = table[t].numpy()
    for objective in ("eps", "v"):
        z_t, target = noisy_latents_and_target(z0, eps, table[t], objective)
        a, s = np.sqrt(ab)[:, None, None, None], np.sqrt(1 - ab)[:, None, None, None]
        z64, e64 = z0.double().numpy(), eps.double().numpy()
        np.testing.assert_allclose(z_t.numpy(), a * z64 + s * e64, rtol=0, atol=1e-6)
        want = e64 if objective == "eps" else a * e64 - s * z64
        np.testing.assert_allclose(target.numpy(), want, rtol=0, atol=1e-6)
    # v relates back to ε and x0 as Salimans & Ho state: x0 = sqrt(ᾱ) z_t − sqrt(1 − ᾱ) v
    z_t, v = noisy_latents_and_target(z0, eps, table[t], "v")
    a, s = table[t].sqrt().float().view(-1, 1, 1, 1), (1 - table[t]).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a * z_t - s * v, z0, rtol=0, atol=1e-5)


def test_min_snr_weights_formula():
    ab = alphas_cumprod(UNetTrainConfig().schedule)[torch.tensor([0, 100, 400, 700, 999])]
    snr = (ab / (1 - ab)).numpy()
    gamma = 5.0
    np.testing.assert_allclose(min_snr_weights(ab, gamma, "eps").numpy(), np.minimum(snr, gamma) / snr, rtol=1e-6)
    np.testing.assert_allclose(min_snr_weights(ab, gamma, "v").numpy(), np.minimum(snr, gamma) / (snr + 1),
                               rtol=1e-6)
    assert torch.equal(min_snr_weights(ab, None, "eps"), torch.ones(5))
    w = min_snr_weights(ab, gamma, "eps")
    assert w[0] < 1e-2 and w[-1] == 1.0  # clean steps (huge SNR) down-weighted, noisy ones untouched


def test_offset_noise_shifts_channel_means(tmp_path):
    tr = tiny_unet(tmp_path, "offset_noise=0.5")
    d = tr.objective.draw(4000, torch.Generator().manual_seed(1))
    eps = tr.objective.noise(d)
    torch.testing.assert_close(eps - d["noise"], 0.5 * d["offset"].expand_as(eps), rtol=0, atol=1e-6)
    h, w = eps.shape[-2:]
    means = eps.mean(dim=(2, 3))  # (n, C): per-sample, per-channel means
    plain = d["noise"].mean(dim=(2, 3))
    # Var of a channel mean: 1/(h·w) without offset; 0.25 + 1/(h·w) with it.
    assert abs(plain.var().item() - 1 / (h * w)) < 0.01
    assert abs(means.var().item() - (0.25 + 1 / (h * w))) < 0.03


def test_timestep_bias_draws_late_steps_more_often(tmp_path):
    uniform = tiny_unet(tmp_path / "u").objective
    t_plain = uniform.draw(20000, torch.Generator().manual_seed(4))["t"]
    # Unbiased draws are the plain uniform draws, bit for bit (earlier runs resume with the same numbers).
    assert torch.equal(t_plain, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(4)))
    biased = tiny_unet(tmp_path / "b", "timestep_bias.portion=0.2", "timestep_bias.multiplier=4").objective
    t = biased.draw(20000, torch.Generator().manual_seed(4))["t"]
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    late = (t >= 800).float().mean().item()
    want = 0.2 * 4 / (0.2 * 4 + 0.8)  # 0.5: the last fifth drawn four times as often
    assert abs(late - want) < 4 * math.sqrt(want * (1 - want) / 20000)
    assert abs(t[t < 800].float().mean().item() - 399.5) < 8  # uniform within each part
    assert abs(t[t >= 800].float().mean().item() - 899.5) < 3
    with pytest.raises(EstableError, match="timestep_bias.portion"):
        tiny_unet(tmp_path / "x", "timestep_bias.portion=1")


def test_caption_dropout_rate(tmp_path):
    tr = tiny_unet(tmp_path, "caption_dropout=0.1")
    obj = tr.objective
    n = 3000
    ids = tr.tokenizer(["a red circle"]).expand(n, -1)
    d = obj.draw(n, torch.Generator().manual_seed(2))
    ctx = obj.context(ids, d["drop"])
    empty = obj.context(obj.empty_ids, None)
    dropped = (ctx - empty).abs().amax(dim=(1, 2)) == 0
    assert torch.equal(dropped, d["drop"] < 0.1)  # exactly the drawn rows get the empty prompt's context
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 3 * math.sqrt(0.1 * 0.9 / n)  # within 3 standard errors
    assert torch.equal(obj.empty_ids, tr.tokenizer([""]))


def test_role_contrast_term_against_hand_formula(tmp_path):
    """Pair rows with t ≥ min_t get relu(margin − (mse_swapped − mse)/mse), the swapped caption being the same
    words with the objects exchanged; other rows (a single object, t below min_t) add nothing."""
    texts = ["a red circle above a blue square", "a green star", "a red circle to the left of a blue square"]
    tr = tiny_unet(tmp_path, "role_contrast.weight=0.5", "role_contrast.margin=0.3", "role_contrast.min_t=500",
                   "caption_dropout=0")
    items = [{**item, "text": text} for item, text in zip(tr.val_items[:3], texts)]
    obj = tr.objective
    batch = tr.prepare(collate(items))
    assert batch["swapped"].tolist() == [True, False, True]
    assert torch.equal(batch["swapped_ids"][0], tr.tokenizer(["a blue square above a red circle"])[0])
    assert torch.equal(batch["swapped_ids"][1], batch["input_ids"][1])
    draws = obj.draw(3, torch.Generator().manual_seed(5))
    draws["t"] = torch.tensor([900, 900, 100])  # the third pair row is below min_t
    loss, metrics = obj(batch, draws)

    with torch.no_grad():
        z0 = obj.clean_latents(batch, draws["posterior"])
        z_t, target = noisy_latents_and_target(z0, draws["noise"], obj.alphas_cumprod[draws["t"]], "eps")
        mse = (obj.unet(z_t, draws["t"], obj.context(batch["input_ids"], None)) - target).pow(2).mean(dim=(1, 2, 3))
        swapped = obj.unet(z_t[:1], draws["t"][:1], obj.context(batch["swapped_ids"][:1], None))
        mse_s = (swapped - target[:1]).pow(2).mean(dim=(1, 2, 3))
    term = torch.relu(0.3 - (mse_s - mse[:1]) / mse[:1]).mean()
    torch.testing.assert_close(metrics["role_contrast"], term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), mse.mean() + 0.5 * term, rtol=1e-5, atol=1e-6)
    loss.backward()  # the term reaches the U-Net's weights
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in obj.unet.parameters() if p.requires_grad)

    draws["t"] = torch.tensor([100, 900, 100])  # no pair row at or above min_t: no extra pass, no term
    loss, metrics = obj(batch, draws)
    assert metrics["role_contrast"] == 0 and loss.item() == metrics["mse"].item()
    plain = tiny_unet(tmp_path / "off", "caption_dropout=0")
    assert "swapped_ids" not in plain.prepare(collate(items))  # off by default: batches as before


def test_shape_contrast_captions_and_batches(tmp_path):
    """role_contrast.kind=shapes: each caption of the grammar against itself with one object as a look-alike shape
    (the words otherwise kept, the same contrast every time); the trainer's batches carry those captions."""
    from dataclasses import replace

    from estable.training.shapes.captions import LOOKALIKES, parse_caption, swap_shape

    world, missing = ShapesWorld("train", 3), 0
    for i in range(2000):
        text = caption_for(world.scene(i))
        other = swap_shape(text)
        if other is None:
            missing += 1
            continue
        spec, new = parse_caption(text), parse_caption(other)
        changed = [k for k, (a, b) in enumerate(zip(spec.objects, new.objects)) if a != b]
        assert len(changed) == 1 and new.objects[changed[0]].shape in LOOKALIKES[spec.objects[changed[0]].shape]
        k = changed[0]
        assert replace(new, objects=spec.objects) == spec  # kind, count, relation and background kept
        assert new.objects[k] == replace(spec.objects[k], shape=new.objects[k].shape)
        assert len(other.split()) == len(text.split()) and swap_shape(text) == other
    assert missing < 0.1 * 2000  # a colour-binding pair whose other object has the look-alike's shape
    assert swap_shape("three green circles") == "three green hexagons" and swap_shape("a dog") is None

    texts = ["a red circle above a blue square", "a green star", "a dog"]
    tr = tiny_unet(tmp_path, "role_contrast.weight=1", "role_contrast.kind=shapes", "caption_dropout=0")
    batch = tr.prepare(collate([{**item, "text": t} for item, t in zip(tr.val_items[:3], texts)]))
    assert batch["swapped"].tolist() == [True, True, False]
    for row, text in enumerate(texts[:2]):
        assert torch.equal(batch["swapped_ids"][row], tr.tokenizer([swap_shape(text)])[0])
    with pytest.raises(EstableError, match="role_contrast.kind"):
        tiny_unet(tmp_path / "bad", "role_contrast.kind=colours")


def test_unet_overfits_a_fixed_batch(tmp_path):
    """A single fixed batch with fixed draws: the loss must fall below half its start in 30 AdamW steps."""
    tr = tiny_unet(tmp_path)
    obj = tr.objective
    batch = tr.prepare(collate(tr.val_items[:4]))
    draws = obj.draw(4, torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(obj.unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _ = obj(batch, draws)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------------------------------ SSIM


def _ssim_numpy(x: np.ndarray, y: np.ndarray, L: float = 2.0) -> float:
    """Direct SSIM of one channel: every valid 11×11 window, Gaussian weights σ = 1.5 (Wang et al. 2004)."""
    k = np.arange(11) - 5.0
    g = np.exp(-(k**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * a).sum(), (w * b).sum()
            vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
            cxy = (w * (a - mx) * (b - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_identity_and_numpy_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 14, 13, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    got = ssim(x, y)
    for b in range(2):
        want = np.mean([_ssim_numpy(x[b, c].numpy(), y[b, c].numpy()) for c in range(3)])
        assert abs(got[b].item() - want) < 1e-10, (got[b].item(), want)
    assert got.max() < 0.9  # noisy copies are clearly less similar
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_ssim_is_float32_under_bf16_autocast():
    """Flat images with small differences (a shapes-world background): in bf16 the variances cancel to garbage."""
    g = torch.Generator().manual_seed(5)
    x = torch.full((2, 3, 32, 32), 0.37) + 0.01 * torch.randn(2, 3, 32, 32, generator=g)
    y = x + 0.02 * torch.randn(x.shape, generator=g)
    want = ssim(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ EMA, LR, data


def test_ema_one_update_by_hand():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.999, warmup=True)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net, step=1)
    d = min(0.999, 2 / 11)  # warm-up decay at step 1
    assert ema.decay_at(1) == d and ema.decay_at(10**6) == 0.999
    for name, p in net.named_parameters():
        want = before[name] * d + p.detach() * (1 - d)
        torch.testing.assert_close(ema.shadow[name], want, rtol=0, atol=1e-7)
    plain = EMA(net, 0.9, warmup=False)
    snap = {k: v.clone() for k, v in plain.shadow.items()}
    with torch.no_grad():
        net.weight.mul_(3)
    plain.update(net, step=5)
    torch.testing.assert_close(plain.shadow["weight"], 0.9 * snap["weight"] + 0.1 * net.weight.detach(),
                               rtol=0, atol=1e-7)
    live = net.weight.detach().clone()
    with plain.swapped(net):
        assert torch.equal(net.weight, plain.shadow["weight"])
    assert torch.equal(net.weight, live)


def test_ema_update_is_the_per_tensor_arithmetic_exactly():
    """The multi-tensor update (float32 parameters) gives the bits of one mul_ and add_ per tensor, and parameters of
    another dtype (a bf16 network) still average into their float32 shadows."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(5, 6))
    ema = EMA(net, 0.995, warmup=False)
    by_hand = {k: v.clone() for k, v in ema.shadow.items()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net, step)
        for name, p in net.named_parameters():
            by_hand[name].mul_(0.995).add_(p.detach(), alpha=1 - 0.995)
            assert torch.equal(ema.shadow[name], by_hand[name]), name
    half = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema16 = EMA(half, 0.5, warmup=False)
    before = ema16.shadow["weight"].clone()
    with torch.no_grad():
        half.weight.add_(1)
    ema16.update(half, 1)
    assert ema16.shadow["weight"].dtype == torch.float32
    torch.testing.assert_close(ema16.shadow["weight"], 0.5 * before + 0.5 * half.weight.float(), rtol=0, atol=1e-6)


def test_lr_schedule():
    from estable.training.config import OptimConfig

    o = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(o, s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(o, 4, 14) == 1.0
    assert abs(lr_factor(o, 9, 14) - (0.1 + 0.9 * 0.5)) < 1e-12
    assert abs(lr_factor(o, 14, 14) - 0.1) < 1e-12
    assert lr_factor(OptimConfig(), 123, 200) == 1.0


def test_sampler_shards_and_resumes():
    one = ResumableBatchSampler(10, 4, seed=3)
    r0 = ResumableBatchSampler(10, 2, rank=0, world_size=2, seed=3)
    r1 = ResumableBatchSampler(10, 2, rank=1, world_size=2, seed=3)
    a, b0, b1 = iter(one), iter(r0), iter(r1)
    for _ in range(7):  # crosses epochs
        assert next(a) == next(b0) + next(b1)
    first = [next(iter(ResumableBatchSampler(10, 4, seed=3, start=s))) for s in (0, 4, 8)]
    again = iter(ResumableBatchSampler(10, 4, seed=3))
    assert first == [next(again) for _ in range(3)]
    epoch0 = one.global_indices(0, 10)
    assert sorted(epoch0) == list(range(10)) and one.global_indices(10, 10) != epoch0


def test_shapes_tokenizer_spells_words_whole():
    tok = shapes_tokenizer(32)
    world = ShapesWorld("heldout", 7)
    for i in range(200):
        words = caption_for(world.scene(i)).split()
        assert [tok.decoder[t] for t in tok.encode(" ".join(words))] == [w + "</w>" for w in words]


# ------------------------------------------------------------------------------------------------ runs


def test_unet_trainer_run_folder(tmp_path):
    """Through the CLI: a short run writes config.json, log lines, a sample grid and clean checkpoints."""
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    run = tmp_path / "unet"
    args = parser.parse_args(["train", "unet", "--config", "tiny-unet", "--run-dir", str(run), "--no-progress",
                              "max_steps=6", "log_every=2", "val_every=3", "sample_every=6", "save_every=3",
                              "keep_checkpoints=1", "min_snr_gamma=5", "offset_noise=0.05", "tensorboard=false"])
    assert args.func(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert load_config("unet", str(run / "config.json")).to_dict() == cfg
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert math.isfinite(r["loss"]) and r["steps_per_s"] > 0 and r["images_per_s"] == 4 * r["steps_per_s"]
        assert math.isfinite(r["grad_norm"]) and r["lr"] > 0
    assert [r["step"] for r in log if r["type"] == "val"] == [3, 6]
    assert (run / "samples" / "step_0000006.png").is_file()
    from PIL import Image

    with Image.open(run / "samples" / "step_0000006.png") as im:
        assert im.size[0] > 2 * 32 and im.mode == "RGB"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000006"]  # keep_checkpoints=1 pruned step 3
    ck = load_checkpoint(run / "checkpoints" / "step_0000006")
    assert set(ck.tensors) == {"model", "ema"} and ck.step == 6
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in ck.tensors["model"])
    assert json.loads(ck.metadata["model"]["config"]) == cfg["model"]
    assert json.loads(ck.metadata["model"]["train_config"]) == cfg
    assert ck.state["data"]["position"] == 24 and ck.state["kind"] == "unet"
    # A second run into the same folder without --resume is refused; --resume (config from the run) continues.
    with pytest.raises(EstableError, match="--resume"):
        args.func(args)
    more = parser.parse_args(["train", "unet", "--run-dir", str(run), "--resume", "--no-progress", "max_steps=8"])
    assert more.func(more) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [2, 4, 6, 8]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 8


def test_until_stops_with_a_checkpoint_on_the_planned_schedule(tmp_path, capsys):
    """--until N stops at step N with a checkpoint, the learning rate still on max_steps' schedule; --resume then
    finishes with the weights of one uninterrupted run (the reproduction chain stops runs where they stopped)."""
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    common = ["--config", "tiny-unet", "--no-progress", "max_steps=4", "log_every=1", "val_every=0", "sample_every=0",
              "save_every=0", "tensorboard=false", "device=cpu", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
              "optim.warmup_steps=0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = parser.parse_args(["train", "unet", "--run-dir", str(whole), *common])
    assert args.func(args) == 0
    assert "done: step 4" in capsys.readouterr().out
    args = parser.parse_args(["train", "unet", "--run-dir", str(split), "--until", "2", *common])
    assert args.func(args) == 0
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    lr = {d.name: [r["lr"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
          for d in (whole, split)}
    assert lr["split"] == lr["whole"][:2] and lr["whole"][1] < lr["whole"][0]  # the 4-step cosine, not a 2-step one
    args = parser.parse_args(["train", "unet", "--run-dir", str(split), "--resume", *common])
    assert args.func(args) == 0
    a = load_checkpoint(whole / "checkpoints" / "step_0000004").tensors["model"]
    b = load_checkpoint(split / "checkpoints" / "step_0000004").tensors["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = parser.parse_args(["train", "unet", "--run-dir", str(tmp_path / "bad"), "--until", "0", *common])
    with pytest.raises(EstableError, match="--until"):
        bad.func(bad)


def test_max_minutes_counts_from_the_trainers_start(tmp_path, monkeypatch):
    """The budget is the invocation's: time spent before train() (a latent cache being built) counts."""
    from estable.training import loop
    from estable.training.unet_trainer import UNetTrainer

    clock = {"now": 1000.0}

    class FakeTime:
        @staticmethod
        def monotonic():
            return clock["now"]

        perf_counter = staticmethod(loop.time.perf_counter)

    monkeypatch.setattr(loop, "time", FakeTime)
    over = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "device=cpu",
            "max_steps=4", "max_minutes=5"]
    trainer = UNetTrainer(load_config("unet", "tiny-unet", over), tmp_path / "run", progress=False)
    clock["now"] += 6 * 60  # six minutes of set-up
    trainer.train()
    trainer.close()
    assert trainer.step == 1  # out of time at the first check


def test_print_config(capsys):
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "vae", "--config", "tiny-vae", "--data", "/x/shards-{000..003}.tar",
                              "--print-config", "kl_weight=1e-5"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["source"] == "/x/shards-{000..003}.tar" and out["kl_weight"] == 1e-5


def test_latent_cache_folder_and_mixed_precision(tmp_path):
    """latents=cache over an image folder gives the same z0 as encoding on the fly (up to the cache's float16
    storage); bf16 autocast with gradient checkpointing and the v objective trains with finite losses."""
    from estable.training.shapes import write_folder

    write_folder(tmp_path / "data", 10, size=32, progress=False)
    tr = tiny_unet(tmp_path, "latents=cache", f"data.source={tmp_path / 'data'}", "data.val_size=2",
                   "precision=bf16", "gradient_checkpointing=true", "objective=v", "max_steps=2")
    assert len(tr.train_data) == 8 and (tmp_path / "run" / "latents_cache.0-of-1.safetensors").is_file()
    folder = tr.train_data  # CachedLatents over the first 8 images (the last 2 are held out for validation)
    from estable.training.data import ImageCaptionFolder

    pixels = ImageCaptionFolder(tmp_path / "data", 32)
    xi = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in (0, 7):
        item = folder[i]
        cached = tr.objective.clean_latents({"latent_mean": item["latent_mean"][None],
                                             "latent_std": item["latent_std"][None]}, xi)
        with tr.autocast():  # as the training step encodes on the fly
            online = tr.objective.clean_latents({"pixel_values": pixels[i]["pixel_values"][None]}, xi)
        torch.testing.assert_close(cached, online, rtol=2e-3, atol=2e-3)  # float16 storage, batched encode
        assert item["text"] == pixels[i]["text"]
    last = tr.train()
    assert math.isfinite(last["loss"]) and tr.network.gradient_checkpointing


def test_latent_cache_is_shared_whatever_the_loader_workers(tmp_path):
    """The cache's fingerprint is the data and the VAE, not how many workers load them: a run with other
    data.num_workers reuses a cache another run wrote (the ablation stages link one cache into several arms)."""
    from estable.training.shapes import write_folder

    write_folder(tmp_path / "data", 6, size=32, progress=False)
    over = ["latents=cache", f"data.source={tmp_path / 'data'}", "data.val_size=2"]
    tiny_unet(tmp_path, *over, name="a")
    cache = tmp_path / "a" / "latents_cache.0-of-1.safetensors"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / cache.name).symlink_to(cache)
    tr = tiny_unet(tmp_path, *over, "data.num_workers=1", name="b")
    assert (tmp_path / "b" / cache.name).is_symlink() and len(tr.train_data) == 4  # not encoded again


def test_vae_objective_falls_and_trainer_runs(tmp_path):
    cfg = load_config("vae", "tiny-vae", [*QUIET, "max_steps=3", "save_every=3", "disc.enabled=true",
                                          "disc.start=2", "disc.channels=8", "disc.layers=2", "sample_every=3"])
    tr = VAETrainer(cfg, tmp_path / "vae", progress=False)
    # Overfit a fixed batch with fixed draws (a separate copy of the objective's optimiser state).
    obj = tr.objective
    batch = tr.prepare(collate(tr.val_items[:4]))
    draws = obj.draw(4, torch.Generator().manual_seed(5), 32)
    opt = torch.optim.AdamW(obj.vae.parameters(), lr=2e-3)
    start = {k: v.detach().clone() for k, v in obj.vae.state_dict().items()}
    losses, metrics = [], None
    for _ in range(25):
        loss, metrics = obj(batch, draws, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.6 * losses[0], losses
    assert set(metrics) == {"l1", "kl", "ssim", "g_adv", "d_loss"}
    l1, kl, s = (float(metrics[k]) for k in ("l1", "kl", "ssim"))
    assert l1 > 0 and kl >= 0 and -1 <= s <= 1
    obj.vae.load_state_dict(start)
    # Before disc.start the adversarial terms add nothing; after it they do.
    off, _ = obj(batch, draws, step=0)
    on, _ = obj(batch, draws, step=2)
    assert off.item() != on.item()
    tr.train()
    run = tmp_path / "vae"
    ck = load_checkpoint(run / "checkpoints" / "step_0000003")
    assert set(ck.tensors) == {"model", "discriminator"}  # ema_decay defaults to None for the VAE
    assert (run / "samples" / "step_0000003.png").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if r["type"] == "train")
    assert {"l1", "kl", "ssim", "d_loss", "g_adv"} <= set(log[-2])


def test_vae_checkpoint_records_the_measured_latent_scaling(tmp_path):
    # The saved config's scaling_factor is 1/std of posterior samples of the validation images (the preset says
    # 1.0); the U-Net trainer then scales latents to unit variance with it.
    cfg = load_config("vae", "tiny-vae", [*QUIET, "max_steps=2", "save_every=2"])
    tr = VAETrainer(cfg, tmp_path / "vae", progress=False)
    tr.train()
    vae_cfg, weights = load_network("vae", tmp_path / "vae")
    assert cfg.model.scaling_factor == 1.0 and vae_cfg.scaling_factor != 1.0
    vae = AutoencoderKL(vae_cfg)
    vae.load_state_dict(weights)
    x = torch.stack([it["pixel_values"] for it in tr.val_items])
    with torch.no_grad():
        z = vae.encode_latents(x, generator=torch.Generator().manual_seed(1))  # samples × scaling_factor
    assert abs(float(z.std()) - 1.0) < 0.05


def test_finetune_from_an_fp16_model_file(tmp_path):
    """init_from, text.source and vae.source all naming one whole-model file stored in fp16 (as the default model
    ships): the U-Net starts from the file's weights, the frozen networks are used in fp32, and bf16 steps train."""
    from estable.checkpoints.store import load_model, save_model
    from test_train_lora import make_base

    half = save_model(load_model(make_base(tmp_path / "base.safetensors")), tmp_path / "half.safetensors",
                      to="estable", dtype="fp16")
    tr = tiny_unet(tmp_path, f"init_from={half}", f"text.source={half}", f"vae.source={half}", "precision=bf16",
                   "max_steps=2")
    stored = load_model(half).unet.state_dict()
    assert all(torch.equal(v, stored[k].float()) for k, v in tr.network.state_dict().items())
    assert {p.dtype for p in [*tr.text_encoder.parameters(), *tr.vae.parameters()]} == {torch.float32}
    last = tr.train()
    assert math.isfinite(last["loss"])
    assert any(not torch.equal(v, stored[k].float()) for k, v in tr.network.state_dict().items())


def test_zero_terminal_snr_needs_v_and_trains(tmp_path):
    """rescale_betas_zero_snr: refused with ε (the noise is the whole input at t = T); with v the noisiest step
    sees pure noise and learns -z0, and the run trains with a finite loss."""
    with pytest.raises(EstableError, match="needs objective 'v'"):
        load_config("unet", "tiny-unet", ["schedule.rescale_betas_zero_snr=true"])
    tr = tiny_unet(tmp_path, "objective=v", "schedule.rescale_betas_zero_snr=true", "max_steps=2")
    assert float(tr.objective.alphas_cumprod[-1]) == 0.0
    z0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    z_t, target = noisy_latents_and_target(z0, noise, tr.objective.alphas_cumprod[[-1, -1]], "v")
    assert torch.equal(z_t, noise) and torch.equal(target, -z0)
    assert math.isfinite(tr.train()["loss"])
    # a LoRA/TI/ControlNet run on an ε base with such a schedule: min-SNR gives the pure-noise step weight 0, not NaN
    ab = tr.objective.alphas_cumprod[[0, -1]]
    assert min_snr_weights(ab, 5.0, "eps").tolist() == [pytest.approx(5.0 / float(ab[0] / (1 - ab[0]))), 0.0]
    assert min_snr_weights(ab, 5.0, "v")[1] == 0.0


def test_grow_attention_starts_as_the_loaded_unet_and_trains(tmp_path):
    """grow_attention=[1]: tiny-unet's level 1 (no attention) gains blocks; the grown U-Net computes exactly what the
    loaded one did (new output projections at zero), trains them, and exports with attention at that level."""
    from estable.checkpoints.store import load_model
    from estable.training.assemble import assemble_model
    from test_train_lora import make_base

    base = make_base(tmp_path / "base.safetensors")
    tr = tiny_unet(tmp_path, f"init_from={base}", f"text.source={base}", f"vae.source={base}", "grow_attention=[1]",
                   "max_steps=3", "save_every=3", "optim.warmup_steps=0")
    loaded = load_model(base).unet.eval()
    assert loaded.config.attention_levels == (True, False)
    assert tr.config.model.attention_levels == (True, True) and len(tr.network.up_blocks[0].attentions) == 2
    new = {k for k in tr.network.state_dict() if k.startswith(("down_blocks.1.attentions.", "up_blocks.0.attentions."))}
    assert new and set(tr.network.state_dict()) - new == set(loaded.state_dict())
    torch.manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.equal(tr.network.eval()(x, t, c), loaded(x, t, c))
    tr.network.train()
    tr.train()
    proj = tr.network.down_blocks[1].attentions[0].proj_out.weight
    assert proj.abs().sum() > 0  # the new block learned
    out = assemble_model(tmp_path / "run", tmp_path / "grown.safetensors", dtype=None)
    assert load_model(out).unet.config.attention_levels == (True, True)


@pytest.mark.parametrize("over, words", [
    (["grow_attention=[1]"], "needs init_from"),
    (["grow_attention=[-1]"], "levels"),
])
def test_grow_attention_bad_settings(over, words):
    from estable.errors import EstableError

    with pytest.raises(EstableError, match=words):
        load_config("unet", "tiny-unet", [*QUIET, *over])


@pytest.mark.parametrize("level, words", [(0, "already has attention"), (2, "levels 0–1")])
def test_grow_attention_needs_a_level_without_it(tmp_path, level, words):
    from estable.errors import EstableError
    from test_train_lora import make_base

    base = make_base(tmp_path / "base.safetensors")
    with pytest.raises(EstableError, match=words):
        tiny_unet(tmp_path, f"init_from={base}", f"text.source={base}", f"vae.source={base}",
                  f"grow_attention=[{level}]")
