"""Hostile or damaged model files from the wild: each gets a one-line EstableError (CLI: ``estable: error: …``, status
2), never a traceback, a hang or a silently wrong image. One test per defect found by the audit of the loaders."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_util import run_cli
from estable.checkpoints.io import read_safetensors, read_safetensors_header, write_safetensors
from estable.checkpoints.lora_format import lora_state_from_tensors, save_lora
from estable.checkpoints.store import load_model, save_model
from estable.config import ModelConfig
from estable.errors import CheckpointError, EstableError
from tiny_model import tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
GEN = ["--steps", "1", "--size", "32", "--device", "cpu", "--seed", "1"]


@contextlib.contextmanager
def _within(seconds: int):
    """Fail instead of hanging (a config asking for 10^9 layers used to build them)."""
    def stop(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_diffusers(tiny, tmp_path_factory) -> Path:
    return save_model(load_model(tiny), tmp_path_factory.mktemp("d") / "tiny", to="diffusers")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _with_meta(src: Path, dst: Path, **changes: str) -> Path:
    tensors, meta = read_safetensors(src)
    write_safetensors(dst, tensors, {**meta, **changes})
    return dst


def _with_tensor(src: Path, dst: Path, key: str, fn) -> Path:
    tensors, meta = read_safetensors(src)
    tensors[key] = fn(tensors[key])
    write_safetensors(dst, tensors, meta)
    return dst


# ------------------------------------------------------------------------------------------- JSON in the files


@pytest.mark.parametrize("header,words", [(DEEP.encode(), "nested too deeply"),
                                          (b'{"a": ' + b"9" * 5000 + b"}", "too many digits")])
def test_a_safetensors_header_nested_too_deep_or_with_a_huge_number(tmp_path, capsys, header, words):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=words):
        read_safetensors_header(bad)
    code, err = run_cli(capsys, "info", bad)
    assert code == 2 and words in err


def test_a_diffusers_config_nested_too_deep(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers, tmp_path)
    (folder / "unet" / "config.json").write_text(DEEP)
    with pytest.raises(CheckpointError, match="config.json is not a readable JSON file .it is nested too deeply"):
        load_model(folder)


@pytest.mark.parametrize("where", ["text_encoder", "tokenizer"])
def test_other_json_nested_too_deep(tiny, tiny_diffusers, tmp_path, where):
    if where == "tokenizer":  # a diffusers folder's vocab.json
        folder = _copy(tiny_diffusers, tmp_path)
        (folder / "tokenizer" / "vocab.json").write_text(DEEP)
        with pytest.raises(EstableError, match="vocab.json is not valid JSON"):
            load_model(folder)
    else:  # the config in an Estable file's metadata
        bad = _with_meta(tiny, tmp_path / "bad.safetensors", config=DEEP)
        with pytest.raises(CheckpointError, match="the model config in the metadata is invalid .it is nested"):
            load_model(bad)


def test_lora_metadata_nested_too_deep():
    tensors = {"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(CheckpointError, match="lora_adapter_metadata' is not valid JSON"):
        lora_state_from_tensors(tensors, {"lora_adapter_metadata": DEEP}, source="x.safetensors")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_config_linked_to_dev_zero_is_refused(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers, tmp_path)
    (folder / "unet" / "config.json").unlink()
    (folder / "unet" / "config.json").symlink_to("/dev/zero")  # read_text() would fill the memory
    with _within(60), pytest.raises(CheckpointError, match="config.json is not a regular file"):
        load_model(folder)


# ------------------------------------------------------------------------------------------ absurd config values


@pytest.mark.parametrize("part,changes,words", [
    ("unet", {"in_channels": -4}, "in_channels must be at least 1"),
    ("unet", {"block_out_channels": [-32, 64]}, "block_channels must be at least 1"),
    ("unet", {"freq_shift": "x"}, "freq_shift must be an integer"),
    ("unet", {"norm_eps": math.nan}, "norm_eps must be a small positive number"),
    ("unet", {"layers_per_block": 10**9}, "layers_per_block must be at most 100"),
    ("unet", {"transformer_layers_per_block": 10**9}, "transformer_layers must be at most 100"),
    ("text_encoder", {"num_hidden_layers": 10**9}, "layers must be at most 100"),
    ("text_encoder", {"intermediate_size": -1}, "mlp_width must be at least 1"),
    ("vae", {"layers_per_block": 10**9}, "layers_per_block must be at most 100"),
    ("scheduler", {"num_train_timesteps": 10**12}, "num_train_timesteps must be at most 100000"),
])
def test_absurd_config_values_are_refused(tiny_diffusers, tmp_path, part, changes, words):
    folder = _copy(tiny_diffusers, tmp_path)
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    _edit_json(folder / part / name, **changes)
    with _within(60), pytest.raises(EstableError, match=words):
        load_model(folder)


def test_a_config_section_that_is_not_an_object(tiny, tmp_path):
    data = ModelConfig().to_dict()
    data["unet"] = None
    with pytest.raises(ValueError, match="ModelConfig.unet must be an object"):
        ModelConfig.from_dict(data)
    config = json.loads(read_safetensors_header(tiny)[1]["config"])
    bad = _with_meta(tiny, tmp_path / "bad.safetensors", config=json.dumps({**config, "vae": [1]}))
    with pytest.raises(CheckpointError, match="ModelConfig.vae must be an object"):
        load_model(bad)


# -------------------------------------------------------------------------------------------------- tokenizers


def test_a_tokenizer_longer_than_the_text_encoder(tiny_diffusers, tmp_path, capsys):
    folder = _copy(tiny_diffusers, tmp_path)
    _edit_json(folder / "tokenizer" / "tokenizer_config.json", model_max_length=10**30)  # falls back to 77
    with pytest.raises(CheckpointError, match="pads prompts to 77 tokens, but the text encoder has only 32"):
        load_model(folder)
    code, err = run_cli(capsys, "generate", "a red circle", "--model", folder, *GEN, "--out", tmp_path / "o.png")
    assert code == 2 and "model_max_length" in err and not (tmp_path / "o.png").exists()


def test_an_embedded_tokenizer_error_names_no_temporary_folder(tiny, tmp_path):
    files = json.loads(read_safetensors_header(tiny)[1]["tokenizer"])
    bad = _with_meta(tiny, tmp_path / "bad.safetensors", tokenizer=json.dumps({**files, "vocab.json": "[1]"}))
    with pytest.raises(CheckpointError, match="embedded in the metadata is corrupt .vocab.json must hold") as info:
        load_model(bad)
    assert "estable-tok-" not in str(info.value)


def test_a_tokenizer_with_ids_past_the_token_embeddings(tiny, tiny_diffusers, tmp_path, capsys):
    # a single file carries no vocabulary: the standard CLIP one (49408 tokens) does not fit 677 embeddings
    ldm = save_model(load_model(tiny), tmp_path / "ldm.safetensors", to="ldm")
    model = load_model(ldm)  # still loads (and converts), without a tokenizer
    with pytest.raises(EstableError, match="token ids up to 49407, but the text encoder has only 677"):
        model.require_tokenizer()
    code, err = run_cli(capsys, "generate", "a red circle", "--model", ldm, *GEN, "--out", tmp_path / "o.png")
    assert code == 2 and "token embeddings" in err  # was an IndexError traceback
    folder = _copy(tiny_diffusers, tmp_path)
    _edit_json(folder / "tokenizer" / "vocab.json", zebra=5000)
    with pytest.raises(CheckpointError, match="token ids up to 5000"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------- tensor types


@pytest.mark.parametrize("key,fn,words", [
    ("unet.conv_in.weight", lambda t: t.to(torch.int32), "'conv_in.weight' is int32 but the model expects floating"),
    ("unet.conv_in.weight", lambda t: t.to(torch.complex64), "is complex64 but the model expects floating point"),
    ("vae.decoder.conv_in.weight", lambda t: t > 0, "is bool but the model expects floating point"),
])
def test_model_tensors_of_the_wrong_type(tiny, tmp_path, capsys, key, fn, words):
    bad = _with_tensor(tiny, tmp_path / "bad.safetensors", key, fn)
    with pytest.raises(CheckpointError, match=words):
        load_model(bad)
    code, err = run_cli(capsys, "generate", "x", "--model", bad, *GEN, "--out", tmp_path / "o.png")
    assert code == 2 and "wrong type" in err


def test_an_int8_file_with_a_float_weight(tiny, tmp_path):
    model = load_model(tiny)
    from estable.nn.int8 import quantize_model

    quantize_model(model.unet)
    q = save_model(model, tmp_path / "q.safetensors", to="estable")
    bad = _with_tensor(q, tmp_path / "bad.safetensors", "unet.conv_in.weight", lambda t: t.float())  # was garbage
    with pytest.raises(CheckpointError, match="'conv_in.weight' is float32 but the model expects int8"):
        load_model(bad)


def test_a_vae_file_with_integer_tensors(tiny, tmp_path, capsys):
    tensors, _ = read_safetensors(tiny)
    vae = {k.removeprefix("vae."): v for k, v in tensors.items() if k.startswith("vae.")}
    vae["decoder.conv_in.weight"] = vae["decoder.conv_in.weight"].to(torch.int32)  # was cast: a wrong image
    write_safetensors(tmp_path / "vae.safetensors", vae)
    code, err = run_cli(capsys, "generate", "x", "--model", tiny, "--vae", tmp_path / "vae.safetensors", *GEN,
                        "--out", tmp_path / "o.png")
    assert code == 2 and "not floating point: decoder.conv_in.weight (int32)" in err
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------------- LoRAs

A, B = torch.full((2, 4), 0.1), torch.full((4, 2), 0.1)


@pytest.mark.parametrize("tensors,meta,words", [
    ({"lora_unet_x.lora_down.weight": A, "lora_unet_x.lora_up.weight": B, "lora_unet_x.alpha": torch.tensor(math.nan)},
     {}, "NaN or infinite"),
    ({"lora_unet_x.lora_down.weight": A, "lora_unet_x.lora_up.weight": B * math.inf}, {}, "NaN or infinite"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(0, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 0)}, {},
     "rank 0"),
    ({"lora_unet_x.lora_down.weight": A.to(torch.int32), "lora_unet_x.lora_up.weight": B}, {},
     "must be floating-point tensors"),
    ({"unet.x.lora_A.weight": A, "unet.x.lora_B.weight": B}, {"lora_adapter_metadata": '{"unet.lora_alpha": "abc"}'},
     "should be a number, not 'abc'"),
    ({"unet.x.lora_A.weight": A, "unet.x.lora_B.weight": B}, {"lora_adapter_metadata": '{"unet.alpha_pattern": [1]}'},
     "alpha_pattern should map"),
    ({"unet.x.lora_A.weight": A, "unet.x.lora_B.weight": B},
     {"lora_adapter_metadata": '{"unet.alpha_pattern": {"(": 1}}'}, "is not a module name"),
    ({"unet.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.lora_A.weight": A,
      "unet.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.lora_B.weight": B},
     {"lora_adapter_metadata": '{"unet.alpha_pattern": {"(a|aa)+x": 1}}'}, "is not a module name"),  # ReDoS
    ({"unet.x.lora_A.weight": torch.tensor(1.0), "unet.x.lora_B.weight": B}, {}, "must be 2-D"),
])
def test_lora_files_with_bad_values(tensors, meta, words):
    with pytest.raises(CheckpointError, match=words):
        lora_state_from_tensors(tensors, meta, source="bad.safetensors")


def test_an_fp8_lora_still_loads():
    state = lora_state_from_tensors({"lora_unet_x.lora_down.weight": A.to(torch.float8_e4m3fn),
                                     "lora_unet_x.lora_up.weight": B}, source="fp8.safetensors")
    assert state.unet["lora_unet_x"].rank == 2


@pytest.fixture(scope="module")
def lora_file(tiny, tmp_path_factory) -> Path:
    from estable.nn.lora import inject_lora

    model = load_model(tiny)
    layers = inject_lora(model.unet, rank=2, alpha=2.0)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.01)
    out = tmp_path_factory.mktemp("lora") / "small.safetensors"
    save_lora(out, model.unet)
    return out


def test_a_lora_weight_that_overflows_is_named_and_undone(tiny, lora_file):
    from estable.extra_networks import LoRASpec, LoRAStack

    model = load_model(tiny)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    stack = LoRAStack(model.unet, model.text_encoder)
    with pytest.raises(EstableError, match="at weight 1e\\+300 makes the weights of .* overflow"):
        stack.activate([LoRASpec(lora_file, te=1e300, unet=1e300)])
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_a_lora_naming_one_module_twice_is_refused(tiny):
    from estable.checkpoints.lora_format import apply_lora
    from estable.nn.lora import lora_modules

    model = load_model(tiny)
    down, up = torch.full((2, 4, 3, 3), 0.1), torch.full((32, 2, 1, 1), 0.1)
    tensors = {}
    for name in ("lora_unet_conv_in", "lora_unet_input_blocks_0_0"):  # conv_in, in diffusers and in LDM naming
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    state = lora_state_from_tensors(tensors, source="twice.safetensors")
    with pytest.raises(CheckpointError, match=r"lora_unet_conv_in and lora_unet_input_blocks_0_0 are the same U-Net "
                                              r"module \(conv_in\)"):  # one of the two was silently dropped
        apply_lora(model.unet, None, state)
    assert not lora_modules(model.unet)


def test_a_lora_or_a_vae_on_an_int8_model_is_named_as_such(tiny, lora_file, tmp_path, capsys):
    from estable.nn.int8 import quantize_model

    model = load_model(tiny)
    for net in (model.unet, model.vae, model.text_encoder):
        quantize_model(net)
    q = save_model(model, tmp_path / "q.safetensors", to="estable")
    vae = {k.removeprefix("vae."): v for k, v in read_safetensors(tiny)[0].items() if k.startswith("vae.")}
    write_safetensors(tmp_path / "vae.safetensors", vae)
    # both were "made for a different model" / "46 missing: …weight_scale": the file is fine, the model is int8
    for flag, path, words in (("--lora", lora_file, "U-Net is quantised to int8"),
                              ("--vae", tmp_path / "vae.safetensors", "VAE is quantised to int8")):
        code, err = run_cli(capsys, "generate", "a red circle", "--model", q, flag, path, *GEN,
                            "--out", tmp_path / "o.png")
        assert code == 2 and words in err and "different model" not in err and "missing" not in err
    assert not (tmp_path / "o.png").exists()


def test_nan_latents_name_the_lora_or_vae_in_use(tiny, lora_file, tmp_path, capsys):
    tensors, meta = read_safetensors(lora_file)
    for k in tensors:
        if k.endswith(".alpha"):
            tensors[k] = torch.tensor(-1e30)  # finite, but the merged weights make NaN latents
    write_safetensors(tmp_path / "wild.safetensors", tensors, meta)
    code, err = run_cli(capsys, "generate", "a red circle", "--model", tiny, "--lora", tmp_path / "wild.safetensors",
                        *GEN, "--out", tmp_path / "o.png")
    assert code == 2 and "NaN" in err and "a LoRA in use (wild)" in err
    vae = {k.removeprefix("vae."): v for k, v in read_safetensors(tiny)[0].items() if k.startswith("vae.")}
    vae["decoder.conv_in.weight"] = torch.full_like(vae["decoder.conv_in.weight"], math.nan)
    write_safetensors(tmp_path / "nanvae.safetensors", vae)
    code, err = run_cli(capsys, "generate", "a red circle", "--model", tiny, "--vae", tmp_path / "nanvae.safetensors",
                        *GEN, "--out", tmp_path / "o.png")
    assert code == 2 and "the VAE file may be corrupt" in err and "nanvae.safetensors" in err


# ------------------------------------------------------------------------------------------------ ControlNets


@pytest.mark.parametrize("text,words", [("[1]", "should hold a JSON object"), (DEEP, "nested too deeply")])
def test_a_controlnet_config_that_is_not_an_object(tmp_path, text, words):
    from estable.checkpoints.controlnet_format import read_controlnet

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=words):
        read_controlnet(tmp_path)


def test_nan_latents_name_the_controlnet_in_use(tiny):
    from estable import GenerationParams, load_pipeline
    from estable.control.guidance import ControlUnit
    from estable.models.controlnet import ControlNet

    pipe = load_pipeline(tiny, device="cpu", dtype="fp32")
    net = ControlNet.from_unet(pipe.unet).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("controlnet_mid_block"):
                p.fill_(math.nan)  # a broken file: the residual it adds to the mid block is NaN
    params = GenerationParams(prompt="a red circle", steps=2, seed=1, width=32, height=32)
    unit = ControlUnit(net=net, image=Image.new("RGB", (32, 32)), name="broken-edges")
    with pytest.raises(EstableError, match=r"a ControlNet in use \(broken-edges\) may be corrupt"):
        pipe.txt2img(params, control=[unit])
    assert pipe.txt2img(params).images  # the same pipeline without it draws


def test_a_controlnet_reading_four_channel_hints_is_named(tiny):
    from estable import GenerationParams, load_pipeline
    from estable.control.guidance import ControlUnit
    from estable.models.controlnet import ControlNet

    pipe = load_pipeline(tiny, device="cpu", dtype="fp32")
    net = ControlNet.from_unet(pipe.unet)
    net = ControlNet(net.config.replace(conditioning_channels=4)).eval()  # diffusers allows any number
    params = GenerationParams(prompt="a red circle", steps=1, seed=1, width=32, height=32)
    unit = ControlUnit(net=net, image=Image.new("RGB", (32, 32)), name="rgba-hints")
    with pytest.raises(EstableError, match="ControlNet rgba-hints reads 4-channel control images"):  # a ValueError
        pipe.txt2img(params, control=[unit])


@pytest.mark.parametrize("sample_size,side", [(100_000, 400_000), (7, 28)])
def test_a_wild_sample_size_does_not_set_an_impossible_default_size(tiny_diffusers, tmp_path, capsys, sample_size,
                                                                    side):
    folder = _copy(tiny_diffusers, tmp_path)
    _edit_json(folder / "unet" / "config.json", sample_size=sample_size)
    args = ["generate", "a red circle", "--model", folder, "--steps", "1", "--device", "cpu", "--seed", "1"]
    # 100000 tried to allocate 160 GB of noise (a traceback); 7 said "the autoencoder downsamples by 8" (it is 4)
    code, err = run_cli(capsys, *args, "--out", tmp_path / "o.png")
    assert code == 2 and f"default size of {side}x{side} (sample_size {sample_size} × 4)" in err and "--size" in err
    assert run_cli(capsys, *args, "--size", "32", "--out", tmp_path / "o.png")[0] == 0


def test_a_header_of_too_many_tensors_is_refused_at_once(tmp_path):
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(250_000)})
    path = tmp_path / "many.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode())
    with _within(20), pytest.raises(CheckpointError, match="lists 250,000 tensors"):
        read_safetensors_header(path)


def test_two_embeddings_of_one_name_are_warned_about(tiny, tmp_path, capsys, caplog):
    """Files are named by their stem, so sub/glow.safetensors and glow.safetensors are one word: the first found is
    used, as before, and the user now hears which one and which not."""
    from estable.embeddings import save_embedding

    root = tmp_path / "emb"
    (root / "sub").mkdir(parents=True)
    save_embedding(root / "sub" / "glow.safetensors", torch.zeros(1, 32))
    save_embedding(root / "glow.safetensors", torch.ones(1, 32))
    save_embedding(root / "other.safetensors", torch.ones(1, 32))
    code, err = run_cli(capsys, "generate", "a glow circle", "--model", tiny, *GEN, "--embeddings-dir", root,
                        "--out", tmp_path / "o.png")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("estable: warning: embedding")]
    assert warnings == [f"estable: warning: embedding 'glow' is {root / 'glow.safetensors'}; "
                        f"{root / 'sub' / 'glow.safetensors'} of the same name not used"], err

    import logging

    from estable.server.extras import Networks
    from estable.server.settings import ServerSettings

    with caplog.at_level(logging.WARNING, logger="estable.server"):  # the server says it in its log
        Networks(ServerSettings(embeddings_dir=root))
    assert [r.getMessage() for r in caplog.records] == [warnings[0].removeprefix("estable: warning: ")]
