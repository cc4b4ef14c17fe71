"""Whole-model loading and saving against diffusers / transformers as oracles (tiny random models, CPU).

The diffusers folders are written by diffusers' own ``StableDiffusionPipeline.save_pretrained`` from tiny
random components on CLIP's real vocabulary; Estable must load them with the same outputs, round-trip them
through its own and the LDM format bit for bit, and write LDM files and folders that diffusers loads back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_oracle import clip_vocab_gz, write_clip_vocab
from estable.checkpoints import describe, io, load_model, save_model
from estable.checkpoints.store import LDM_CONFIG_KEY, LoadedModel, _cast
from estable.errors import CheckpointError, EstableError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


# ------------------------------------------------------------------ fixtures: diffusers' own folders


def make_diffusers_folder(root: Path, family: str) -> Path:
    """A tiny random SD 1.x- or SD 2.x-shaped pipeline, saved by diffusers itself."""
    vocab = clip_vocab_gz()
    if vocab is None:
        pytest.skip("CLIP vocabulary not found: set ESTABLE_CLIP_VOCAB")
    src = root / "vocab"
    if not (src / "vocab.json").is_file():
        write_clip_vocab(src, vocab)
    sd2 = family == "sd2"
    tok = transformers.CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"),
                                     pad_token="!" if sd2 else "<|endoftext|>")
    torch.manual_seed(0 if not sd2 else 1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 2, norm_num_groups=32,
        use_linear_projection=sd2, upcast_attention=sd2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, layers_per_block=1,
        sample_size=16,
    )
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1,
    ))
    # Non-trivial norms so that a swapped weight/bias would show.
    with torch.no_grad():
        for module in [*unet.modules(), *vae.modules(), *text.modules()]:
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False, prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    out = root / f"{family}-diffusers"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: make_diffusers_folder(root, family) for family in ("sd1", "sd2")}


@pytest.fixture(autouse=True)
def _vocab_env(monkeypatch):
    """LDM and Estable files carry no vocabulary: point find_clip_vocab() at the test copy."""
    vocab = clip_vocab_gz()
    if vocab is not None:
        monkeypatch.setenv("ESTABLE_CLIP_VOCAB", str(vocab))


# ------------------------------------------------------------------ helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 700]),
        "context": torch.randn(2, 5, 32, generator=g),
        "image": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1,
        "ids": torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407], [49406, 3306, 49407, 0, 0, 0, 0, 0]]),
    }


def ours_outputs(model: LoadedModel) -> dict[str, torch.Tensor]:
    x = inputs()
    with torch.no_grad():
        return {
            "unet": model.unet(x["latents"], x["t"], x["context"]),
            "decode": model.vae.decode(x["latents"]),
            "encode": model.vae.encode(x["image"]).mean,
            "text": model.text_encoder.encode(x["ids"], clip_skip=model.config.clip_skip),
        }


def reference_outputs(unet, vae, text) -> dict[str, torch.Tensor]:
    x = inputs()
    with torch.no_grad():
        return {
            "unet": unet(x["latents"], x["t"], encoder_hidden_states=x["context"]).sample,
            "decode": vae.decode(x["latents"]).sample,
            "encode": vae.encode(x["image"]).latent_dist.mean,
            "text": text(x["ids"]).last_hidden_state,
        }


def reference_from_folder(folder: Path):
    return (
        diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
        diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval(),
        transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
    )


def assert_outputs_match(ours: dict, ref: dict, tol: float = REL_TOL) -> None:
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        err = rel_err(ours[name], ref[name])
        assert err <= tol, f"{name}: relative error {err:.2e}"


def weights_of(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's weights file; text-encoder keys in one form (transformers 5 writes CLIPTextModel
    without the ``text_model.`` prefix that older files and Estable use; both load the same)."""
    out = {name: load_file(folder / rel) for name, rel in WEIGHT_FILES.items()}
    out["text_encoder"] = {k.removeprefix("text_model."): v for k, v in out["text_encoder"].items()}
    return out


