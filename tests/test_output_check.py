"""The output check: CLIP scores against concept prompts, refusal at the threshold, refused images not written."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from estable.cli import main
from estable.errors import EstableError
from estable.provenance.output_check import OutputCheck, load_concepts

CONCEPTS = ["a red circle", "a blue square"]
_CONCEPT_RGB = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture(autouse=True)
def colour_clip(monkeypatch):
    """A random tiny CLIP knows nothing (its cosines are arbitrary, often all negative); these encoders make the
    check's arithmetic testable: an image embeds as its mean colour, concept k as the colour it names."""
    from estable.models.clip import CLIPPair

    def encode_image(self, pixels):
        rgb = pixels.float().mean(dim=(2, 3)) + 1.0  # (N, 3) in [0, 2]
        return torch.cat([rgb, torch.zeros(len(rgb), self.config.embed_dim - 3)], dim=1)

    def encode_text(self, ids):
        k = len(ids)
        return torch.cat([_CONCEPT_RGB[:k], torch.zeros(k, self.config.embed_dim - 3)], dim=1)

    monkeypatch.setattr(CLIPPair, "encode_image", encode_image)
    monkeypatch.setattr(CLIPPair, "encode_text", encode_text)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A tiny random CLIP pair with a BPE vocabulary learned from a few captions (scores are arbitrary but fixed)."""
    from estable.models.clip import CLIPPair, CLIPPairConfig, ImageEncoderConfig
    from estable.models.text import TextConfig
    from estable.training.bpe import learn_tokenizer
    from estable.training.clip_exports import save_clip_pair

    tok = learn_tokenizer(CONCEPTS * 4 + ["a yellow star above a purple heart"], 600, max_length=16)
    text = TextConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, max_positions=16, width=32, layers=1,
                      heads=2, mlp_width=64, projection_dim=32)
    image = ImageEncoderConfig(stage_channels=(8, 16), blocks_per_stage=1, stem_stride=4, image_size=32)
    torch.manual_seed(0)
    pair = CLIPPair(CLIPPairConfig(text=text, image=image, embed_dim=32))
    return save_clip_pair(tmp_path_factory.mktemp("clip") / "clip.safetensors", pair.eval(), tok)


def _images():
    return [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255), (20, 200, 40))]


def test_scores_and_threshold(clip_file):
    check = OutputCheck.load(clip_file, CONCEPTS, threshold=50.0)
    s = check.scores(_images())  # red, blue, green images
    assert s.shape == (3, 2)
    assert s[0, 0] == pytest.approx(100.0, abs=0.01) and s[0, 1] == pytest.approx(0.0, abs=0.01)
    assert s[1, 1] == pytest.approx(100.0, abs=0.01)
    g = torch.tensor([20.0, 200.0, 40.0]) / 127.5  # the green image's embedding
    assert s[2, 0] == pytest.approx(100 * float(g[0] / g.norm()), rel=1e-3)
    verdicts = check.check(_images())
    assert verdicts[0][0] == "a red circle" and verdicts[1][0] == "a blue square" and verdicts[2] is None
    check.threshold = 100.5
    assert check.check(_images()) == [None, None, None]
    with pytest.raises(EstableError, match="in \\(0, 100\\]"):
        OutputCheck.load(clip_file, CONCEPTS, threshold=0.0)


def test_load_concepts(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# refused\na red circle\n\n", encoding="utf-8")
    assert load_concepts(f) == ["a red circle"]
    f.write_text("# nothing\n")
    with pytest.raises(EstableError, match="no prompts"):
        load_concepts(f)


def test_cli_refused_image_not_written(clip_file, tmp_path, capsys):
    from estable.pipeline import load_pipeline
    from estable.provenance.stamp import WatermarkSettings, prepare

    torch.set_num_threads(1)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("\n".join(CONCEPTS) + "\n", encoding="utf-8")
    pipe = load_pipeline("default", device="cpu")
    from estable.params import GenerationParams

    prepare(pipe, WatermarkSettings(dwtdct=False), "txt2img")
    # the images the command below makes: the model's recommended guidance scale and sampler, as `generate` takes
    params = pipe.with_model_defaults(GenerationParams(prompt="a red circle", seed=21, steps=3, batch_size=2))
    imgs = pipe.txt2img(params).images
    best = OutputCheck.load(clip_file, CONCEPTS, 50.0).scores(imgs).max(dim=1).values
    if abs(float(best[0] - best[1])) < 1e-4:
        pytest.skip("the random CLIP scores both images alike")
    hi = int(best.argmax())
    threshold = (float(best[0]) + float(best[1])) / 2
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "--seed", "21", "--steps", "3", "--batch", "2", "--device", "cpu",
                 "--out", str(out), "--output-check", str(concepts), "--output-clip", str(clip_file),
                 "--output-threshold", str(threshold)])
    assert code == 2
    err = capsys.readouterr().err
    assert "output check refused 1 image(s)" in err and f"seed {21 + hi}" in err
    files = sorted(p.name for p in out.glob("*"))
    assert files == [f"00000-{21 + 1 - hi}.png"]  # only the allowed image, nothing half-written
    assert main(["generate", "x", "--output-check", str(concepts)]) == 2
    assert "needs --output-clip" in capsys.readouterr().err
    assert main(["generate", "x", "--output-threshold", "20", "--out", str(tmp_path / "x.png")]) == 2  # no check on
    assert "--output-threshold is used by --output-check FILE, which is missing" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
