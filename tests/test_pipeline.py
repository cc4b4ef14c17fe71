"""Pixel parity of estable's generation pipeline with diffusers' (the oracle), on tiny random-weight models.

A tiny SD-shaped model (U-Net with cross-attention, 4-level KL autoencoder so latents are H/8, a 2-layer CLIP text
encoder over CLIP's real 49,408-token vocabulary) is saved by diffusers' own ``save_pretrained``; Estable loads the
folder with ``load_pipeline`` and must produce the same PNG pixels (≤ 1/255 per channel) as diffusers'
StableDiffusionPipeline / Img2Img / Inpaint pipelines for the same prompt, negative prompt, seed (a list of CPU
generators, which is what Estable's seeding equals), steps, guidance and sampler, for ε- and v-prediction.
The sensitivity checks show that a changed seed or sampler moves pixels far more than the tolerance.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_oracle import write_clip_vocab
from estable import GenerationParams, load_pipeline
from estable.errors import EstableError
from estable.pipeline import Pipeline, params_from_record, save_result
from estable.provenance.infotext import parse_infotext, read_png_metadata

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # pixels; latents 8×8
STEPS = 6
CFG = 6.0
SEED = 1234
PROMPT = "a red cube on a blue floor, studio light"
NEGATIVE = "blurry, low quality"
TOL = 1  # max |Δ| in 8-bit pixel levels

# our sampler name -> (diffusers scheduler class, extra from_config kwargs)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
# The rest of the registry, checked for txt2img too (cheap at this size).
MORE_SAMPLERS = {
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
PREDICTIONS = ("epsilon", "v_prediction")
MEASURED: dict[str, int] = {}  # case -> max pixel difference, printed at the end (pytest -s)


# ------------------------------------------------------------------------------------------------ fixtures


def _clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer on vocab.json / merges.txt built from CLIP's published BPE file."""
    write_clip_vocab(folder)
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _unet(in_channels: int):
    return diffusers.UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=32,
    )


# Cross-attention gains: with default init the 77 mostly-padding tokens average out and the prompt barely moves
# the image; sharper keys and larger values make the text matter (see test_parity_test_is_sensitive).
CROSS_ATTENTION_GAIN = {"attn2.to_k.weight": 5.0, "attn2.to_v.weight": 5.0, "attn2.to_out.0.weight": 3.0}


def _liven(*modules: torch.nn.Module) -> None:
    """Non-trivial norm affines (a swapped weight/bias would show) and a text conditioning that matters."""
    with torch.no_grad():
        for m in modules:
            for sub in m.modules():
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    sub.weight.normal_(1.0, 0.2)
                    sub.bias.normal_(0.0, 0.2)
            for name, p in m.named_parameters():
                for suffix, gain in CROSS_ATTENTION_GAIN.items():
                    if name.endswith(suffix):
                        p.mul_(gain)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """diffusers-saved folders: 'epsilon', 'v_prediction' (same weights) and 'inpaint' (9-channel U-Net)."""
    root = tmp_path_factory.mktemp("pipeline_models")
    tok = _clip_tokenizer(root / "vocab")
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
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False,
    )
    common = dict(vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    out = {"epsilon": root / "eps", "v_prediction": root / "v", "inpaint": root / "inpaint"}
    diffusers.StableDiffusionPipeline(unet=unet, **common).save_pretrained(out["epsilon"])
    torch.manual_seed(1)
    unet9 = _unet(9)
    _liven(unet9)
    diffusers.StableDiffusionInpaintPipeline(unet=unet9, **common).save_pretrained(out["inpaint"])
    shutil.copytree(out["epsilon"], out["v_prediction"])
    for name, prediction in (("epsilon", "epsilon"), ("v_prediction", "v_prediction"), ("inpaint", "epsilon")):
        # As SD's own scheduler_config.json: clip_sample false (DDIM would otherwise clip x0 to [-1, 1]).
        path = out[name] / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": False,
                                    "prediction_type": prediction}))
    return out


@pytest.fixture(scope="session")
def ours(folders) -> dict[str, Pipeline]:
    return {name: load_pipeline(path, device="cpu", dtype="fp32") for name, path in folders.items()}