def assert_bit_identical(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert a[name][k].dtype == b[name][k].dtype, (name, k)
            assert torch.equal(a[name][k], b[name][k]), (name, k)


# ------------------------------------------------------------------ loading diffusers' folders


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folder_loads_with_reference_outputs(folders, family):
    folder = folders[family]
    model = load_model(folder)
    assert model.format == "diffusers"
    assert model.config.family == family
    assert model.config.schedule.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert model.config.clip_skip == 1
    assert_outputs_match(ours_outputs(model), reference_outputs(*reference_from_folder(folder)))

    # The tokenizer is the folder's: ids equal transformers' (SD 2.x pads with "!" = 0).
    ref_tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert ref_tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's real ids
    prompt = "a photo of an astronaut riding a horse!"
    ids = model.require_tokenizer()([prompt])
    assert ids[0].tolist() == ref_tok(prompt, padding="max_length", max_length=77).input_ids
    assert model.config.tokenizer.pad_token_id == (0 if family == "sd2" else 49407)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_diffusers_estable_ldm_estable_diffusers(folders, family, tmp_path):
    original = folders[family]
    first = load_model(original)
    save_model(first, tmp_path / "a.safetensors", to="estable")
    a = load_model(tmp_path / "a.safetensors")
    assert a.format == "estable" and a.config == first.config
    save_model(a, tmp_path / "b.safetensors", to="ldm")
    b = load_model(tmp_path / "b.safetensors")
    assert b.format == "ldm" and b.config == first.config  # exact thanks to the recorded config
    save_model(b, tmp_path / "c.safetensors", to="estable")
    c = load_model(tmp_path / "c.safetensors")
    save_model(c, tmp_path / "out", to="diffusers")
    assert_bit_identical(weights_of(original), weights_of(tmp_path / "out"))

    # The folder Estable wrote is a pipeline diffusers loads offline, with the same networks and scheduler.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert_outputs_match(ours_outputs(first), reference_outputs(pipe.unet, pipe.vae, pipe.text_encoder))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(original, local_files_only=True)
    for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "steps_offset"):
        assert pipe.scheduler.config[key] == ref.scheduler.config[key], key
    prompt = "A cat, sitting! 123"
    assert pipe.tokenizer(prompt).input_ids == ref.tokenizer(prompt).input_ids
    assert pipe.tokenizer.pad_token_id == ref.tokenizer.pad_token_id


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ldm_file_loads_into_diffusers(folders, family, tmp_path):
    folder = folders[family]
    model = load_model(folder)
    path = save_model(model, tmp_path / "model.safetensors", to="ldm")
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(path), config=str(folder), subfolder="unet", local_files_only=True)
    vae = diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae",
                                                   local_files_only=True)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    ref = reference_outputs(unet.eval(), vae.eval(), pipe.text_encoder.eval())
    assert_outputs_match(ours_outputs(model), ref)
    assert_outputs_match(ours_outputs(model), reference_outputs(pipe.unet, pipe.vae, pipe.text_encoder))


