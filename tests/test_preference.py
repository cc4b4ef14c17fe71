"""estable.training.preference and `estable train preference` (issue 11): the DPO loss, the prompts, the pairs, the
mix of weights and the command end to end, on tiny CPU networks."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from estable.config import ScheduleConfig, UNetConfig
from estable.models.unet import UNet
from estable.sampling.schedules import alphas_cumprod
from estable.training import preference as dpo


def _pairs(n: int, context_dim: int = 24) -> list:
    g = torch.Generator().manual_seed(1)

    def item():
        return {"latent": torch.randn(4, 8, 8, generator=g), "context": torch.randn(1, 5, context_dim, generator=g)}

    return [(item(), item()) for _ in range(n)]


def test_dpo_loss_starts_at_log_2_and_a_step_orders_the_pairs():
    """Against an identical reference every Δ is 0 (loss log 2, nothing ordered); gradient steps on that loss then
    make the model fit the winners better than the losers, relative to the reference, on the same draws."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_channels=(16, 32), attention_levels=(True, False), layers_per_block=1,
                           num_heads=2, context_dim=24, norm_groups=8, in_channels=4, out_channels=4))
    ref = copy.deepcopy(unet).requires_grad_(False)
    ac = alphas_cumprod(ScheduleConfig(prediction_type="v_prediction"))
    pairs = _pairs(4)
    out = dpo.dpo_step(unet, ref, pairs, ac, "v", 2000.0, torch.Generator().manual_seed(3), "cpu")
    assert math.isclose(out["loss"].item(), math.log(2), rel_tol=1e-6) and out["delta"] == 0 and out["acc"] == 0
    opt = torch.optim.SGD(unet.parameters(), lr=1e-4)
    for _ in range(5):
        out = dpo.dpo_step(unet, ref, pairs, ac, "v", 2000.0, torch.Generator().manual_seed(3), "cpu")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = dpo.dpo_step(unet, ref, pairs, ac, "v", 2000.0, torch.Generator().manual_seed(3), "cpu")
    assert after["loss"].item() < math.log(2) and after["delta"] < 0 and after["acc"] > 0.5


def test_train_prompts_are_distinct_train_split_prompts_of_the_kind():
    from estable.evaluation.compositional import make_prompts
    from estable.training.shapes import caption_for

    specs = dpo.train_prompts("count", 30, 101)
    captions = [caption_for(s) for s in specs]
    assert len(set(captions)) == 30 and all(s.kind == "count" for s in specs)
    held_out = {p.caption for p in make_prompts(500)}  # the benchmark's prompts
    assert not held_out & set(captions)


class _FakeVAE:
    config = SimpleNamespace(scaling_factor=0.5)

    def encode(self, pixels):  # (K, 3, 16, 16) in [-1, 1] -> a "latent" that keeps the image's red level
        return SimpleNamespace(mean=pixels[:, :1, ::8, ::8])


class _FakePipe:
    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(default_cfg=3.5)

    def __init__(self):
        self.vae, self.runs = _FakeVAE(), []

    def txt2img_each(self, prompts, seeds, params, batch):
        assert params.sampler == "dpmpp_2m_karras" and params.steps == 25 and params.cfg_scale == 3.5
        self.runs.append(len(prompts))
        return [Image.new("RGB", (16, 16), (s % 256, 0, 0)) for s in seeds]  # the seed in the red channel

    def completed_prompt(self, params, seed, prompt):
        return f"{prompt} #{seed}"


class _FakeJudge:
    def detect(self, images):
        return list(images)

    def classify_background(self, images):
        return [None] * len(images)


def test_make_pairs_pairs_each_wrong_image_with_a_right_one_of_its_prompt(monkeypatch):
    """Sampler runs of whole prompts' images; an image is "right" here when its seed is not a multiple of 3."""
    monkeypatch.setattr(dpo, "score_image",
                        lambda spec, image, bg: {"whole_prompt": image.getpixel((0, 0))[0] % 3 != 0})
    pipe, specs = _FakePipe(), dpo.train_prompts("count", 3, 101)
    data = dpo.draw_pairs(pipe, _FakeJudge(), specs, 4, 10, 8)
    verdicts = data.verdicts
    assert pipe.runs == [8, 4]  # two prompts' four images per run, then the last prompt's
    seeds = [v["seeds"] for v in verdicts]
    assert seeds == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    assert [v["right"] for v in verdicts] == [[True, True, False, True], [True, False, True, True],
                                             [False, True, True, False]]
    # every prompt had both kinds: all 12 images kept, one pair per wrong image
    assert len(data.prompts) == 12 and data.latents.shape == (12, 1, 2, 2)
    assert data.latents.dtype == torch.float16
    pair_seeds = [(int(data.prompts[w].split("#")[1]), int(data.prompts[lo].split("#")[1]))
                  for w, lo in data.pairs]
    assert pair_seeds == [(10, 12), (14, 15), (19, 18), (20, 21)]
    for w, lo in data.pairs:
        assert data.prompts[w].split(" #")[0] == data.prompts[lo].split(" #")[0]
    # the latent is the encoder's mean times the scaling factor: the seed's red level, scaled to [-1, 1], halved
    assert torch.allclose(data.latents[2].float(), torch.full((1, 2, 2), (12 / 127.5 - 1) * 0.5), atol=1e-3)