@pytest.fixture(scope="session")
def theirs(folders):
    """diffusers pipelines read back from the same folders (offline)."""
    kw = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False)
    out = {}
    for name in ("epsilon", "v_prediction"):
        out[name] = diffusers.StableDiffusionPipeline.from_pretrained(folders[name], **kw)
    out["inpaint"] = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folders["inpaint"], **kw)
    for p in out.values():
        p.set_progress_bar_config(disable=True)
        p.saved_scheduler_config = dict(p.scheduler.config)
    return out


@pytest.fixture(scope="session")
def init_image() -> Image.Image:
    """A deterministic 64×64 picture: gradients plus a bright square and a dark disc."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    rgb = np.stack([x, y, 1 - 0.5 * (x + y)], axis=-1) * 200 + 20
    rgb[10:30, 34:54] = [250, 240, 60]
    rgb[((x - 0.3) ** 2 + (y - 0.7) ** 2) < 0.02] = [15, 30, 120]
    return Image.fromarray(rgb.round().astype(np.uint8))


@pytest.fixture(scope="session")
def mask_image() -> Image.Image:
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[16:48, 8:40] = 255  # white = repaint
    return Image.fromarray(m)


# ------------------------------------------------------------------------------------------------- helpers


def _scheduler(pipe, sampler: str, prediction: str):
    """The scheduler diffusers users build for ``sampler`` from the model's saved (PNDM) scheduler config."""
    cls_name, extra = {**SAMPLERS, **MORE_SAMPLERS}[sampler]
    cls = getattr(diffusers, cls_name)
    # The config saved with the model, not pipe.scheduler.config: that one carries the previous test's options.
    return cls.from_config(pipe.saved_scheduler_config, prediction_type=prediction, **extra)


def _derived(cls, pipe):
    """Another diffusers pipeline class over the same components."""
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    out.saved_scheduler_config = pipe.saved_scheduler_config
    return out


def _reference_pixels(pipe, sampler: str, prediction: str, **kwargs) -> np.ndarray:
    """diffusers' output as 8-bit pixels (np output rounded ×255, as its PIL conversion does). (B, H, W, 3)"""
    pipe.scheduler = _scheduler(pipe, sampler, prediction)
    seeds = kwargs.pop("seeds", [SEED])
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                      generator=gens, num_images_per_prompt=len(seeds), output_type="np", **kwargs).images
    return (images * 255).round().astype(np.uint8)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def _params(sampler: str, **kw) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=STEPS, cfg_scale=CFG, seed=SEED,
                width=SIZE, height=SIZE)
    return GenerationParams(**{**base, **kw})


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _check(case: str, ref: np.ndarray, got: np.ndarray) -> None:
    diff = _max_diff(ref, got)
    MEASURED[case] = diff
    # The comparison is meaningful only if the image has structure and is not clipped flat.
    assert ref.std() > 5 and (ref == 0).mean() < 0.5 and (ref == 255).mean() < 0.5, f"{case}: degenerate image"
    assert diff <= TOL, f"{case}: max pixel difference {diff} > {TOL}"


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler", list(SAMPLERS) + list(MORE_SAMPLERS))
def test_txt2img_parity(ours, theirs, sampler, prediction):
    ref = _reference_pixels(theirs[prediction], sampler, prediction, height=SIZE, width=SIZE)
    result = ours[prediction].txt2img(_params(sampler))
    assert result.seeds == [SEED]
    _check(f"txt2img {sampler} {prediction}", ref, _pixels(result))


