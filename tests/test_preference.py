"""estable.training.preference and `estable train preference` (issue 11): the DPO loss, the prompts, the judged
images and their pairs by each grade, the mix of weights and the command end to end, on tiny CPU networks."""

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


WRONG = {12, 15, 18, 21, 26, 27, 28, 29}  # by seed: prompts 0-2 mixed, prompt 3 (22-25) all right, 4 (26-29) all wrong
STRAYS = {10: 40, 11: 3, 12: 9, 13: 3, 14: 0, 15: 50, 16: 10, 17: 20, 18: 1, 19: 8, 20: 2, 21: 1, 22: 5, 23: 30,
          24: 0, 25: 12, 26: 0, 27: 0, 28: 0, 29: 0}


def _seed_pairs(data, pairs):
    return [(int(data.prompts[w].split("#")[1]), int(data.prompts[lo].split("#")[1])) for w, lo in pairs]


def test_draw_images_judges_counts_strays_and_keeps_the_images_that_can_pair(monkeypatch):
    """Sampler runs of whole prompts' images (the seed in the red channel); WRONG and STRAYS say, by seed, what the
    judge and the stray count make of each."""
    monkeypatch.setattr(dpo, "score_image", lambda spec, image, bg: {"whole_prompt": image.getpixel((0, 0))[0]
                                                                     not in WRONG})
    seen_colours = []

    def count_stray(images, colours, device):
        seen_colours.extend(colours)
        return [STRAYS[im.getpixel((0, 0))[0]] for im in images]

    monkeypatch.setattr(dpo, "count_stray", count_stray)
    pipe, specs = _FakePipe(), dpo.train_prompts("count", 5, 101)
    data = dpo.draw_images(pipe, _FakeJudge(), specs, 4, 10, 8)
    assert pipe.runs == [8, 8, 4]  # two prompts' four images per run, then the last prompt's
    assert seen_colours == [dpo.spec_colours(s) for s in specs for _ in range(4)]
    v = data.verdicts
    assert [x["seeds"] for x in v] == [list(range(10 + 4 * i, 14 + 4 * i)) for i in range(5)]
    assert [x["right"] for x in v][2:] == [[False, True, True, False], [True] * 4, [False] * 4]
    assert v[1]["strays"] == [0, 50, 10, 20]
    # mixed prompts keep all four images; the all-right one its cleanest (24) and dirtiest (23); the all-wrong none
    assert len(data.prompts) == 14 and data.latents.shape == (14, 1, 2, 2) and data.latents.dtype == torch.float16
    assert v[3]["kept"] == [-1, 12, 13, -1] and v[4]["kept"] == [-1] * 4
    assert _seed_pairs(data, dpo.choose_pairs(data, "judge")) == [(10, 12), (14, 15), (19, 18), (20, 21)]
    assert _seed_pairs(data, dpo.choose_pairs(data, "strays")) == [(11, 10), (14, 17), (24, 23)]
    assert _seed_pairs(data, dpo.choose_pairs(data, "strays", margin=25)) == [(11, 10), (24, 23)]
    assert _seed_pairs(data, dpo.choose_pairs(data, "both")) == [(11, 12), (11, 10), (14, 15), (14, 17), (20, 18),
                                                                 (19, 21), (24, 23)]
    for w, lo in dpo.choose_pairs(data, "both"):
        assert data.prompts[w].split(" #")[0] == data.prompts[lo].split(" #")[0]
    # the latent is the encoder's mean times the scaling factor: the seed's red level, scaled to [-1, 1], halved
    assert torch.allclose(data.latents[2].float(), torch.full((1, 2, 2), (12 / 127.5 - 1) * 0.5), atol=1e-3)
    with pytest.raises(ValueError, match="grade must be one of"):
        dpo.choose_pairs(data, "colour")


def test_merge_sets_shifts_the_second_sets_indices():
    a = dpo.ImageSet(torch.zeros(3, 1, 2, 2), ["a", "b", "c"],
                    [{"prompt": "x", "right": [True, False, True], "strays": [0, 0, 0], "kept": [0, 1, 2]}])
    b = dpo.ImageSet(torch.ones(2, 1, 2, 2), ["d", "e"],
                    [{"prompt": "y", "right": [True, True, True], "strays": [0, 5, 30], "kept": [0, -1, 1]}])
    m = dpo.merge_sets([a, b])
    assert m.prompts == ["a", "b", "c", "d", "e"] and [x["kept"] for x in m.verdicts] == [[0, 1, 2], [3, -1, 4]]
    assert m.latents.shape == (5, 1, 2, 2) and m.latents[3:].eq(1).all() and m.latents[:3].eq(0).all()
    assert dpo.choose_pairs(m) == [(0, 1)] and dpo.choose_pairs(m, "strays") == [(3, 4)]


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