def test_merge_pairs_shifts_the_second_sets_indices():
    a = dpo.PairSet(torch.zeros(3, 1, 2, 2), ["a", "b", "c"], [(0, 1), (2, 1)], [{"prompt": "x"}])
    b = dpo.PairSet(torch.ones(2, 1, 2, 2), ["d", "e"], [(1, 0)], [{"prompt": "y"}])
    m = dpo.merge_pairs([a, b])
    assert m.prompts == ["a", "b", "c", "d", "e"] and m.pairs == [(0, 1), (2, 1), (4, 3)]
    assert m.latents.shape == (5, 1, 2, 2) and m.latents[3:].eq(1).all() and m.latents[:3].eq(0).all()
    assert [v["prompt"] for v in m.verdicts] == ["x", "y"]



def test_mix_weights_puts_the_unet_part_of_the_way_from_the_reference():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = copy.deepcopy(a)
    dpo.mix_weights(a, b, 0.25)
    assert torch.allclose(a.weight, b.weight + 0.25 * (before.weight - b.weight))
    dpo.mix_weights(a, b, 0.0)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dpo.mix_weights(a, b, 1.5)


def _unet_weights(path):
    from estable.checkpoints.store import load_model

    return {k: v.float() for k, v in load_model(path, dtype="fp32").unet.state_dict().items()}


def test_train_preference_command_fine_tunes_on_kept_pairs_and_mixes(tmp_path, run):
    """The command on a tiny model, with pairs already in its work folder (drawing them is draw_pairs' test): --mix 1
    writes the fine-tuned U-Net, --mix 0.5 the point half-way from MODEL's (the same run again: CPU steps repeat),
    and a pair set with no pairs writes MODEL unchanged."""
    from estable.checkpoints.io import sha256_file
    from tiny_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m")
    drawn = {"model_sha256": sha256_file(model), "kind": "count", "prompts": 3, "seeds": 2, "world_seed": 101}
    g = torch.Generator().manual_seed(0)
    pairs = dpo.PairSet(torch.randn(6, 4, 8, 8, generator=g).half(), ["two red circles", "two red circles",
                        "three blue stars", "three blue stars", "four green hearts", "four green hearts"],
                        [(0, 1), (3, 2), (4, 5)], [], drawn)
    for work in ("w1", "w05"):
        (tmp_path / work).mkdir()
        pairs.save(tmp_path / work / "pairs-count.pt")
    common = ["--kinds", "count", "--prompts", "3", "--seeds", "2", "--steps", "3", "--pairs-per-step", "2", "--lr",
              "1e-3", "--device", "cpu"]
    code, out, _ = run("train", "preference", str(model), str(tmp_path / "full.safetensors"), "--mix", "1",
                       "--work", str(tmp_path / "w1"), *common)
    assert code == 0 and "3 pairs read from" in out and "step 3/3" in out
    code, _, _ = run("train", "preference", str(model), str(tmp_path / "half.safetensors"), "--mix", "0.5",
                     "--work", str(tmp_path / "w05"), *common)
    assert code == 0
    base, full, half = (_unet_weights(p) for p in (model, tmp_path / "full.safetensors", tmp_path / "half.safetensors"))
    moved = [k for k in base if not torch.allclose(base[k], full[k], atol=1e-3)]
    assert len(moved) > len(base) // 2  # lr 1e-3 moves most tensors well past fp16 rounding
    for k in base:
        assert torch.allclose(half[k], (base[k] + full[k]) / 2, atol=2e-3), k
    log = (tmp_path / "w1" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3 and json.loads((tmp_path / "w1" / "summary.json").read_text())["pairs"] == {"count": 3}
    (tmp_path / "w0").mkdir()
    dpo.PairSet(torch.zeros(0), [], [], [], drawn).save(tmp_path / "w0" / "pairs-count.pt")
    code, out, _ = run("train", "preference", str(model), str(tmp_path / "same.safetensors"), "--work",
                       str(tmp_path / "w0"), *common)
    assert code == 0 and "nothing to learn from" in out
    same = _unet_weights(tmp_path / "same.safetensors")
    assert all(torch.allclose(same[k], base[k], atol=1e-3) for k in base)
    # pairs kept from other settings (here: other seeds) are not reused
    code, _, err = run("train", "preference", str(model), str(tmp_path / "other.safetensors"), "--work",
                       str(tmp_path / "w1"), *common, "--seeds", "4")
    assert code != 0 and "were drawn with" in err and not (tmp_path / "other.safetensors").exists()


def test_train_preference_command_refuses_bad_options(tmp_path, run):
    out = tmp_path / "o.safetensors"
    for bad, says in ((["--kinds", "count,colour"], "--kinds takes"), (["--seeds", "1"], "--seeds at least 2"),
                      (["--mix", "2"], "--mix between 0 and 1"), (["--beta", "0"], "--beta must be positive")):
        code, _, err = run("train", "preference", "default", str(out), *bad)
        assert code != 0 and says in err, (bad, err)
    work = tmp_path / "w"
    work.mkdir()
    (work / "pairs-count.pt").write_bytes(b"not a pair set")
    code, _, err = run("train", "preference", "default", str(out), "--kinds", "count", "--work", str(work))
    assert code != 0 and "cannot read the pairs in" in err and "remove it" in err
    assert (work / "pairs-count.pt").read_bytes() == b"not a pair set" and not out.exists()
    code, _, err = run("train", "preference", "default", str(out), "--work", str(work / "pairs-count.pt"))
    assert code != 0 and "is a file" in err
    code, _, err = run("train", "preference", str(tmp_path / "nothing.safetensors"), str(out))
    assert code != 0 and "no model at" in err
    out.write_bytes(b"x")
    code, _, err = run("train", "preference", "default", str(out))
    assert code != 0 and "exists" in err and out.read_bytes() == b"x"
