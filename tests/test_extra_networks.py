"""LoRAs at generation time: A1111 prompt tags, --lora, several at once, infotext hashes, and pixel parity with
diffusers' ``load_lora_weights`` (PEFT) on a tiny random SD pipeline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from estable import GenerationParams, load_pipeline
from estable.checkpoints.io import write_safetensors
from estable.checkpoints.lora_format import kohya_name
from estable.cli import main
from estable.errors import CheckpointError, EstableError
from estable.extra_networks import (
    LoRASpec,
    addnet_hash,
    find_lora,
    lora_hashes_text,
    negative_prompt_tags,
    parse_lora_arg,
    parse_prompt_networks,
)
from estable.provenance.infotext import parse_infotext, read_png_metadata

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_pipeline import SIZE, _clip_tokenizer, _liven, _unet  # noqa: E402

STEPS = 5
CFG = 6.0
SEED = 321
PROMPT = "a red cube on a blue floor, studio light"
NEGATIVE = "blurry"


# ------------------------------------------------------------------------------------------------ prompt tags


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("a cat <lora:x:0.5>", "a cat ", [("x", 0.5, 0.5)]),
        # the tag alone is cut out, commas stay (A1111 encodes them)
        ("a cat, <lora:ink_v2:0.6>, sketch <lora:Film Grain>", "a cat, , sketch ",
         [("ink_v2", 0.6, 0.6), ("Film Grain", 1.0, 1.0)]),
        ("<lora:a:-1>portrait <lyco:b:1.2:0.4>", "portrait ", [("a", -1.0, -1.0), ("b", 1.2, 0.4)]),
        ("x <lora:c:te=0.3:unet=0.9>", "x ", [("c", 0.3, 0.9)]),
        ("x <lora:c:0.7:unet=0>", "x ", [("c", 0.7, 0.0)]),
        ("plain prompt, (no:1.2) tags", "plain prompt, (no:1.2) tags", []),
    ],
)
def test_parse_prompt_networks(prompt, text, tags):
    clean, found = parse_prompt_networks(prompt)
    assert clean == text
    assert [(t.name, t.te, t.unet) for t in found] == tags


def test_parse_prompt_network_errors():
    for bad, match in (("<lora:x:strong>", "not a number"), ("<hypernet:h:1>", "not supported"),
                       ("<lora:x:1:1:8>", "dyn"), ("<lora:x:dyn=8>", "dyn"), ("<lora: :1>", "no LoRA name")):
        with pytest.raises(EstableError, match=match):
            parse_prompt_networks(f"a cat {bad}")
    assert negative_prompt_tags("ugly <lora:x:1>, <hypernet:y>") == ["<lora:x:1>"]


def test_lora_arg_and_lookup(tmp_path):
    root = tmp_path / "loras"
    (root / "styles").mkdir(parents=True)
    write_safetensors(root / "styles" / "Ink.safetensors", {"lora_unet_a.alpha": torch.tensor(1.0)},
                      {"ss_output_name": "inkAlias"})
    (root / "old.pt").write_bytes(b"x")
    spec = parse_lora_arg(f"{root / 'styles' / 'Ink.safetensors'}:0.25")
    assert spec.te == spec.unet == 0.25 and spec.name == "Ink"
    assert parse_lora_arg(str(root / "styles" / "Ink.safetensors")).te == 1.0
    with pytest.raises(EstableError, match="no such file"):
        parse_lora_arg(str(root / "nope.safetensors:0.5"))
    with pytest.raises(EstableError, match="safetensors files only"):
        parse_lora_arg(str(root / "old.pt"))
    target = root / "styles" / "Ink.safetensors"
    assert find_lora("Ink", root) == target and find_lora("ink", root) == target
    assert find_lora("inkAlias", root) == target
    with pytest.raises(EstableError, match="safetensors only"):
        find_lora("old", root)
    with pytest.raises(EstableError, match="LoRAs there: Ink"):
        find_lora("missing", root)
    with pytest.raises(EstableError, match="--lora-dir"):
        find_lora("Ink", None)
    # a tag is a name, never a path or a pattern: nothing outside the folder is found or named
    (tmp_path / "secret.pt").write_bytes(b"x")
    for name in ("../secret", "*", "**/old"):
        with pytest.raises(EstableError, match=r"no .*\.safetensors under") as err:
            find_lora(name, root)
        assert "secret" not in str(err.value).replace(name, "") and "old.pt" not in str(err.value)


def test_addnet_hash_and_infotext_value(tmp_path):
    """A1111's LoRA hash: SHA-256 of the bytes after the safetensors header; metadata changes leave it alone."""
    t = {"lora_unet_a.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    write_safetensors(tmp_path / "a.safetensors", t, {"note": "one"})
    write_safetensors(tmp_path / "b.safetensors", t, {"note": "two, longer"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    want = hashlib.sha256(raw[8 + n:]).hexdigest()
    assert addnet_hash(tmp_path / "a.safetensors") == want == addnet_hash(tmp_path / "b.safetensors")
    assert want != hashlib.sha256(raw).hexdigest()
    write_safetensors(tmp_path / "c.safetensors", t, {"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert addnet_hash(tmp_path / "c.safetensors") == ("abcdef0123456789" * 4)
    specs = [LoRASpec(tmp_path / "a.safetensors", name="my:style,v2"), LoRASpec(tmp_path / "c.safetensors")]
    assert lora_hashes_text(specs) == f"mystylev2: {want[:12]}, c: abcdef012345"
    assert lora_hashes_text([]) is None


# ------------------------------------------------------------------------------------------ tiny SD pipeline


def make_tiny_sd(root: Path) -> Path:
    """A tiny random SD 1.x-shaped pipeline (Euler scheduler) saved by diffusers into ``root/sd``."""
    tok = _clip_tokenizer(root / "vocab")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = _unet(4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32, layers_per_block=1,
        sample_size=SIZE,
    )
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    _liven(unet, vae, text)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1)
    diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("lora_sd"))


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder, device="cpu", dtype="fp32")


def _random_kohya_lora(pipe, path: Path, seed: int, *, rank: int = 4, alpha: float = 2.0, gain: float = 1.0) -> Path:
    """Random kohya-named LoRA over the U-Net's attention / feed-forward / proj layers, two LoCon 3×3
    convolutions, and the text encoder's attention and MLP (every layer kohya's LoRA + LoCon trains)."""
    g = torch.Generator().manual_seed(seed)
    targets = [("unet", pipe.unet, n, m) for n, m in pipe.unet.named_modules()
               if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out"))
               or n in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2")]
    targets += [("text_encoder", pipe.text_encoder, n, m) for n, m in pipe.text_encoder.named_modules()
                if n.endswith(("q_proj", "v_proj", "out_proj", "mlp.fc1"))]
    tensors = {}
    for component, _, name, module in targets:
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) / fan_in**0.5
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * gain
        else:
            down = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=g) * gain
        key = kohya_name(component, name)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora"})
    return path


def _params(**kw) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="euler", steps=STEPS, cfg_scale=CFG, seed=SEED,
                width=SIZE, height=SIZE)
    return GenerationParams(**{**base, **kw})


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