def test_ldm_without_recorded_config_is_inferred(folders, tmp_path):
    """An LDM file from elsewhere (no Estable metadata) is read by shape inference plus family defaults."""
    model = load_model(folders["sd1"])
    path = save_model(model, tmp_path / "m.safetensors", to="ldm")
    tensors, meta = io.read_safetensors(path)
    assert LDM_CONFIG_KEY in meta
    plain = tmp_path / "plain.safetensors"
    io.write_safetensors(plain, tensors)  # no metadata at all
    loaded = load_model(plain)
    assert loaded.config.family == "sd1"
    assert loaded.config.unet.block_channels == model.config.unet.block_channels
    # Shapes fix the widths and depths; head counts are not in the file (family defaults apply).
    for field in ("width", "layers", "mlp_width", "activation", "vocab_size", "max_positions"):
        assert getattr(loaded.config.text, field) == getattr(model.config.text, field), field
    assert loaded.tokenizer is not None and loaded.tokenizer.pad_token_id == 49407
    for name in ("vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_estable_file_metadata(folders, tmp_path):
    model = load_model(folders["sd2"])
    path = save_model(model, tmp_path / "m.safetensors", to="estable", dtype="fp16")
    tensors, meta = io.read_safetensors(path)
    assert meta["format"] == "estable" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == model.config.to_dict()
    assert meta["tokenizer"] == "clip"  # the standard vocabulary is referred to, not embedded
    assert {k.split(".")[0] for k in tensors} == {"unet", "vae", "text_encoder"}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    again = load_model(path)
    assert again.config == model.config
    assert again.tokenizer is not None and again.tokenizer.pad_token_id == 0


def test_custom_vocabulary_is_embedded(tmp_path, folders):
    from estable.tokenizer import CLIPTokenizer

    model = load_model(folders["sd1"])
    base = model.require_tokenizer()
    small = {t: i for t, i in base.encoder.items() if i < 600}
    small["<|startoftext|>"], small["<|endoftext|>"] = 600, 601
    merges = [m for m in base.merges if "".join(m) in small][:50]
    model.tokenizer = CLIPTokenizer.from_vocab(small, merges)
    path = save_model(model, tmp_path / "m.safetensors", to="estable")
    meta = io.read_safetensors_header(path)[1]
    assert json.loads(meta["tokenizer"]).keys() >= {"vocab.json", "merges.txt"}
    again = load_model(path)
    assert again.tokenizer.encoder == model.tokenizer.encoder
    assert again.tokenizer.merges == model.tokenizer.merges


def test_wrapper_prefixes_are_never_saved(folders, tmp_path):
    model = load_model(folders["sd1"])
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model.unet  # what torch.compile's OptimizedModule looks like to state_dict()
    outer = torch.nn.Module()
    outer.module = wrapper  # and DDP on top
    assert next(iter(outer.state_dict())).startswith("module._orig_mod.")
    model.unet = outer  # type: ignore[assignment]
    path = save_model(model, tmp_path / "m.safetensors", to="estable")
    keys = io.read_safetensors(path)[0].keys()
    assert not any("_orig_mod" in k or ".module." in k or k.startswith("module.") for k in keys)
    assert load_model(path).config == model.config


def test_dtype_conversion(folders, tmp_path):
    model = load_model(folders["sd1"], dtype="bf16")
    for net in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    ref = load_model(folders["sd1"])
    a = dict(model.unet.named_parameters())
    for k, p in ref.unet.named_parameters():
        assert torch.equal(a[k], p.to(torch.bfloat16)), k
    path = save_model(ref, tmp_path / "h.safetensors", to="ldm", dtype="fp16")
    dtypes = {i.dtype for i in io.read_safetensors_header(path)[0].values()}
    assert dtypes == {"F16"}
    assert set(describe(path, hashes=False)["dtypes"]) == {"F16"}
    back = load_model(path, dtype="fp32")
    assert {p.dtype for p in back.unet.parameters()} == {torch.float32}
    with pytest.raises(EstableError, match="unknown dtype 'fp8'"):
        load_model(folders["sd1"], dtype="fp8")


def test_prediction_type_override(folders, tmp_path):
    model = load_model(folders["sd2"], prediction_type="epsilon")
    assert model.config.schedule.prediction_type == "epsilon"
    with pytest.raises(EstableError, match="unknown prediction type"):
        load_model(folders["sd2"], prediction_type="x0")


def test_ema_weights(folders, tmp_path):
    from estable.checkpoints import ldm

    model = load_model(folders["sd1"])
    path = save_model(model, tmp_path / "m.safetensors", to="ldm")
    tensors, meta = io.read_safetensors(path)
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    for k in unet_keys:
        tensors[ldm.ema_key(k)] = tensors[k] + 1.0
    ema_file = tmp_path / "ema.safetensors"
    io.write_safetensors(ema_file, tensors, meta)
    plain, ema = load_model(ema_file), load_model(ema_file, ema=True)
    ref = dict(model.unet.named_parameters())
    for k, p in plain.unet.named_parameters():
        assert torch.equal(p, ref[k])
    for k, p in ema.unet.named_parameters():
        assert torch.equal(p, ref[k] + 1.0)
    with pytest.raises(CheckpointError, match="no 'model_ema.' copy"):
        load_model(path, ema=True)


# ------------------------------------------------------------------ errors


def test_truncated_file(folders, tmp_path):
    path = save_model(load_model(folders["sd1"]), tmp_path / "m.safetensors", to="estable")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=r"m\.safetensors is truncated"):
        load_model(path)


