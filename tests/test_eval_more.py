"""`estable eval clipscore | vae | guidance-sweep`, the PIL plot helper and the built-in model lookup."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import estable.pipeline
from estable.config import TextConfig
from estable.errors import EstableError
from estable.models.clip import CLIPPair, CLIPPairConfig, ImageEncoderConfig
from estable.params import GenerationParams

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv: str) -> int:
    from estable.cli_eval import add_eval_commands

    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An Estable model file with seeded random tiny networks (VAE factor 4, native size 32 px)."""
    from tiny_model import tiny_model_file

    return tiny_model_file(tmp_path_factory.mktemp("model"))


# ------------------------------------------------------------------------------------------------ clipscore


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """A tiny CLIP pair trained for 80 steps on fresh renders of the 6 held-out prompts the test scores."""
    from estable.evaluation.compositional import make_prompts, render_generator
    from estable.training.bpe import learn_tokenizer
    from estable.training.clip_exports import save_clip_pair
    from estable.training.clip_objective import CLIPObjective
    from estable.training.data import to_tensor

    captions = [p.caption for p in make_prompts(6)]
    real = render_generator(64)
    train_caps = [c for c in captions for _ in range(8)]
    train_px = torch.stack([to_tensor(im) for im in real(train_caps, list(range(5000, 5000 + len(train_caps))))])
    tok = learn_tokenizer(train_caps, 600, max_length=32)
    text = TextConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, max_positions=32, width=64, layers=2,
                      heads=2, mlp_width=128, projection_dim=64)
    image = ImageEncoderConfig(stage_channels=(16, 32, 64), blocks_per_stage=1, stem_stride=2, image_size=64)
    torch.manual_seed(0)
    pair = CLIPPair(CLIPPairConfig(text=text, image=image, embed_dim=64))
    objective = CLIPObjective(tok)
    opt = torch.optim.AdamW(pair.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(len(train_caps), (16,), generator=g).tolist()
        loss, _ = objective(pair, {"pixel_values": train_px[idx], "text": [train_caps[i] for i in idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        pair.clamp_logit_scale_()
    folder = tmp_path_factory.mktemp("clip_run")
    return save_clip_pair(folder / "clip.safetensors", pair.eval(), tok)


def test_clipscore_real_renders_beat_the_shuffled_floor(clip_file, tmp_path, capsys):
    out = tmp_path / "clip.json"
    # The CLIP run folder is accepted as well as the file.
    assert run_cli("clipscore", "--clip", str(clip_file.parent), "--model", "shapes", "--prompts", "6",
                   "--images-per-prompt", "2", "--size", "64", "--device", "cpu", "--out", str(out)) == 0
    report = json.loads(out.read_text())
    for key in ("generated", "reference", "floor", "generated_shuffled"):
        assert set(report[key]) == {"mean", "std"}
    assert report["images"] == 12 and report["prompts"] == 6 and len(report["per_image"]) == 12
    assert set(report["by_kind"]) <= {"single", "count", "pair", "colour_binding"}
    print(f"reference {report['reference']['mean']:.2f}, floor {report['floor']['mean']:.2f}")
    assert report["reference"]["mean"] > report["floor"]["mean"] + 1.0
    # --model shapes draws the same real renders as the reference (same seeds): identical scores.
    assert report["generated"]["mean"] == pytest.approx(report["reference"]["mean"], abs=1e-6)
    assert report["relative"] == pytest.approx(1.0, abs=1e-6)
    # The per-image rows hold the score formula's range, and the mean is their mean.
    refs = [r["reference"] for r in report["per_image"]]
    assert all(0.0 <= v <= 100.0 for v in refs)
    assert np.mean(refs) == pytest.approx(report["reference"]["mean"], rel=1e-5)
    assert "real renders" in capsys.readouterr().out


def test_clipscore_floor_pairs_each_image_with_another_prompt(clip_file):
    """The floor and generated_shuffled rows, recomputed by hand: image i of prompt p scored (cosine of the pair's
    own embeddings, x 100, floored at 0) against the caption of prompt p+1 mod n. The generator is not the
    reference (half its images are blank), so no row equals another by construction, and ``relative`` is checked
    against its formula."""
    from estable.evaluation.clipscore import evaluate_clipscore, load_clip
    from estable.evaluation.compositional import image_seed, make_prompts, render_generator
    from estable.training.data import preprocess

    pair, tok = load_clip(clip_file)
    prompts = make_prompts(6)
    real = render_generator(64)

    def half_blank(texts, seeds):
        return [im if i % 2 == 0 else Image.new("RGB", im.size, (128, 128, 128))
                for i, im in enumerate(real(texts, seeds))]

    k_per = 2
    report = evaluate_clipscore(half_blank, pair, tok, prompts, k_per, seed=3, render_size=64)

    def by_hand(image, caption) -> float:
        with torch.no_grad():
            e_i = pair.encode_image(preprocess(image, pair.config.image.image_size)[None])
            e_t = pair.encode_text(tok([caption]))
        return 100.0 * max(float(torch.nn.functional.cosine_similarity(e_i, e_t)), 0.0)

    n = len(prompts)
    for row_i, row in enumerate(report["per_image"]):
        p, k = prompts[row_i // k_per], row_i % k_per
        own, other = p.caption, prompts[(p.index + 1) % n].caption
        assert own != other
        seed = image_seed(p.index, k, 3, k_per)
        ref = real([own], [seed])[0]
        fake = half_blank([own, own], [seed, seed])[row_i % 2]
        assert row["reference"] == pytest.approx(by_hand(ref, own), abs=1e-3)
        assert row["floor"] == pytest.approx(by_hand(ref, other), abs=1e-3)
        assert row["generated"] == pytest.approx(by_hand(fake, own), abs=1e-3)
        assert row["generated_shuffled"] == pytest.approx(by_hand(fake, other), abs=1e-3)
    mean = {key: report[key]["mean"] for key in ("generated", "reference", "floor")}
    assert mean["floor"] < mean["reference"]
    span = mean["reference"] - mean["floor"]
    assert report["relative"] == pytest.approx((mean["generated"] - mean["floor"]) / span)
    assert 0.0 < report["relative"] < 1.0


def test_clipscore_missing_clip_file_is_a_clear_error(tmp_path):
    with pytest.raises(EstableError, match="no CLIP model"):
        run_cli("clipscore", "--clip", str(tmp_path / "nope.safetensors"), "--model", "shapes", "--prompts", "2",
                "--device", "cpu")
    with pytest.raises(EstableError, match="no CLIP model"):
        run_cli("clipscore", "--clip", str(tmp_path), "--model", "shapes", "--prompts", "2", "--device", "cpu")


# ------------------------------------------------------------------------------------------------------ vae


def _np_ssim(x: np.ndarray, y: np.ndarray, L: float = 255.0) -> float:
    """SSIM (Wang et al. 2004) written independently: separable 11-tap Gaussian (σ 1.5), 'valid' windows,
    mean over the map and the channels. x, y: (H, W, C) float64."""
    k = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    k /= k.sum()

    def blur(a: np.ndarray) -> np.ndarray:
        rows = np.lib.stride_tricks.sliding_window_view(a, 11, axis=0) @ k  # (H-10, W, C)
        return np.lib.stride_tricks.sliding_window_view(rows, 11, axis=1) @ k  # (H-10, W-10, C)

    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    smap = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(smap.mean())


def test_vae_psnr_ssim_match_a_direct_numpy_computation(tiny_model, tmp_path, capsys):
    from estable.checkpoints.store import load_model
    from estable.evaluation.recon import RENDER_SEED
    from estable.training.shapes import ShapesWorld

    out = tmp_path / "vae.json"
    # Batch size 1: the hand computation below runs the VAE on one image, and batched convolutions may round a
    # pixel differently (measured: 1.4e-5 dB with batches of 3).
    assert run_cli("vae", "--model", str(tiny_model), "--count", "3", "--size", "32", "--batch-size", "1",
                   "--device", "cpu", "--out", str(out)) == 0
    report = json.loads(out.read_text())
    rows = report["renders"]["per_image"]
    assert len(rows) == 3 and report["size"] == 32
    assert report["renders"]["psnr_mean"] == pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert report["renders"]["ssim_mean"] == pytest.approx(np.mean([r["ssim"] for r in rows]))

    # Image 1 again, by hand: posterior mean → decode → 8-bit, then PSNR and SSIM in numpy.
    vae = load_model(tiny_model, dtype="fp32").vae.eval()
    original = np.asarray(ShapesWorld("heldout", RENDER_SEED).sample(1, 32)[0], dtype=np.float64)  # (32, 32, 3)
    with torch.no_grad():
        x = torch.from_numpy(original).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        decoded = vae.decode(vae.encode(x).mean)[0].permute(1, 2, 0).numpy()  # (32, 32, 3)
    recon = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.float64)
    want_psnr = 10 * np.log10(255.0**2 / np.mean((original - recon) ** 2))
    assert rows[1]["psnr"] == pytest.approx(want_psnr, abs=1e-6)
    assert rows[1]["ssim"] == pytest.approx(_np_ssim(original, recon), abs=1e-5)
    assert "PSNR" in capsys.readouterr().out


def test_vae_photos_need_scikit_image(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage` now raises ImportError
    with pytest.raises(EstableError, match="pip install scikit-image"):
        run_cli("vae", "--model", str(tiny_model), "--count", "1", "--photos", "--device", "cpu")


def test_vae_photos_with_a_stand_in_scikit_image(tiny_model, tmp_path, monkeypatch):
    from estable.evaluation.recon import PHOTOS

    rng = np.random.default_rng(0)
    data = types.ModuleType("skimage.data")
    for name in PHOTOS:  # landscape colour photographs of odd sizes (one float, as some loaders give)
        arr = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
        setattr(data, name, (lambda a=arr: a) if name != "rocket" else (lambda a=arr: a / 255.0))
    package = types.ModuleType("skimage")
    package.data = data  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "skimage", package)
    monkeypatch.setitem(sys.modules, "skimage.data", data)
    out = tmp_path / "vae.json"
    assert run_cli("vae", "--model", str(tiny_model), "--count", "0", "--photos", "--size", "24", "--device", "cpu",
                   "--out", str(out)) == 0
    photos = json.loads(out.read_text())["photos"]
    assert [r["name"] for r in photos["per_image"]] == list(PHOTOS)
    assert photos["size"] == 24 and all(np.isfinite(r["psnr"]) for r in photos["per_image"])
    with pytest.raises(EstableError, match="multiple of 4"):
        run_cli("vae", "--model", str(tiny_model), "--count", "1", "--size", "30", "--device", "cpu")


# ------------------------------------------------------------------------------------------- guidance sweep


def test_guidance_sweep_with_real_renders(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_cli("guidance-sweep", "--model", "shapes", "--cfg", "1,3,7.5", "--prompts", "4",
                   "--images-per-prompt", "1", "--fid-count", "6", "--size", "64", "--device", "cpu",
                   "--batch-size", "8", "--out", str(out)) == 0
    result = json.loads((out / "sweep.json").read_text())
    rows = result["rows"]
    assert [r["cfg"] for r in rows] == [1.0, 3.0, 7.5]
    # Real renders ignore the guidance scale: every CFG sees the same images, so every number agrees.
    for r in rows[1:]:
        assert r["whole_prompt"] == rows[0]["whole_prompt"] and r["by_kind"] == rows[0]["by_kind"]
        assert r["fid"] == pytest.approx(rows[0]["fid"], rel=1e-9)
    assert rows[0]["images"] == 4 and result["fid"]["floor"] > 0
    print(f"whole-prompt accuracy {rows[0]['whole_prompt']}, FID {rows[0]['fid']:.3f}, "
          f"floor {result['fid']['floor']:.3f}")
    assert result["recommended_cfg"] == 1.0  # all tied: the lowest CFG
    md = (out / "sweep.md").read_text()
    assert md.count("\n| ") == 4 and "Recommended default CFG: **1**" in md
    with Image.open(out / "sweep.png") as im:
        assert im.size == (960, 360)  # two 480 × 360 panels
        assert len(im.convert("RGB").getcolors(1 << 16) or []) > 3  # something was drawn
    assert "recommended default CFG: 1" in capsys.readouterr().out


def test_guidance_sweep_without_matplotlib_says_so_and_keeps_its_table(tmp_path, capsys, monkeypatch):
    import estable.evaluation.plot as plot

    monkeypatch.setattr(plot, "plotting_available", lambda: False)
    out = tmp_path / "sweep"
    assert run_cli("guidance-sweep", "--model", "shapes", "--cfg", "1", "--prompts", "2", "--images-per-prompt", "1",
                   "--fid-count", "0", "--size", "64", "--device", "cpu", "--out", str(out)) == 0
    assert "sweep.png will not be drawn" in capsys.readouterr().err and "estable[plot]" in plot.INSTALL_HINT
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md"]


def test_guidance_sweep_uses_each_scale(tmp_path, monkeypatch):
    """A generator whose output depends on the scale: of every 4 images, round(4·g/10) are true renders of the
    prompt and the rest blank canvases, so accuracy and FID must change from row to row. A sweep that used one
    scale for every row (in run_sweep or in the command's make_generator) gives identical rows and fails."""
    import estable.cli_eval as cli_eval
    from estable.evaluation.compositional import render_generator

    seen: list[float] = []

    def scaled_generator(args, pipe=None):
        g = float(args.cfg)
        seen.append(g)
        real = render_generator(args.size or 64)

        def generate(prompts, seeds):
            images = real(prompts, seeds)
            good = round(4 * g / 10)
            return [im if i % 4 < good else Image.new("RGB", im.size, (128, 128, 128)) for i, im in enumerate(images)]

        return generate

    monkeypatch.setattr(cli_eval, "model_generator", scaled_generator)
    out = tmp_path / "sweep"
    assert run_cli("guidance-sweep", "--model", "shapes", "--cfg", "1,3,7.5", "--prompts", "8",
                   "--images-per-prompt", "1", "--fid-count", "8", "--size", "64", "--device", "cpu",
                   "--batch-size", "8", "--out", str(out)) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert seen == [1.0, 3.0, 7.5]
    acc = [r["whole_prompt"] for r in rows]
    assert acc[0] == 0.0 and acc[0] < acc[1] < acc[2], acc  # 0, 1/4, 3/4 of the images are right
    assert len({round(r["fid"], 6) for r in rows}) == 3 and rows[2]["fid"] < rows[0]["fid"]
    assert json.loads((out / "sweep.json").read_text())["recommended_cfg"] == 7.5


def test_evaluations_default_to_the_model_recommended_cfg():
    """Without --cfg an evaluation generates at the scale the model's file recommends (as `estable generate` does),
    7 when it records none; a given --cfg wins; the report's args carry the scale used."""
    import argparse
    from types import SimpleNamespace

    from estable.cli_eval import model_generator

    used = []

    class Pipe:
        device = torch.device("cpu")

        def __init__(self, default_cfg, completion=None):
            self.config = SimpleNamespace(default_cfg=default_cfg, prompt_completion=completion)

        def txt2img_each(self, prompts, seeds, params, *, batch):
            used.append((params.cfg_scale, params.complete_prompt))
            return []

    for given, recorded, expected in ((None, 4.0, 4.0), (None, None, 7.0), (2.5, 4.0, 2.5)):
        args = argparse.Namespace(model="m", cfg=given, sampler=None, steps=3, size=None)
        model_generator(args, Pipe(recorded))(["a red circle"], [1])
        assert used[-1] == (expected, True) and args.cfg == expected and args.prompt_completion is None
    # the file's prompt completion is used unless --no-prompt-completion; the report's args name the one used
    for complete, reported in ((True, "shapes-grey-background"), (False, None)):
        args = argparse.Namespace(model="m", cfg=None, sampler=None, steps=3, size=None, complete_prompt=complete)
        model_generator(args, Pipe(4.0, "shapes-grey-background"))(["a red circle"], [1])
        assert used[-1] == (4.0, complete) and args.prompt_completion == reported


def test_recommendation_and_cfg_parsing():
    from estable.evaluation.sweep import parse_cfgs, recommend

    rows = [{"cfg": 1.0, "whole_prompt": 0.2, "fid": 5.0}, {"cfg": 5.0, "whole_prompt": 0.6, "fid": 9.0},
            {"cfg": 7.5, "whole_prompt": 0.6, "fid": 7.0}, {"cfg": 10.0, "whole_prompt": 0.5, "fid": 4.0}]
    assert recommend(rows) == 7.5  # best accuracy, tie broken by the lower FID
    assert parse_cfgs("7.5, 1,3,3") == [1.0, 3.0, 7.5]
    for bad in ("", "a,b", "1,-2", "nan"):
        with pytest.raises(ValueError):
            parse_cfgs(bad)


def test_line_plot_draws_panels_side_by_side_with_gaps(tmp_path):
    from estable.evaluation.plot import HLine, Panel, Series, line_plot

    path = line_plot([Panel("t", "x", "y", [Series("s", [1, 2, 3], [1.0, None, 2.0])], [HLine("floor", 0.5)]),
                      Panel("u", "x", "y", [Series("s", [1, 2], [3.0, 4.0])], ylim=(0, 5))],
                     tmp_path / "p.png", panel_size=(300, 200))
    with Image.open(path) as im:
        assert im.size == (600, 200)
        assert len(im.convert("RGB").getcolors(1 << 16) or []) > 3
    with pytest.raises(ValueError):
        line_plot([], tmp_path / "q.png")


def test_line_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from estable.evaluation.plot import Panel, line_plot

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(EstableError, match=r"pip install 'estable\[plot\]'"):
        line_plot([Panel("t", "x", "y")], tmp_path / "p.png")


# ------------------------------------------------------------------------------------------ default model


def test_default_model_loads_from_the_assets_path(tiny_model, monkeypatch):
    monkeypatch.setattr(estable.pipeline, "DEFAULT_MODEL_PATH", tiny_model)
    pipe = estable.pipeline.load_pipeline("default", device="cpu", dtype="fp32")
    result = pipe.txt2img(GenerationParams(prompt="a red circle", negative_prompt="", steps=2, seed=1,
                                           sampler="euler"))
    assert result.images[0].size == (32, 32)
    assert np.asarray(result.images[0]).std() > 0


def test_default_model_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(estable.pipeline, "DEFAULT_MODEL_PATH", tmp_path / "default_model.safetensors")
    with pytest.raises(EstableError, match="default model is not available.*recipes/default"):
        estable.pipeline.load_pipeline("default", device="cpu")
    # --model is optional in the eval commands and means the built-in model.
    with pytest.raises(EstableError, match="default model is not available"):
        run_cli("vae", "--count", "1", "--device", "cpu")