def test_train_preference_command_fine_tunes_on_kept_images_and_mixes(tmp_path, run):
    """The command on a tiny model, with judged images already in its work folder (drawing them is draw_images'
    test): --mix 1 writes the fine-tuned U-Net, --mix 0.5 the point half-way from MODEL's (the same run again: CPU
    steps repeat), and an image set with no pairs writes MODEL unchanged."""
    from estable.checkpoints.io import sha256_file
    from tiny_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m")
    drawn = {"model_sha256": sha256_file(model), "kind": "count", "prompts": 3, "seeds": 2, "world_seed": 101}
    g = torch.Generator().manual_seed(0)
    prompts = ["two red circles", "three blue stars", "four green hearts"]
    verdicts = [{"prompt": p, "seeds": [1, 2], "right": r, "strays": [3, 3], "kept": [2 * i, 2 * i + 1]}
                for i, (p, r) in enumerate(zip(prompts, ([True, False], [False, True], [True, False])))]
    images = dpo.ImageSet(torch.randn(6, 4, 8, 8, generator=g).half(), [p for p in prompts for _ in range(2)],
                          verdicts, drawn)
    for work in ("w1", "w05"):
        (tmp_path / work).mkdir()
        images.save(tmp_path / work / "images-count.pt")
    common = ["--kinds", "count", "--prompts", "3", "--seeds", "2", "--steps", "3", "--pairs-per-step", "2", "--lr",
              "1e-3", "--device", "cpu"]
    code, out, _ = run("train", "preference", str(model), str(tmp_path / "full.safetensors"), "--mix", "1",
                       "--work", str(tmp_path / "w1"), *common)
    assert code == 0 and "3 prompts' verdicts read from" in out and "3 pairs by judge" in out and "step 3/3" in out
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
    dpo.ImageSet(torch.zeros(0), [], [], drawn).save(tmp_path / "w0" / "images-count.pt")
    code, out, _ = run("train", "preference", str(model), str(tmp_path / "same.safetensors"), "--work",
                       str(tmp_path / "w0"), *common)
    assert code == 0 and "no pair to learn from" in out
    # the same images graded by stray pixels: each prompt has one right image, so no pair either
    code, out, _ = run("train", "preference", str(model), str(tmp_path / "strays.safetensors"), "--work",
                       str(tmp_path / "w1"), *common, "--grade", "strays")
    assert code == 0 and "0 pairs by strays" in out and "no pair to learn from" in out
    assert json.loads((tmp_path / "w1" / "summary.json").read_text())["grade"] == "strays"
    same = _unet_weights(tmp_path / "same.safetensors")
    assert all(torch.allclose(same[k], base[k], atol=1e-3) for k in base)
    # pairs kept from other settings (here: other seeds) are not reused
    code, _, err = run("train", "preference", str(model), str(tmp_path / "other.safetensors"), "--work",
                       str(tmp_path / "w1"), *common, "--seeds", "4")
    assert code != 0 and "were drawn with" in err and not (tmp_path / "other.safetensors").exists()


def test_train_preference_command_refuses_bad_options(tmp_path, run):
    out = tmp_path / "o.safetensors"
    for bad, says in ((["--kinds", "count,colour"], "--kinds takes"), (["--seeds", "1"], "--seeds at least 2"),
                      (["--mix", "2"], "--mix between 0 and 1"), (["--beta", "0"], "--beta must be positive"),
                      (["--stray-margin", "0"], "--stray-margin at least 1"), (["--grade", "x"], "invalid choice")):
        code, _, err = run("train", "preference", "default", str(out), *bad)
        assert code != 0 and says in err, (bad, err)
    work = tmp_path / "w"
    work.mkdir()
    (work / "images-count.pt").write_bytes(b"not an image set")
    code, _, err = run("train", "preference", "default", str(out), "--kinds", "count", "--work", str(work))
    assert code != 0 and "cannot read the images in" in err and "remove it" in err
    assert (work / "images-count.pt").read_bytes() == b"not an image set" and not out.exists()
    code, _, err = run("train", "preference", "default", str(out), "--work", str(work / "images-count.pt"))
    assert code != 0 and "is a file" in err
    code, _, err = run("train", "preference", str(tmp_path / "nothing.safetensors"), str(out))
    assert code != 0 and "no model at" in err
    out.write_bytes(b"x")
    code, _, err = run("train", "preference", "default", str(out))
    assert code != 0 and "exists" in err and out.read_bytes() == b"x"