def test_renamed_key_in_ldm_file(folders, tmp_path):
    path = save_model(load_model(folders["sd1"]), tmp_path / "m.safetensors", to="ldm")
    tensors, meta = io.read_safetensors(path)
    old = "first_stage_model.decoder.conv_in.weight"
    tensors["first_stage_model.decoder.conv_inn.weight"] = tensors.pop(old)
    io.write_safetensors(path, tensors, meta)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and old in msg and "decoder.conv_inn.weight" in msg


def test_wrong_shape_in_diffusers_folder(folders, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(folders["sd1"], folder)
    weights = folder / WEIGHT_FILES["unet"]
    sd = load_file(weights)
    sd["conv_in.bias"] = torch.zeros(33)
    io.write_safetensors(weights, sd)
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    msg = str(info.value)
    assert str(weights) in msg and "'conv_in.bias' is [33] but the model expects [32]" in msg


def test_unknown_and_missing_keys_are_counted(folders, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(folders["sd1"], folder)
    weights = folder / WEIGHT_FILES["text_encoder"]
    sd = load_file(weights)
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""  # transformers 5 drops it
    for i in range(7):
        sd[f"extra.{i}"] = torch.zeros(1)
    del sd[prefix + "final_layer_norm.bias"]
    io.write_safetensors(weights, sd)
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    msg = str(info.value)
    assert "7 unknown key(s)" in msg and "and 2 more" in msg
    assert "1 missing key(s): 'text_model.final_layer_norm.bias'" in msg and str(weights) in msg


def test_missing_component_folder(folders, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(folders["sd1"], folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"not a complete diffusers pipeline: missing vae/"):
        load_model(folder)
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(CheckpointError, match=r"missing vae/, scheduler/"):
        load_model(folder)


def test_missing_path_and_plain_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers pipeline"):
        load_model(tmp_path / "empty")


def test_ckpt_needs_opt_in(folders, tmp_path):
    path = save_model(load_model(folders["sd1"]), tmp_path / "m.safetensors", to="ldm")
    tensors, _ = io.read_safetensors(path)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, ckpt)
    with pytest.raises(CheckpointError, match=r"m\.ckpt.*allow_pickle=True"):
        load_model(ckpt)
    model = load_model(ckpt, allow_pickle=True)
    ref = load_model(path)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(model, name).state_dict(), getattr(ref, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name


def test_no_overwrite_without_permission(folders, tmp_path):
    model = load_model(folders["sd1"])
    path = save_model(model, tmp_path / "m.safetensors", to="estable")
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(model, path, to="estable")
    save_model(model, path, to="estable", overwrite=True)
    out = save_model(model, tmp_path / "d", to="diffusers")
    save_model(model, out, to="diffusers", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.safetensors"]  # no temporary leftovers


def test_sd2_full_text_tower_is_trimmed_for_diffusers(folders, tmp_path):
    """An SD 2.x single file reads the penultimate text layer (clip_skip 2); the diffusers folder written
    from it drops the unused last layer and gives diffusers the same conditioning."""
    from estable.models.text import TextEncoder

    model = load_model(folders["sd2"])
    text_cfg = model.config.text.replace(layers=3, projection_dim=32)
    torch.manual_seed(3)
    model.text_encoder = TextEncoder(text_cfg).eval()
    model.config = model.config.replace(text=text_cfg, clip_skip=2)
    path = save_model(model, tmp_path / "full.safetensors", to="ldm")
    tensors, _ = io.read_safetensors(path)
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.2.") for k in tensors)
    # (The tiny U-Net's 16 channels per head are not SD 2.x's 64, so the recorded config is used here;
    # inferring SD 2.x configs from shapes alone is test_ldm's business.)
    loaded = load_model(path)
    assert loaded.config.family == "sd2" and loaded.config.clip_skip == 2 and loaded.config.text.layers == 3
    assert loaded.config.tokenizer.pad_token_id == 0

    out = save_model(loaded, tmp_path / "folder", to="diffusers")
    text_config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert text_config["num_hidden_layers"] == 2
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    ids = inputs()["ids"]
    with torch.no_grad():
        ours = loaded.text_encoder.encode(ids, clip_skip=2)
        ref = pipe.text_encoder(ids).last_hidden_state
    assert rel_err(ours, ref) <= REL_TOL
    assert pipe.scheduler.config["prediction_type"] == "v_prediction"


def test_ldm_loads_without_vocabulary(folders, tmp_path, monkeypatch):
    path = save_model(load_model(folders["sd1"]), tmp_path / "m.safetensors", to="ldm")
    monkeypatch.setenv("ESTABLE_CLIP_VOCAB", str(tmp_path / "no-vocab.txt.gz"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("estable.tokenizer.PACKAGED_CLIP_VOCAB", tmp_path / "stripped" / "vocab.txt.gz")
    model = load_model(path)
    assert model.tokenizer is None
    with pytest.raises(EstableError, match="bpe_simple_vocab_16e6.txt.gz not found"):
        model.require_tokenizer()
    with pytest.raises(EstableError, match="not found"):  # a diffusers folder needs a tokenizer/ to write
        save_model(model, tmp_path / "d", to="diffusers")
    assert not (tmp_path / "d").exists()


def test_sharded_and_pickled_component_files(folders, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(folders["sd1"], folder)
    ref = load_model(folder)
    # U-Net split into two shards with an index, as diffusers writes large models.
    unet_file = folder / WEIGHT_FILES["unet"]
    sd = load_file(unet_file)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        io.write_safetensors(folder / "unet" / name, {k: sd[k] for k in part})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    unet_file.unlink()
    # VAE as a pickle: refused without the opt-in.
    vae_file = folder / WEIGHT_FILES["vae"]
    torch.save(load_file(vae_file), folder / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*allow_pickle=True"):
        load_model(folder)
    model = load_model(folder, allow_pickle=True)
    for name in ("unet", "vae"):
        a, b = getattr(model, name).state_dict(), getattr(ref, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name
    index["weight_map"][keys[0]] = "../escape.safetensors"
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        load_model(folder, allow_pickle=True)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # "meta" stands in for an accelerator: copied, then converted
def test_cast_converts_floating_tensors_only(device):
    sd = {"w": torch.randn(3, 2), "steps": torch.arange(4), "half": torch.ones(2, dtype=torch.float16)}
    out = _cast(sd, torch.bfloat16, device)
    assert {k: v.dtype for k, v in out.items()} == {"w": torch.bfloat16, "steps": torch.int64, "half": torch.bfloat16}
    assert all(v.device.type == device for v in out.values())
    if device == "cpu":
        assert torch.equal(out["w"], sd["w"].to(torch.bfloat16))
    assert _cast(sd, None, device)["w"].dtype == torch.float32  # None keeps the file's precision


def test_loading_a_file_does_not_import_the_compiler(tmp_path):
    """The shells are built on the meta device; an init that runs there (nn.Embedding's normal_) went through a
    Python reference that imports torch._dynamo: over a second of every fresh process's load (RESULTS.md)."""
    from tiny_model import tiny_model_file

    path = tiny_model_file(tmp_path)
    code = ("import sys; from estable.checkpoints import load_model; "
            f"load_model({str(path)!r}); print('torch._dynamo' in sys.modules)")
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