# diffusers' PNDM list of timesteps repeats its second entry ([t0, t1, t1, t2, ...]: the start-up step evaluates the
# network twice); img2img slices that list at t_start, so the repeat is no longer where the start-up happens and
# the network is then evaluated at one noise level while the sample sits at the previous one. Estable enters the
# PLMS schedule at t_start as the slicing intends, so PLMS is compared only at strength 1 (no slicing).
IMG2IMG_CASES = [(s, 0.6) for s in SAMPLERS if s != "plms"] + [("plms", 1.0)]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(("sampler", "strength"), IMG2IMG_CASES)
def test_img2img_parity(ours, theirs, init_image, sampler, strength, prediction):
    pipe = _derived(diffusers.StableDiffusionImg2ImgPipeline, theirs[prediction])
    ref = _reference_pixels(pipe, sampler, prediction, image=init_image, strength=strength)
    result = ours[prediction].img2img(init_image, _params(sampler, strength=strength))
    _check(f"img2img {sampler} {prediction} s={strength}", ref, _pixels(result))


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras", "lcm"])
def test_inpaint_9_channel_parity(ours, theirs, init_image, mask_image, sampler, prediction, strength):
    ref = _reference_pixels(theirs["inpaint"], sampler, prediction, image=init_image, mask_image=mask_image,
                            strength=strength, height=SIZE, width=SIZE)
    pipe = ours["inpaint"]
    if prediction != pipe.config.schedule.prediction_type:
        schedule = pipe.config.schedule.replace(prediction_type=prediction)
        pipe.config = pipe.config.replace(schedule=schedule)
    try:
        result = pipe.inpaint(init_image, mask_image, _params(sampler, strength=strength))
    finally:
        pipe.config = pipe.model.config
    _check(f"inpaint9 {sampler} {prediction} s={strength}", ref, _pixels(result))


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m_karras"])
def test_inpaint_4_channel_parity(ours, theirs, init_image, mask_image, sampler, strength):
    pipe = _derived(diffusers.StableDiffusionInpaintPipeline, theirs["epsilon"])
    ref = _reference_pixels(pipe, sampler, "epsilon", image=init_image, mask_image=mask_image, strength=strength,
                            height=SIZE, width=SIZE)
    result = ours["epsilon"].inpaint(init_image, mask_image, _params(sampler, strength=strength))
    got = _pixels(result)
    _check(f"inpaint4 {sampler} epsilon s={strength}", ref, got)


def test_batch_list_of_generators(ours, theirs):
    """Batch of 2 (seeds SEED, SEED+1) = diffusers with a list of two generators; image 1 alone = image 1."""
    ref = _reference_pixels(theirs["epsilon"], "euler_a", "epsilon", seeds=[SEED, SEED + 1], height=SIZE, width=SIZE)
    result = ours["epsilon"].txt2img(_params("euler_a", batch_size=2))
    assert result.seeds == [SEED, SEED + 1]
    _check("txt2img euler_a epsilon batch=2", ref, _pixels(result))
    alone = ours["epsilon"].txt2img(_params("euler_a", seed=SEED + 1))
    assert _max_diff(_pixels(alone)[0], _pixels(result)[1]) <= TOL
    counted = ours["epsilon"].txt2img(_params("euler_a", batch_count=2))
    assert counted.seeds == [SEED, SEED + 1]
    assert _max_diff(_pixels(counted), _pixels(result)) <= TOL


CFG_START = 0.4  # no guidance above t = 600: the first steps of every sampler here, well away from their timesteps


def _interval_kwargs(pipe) -> dict:
    """diffusers' call options for guidance only at t <= 600: the scale is switched per step by a step-end callback.
    ("Off" is a scale of 1 + 1e-6: u + (c - u) = c, where a scale of 1 would turn the two-half batch off, and the
    pipeline cannot change its batch mid-run.)"""
    off = 1.0 + 1e-6
    limit = (1 - CFG_START) * 1000

    def switch(p, i, t, kwargs):
        later = p.scheduler.timesteps
        if i + 1 < len(later):
            p._guidance_scale = CFG if float(later[i + 1]) <= limit else off
        return kwargs

    return dict(guidance_scale=off, callback_on_step_end=switch)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_guidance_interval_parity(ours, theirs, sampler):
    """cfg_start: the conditional output alone above a timestep, as diffusers switched to scale 1 for those steps."""
    pipe = theirs["epsilon"]
    pipe.scheduler = _scheduler(pipe, sampler, "epsilon")
    gens = [torch.Generator("cpu").manual_seed(SEED)]
    with torch.no_grad():
        images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, generator=gens, height=SIZE,
                      width=SIZE, output_type="np", **_interval_kwargs(pipe)).images
    assert any(float(t) <= 600 for t in pipe.scheduler.timesteps) and float(pipe.scheduler.timesteps[0]) > 600
    ref = (images * 255).round().astype(np.uint8)
    result = ours["epsilon"].txt2img(_params(sampler, cfg_start=CFG_START))
    _check(f"txt2img {sampler} cfg_start {CFG_START}", ref, _pixels(result))
    everywhere = _pixels(ours["epsilon"].txt2img(_params(sampler)))
    assert _max_diff(everywhere, ref) > 10 * TOL  # the interval changes the image
    assert "CFG start: 0.4" in result.infotexts[0]