def _theirs(folder, loras: list[tuple[Path, float]]) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for k, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{k}")
        names.append(f"l{k}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                   width=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images
    return (out * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def lora_files(ours, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    (root / "sub").mkdir()
    return {"ink": _random_kohya_lora(ours, root / "ink.safetensors", 1),
            "grain": _random_kohya_lora(ours, root / "sub" / "grain.safetensors", 2, rank=2, alpha=3.0)}


def test_lora_parity_with_diffusers(folder, ours, lora_files):
    """One LoRA at 0.8, then two at once (0.8 and −0.6): the same pixels as diffusers + PEFT (≤ 1 level)."""
    base = _pixels(ours.txt2img(_params()))
    for loras in ([(lora_files["ink"], 0.8)], [(lora_files["ink"], 0.8), (lora_files["grain"], -0.6)]):
        ours.loras = [LoRASpec(p, te=w, unet=w) for p, w in loras]
        try:
            got = _pixels(ours.txt2img(_params()))
        finally:
            ours.loras = []
        ref = _theirs(folder, loras)
        assert ref.std() > 5
        assert np.abs(ref - got).max() <= 1, f"{len(loras)} LoRA(s): {np.abs(ref - got).max()} levels"
        assert np.abs(base - got).max() > 20  # the LoRA matters far more than the tolerance
    # taken out again: the base model, bit for bit
    assert np.array_equal(_pixels(ours.txt2img(_params())), base)


def test_prompt_tags_equal_flags_and_record_hashes(ours, lora_files, tmp_path):
    ours.lora_dir = lora_files["ink"].parent
    try:
        tagged = ours.txt2img(_params(prompt=f"{PROMPT} <lora:ink:0.5><lora:grain:te=0.3:unet=-0.4>"))
    finally:
        ours.lora_dir = None
    ours.loras = [LoRASpec(lora_files["ink"], te=0.5, unet=0.5), LoRASpec(lora_files["grain"], te=0.3, unet=-0.4)]
    try:
        flagged = ours.txt2img(_params())
    finally:
        ours.loras = []
    assert np.array_equal(_pixels(tagged), _pixels(flagged))  # the tag text is not encoded
    info = parse_infotext(tagged.infotexts[0])
    assert info["prompt"].endswith("<lora:grain:te=0.3:unet=-0.4>")  # the prompt as written, as A1111 keeps it
    h1, h2 = addnet_hash(lora_files["ink"])[:12], addnet_hash(lora_files["grain"])[:12]
    assert info["params"]["Lora hashes"] == f"ink: {h1}, grain: {h2}"
    assert f'Lora hashes: "ink: {h1}, grain: {h2}"' in tagged.infotexts[0]
    rec = tagged.records[0]["loras"]
    assert [(r["name"], r["te"], r["unet"], r["source"]) for r in rec] == [
        ("ink", 0.5, 0.5, "prompt"), ("grain", 0.3, -0.4, "prompt")]
    assert "Lora hashes" not in ours.txt2img(_params(steps=1)).infotexts[0]


def test_lora_for_another_model_lists_its_modules(ours, tmp_path):
    path = tmp_path / "other.safetensors"
    write_safetensors(path, {
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2),
    })
    before = {k: v.clone() for k, v in ours.text_encoder.state_dict().items()}
    ours.loras = [LoRASpec(path)]
    try:
        with pytest.raises(CheckpointError, match="lora_unet_down_blocks_7_attentions_0_proj_in"):
            ours.txt2img(_params(steps=1))
    finally:
        ours.loras = []
    after = ours.text_encoder.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_lora_flags_and_from_png(folder, lora_files, tmp_path, capsys):
    out = tmp_path / "a.png"
    code = main(["generate", f"{PROMPT} <lora:grain:0.7>", "--model", str(folder), "--device", "cpu",
                 "--steps", "2", "--seed", "5", "--size", f"{SIZE}x{SIZE}", "--sampler", "euler",
                 "--lora", f"{lora_files['ink']}:0.5", "--lora-dir", str(lora_files["ink"].parent),
                 "--negative", "bad <lora:ink:1>", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "negative prompt are not applied" in err
    text, record = read_png_metadata(out)
    assert parse_infotext(text)["params"]["Lora hashes"].startswith("ink: ")
    assert [(r["name"], r["source"]) for r in record["loras"]] == [("ink", "flag"), ("grain", "prompt")]
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(_pixels([_open(out)]), _pixels([_open(again)]))
    assert json.loads(json.dumps(read_png_metadata(again)[1]["loras"])) == record["loras"]
    code = main(["generate", "x <lora:nothing:1>", "--model", str(folder), "--lora-dir", str(tmp_path),
                 "--out", str(tmp_path / "c.png")])
    assert code == 2 and "no nothing.safetensors" in capsys.readouterr().err


def _open(path: Path):
    from PIL import Image

    return Image.open(path)


def test_diffusers_saved_peft_file_equals_the_kohya_file(folder, ours, lora_files, tmp_path):
    """The kohya LoRA loaded by diffusers and saved again with its save_lora_weights (PEFT naming, α in the
    lora_adapter_metadata): Estable reads both files as the same LoRA, pixel for pixel."""
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                             requires_safety_checker=False)
    kohya = lora_files["ink"]
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name="ink")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="ink"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="ink"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["ink"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["ink"].to_dict(), safe_serialization=True)
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    images = []
    for path in (kohya, peft_file):
        ours.loras = [LoRASpec(path, te=0.8, unet=0.8)]
        try:
            images.append(_pixels(ours.txt2img(_params(steps=3))))
        finally:
            ours.loras = []
    assert np.abs(images[0] - images[1]).max() <= 1
    assert np.abs(images[0] - _pixels(ours.txt2img(_params(steps=3)))).max() > 20
