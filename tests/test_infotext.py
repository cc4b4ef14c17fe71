"""A1111 infotext (format/parse) and PNG metadata chunks (estable.provenance.infotext)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image, PngImagePlugin

from estable.errors import EstableError
from estable.provenance.infotext import (
    format_infotext,
    model_hash,
    parse_infotext,
    read_png_metadata,
    to_a1111_fields,
    write_png,
)

PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7,
    "Seed": 1234,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "name",
    "Version": "estable 0.1.0",
}


def test_format_matches_published_layout():
    text = format_infotext("a cat", "blurry", PARAMS)
    assert text == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: name, Version: estable 0.1.0"
    )
    # no negative line when the negative prompt is empty; None values are left out; Size may be a pair
    params = dict(PARAMS, Size=(640, 384), Version=None)
    assert format_infotext("a cat", "", params) == (
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 640x384, "
        "Model hash: 6ce0161689, Model: name"
    )


def test_values_with_separators_are_json_quoted():
    params = {"Steps": 20, "Seed": 1, "Lora hashes": "add_detail: 7c6bad76eb54, x: 1", "Note": "two\nlines",
              "Empty": "", "Quoted": '"q"', "Space": " pad "}
    text = format_infotext("p", "", params)
    last = text.split("\n")[-1]
    assert 'Lora hashes: "add_detail: 7c6bad76eb54, x: 1"' in last
    assert 'Note: "two\\nlines"' in last and 'Empty: ""' in last
    assert "\n" not in last.replace("\\n", "")
    assert parse_infotext(text)["params"] == {k: str(v) for k, v in params.items()}


@pytest.mark.parametrize(
    "prompt,negative",
    [
        ("a photo of a cat", "blurry, lowres"),
        ("line one,\nline two: (detail:1.2)\n\nline four", "neg one\nneg two"),
        ("猫, Ünïcödé — café ☕", "ぼやけた"),
        ("just a prompt", ""),
        ("", "only negative"),
        ("", ""),
    ],
)
def test_round_trip(prompt, negative):
    params = dict(PARAMS, Prompt_extra="x, y", Seed=4294967295)
    text = format_infotext(prompt, negative, params)
    parsed = parse_infotext(text)
    assert parsed["prompt"] == prompt
    assert parsed["negative_prompt"] == negative
    assert parsed["params"] == {k: str(v) for k, v in params.items()}
    assert (parsed["width"], parsed["height"]) == (512, 768)
    # and formatting what was parsed gives the same text back
    assert format_infotext(parsed["prompt"], parsed["negative_prompt"], parsed["params"]) == text


# Infotexts in the exact form A1111 writes them (the first is the example in the docstring of A1111's
# parse_generation_parameters; the others follow current A1111 output).
A1111_DOCSTRING = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
    "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

A1111_MODERN = (
    "masterpiece, best quality, 1girl, (detailed eyes:1.2)\n"
    "<lora:add_detail:0.5>\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3405691582, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, '
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "easynegative: c74b4e810b03, badhandv4: 5e40d722fc3d", Version: v1.10.1'
)


def test_parse_a1111_docstring_example():
    r = parse_infotext(A1111_DOCSTRING)
    assert r["prompt"].startswith("girl with an artist's beret") and r["prompt"].endswith("detailed, intricate")
    assert r["negative_prompt"].startswith("ugly, fat") and r["negative_prompt"].endswith("messy drawing")
    assert r["params"] == {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086",
                           "Size": "512x512", "Model hash": "45dee52b"}
    assert (r["width"], r["height"]) == (512, 512)
    fields = to_a1111_fields(r)
    assert fields["Size-1"] == "512" and fields["Size-2"] == "512" and "Size" not in fields
    assert fields["Prompt"] == r["prompt"] and fields["Steps"] == "20"


def test_parse_a1111_modern_example():
    r = parse_infotext(A1111_MODERN)
    assert r["prompt"] == "masterpiece, best quality, 1girl, (detailed eyes:1.2)\n<lora:add_detail:0.5>"
    assert r["negative_prompt"] == "lowres, bad anatomy, (worst quality:1.4)"
    p = r["params"]
    assert list(p)[:6] == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"]
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["TI hashes"] == "easynegative: c74b4e810b03, badhandv4: 5e40d722fc3d"
    assert p["CFG scale"] == "6.5" and p["Clip skip"] == "2" and p["Version"] == "v1.10.1"
    assert (r["width"], r["height"]) == (512, 768)


def test_pairs_are_findall_in_linear_time():
    import random
    import time

    from estable.provenance.infotext import _PAIR, _pairs

    rng = random.Random(0)
    for _ in range(20_000):  # the same pairs as the pattern's findall, on lines of the characters that matter
        line = "".join(rng.choice('ab1 :,\t-/"\\x') for _ in range(rng.randrange(0, 24)))
        assert _pairs(line) == _PAIR.findall(line), line
    assert _pairs('Steps: 2, Sampler: Euler a, Lora hashes: "a: 1, b: 2"') == [
        ("Steps", "2"), ("Sampler", "Euler a"), ("Lora hashes", '"a: 1, b: 2"')]
    for line in ("a" * 40_000, "Steps: 2, Sampler: Euler, " + "\t" * 40_000 + "x", " " * 40_000 + ",",
                 "a-" * 20_000):  # runs with no ':' after them: findall takes seconds on each
        start = time.perf_counter()
        r = parse_infotext(f"a prompt\n{line}, Steps: 2, Seed: 1, Size: 8x8")
        assert time.perf_counter() - start < 0.5 and r["params"]["Size"] == "8x8"


def test_parse_without_parameters_line():
    # fewer than three pairs: the last line is prompt text (A1111's rule)
    r = parse_infotext("a cat\nSteps: 20, Seed: 3")
    assert r["prompt"] == "a cat\nSteps: 20, Seed: 3" and r["params"] == {} and r["width"] is None
    r = parse_infotext("  just text  ")
    assert r == {"prompt": "just text", "negative_prompt": "", "params": {}, "width": None, "height": None}


def test_format_argument_errors():
    with pytest.raises(ValueError, match="at least 3"):
        format_infotext("p", "", {"Steps": 20, "Seed": 1})
    with pytest.raises(ValueError, match="not readable back"):
        format_infotext("p", "", dict(PARAMS, **{"Bad:key": 1}))
    with pytest.raises(ValueError, match="not readable back"):
        format_infotext("p", "", dict(PARAMS, **{"X": 1}))


def test_model_hash():
    sha = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    assert model_hash(sha) == "6ce0161689"
    assert model_hash(sha.upper()) == "6ce0161689"
    with pytest.raises(ValueError):
        model_hash("6ce0161689")


# ---------------------------------------------------------------------------------------------------- PNG


def _image():
    im = Image.new("RGB", (8, 6))
    im.putpixel((1, 2), (255, 10, 0))
    return im


def test_png_round_trip(tmp_path):
    text = format_infotext("猫 (cute:1.2)", "blurry", PARAMS)
    record = {"params": {"steps": 20, "cfg_scale": 7.5, "prompt": "猫"}, "model_sha256": "ab" * 32,
              "estable_version": "0.1.0"}
    path = write_png(tmp_path / "out.png", _image(), parameters=text, record=record)
    assert path == tmp_path / "out.png"
    assert read_png_metadata(path) == (text, record)
    with Image.open(path) as im:  # pixels survive, and Pillow itself sees both chunks
        assert im.format == "PNG" and im.size == (8, 6) and im.getpixel((1, 2)) == (255, 10, 0)
        assert im.text["parameters"] == text and json.loads(im.text["estable"]) == record
    # nothing but the file is left in the folder (the temporary was renamed)
    assert os.listdir(tmp_path) == ["out.png"]


def test_png_latin1_parameters_use_text_chunk_and_overwrite(tmp_path):
    path = tmp_path / "x.png"
    write_png(path, _image(), parameters="old", record={"v": 1})
    write_png(str(path), _image(), parameters="café\nSteps: 1, Seed: 2, CFG scale: 3", record={"v": 2})
    data = path.read_bytes()
    assert b"tEXtparameters\x00caf\xe9" in data  # Latin-1 text goes into a plain tEXt chunk, as A1111's does
    assert read_png_metadata(path) == ("café\nSteps: 1, Seed: 2, CFG scale: 3", {"v": 2})


def test_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    assert read_png_metadata(path) == (None, None)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "from a1111")
    _image().save(path, pnginfo=info)
    assert read_png_metadata(path) == ("from a1111", None)


def test_png_errors(tmp_path):
    with pytest.raises(EstableError, match="no such file"):
        read_png_metadata(tmp_path / "missing.png")
    jpeg = tmp_path / "photo.png"
    _image().save(jpeg, format="JPEG")
    with pytest.raises(EstableError, match="not a PNG"):
        read_png_metadata(jpeg)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(EstableError, match="not a readable PNG"):
        read_png_metadata(junk)
    bad = tmp_path / "bad.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("estable", "{not json")
    _image().save(bad, pnginfo=info)
    with pytest.raises(EstableError, match="not valid JSON"):
        read_png_metadata(bad)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        write_png(tmp_path / "y.png", _image(), parameters="p", record={"x": object()})
    with pytest.raises(EstableError, match="does not exist"):
        write_png(tmp_path / "no" / "dir.png", _image(), parameters="p", record={})
    assert sorted(os.listdir(tmp_path)) == ["bad.png", "junk.png", "photo.png"]
