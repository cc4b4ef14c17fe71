"""benchmarks/guidance_variants.py (guidance rescale and a guidance interval, probed on the built-in model),
benchmarks/vae_spikes.py (the autoencoder's latent spikes) and decoder_spike_finetune.py's spike masks: the probes do
what their RESULTS sections say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from estable import GenerationParams, load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from guidance_variants import Variant, guidance_variant, parse_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = dict(prompt="a red circle above a blue square", steps=3, seed=2, sampler="dpmpp_2m")


def _image(pipe, **changes) -> np.ndarray:
    return np.asarray(pipe.txt2img(GenerationParams(**{**PARAMS, **changes})).images[0], dtype=np.int16)


def test_guidance_variants_reduce_to_plain_guidance_and_to_none():
    plain = load_pipeline("default", device="cpu")
    reference, unguided = _image(plain, cfg_scale=4), _image(plain, cfg_scale=1)
    assert np.abs(reference - unguided).max() > 20  # guidance matters at this seed

    same = load_pipeline("default", device="cpu")
    guidance_variant(same, Variant(4))  # the defaults: plain guidance
    assert np.array_equal(_image(same, cfg_scale=4), reference)

    never = load_pipeline("default", device="cpu")
    guidance_variant(never, Variant(4, t_min=1001.0))  # no step above t 1000: the conditional output alone, as CFG 1
    assert np.abs(_image(never, cfg_scale=4) - unguided).max() <= 2  # batch-of-2 arithmetic against batch 1

    above = load_pipeline("default", device="cpu")
    guidance_variant(above, Variant(4, t_max=-1.0))  # every step above T_MAX: unguided again, from the other end
    assert np.abs(_image(above, cfg_scale=4) - unguided).max() <= 2

    rescaled = load_pipeline("default", device="cpu")
    guidance_variant(rescaled, Variant(4, phi=0.7))
    assert np.abs(_image(rescaled, cfg_scale=4) - reference).max() > 5

    split = load_pipeline("default", device="cpu")
    guidance_variant(split, Variant(4, high=1.0))  # the fine detail unguided
    assert np.abs(_image(split, cfg_scale=4) - reference).max() > 5


def test_combine_splits_guidance_by_frequency_and_time():
    import torch
    from guidance_variants import combine, low_pass

    gen = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    plain = u + 4 * (c - u)
    assert torch.allclose(combine(u, c, 500.0, Variant(4)), plain)
    assert torch.allclose(combine(u, c, 500.0, Variant(4, high=4.0)), plain)  # H = W: no split
    # the low-pass keeps a constant and removes a checkerboard
    assert torch.allclose(low_pass(torch.ones(1, 1, 8, 8), 4), torch.ones(1, 1, 8, 8))
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1
    assert low_pass(checker[None, None], 4).abs().max() < 1e-6
    split = combine(u, c, 500.0, Variant(4, high=1.0))  # g = c + 3 L: the conditional output plus guided lows
    low = low_pass(c - u, 4)
    assert torch.allclose(split, c + 3 * low, atol=1e-5)
    assert torch.allclose(combine(u, c, 500.0, Variant(4, high=1.0, t_high=800.0)), plain)  # split only above 800
    assert torch.allclose(combine(u, c, 900.0, Variant(4, t_max=800.0, above=2.0)), u + 2 * (c - u))
    assert torch.equal(combine(u, c, 900.0, Variant(4, t_max=800.0)), c)
    assert torch.equal(combine(u, c, 100.0, Variant(4, t_min=200.0)), c)


def test_combine_masks_guidance_to_where_the_caption_acts():
    import torch
    from guidance_variants import combine

    u = torch.zeros(1, 4, 8, 8)
    c = torch.full((1, 4, 8, 8), 0.01)  # the caption changes every pixel a little ...
    c[:, :, 2:5, 2:5] = 1.0  # ... and a 3 × 3 "object" a lot
    g = combine(u, c, 500.0, Variant(4, mask=2))
    assert torch.allclose(g[:, :, 3, 3], torch.full((1, 4), 4.0))  # the object's centre: full guidance
    assert torch.allclose(g[:, :, 7, 7], torch.full((1, 4), 0.025))  # far from it: s = 1/2, c + 1.5 (c − u)
    plain = u + 4 * (c - u)
    assert torch.all(g <= plain + 1e-6) and torch.all(g >= c - 1e-6)  # between the conditional and plain guidance
    assert torch.allclose(combine(u, c, 500.0, Variant(4, mask=1e-9)), plain)  # K → 0: plain guidance
    assert parse_config("4,mask=2") == Variant(4.0, mask=2.0)
    gated = combine(u, c, 500.0, Variant(4, gate=2))
    assert torch.allclose(gated[:, :, 3, 3], plain[:, :, 3, 3]) and torch.equal(gated[:, :, 7, 7], c[:, :, 7, 7])


def test_config_parsing():
    assert parse_config("4") == Variant(4.0, 0.0, 0.0, 1000.0)
    assert parse_config("7.5:0.7") == Variant(7.5, 0.7)
    assert parse_config("4:0:200") == Variant(4.0, t_min=200.0)
    assert parse_config("4:0:0:800") == Variant(4.0, t_max=800.0)
    assert parse_config("4:0:0:800,above=2") == Variant(4.0, t_max=800.0, above=2.0)
    assert parse_config("1,bad=m4.safetensors,auto=3") == Variant(1.0, bad="m4.safetensors", auto=3.0)
    assert parse_config("2,order=3") == Variant(2.0, order=3.0)
    assert parse_config("1,swap=4") == Variant(1.0, swap=4.0)
    assert parse_config("1,contrast=2") == Variant(1.0, contrast=2.0)
    assert parse_config("4,high=1,pool=8,t_high=800") == Variant(4.0, high=1.0, pool=8, t_high=800.0)
    with pytest.raises(SystemExit):
        parse_config("4:0:200:800:1")
    with pytest.raises(SystemExit):
        parse_config("4,lows=2")


def test_vae_spikes_reports_the_shipped_autoencoder_spike(tmp_path, capsys, monkeypatch):
    import vae_spikes

    out = tmp_path / "crops.png"
    monkeypatch.setattr(sys, "argv", ["vae_spikes.py", "--images", "2", "--crops", "2", "--out", str(out)])
    vae_spikes.main()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line[:2] in ("0 ", "1 ")]
    peak, median = (float(v) for v in rows[0][1].split(" / "))
    assert peak > 6 * median  # measured 11.4 / 1.27 on the sixth model's VAE (RESULTS.md)
    # the largest reconstruction error near the spike and elsewhere, in levels: the decoders shipped until the
    # eleventh model drew their spot there (152 / 70 on the sixth's); with the worst-pixel decoders since, either
    # can be the larger (the twelfth's: 60 / 64; the thirteenth's: 59 / 52)
    near, elsewhere = (int(v) for v in rows[0][2].split(" / "))
    assert 0 < near <= 255 and 0 < elsewhere <= 255
    assert out.is_file()


def test_vae_spikes_takes_an_autoencoder_run_alone(tmp_path, capsys, monkeypatch):
    """A VAE run folder (``estable train vae``) is a model of reconstructions only, as model and as reference; it has
    no U-Net for --prompt, which says so."""
    import torch
    import vae_spikes

    from estable.config import VAEConfig
    from estable.models.vae import AutoencoderKL
    from estable.training.runs import save_checkpoint

    cfg = VAEConfig(block_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_groups=4, sample_size=32,
                    downsample_kernel=4)
    torch.manual_seed(0)
    run = tmp_path / "vae-run"
    save_checkpoint(run / "checkpoints", 2, {"model": AutoencoderKL(cfg).state_dict()}, {},
                    {"kind": "vae", "config": cfg.to_json()})
    monkeypatch.setattr(sys, "argv", ["vae_spikes.py", str(run), "--reference", str(run), "--images", "2",
                                      "--psnr-images", "2", "--crops", "2"])
    vae_spikes.main()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line[:2] in ("0 ", "1 ")]
    assert len(rows) == 2 and all(float(r[1].split(" / ")[0]) > 0 for r in rows)
    monkeypatch.setattr(sys, "argv", ["vae_spikes.py", str(run), "--prompt", "a red circle"])
    with pytest.raises(SystemExit):
        vae_spikes.main()
    assert "autoencoder alone" in capsys.readouterr().err


def test_spike_masks_mark_outliers_and_their_neighbourhood():
    import torch
    from vae_spikes import near, spikes

    z = torch.ones(2, 4, 8, 8)
    z[0, :, 3, 5] = 20.0  # norm 40 against a median of 2: a spike; image 1 has none
    mask = spikes(z)
    assert mask.shape == (2, 1, 8, 8) and mask[0, 0, 3, 5] and int(mask.sum()) == 1
    pixels = near(mask, 8)  # 3 × 3 latent pixels around it, 8 × 8 pixels each
    assert pixels.shape == (2, 1, 64, 64) and int(pixels[0].sum()) == 24 * 24 and int(pixels[1].sum()) == 0
    assert pixels[0, 0, 16:40, 32:56].all()


def test_cap_norms_caps_only_the_outliers():
    import torch
    from vae_spikes import cap_norms

    z = torch.ones(1, 4, 8, 8)  # every norm 2
    z[0, :, 3, 5] = torch.tensor([20.0, -20.0, 20.0, 20.0])  # norm 40: 20 × the median
    capped = cap_norms(z, 3)
    assert torch.allclose(capped[0, :, 3, 5].norm(), torch.tensor(6.0))  # 3 × the median norm
    assert torch.allclose(capped[0, :, 3, 5] / 6, z[0, :, 3, 5] / 40)  # same direction
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[3, 5] = False
    assert torch.equal(capped[0][:, keep], z[0][:, keep])


def test_vae_activations_finds_the_decoders_droplet(capsys, monkeypatch):
    import vae_activations

    monkeypatch.setattr(sys, "argv", ["vae_activations.py", "--images", "8"])
    vae_activations.main()
    rows = {line.split(" | ")[0]: line.split(" | ") for line in capsys.readouterr().out.splitlines() if " | " in line}
    ratio, at = float(rows["decoder.conv_norm_out"][2]), rows["decoder.conv_norm_out"][3]
    # the shipped decoder's last GroupNorm sees one position at hundreds of times the median norm (the eleventh
    # model's: 312 over these 8 renders, 338 over 16, RESULTS.md; the thirteenth's: 288); the eleventh's sat at the
    # latent spike in 4 of the 6 images with one, the thirteenth's (trained against the spots) in 2
    assert ratio > 50
    hits, of = (int(v) for v in at.split(" of "))
    assert of == 6 and 0 <= hits <= of  # six spikes: the encoder is frozen in every decoder fine-tune


def test_autoguidance_against_itself_is_plain_guidance_and_against_another_model_is_not(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    reference = _image(load_pipeline("default", device="cpu"), cfg_scale=4)
    itself = load_pipeline("default", device="cpu")
    guidance_variant(itself, Variant(4, bad="default", auto=3.0))  # c − b = 0: the weaker model adds nothing
    assert np.abs(_image(itself, cfg_scale=4) - reference).max() <= 2

    # a weaker model: the built-in one with its U-Net's weights blurred by noise (same schedule, same text tower)
    from estable.pipeline import default_model_path

    tensors = load_file(str(default_model_path()))
    gen = torch.Generator().manual_seed(0)
    for key, t in tensors.items():
        if "unet" in key and t.is_floating_point() and t.ndim > 1:
            tensors[key] = t + 0.3 * t.float().std() * torch.randn(t.shape, generator=gen).to(t.dtype)
    from safetensors import safe_open

    with safe_open(str(default_model_path()), "pt") as f:
        metadata = f.metadata()
    weak = tmp_path / "weak.safetensors"
    save_file(tensors, str(weak), metadata=metadata)
    auto = load_pipeline("default", device="cpu")
    guidance_variant(auto, Variant(4, bad=str(weak), auto=2.0))
    assert np.abs(_image(auto, cfg_scale=4) - reference).max() > 5
    pure = load_pipeline("default", device="cpu")
    guidance_variant(pure, Variant(1, bad=str(weak), auto=2.0))  # CFG 1: b + 2 (c − b), no unconditional call
    unguided = _image(load_pipeline("default", device="cpu"), cfg_scale=1)
    assert np.abs(_image(pure, cfg_scale=1) - unguided).max() > 5


def test_word_order_guidance_pushes_away_from_the_reversed_caption():
    from guidance_variants import reverse_words

    assert reverse_words("a red circle  above a blue square") == "square blue a above circle red a"
    reference = _image(load_pipeline("default", device="cpu"), cfg_scale=4)
    ordered = load_pipeline("default", device="cpu")
    guidance_variant(ordered, Variant(4, order=2.0))
    assert np.abs(_image(ordered, cfg_scale=4) - reference).max() > 5
    # a caption that reads the same reversed: c − r = 0, plain guidance again
    palindrome = load_pipeline("default", device="cpu")
    guidance_variant(palindrome, Variant(4, order=2.0))
    plain = load_pipeline("default", device="cpu")
    assert np.abs(_image(palindrome, cfg_scale=4, prompt="red red")
                  - _image(plain, cfg_scale=4, prompt="red red")).max() <= 2


def test_role_swap_guidance_pushes_away_from_the_mirrored_scene():
    from guidance_variants import swapped_roles

    assert swapped_roles("a red circle above a blue square") == "a blue square above a red circle"
    assert swapped_roles("a red circle") == "a red circle"  # not a pair: its own contrast
    prompt = "a red circle above a blue square"
    unguided = _image(load_pipeline("default", device="cpu"), cfg_scale=1, prompt=prompt)
    swapped = load_pipeline("default", device="cpu")
    guidance_variant(swapped, Variant(1, swap=3.0))  # CFG 1: c + 3 (c − s), no unconditional call
    assert np.abs(_image(swapped, cfg_scale=1, prompt=prompt) - unguided).max() > 5
    # a prompt without roles to swap: c − s = 0, the unguided image again
    single = load_pipeline("default", device="cpu")
    guidance_variant(single, Variant(1, swap=3.0))
    assert np.abs(_image(single, cfg_scale=1, prompt="a red circle")
                  - _image(load_pipeline("default", device="cpu"), cfg_scale=1, prompt="a red circle")).max() <= 2


def test_attribute_contrasts_change_what_the_kind_is_judged_on_and_keep_the_background():
    from guidance_variants import attribute_contrasts

    assert attribute_contrasts("a red circle above a blue square") == ("a blue square above a red circle",) * 2
    assert attribute_contrasts("a red circle and a blue square against a purple gradient background") == (
        "a blue circle and a red square against a purple gradient background",) * 2
    assert attribute_contrasts("four small red circles") == ("two small red circles", "three small red circles")
    assert attribute_contrasts("two large blue stars") == ("three blue stars", "four blue stars")  # no large 3s, 4s
    assert attribute_contrasts("a large red circle on a textured white background") == (
        "a large green circle on a textured white background", "a large red square on a textured white background")
    assert attribute_contrasts("a cat") == ("a cat", "a cat")  # outside the grammar: its own contrast
    prompt = "a red circle"
    unguided = _image(load_pipeline("default", device="cpu"), cfg_scale=1, prompt=prompt)
    contrasted = load_pipeline("default", device="cpu")
    guidance_variant(contrasted, Variant(1, contrast=3.0))
    assert np.abs(_image(contrasted, cfg_scale=1, prompt=prompt) - unguided).max() > 5


def test_guidance_front_restricted_to_one_kind(tmp_path):
    """benchmarks/guidance_front.py --kind pair: the accuracy and the FID on pair prompts and pair renders only."""
    from guidance_front import main as front

    out = tmp_path / "front.json"
    assert front(["--kind", "pair", "--config", "1", "--prompts", "2", "--images-per-prompt", "1",
                  "--fid-count", "3", "--device", "cpu", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert set(row["by_kind"]) == {"pair"} and row["by_kind"]["pair"]["images"] == 2
    assert row["fid_count"] == 3 and row["fid_kinds"] == {"pair": 3} and row["fid"] > 0


def test_guidance_front_names_the_grey_of_silent_captions(tmp_path, monkeypatch):
    """--name-grey: every caption that names no background reaches the pipeline with a grey one, in both measures;
    the others as they were."""
    from guidance_front import main as front

    from estable.pipeline import Pipeline
    from estable.training.shapes.captions import parse_caption

    seen: list[str] = []
    original = Pipeline.txt2img_each

    def record(self, texts, seeds, *a, **kw):
        seen.extend(texts)
        return original(self, texts, seeds, *a, **kw)

    monkeypatch.setattr(Pipeline, "txt2img_each", record)
    out = tmp_path / "front.json"
    assert front(["--name-grey", "--config", "1", "--prompts", "3", "--images-per-prompt", "1", "--fid-count", "6",
                  "--device", "cpu", "--out", str(out)]) == 0
    assert len(seen) == 9 and json.loads(out.read_text())[0]["name_grey"] is True
    backgrounds = [parse_caption(t).background for t in seen]
    assert all(bg is not None for bg in backgrounds) and any(bg.colour == "grey" for bg in backgrounds)


def test_pair_failures_sorts_missed_objects():
    from pair_failures import missed_objects

    from estable.evaluation.judge import Detection
    from estable.training.shapes.captions import parse_caption

    spec = parse_caption("a red circle above a blue square")
    def det(colour, shape):
        return Detection(colour, shape, "medium", (0.5, 0.5))

    assert missed_objects(spec, [det("red", "circle"), det("blue", "square")]) == []
    assert missed_objects(spec, [det("red", "hexagon"), det("green", "square")]) == [
        ("circle", "right colour, wrong shape", "hexagon"), ("square", "right shape, wrong colour", None)]
    assert missed_objects(spec, [det("red", "circle")]) == [("square", "missing", None)]


def test_pair_failures_tallies_objects_per_shape_and_size():
    from pair_failures import object_tally

    from estable.evaluation.judge import Detection
    from estable.training.shapes.captions import parse_caption

    def det(colour, shape):
        return Detection(colour, shape, "medium", (0.5, 0.5))

    specs = [parse_caption("a small red circle above a blue square"),
             parse_caption("a red hexagon to the left of a red circle")]
    found = [[det("red", "circle")], [det("red", "circle"), det("red", "hexagon")]]
    tally = object_tally(specs, found)
    assert tally["shape"] == {"circle": [2, 0], "hexagon": [1, 0], "square": [1, 1]}
    assert tally["size"] == {"-": [3, 1], "small": [1, 0]}

