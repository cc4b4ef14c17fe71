"""Prompt completion (estable.prompt_completion): a model file names a rewrite of the prompt, the pipeline applies it
to each image of a txt2img request with that image's seed, records the prompt as completed, and a request can turn
it off. On a tiny random-weight model whose file names the shapes world's grey-background completion."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import estable.cli as cli
from estable import GenerationParams, load_pipeline
from estable.config import ModelConfig
from estable.errors import EstableError
from estable.pipeline import params_from_record
from estable.prompt_completion import complete_prompt
from estable.provenance.infotext import read_png_metadata
from tiny_model import tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "shapes-grey-background"
PROMPT = "a red circle above a blue square"
GREYS = {f"{PROMPT} on a grey background", f"{PROMPT} on a grey gradient background",
         f"{PROMPT} on a textured grey background"}
FLAGS = ["--device", "cpu", "--steps", "2", "--size", "32x32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny model, the same model with the completion recorded in its file by `estable convert`)."""
    folder = tmp_path_factory.mktemp("completion")
    plain = tiny_model_file(folder)
    completing = folder / "completing.safetensors"
    assert cli.main(["convert", str(plain), str(completing), "--to", "estable", "--prompt-completion", NAME]) == 0
    return plain, completing


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_completion_rewrites_only_silent_captions():
    assert complete_prompt(None, PROMPT, 3) == PROMPT
    done = {s: complete_prompt(NAME, PROMPT, s) for s in range(64)}
    assert set(done.values()) == GREYS  # the three grey kinds …
    plain = sum(text.endswith(" on a grey background") for text in done.values())
    assert 20 <= plain <= 44  # … plain about half the time (the world's 2 : 1 : 1)
    assert done == {s: complete_prompt(NAME, PROMPT, s) for s in range(64)}  # the seed decides
    for text in GREYS:
        assert complete_prompt(NAME, text, 5) == text  # a completed prompt completes to itself
    for text in (f"{PROMPT} on a black background", "a photo of a cat", "(a red circle:1.2)"):
        assert complete_prompt(NAME, text, 5) == text  # a named background, or not the caption grammar
    with pytest.raises(EstableError, match="unknown prompt completion 'nope'.*shapes-grey-background"):
        complete_prompt("nope", PROMPT, 1)
    with pytest.raises(ValueError, match="prompt_completion: unknown completion"):
        ModelConfig(prompt_completion="nope")


def test_each_image_gets_its_seeds_completion_and_its_record_makes_it_again(models):
    plain_file, completing_file = models
    pipe = load_pipeline(completing_file, device="cpu")
    assert pipe.config.prompt_completion == NAME
    assert load_pipeline(plain_file, device="cpu").config.prompt_completion is None
    params = GenerationParams(prompt=PROMPT, steps=2, cfg_scale=4.0, seed=11, batch_size=4)
    result = pipe.txt2img(params)
    prompts = [r["params"]["prompt"] for r in result.records]
    assert prompts == [complete_prompt(NAME, PROMPT, 11 + k) for k in range(4)]
    assert len(set(prompts)) > 1  # images of one batch with different completions (per-image contexts)
    assert all(text.startswith(prompts[k] + "\n") for k, text in enumerate(result.infotexts))

    # Image k is the image of its completed prompt drawn as written (the record alone makes it again, with or
    # without the completion), and the image made alone with seed + k.
    plain = load_pipeline(plain_file, device="cpu")
    for k in (0, 3):
        own = params_from_record(result.records[k])
        for again in (plain.txt2img(own), pipe.txt2img(own),
                      pipe.txt2img(dataclasses.replace(params, seed=11 + k, batch_size=1))):
            assert np.abs(_pixels(again.images[0]) - _pixels(result.images[k])).max() <= 1
    each = pipe.txt2img_each([PROMPT] * 4, [11, 12, 13, 14], params)
    assert max(np.abs(_pixels(a) - _pixels(b)).max() for a, b in zip(each, result.images)) <= 1

    # Turned off, the prompt is drawn as written: other contexts, other pixels.
    off = pipe.txt2img(dataclasses.replace(params, complete_prompt=False))
    assert [r["params"]["prompt"] for r in off.records] == [PROMPT] * 4
    assert all(r["params"]["complete_prompt"] is False for r in off.records)
    assert max(np.abs(_pixels(a) - _pixels(b)).max() for a, b in zip(off.images, result.images)) > 8

    # img2img keeps the prompt as written (the background comes from the image).
    made = pipe.img2img(result.images[0], dataclasses.replace(params, batch_size=1, strength=0.5))
    assert made.records[0]["params"]["prompt"] == PROMPT


def test_cli_info_generate_and_bulk(models, tmp_path, capsys):
    plain_file, completing_file = models
    capsys.readouterr()
    assert cli.main(["info", str(completing_file)]) == 0
    assert f"completed by {NAME}" in capsys.readouterr().out
    assert cli.main(["info", str(completing_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_completion"] == NAME

    for extra, expected in (([], complete_prompt(NAME, PROMPT, 5)), (["--no-prompt-completion"], PROMPT)):
        out = tmp_path / f"one{len(extra)}.png"
        assert cli.main(["generate", PROMPT, "--model", str(completing_file), *FLAGS, "--seed", "5",
                         "--out", str(out), *extra]) == 0
        assert read_png_metadata(out)[1]["params"]["prompt"] == expected

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "seed": 5}) + "\n"
                       + json.dumps({"prompt": PROMPT, "seed": 6, "complete_prompt": False}) + "\n")
    assert cli.main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "bulk"),
                     "--model", str(completing_file), *FLAGS]) == 0
    first = read_png_metadata(tmp_path / "bulk" / "000001-000.png")[1]["params"]["prompt"]
    second = read_png_metadata(tmp_path / "bulk" / "000002-000.png")[1]["params"]["prompt"]
    assert (first, second) == (complete_prompt(NAME, PROMPT, 5), PROMPT)
    alone = read_png_metadata(tmp_path / "one0.png")[1]
    assert alone["params"]["prompt"] == first  # the bulk image and the single one share seed and completion

    # convert: an unknown name is refused before anything is written; "none" removes a recorded completion
    capsys.readouterr()
    assert cli.main(["convert", str(plain_file), str(tmp_path / "x.safetensors"), "--to", "estable",
                     "--prompt-completion", "nope"]) == 2
    assert "unknown prompt completion 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    removed = tmp_path / "removed.safetensors"
    assert cli.main(["convert", str(completing_file), str(removed), "--to", "estable",
                     "--prompt-completion", "none"]) == 0
    assert load_pipeline(removed, device="cpu").config.prompt_completion is None
    capsys.readouterr()
    assert cli.main(["convert", str(plain_file), str(tmp_path / "d"), "--to", "diffusers",
                     "--prompt-completion", NAME]) == 2
    assert "--prompt-completion is recorded in Estable files only" in capsys.readouterr().err


def test_evaluation_reports_name_the_completion_used(models, tmp_path):
    _, completing_file = models
    for extra, expected in (([], NAME), (["--no-prompt-completion"], None)):
        out = tmp_path / f"sweep{len(extra)}"
        assert cli.main(["eval", "guidance-sweep", "--model", str(completing_file), "--cfg", "1,3", "--prompts", "2",
                         "--images-per-prompt", "1", "--fid-count", "2", "--steps", "2", "--device", "cpu",
                         "--out", str(out), *extra]) == 0
        assert json.loads((out / "sweep.json").read_text())["generation"]["prompt_completion"] == expected