def test_guidance_interval_inpaint_9_channel_parity(ours, theirs, init_image, mask_image):
    pipe = theirs["inpaint"]
    pipe.scheduler = _scheduler(pipe, "ddim", "epsilon")
    gens = [torch.Generator("cpu").manual_seed(SEED)]
    with torch.no_grad():
        images = pipe(PROMPT, negative_prompt=NEGATIVE, image=init_image, mask_image=mask_image, strength=1.0,
                      num_inference_steps=STEPS, generator=gens, height=SIZE, width=SIZE, output_type="np",
                      **_interval_kwargs(pipe)).images
    ref = (images * 255).round().astype(np.uint8)
    result = ours["inpaint"].inpaint(init_image, mask_image, _params("ddim", strength=1.0, cfg_start=CFG_START))
    _check(f"inpaint9 ddim cfg_start {CFG_START}", ref, _pixels(result))
    everywhere = ours["inpaint"].inpaint(init_image, mask_image, _params("ddim", strength=1.0))
    assert _max_diff(_pixels(everywhere), ref) > 10 * TOL


def test_guidance_interval_values():
    assert _params("euler").cfg_start == 0.0
    for bad in (1.0, -0.1, float("nan"), "0.2", True):
        with pytest.raises(EstableError, match="cfg start"):
            _params("euler", cfg_start=bad)


# ------------------------------------------------------------------------------------------------- sensitivity


def test_parity_test_is_sensitive(ours, theirs):
    """What the tolerance must catch: another seed, sampler, CFG, prompt, weight, text layer, negative prompt."""
    ref = _reference_pixels(theirs["epsilon"], "dpmpp_2m_karras", "epsilon", height=SIZE, width=SIZE)
    pipe = ours["epsilon"]
    variants = {
        "seed+1": _params("dpmpp_2m_karras", seed=SEED + 1),
        "sampler euler": _params("euler"),
        "cfg 5.5": _params("dpmpp_2m_karras", cfg_scale=CFG - 0.5),
        "no negative": _params("dpmpp_2m_karras", negative_prompt=""),
        "other prompt": _params("dpmpp_2m_karras", prompt=PROMPT.replace("red", "green")),
        "emphasis": _params("dpmpp_2m_karras", prompt=PROMPT.replace("red", "(red:1.2)")),
        "clip skip 2": _params("dpmpp_2m_karras", clip_skip=2),
    }
    for label, params in variants.items():
        diff = _max_diff(ref, _pixels(pipe.txt2img(params)))
        assert diff > 10 * TOL, f"{label}: only {diff} levels away; the parity tests would not see it"


# ------------------------------------------------------------------------------------------------- behaviour


def test_metadata_round_trip(ours, tmp_path):
    pipe = ours["epsilon"]
    result = pipe.txt2img(_params("dpmpp_2m_karras", batch_size=2, seed=7))
    paths = save_result(result, tmp_path)
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"]
    text, record = read_png_metadata(paths[1])
    parsed = parse_infotext(text)
    assert parsed["prompt"] == PROMPT and parsed["negative_prompt"] == NEGATIVE
    p = parsed["params"]
    assert p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras" and p["Seed"] == "8"
    assert p["Steps"] == str(STEPS) and p["CFG scale"] == "6" and p["Size"] == f"{SIZE}x{SIZE}"
    assert p["Model hash"] == pipe.model_sha256[:10] and len(p["Model hash"]) == 10
    assert p["Version"].startswith("estable ")
    assert record["model"]["sha256"] == pipe.model_sha256
    again = params_from_record(record)
    assert again.seed == 8 and again.batch_size == 1 and again.sampler == "dpmpp_2m_karras"
    redo = pipe.txt2img(again)  # alone, where the original was made in a batch of 2: same up to rounding
    assert _max_diff(_pixels(redo)[0], np.asarray(Image.open(paths[1]).convert("RGB"))) <= TOL
    # numbering continues after the files already there
    assert [p.name for p in save_result(pipe.txt2img(_params("euler", steps=2, seed=3)), tmp_path)] == ["00002-3.png"]


