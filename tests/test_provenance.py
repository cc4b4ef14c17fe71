"""Records, signatures, `estable verify` / `keys`, reproduction and Tree-Ring, with the built-in model on the CPU."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from estable.cli import main
from estable.errors import EstableError
from estable.params import GenerationParams
from estable.provenance import treering
from estable.provenance.infotext import read_png_metadata, write_png
from estable.provenance.records import (
    canonical_bytes,
    load_private_key,
    new_keypair,
    pixel_sha256,
    sign_record,
    verify_signature,
)
from estable.provenance.stamp import prepare, settings_from_record, stamp
from estable.provenance.watermark import WatermarkSettings, detect_dwtdct

pytest.importorskip("cryptography")

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def pipe():
    from estable.pipeline import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline("default", device="cpu")


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    private, _, _ = new_keypair(tmp_path_factory.mktemp("keys"))
    return private


# ------------------------------------------------------------------------------------------------ records


def test_sign_and_verify(keyfile):
    key = load_private_key(keyfile)
    rec = {"params": {"prompt": "x", "seed": 1}, "pixels": {"sha256": "00" * 32}}
    signed = sign_record(rec, key)
    assert verify_signature(signed)[0] is True
    assert signed["signer"]["public_key"] == verify_signature(signed)[1]
    assert verify_signature(rec) == (None, "unsigned")
    # any change of the signed content, the key or the signature breaks it
    for change in ({"params": {"prompt": "y", "seed": 1}}, {"pixels": {"sha256": "11" * 32}}):
        assert verify_signature({**signed, **change})[0] is False
    other = sign_record(rec, load_private_key(new_keypair(keyfile.parent / "other")[0]))
    assert verify_signature({**signed, "signer": other["signer"]})[0] is False
    assert verify_signature({**signed, "signature": "zz"})[0] is False
    assert b"signature" not in canonical_bytes(signed)
    assert canonical_bytes({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_missing_cryptography_is_a_clear_error(monkeypatch, keyfile):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric", None)
    with pytest.raises(EstableError, match=r"pip install 'estable\[provenance\]'"):
        load_private_key(keyfile)


def test_keys_new_cli(tmp_path, capsys):
    assert main(["keys", "new", "--out", str(tmp_path)]) == 0
    private = tmp_path / "estable_ed25519.pem"
    assert private.is_file() and (tmp_path / "estable_ed25519.pub.pem").is_file()
    assert (private.stat().st_mode & 0o777) == 0o600
    hexkey = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert len(bytes.fromhex(hexkey)) == 32
    assert main(["keys", "new", "--out", str(tmp_path)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", "x", "--sign-key", str(tmp_path / "nope.pem")]) == 2
    assert "signing key not found" in capsys.readouterr().err


def test_pixel_hash():
    a = Image.new("RGB", (8, 8), (1, 2, 3))
    b = a.copy()
    assert pixel_sha256(a) == pixel_sha256(b)
    b.putpixel((3, 3), (1, 2, 4))
    assert pixel_sha256(a) != pixel_sha256(b)


# ------------------------------------------------------------------------------------------------ the hook


def test_stamp_marks_and_records(pipe, keyfile):
    params = GenerationParams(prompt=PROMPT, seed=5, steps=4, cfg_scale=5)
    settings = WatermarkSettings(key="alice")
    prepare(pipe, settings, "txt2img")
    plain = pipe.txt2img(params)
    out = stamp(plain, pipe, settings, signing_key=load_private_key(keyfile))
    rec = out.records[0]
    assert rec["pixels"]["sha256"] == pixel_sha256(out.images[0]) != pixel_sha256(plain.images[0])
    assert rec["device"]["type"] == "cpu" and rec["device"]["dtype"] == "float32"
    assert rec["watermark"]["dwtdct"]["enabled"] and rec["watermark"]["dwtdct"]["applied"]
    assert rec["watermark"]["tree_ring"] == {"enabled": False}
    assert "alice" not in json.dumps(rec)  # the key itself is never recorded
    assert verify_signature(rec)[0] is True
    assert detect_dwtdct(out.images[0], key="alice").key_matches
    assert not detect_dwtdct(plain.images[0]).found
    s, msg = settings_from_record(rec)
    assert s.dwtdct and not s.tree_ring and msg == bytes.fromhex(rec["watermark"]["dwtdct"]["message"])
    off = stamp(plain, pipe, WatermarkSettings(dwtdct=False))
    assert off.records[0]["watermark"]["dwtdct"] == {"enabled": False}
    assert pixel_sha256(off.images[0]) == pixel_sha256(plain.images[0])
    with pytest.raises(EstableError, match="text-to-image"):
        prepare(pipe, WatermarkSettings(tree_ring=True), "img2img")


# ------------------------------------------------------------------------------------------------ Tree-Ring


def test_tree_ring_injection_keeps_the_seed_noise_and_is_deterministic(pipe):
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = treering.inject(noise), treering.inject(noise)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :treering.CHANNEL], noise[:, :treering.CHANNEL])  # other channels untouched
    key, mask = treering.key_and_mask(32, 32)
    f = torch.fft.fftshift(torch.fft.fft2(a[:, treering.CHANNEL].double()), dim=(-2, -1))
    assert torch.allclose(f[:, mask], key[mask].expand(2, -1), atol=1e-3)
    g = torch.fft.fftshift(torch.fft.fft2(noise[:, treering.CHANNEL].double()), dim=(-2, -1))
    assert torch.allclose(f[:, ~mask], g[:, ~mask], atol=1e-3)
    # same seed, key on: the same image every time, and not the image without the key
    params = GenerationParams(prompt=PROMPT, seed=11, steps=4, cfg_scale=5)
    pipe.noise_hook = treering.inject
    try:
        one, two = pipe.txt2img(params).images[0], pipe.txt2img(params).images[0]
    finally:
        pipe.noise_hook = None
    assert np.array_equal(np.asarray(one), np.asarray(two))
    assert not np.array_equal(np.asarray(one), np.asarray(pipe.txt2img(params).images[0]))


def test_tree_ring_detected_by_inversion(pipe):
    # Inversion does not find every mark. The demo prompt at seeds 1-8, 25 steps of DPM++ 2M Karras, 20 inversion
    # steps (2-core CPU): 7 of 8 found on the fourth and on the sixth built-in model, 6 of 8 on the fifth, no false
    # positive on the unmarked twins. With this test's prompt and settings, seeds 1-8: 5 of 8 on the fifth, 2 of 8
    # on the sixth (seeds 5 and 6; seed 6 at p 3e-15). DPM++ 2M without Karras sigmas: see test_large_images._base.
    params = GenerationParams(prompt=PROMPT, seed=6, steps=12, cfg_scale=5, sampler="dpmpp_2m")
    pipe.noise_hook = treering.inject
    try:
        marked = pipe.txt2img(params).images[0]
    finally:
        pipe.noise_hook = None
    clean = pipe.txt2img(params).images[0]
    hit = treering.detect(pipe, marked, steps=20)
    miss = treering.detect(pipe, clean, steps=20)
    assert hit.found and hit.p_value < treering.DETECT_P, hit
    assert not miss.found and miss.p_value > 1e-3, miss
    assert hit.model == pipe.model_name


def test_p_value_is_uniform_under_the_null():
    # pure Gaussian "inverted noise": p-values must be ~uniform (a wrong variance or df would skew them)
    gen = torch.Generator().manual_seed(0)
    ps = np.array([treering.p_value(torch.randn(4, 32, 32, generator=gen))[0] for _ in range(300)])
    for q in (0.05, 0.25, 0.5):
        assert abs((ps < q).mean() - q) < 0.06, (q, (ps < q).mean())
    # and the key itself (plus a little noise) is far in the tail
    key, mask = treering.key_and_mask(32, 32)
    z = torch.randn(4, 32, 32, generator=gen)
    assert treering.p_value(treering.inject(z[None])[0])[0] < 1e-30


def test_ncx2_cdf_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for x, df, nc in [(10.0, 4, 0.0), (50.0, 80, 30.0), (150.0, 80, 120.0), (30.0, 80, 300.0), (400, 80, 300)]:
        assert treering.ncx2_cdf(x, df, nc) == pytest.approx(stats.ncx2.cdf(x, df, nc) if nc else
                                                            stats.chi2.cdf(x, df), rel=1e-6, abs=1e-300)


# ------------------------------------------------------------------------------------------------ the CLI


def test_generate_verify_reproduce(tmp_path, keyfile, capsys):
    out = tmp_path / "a.png"
    base = ["--seed", "7", "--steps", "4", "--device", "cpu"]
    assert main(["generate", PROMPT, *base, "--out", str(out), "--sign-key", str(keyfile)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--no-tree-ring"]) == 0
    text = capsys.readouterr().out
    assert "dwtDct watermark: FOUND, 32/32" in text and "signature valid" in text and "pixels match" in text
    assert "noise-residue detector: P(generated) = " in text

    # bit-exact reproduction on the same device class
    assert main(["verify", "--reproduce", str(out)]) == 0
    assert "BIT-EXACT" in capsys.readouterr().out

    # edited pixels: the hash says so, and reproduction reports the difference
    im = Image.open(out)
    text_chunk, record = read_png_metadata(out)
    edited = im.convert("RGB")
    edited.putpixel((10, 10), (255, 0, 0))
    bad = tmp_path / "edited.png"
    write_png(bad, edited, parameters=text_chunk, record=record)
    assert main(["verify", "--reproduce", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "PIXELS EDITED" in text and "max |Δ|" in text and "re-made image has the recorded pixels" in text

    # a record naming a LoRA: not re-made from the model alone (that would match for the wrong reason)
    with_lora = tmp_path / "with_lora.png"
    write_png(with_lora, im, parameters=text_chunk, record={**record, "loras": [{"name": "x", "path": "x.safetensors",
                                                                               "te": 1.0, "unet": 1.0}]})
    assert main(["verify", "--reproduce", str(with_lora)]) == 2
    assert "made with LoRAs" in capsys.readouterr().err

    # a changed record: the signature no longer verifies
    forged = tmp_path / "forged.png"
    write_png(forged, im, parameters=text_chunk, record={**record, "params": {**record["params"], "seed": 8}})
    assert main(["verify", "--no-tree-ring", str(forged)]) == 0  # the watermark is still there
    assert "SIGNATURE INVALID" in capsys.readouterr().out
    assert main(["verify", "--reproduce", str(forged)]) == 1
    assert "signature: INVALID" in capsys.readouterr().out

    # --no-watermark: nothing found, and the record says it was off
    plain = tmp_path / "plain.png"
    assert main(["generate", PROMPT, *base, "--out", str(plain), "--no-watermark"]) == 0
    assert read_png_metadata(plain)[1]["watermark"]["dwtdct"] == {"enabled": False}
    capsys.readouterr()
    assert main(["verify", "--no-tree-ring", "--json", str(plain)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["found"] is False and report["record"]["signature"] == "unsigned"
    assert main(["verify", "--no-tree-ring", str(out), str(plain)]) == 1  # one of them unmarked

    # JPEG copy: no record, the watermark is judged from the pixels alone
    jpg = tmp_path / "a.jpg"
    im.convert("RGB").save(jpg, quality=95, subsampling=0)
    assert main(["verify", "--no-tree-ring", str(jpg)]) == 0
    assert "record: none" in capsys.readouterr().out

    assert main(["verify", str(tmp_path / "missing.png")]) == 2


def test_verify_tree_ring_cli(tmp_path, capsys):
    out = tmp_path / "t.png"
    # DPM++ 2M without Karras sigmas: at 10 steps the Karras spacing breaks this model's images (its card), and the
    # key is then rarely found (sixth built-in model, seeds 1-8: 1 of 8 with Karras sigmas, 4 of 8 without)
    assert main(["generate", PROMPT, "--seed", "6", "--steps", "10", "--sampler", "dpmpp_2m", "--device", "cpu",
                 "--out", str(out), "--tree-ring", "--no-watermark"]) == 0
    assert read_png_metadata(out)[1]["watermark"]["tree_ring"]["enabled"]
    capsys.readouterr()
    assert main(["verify", str(out), "--steps", "20", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "Tree-Ring: FOUND" in text and "inverted with default_model, 20 DDIM steps" in text
    assert "dwtDct watermark: not found" in text
    assert main(["verify", "--reproduce", str(out)]) == 0  # the key is re-applied from the record
    assert "BIT-EXACT" in capsys.readouterr().out
    assert os.path.getsize(out) > 0


def test_watermark_key_flag_env_and_from_png(tmp_path, capsys, monkeypatch):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    base = ["--seed", "9", "--steps", "3", "--device", "cpu"]
    assert main(["generate", PROMPT, *base, "--out", str(a), "--watermark-key", "alice", "--tree-ring"]) == 0
    monkeypatch.setenv("ESTABLE_WATERMARK_KEY", "bob")
    assert main(["generate", PROMPT, *base, "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["verify", "--no-tree-ring", "--key", "alice", str(a)]) == 0
    assert "(matches --key)" in capsys.readouterr().out
    assert main(["verify", "--no-tree-ring", "--key", "alice", str(b)]) == 0
    assert "(not --key's tag)" in capsys.readouterr().out
    rec = read_png_metadata(a)[1]["watermark"]
    assert rec["dwtdct"]["keyed"] and "alice" not in json.dumps(rec)
    # --from-png keeps the Tree-Ring key of the image it re-makes; with the same watermark key (the flag wins
    # over the environment's) the pixels are the same
    assert main(["generate", "--from-png", str(a), "--out", str(c), "--watermark-key", "alice"]) == 0
    assert read_png_metadata(c)[1]["watermark"]["tree_ring"]["enabled"]
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(c)))