def test_defaults_and_errors(ours, init_image, mask_image):
    pipe = ours["epsilon"]
    assert pipe.native_size == (SIZE, SIZE)
    result = pipe.txt2img(GenerationParams(prompt="x", steps=2, sampler="Euler a"))  # A1111 label, native size
    assert result.images[0].size == (SIZE, SIZE) and 0 <= result.seeds[0] < 2**32
    with pytest.raises(EstableError, match="unknown sampler"):
        pipe.txt2img(_params("not-a-sampler"))
    with pytest.raises(EstableError, match="multiple of 8"):
        _params("euler", width=65)
    with pytest.raises(EstableError, match="same size"):
        pipe.inpaint(init_image, mask_image.resize((32, 32)), _params("euler"))
    with pytest.raises(EstableError, match="clip skip"):
        pipe.txt2img(_params("euler", clip_skip=5))
    with pytest.raises(EstableError, match="inpaint"):
        ours["inpaint"].txt2img(_params("euler"))
    # a missing built-in model: tests/test_eval_more.py::test_default_model_absent_is_a_clear_error


def test_progress_callback_and_long_prompt(ours):
    pipe = ours["epsilon"]
    seen = []
    pipe.txt2img(_params("euler", steps=3, batch_count=2), callback=lambda i, n, x, d: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(6)]
    long_prompt = ", ".join(f"word{i}" for i in range(60))  # > 75 tokens: two windows, negative padded to two
    res = pipe.txt2img(_params("euler", steps=2, prompt=long_prompt + ", (red:1.3)"))
    assert res.images[0].size == (SIZE, SIZE)


def test_txt2img_each_matches_one_prompt_at_a_time(ours):
    """Mixed prompts (one of two 75-token windows) in shared batches give each prompt's own txt2img image."""
    pipe = ours["epsilon"]
    long_prompt = ", ".join(f"word{i}" for i in range(60))
    prompts = ["a red circle", "a blue square", long_prompt, "a red circle", "green"]
    seeds = [5, 9, 2, 6, 11]
    base = _params("dpmpp_2m_karras", steps=3)
    got = pipe.txt2img_each(prompts, seeds, base, batch=3)
    assert len(got) == 5
    for prompt, seed, image in zip(prompts, seeds, got):
        alone = pipe.txt2img(dataclasses.replace(base, prompt=prompt, seed=seed)).images[0]
        assert _max_diff(_pixels([alone]), _pixels([image])) <= 1, prompt
    # the images differ from one another: each got its own prompt and noise
    assert _max_diff(_pixels(got[:1]), _pixels(got[3:4])) > 10
    with pytest.raises(EstableError, match="one seed per prompt"):
        pipe.txt2img_each(prompts, seeds[:2], base)


def test_fp16_decode_falls_back_to_fp32(ours, monkeypatch):
    """A reduced-precision decode that gives NaN is retried in fp32 with a warning: a real image, never a black one."""
    model = copy.deepcopy(ours["epsilon"].model)
    model.vae.to(torch.bfloat16)
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    real_decode = type(model.vae).decode

    def poisoned(self, latents):  # what an fp16 overflow looks like
        out = real_decode(self, latents)
        return out * float("nan") if latents.dtype != torch.float32 else out

    monkeypatch.setattr(type(model.vae), "decode", poisoned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe.txt2img(_params("euler", steps=2))
    assert result.warnings and "float32" in result.warnings[0]
    assert any(issubclass(w.category, RuntimeWarning) and "float32" in str(w.message) for w in caught)
    assert next(model.vae.parameters()).dtype == torch.bfloat16  # back to its own dtype afterwards
    # the image is the fp32 decode of the same (bf16-rounded) weights
    reference = copy.deepcopy(model.vae).float()
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, note = pipe._decode(z)
    with torch.no_grad():
        expected = reference.decode(z / model.config.vae.scaling_factor)
    assert note and torch.isfinite(image).all() and (image - expected).abs().max() < 1e-5
    assert _pixels(result)[0].std() > 5


def test_report(request):
    """Prints the measured differences (run with -s); runs last in this file."""
    del request
    if MEASURED:
        width = max(map(len, MEASURED))
        print("\nmax pixel difference (8-bit levels) vs diffusers:")
        for case, diff in MEASURED.items():
            print(f"  {case:<{width}}  {diff}")
    assert all(v <= TOL for v in MEASURED.values())

