"""Pixel parity of ControlNet generation with diffusers' StableDiffusionControlNetPipeline (and its Img2Img and
Inpaint variants) on the tiny random-weight model of test_pipeline.py plus random-weight ControlNets: same PNG
pixels (≤ 1/255) for the same seed, weight, guess mode, start/end and several ControlNets at once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import test_pipeline as tp
from estable.checkpoints.controlnet_format import load_controlnet
from estable.control import ControlUnit
from estable.errors import EstableError
from estable.provenance.infotext import parse_infotext
from test_pipeline import SIZE, TOL, _check, _max_diff, _params, _pixels, _reference_pixels

# test_pipeline's fixtures: the tiny diffusers-saved models and the pipelines on both sides
folders, ours, theirs, init_image, mask_image = tp.folders, tp.ours, tp.theirs, tp.init_image, tp.mask_image

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_controlnet(unet, seed: int):
    """diffusers' ControlNet copied from the U-Net, its zero convolutions made random so that it steers — gently
    enough that its scale and the guidance still show in the image (test_controlnet_parity_test_is_sensitive; at 10×
    these weights it drowned both)."""
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.08 if p.ndim > 1 else 0.03))
    return cn.eval()


@pytest.fixture(scope="module")
def nets(theirs, ours, tmp_path_factory):
    """Two ControlNets: (diffusers model, Estable model) pairs, Estable's loaded from the saved diffusers folder."""
    root = tmp_path_factory.mktemp("controlnets")
    out = []
    for k in range(2):
        cn = _random_controlnet(theirs["epsilon"].unet, seed=10 + k)
        cn.save_pretrained(root / f"cn{k}")
        mine = load_controlnet(root / f"cn{k}", base=ours["epsilon"].config.unet).model
        out.append((cn, mine))
    return out


@pytest.fixture(scope="module")
def control_images():
    """Two control pictures: white strokes on black (an edge map) and a blocky colour map."""
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[8:10, 4:60] = 255
    a[20:56, 30:32] = 255
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    a[np.abs(np.hypot(yy - 40, xx - 16) - 10) < 1] = 255
    b = np.zeros((SIZE, SIZE, 3), np.uint8)
    b[:32, :32] = (200, 30, 30)
    b[32:, 20:] = (30, 200, 60)
    return Image.fromarray(a), Image.fromarray(b)


def _pipe(cls, base, controlnet):
    comps = {k: v for k, v in base.components.items() if k != "controlnet"}
    out = cls(**comps, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    out.saved_scheduler_config = base.saved_scheduler_config
    return out


def _units(nets, images, which, **kw):
    per = {k: (v if isinstance(v, list) else [v] * len(which)) for k, v in kw.items()}
    return [ControlUnit(net=nets[i][1], image=images[i], **{k: v[j] for k, v in per.items()})
            for j, i in enumerate(which)]


def _diffusers_args(nets, images, which, scale, start, end, guess):
    multi = len(which) > 1
    nets_ = [nets[i][0] for i in which]
    controlnet = diffusers.MultiControlNetModel(nets_) if multi else nets_[0]
    pick = (lambda v: v) if multi else (lambda v: v[0])
    args = dict(controlnet_conditioning_scale=pick(scale), control_guidance_start=pick(start),
                control_guidance_end=pick(end), guess_mode=guess)
    return controlnet, [images[i] for i in which] if multi else images[which[0]], args


CASES = {
    # name: (sampler, which nets, scales, starts, ends, guess mode)
    "one dpmpp_2m_karras": ("dpmpp_2m_karras", [0], [0.8], [0.0], [1.0], False),
    "one euler_a window": ("euler_a", [0], [1.0], [0.2], [0.7], False),
    "one heun window": ("heun", [1], [1.3], [0.0], [0.6], False),
    "one plms window": ("plms", [0], [0.9], [0.3], [1.0], False),
    "guess mode ddim": ("ddim", [0], [1.0], [0.0], [1.0], True),
    "two nets": ("euler", [0, 1], [0.7, 1.2], [0.0, 0.25], [0.8, 1.0], False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_txt2img_controlnet_parity(ours, theirs, nets, control_images, case):
    sampler, which, scale, start, end, guess = CASES[case]
    controlnet, image, args = _diffusers_args(nets, control_images, which, scale, start, end, guess)
    pipe = _pipe(diffusers.StableDiffusionControlNetPipeline, theirs["epsilon"], controlnet)
    ref = _reference_pixels(pipe, sampler, "epsilon", image=image, height=SIZE, width=SIZE, **args)
    units = _units(nets, control_images, which, scale=scale, start=start, end=end, guess_mode=guess)
    got = _pixels(ours["epsilon"].txt2img(_params(sampler), control=units))
    _check(f"controlnet txt2img {case}", ref, got)
    plain = _pixels(ours["epsilon"].txt2img(_params(sampler)))
    assert _max_diff(plain, got) > 10 * TOL, "the ControlNet does not change the image: the test would not see it"


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_img2img_controlnet_parity(ours, theirs, nets, control_images, init_image, sampler):
    controlnet, image, args = _diffusers_args(nets, control_images, [0], [0.9], [0.0], [0.8], False)
    pipe = _pipe(diffusers.StableDiffusionControlNetImg2ImgPipeline, theirs["epsilon"], controlnet)
    ref = _reference_pixels(pipe, sampler, "epsilon", image=init_image, control_image=image, strength=0.7,
                            height=SIZE, width=SIZE, **args)
    units = _units(nets, control_images, [0], scale=0.9, end=0.8)
    got = _pixels(ours["epsilon"].img2img(init_image, _params(sampler, strength=0.7), control=units))
    _check(f"controlnet img2img {sampler}", ref, got)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_controlnet_parity(ours, theirs, nets, control_images, init_image, mask_image, strength):
    controlnet, image, args = _diffusers_args(nets, control_images, [1], [1.1], [0.0], [1.0], False)
    pipe = _pipe(diffusers.StableDiffusionControlNetInpaintPipeline, theirs["epsilon"], controlnet)
    ref = _reference_pixels(pipe, "euler", "epsilon", image=init_image, mask_image=mask_image, control_image=image,
                            strength=strength, height=SIZE, width=SIZE, **args)
    units = _units(nets, control_images, [1], scale=1.1)
    got = _pixels(ours["epsilon"].inpaint(init_image, mask_image, _params("euler", strength=strength), control=units))
    _check(f"controlnet inpaint4 s={strength}", ref, got)


def test_metadata_and_errors(ours, nets, control_images):
    pipe = ours["epsilon"]
    unit = ControlUnit(net=nets[0][1], image=control_images[0], scale=0.5, start=0.1, kind="canny", name="cn0",
                       sha256="ab" * 32, image_source="edges.png")
    result = pipe.txt2img(_params("euler", steps=2), control=[unit])
    fields = parse_infotext(result.infotexts[0])["params"]
    assert fields["ControlNet 0"] == ("Module: canny, Model: cn0 [abababab], Weight: 0.5, Guidance Start: 0.1, "
                                      "Guidance End: 1")
    rec = result.records[0]["control"][0]
    assert rec["type"] == "canny" and rec["scale"] == 0.5 and rec["image"] == "edges.png"
    with pytest.raises(EstableError, match="start < end"):
        pipe.txt2img(_params("euler", steps=2), control=[dataclasses.replace(unit, start=0.9, end=0.5)])
    with pytest.raises(EstableError, match="weight"):
        pipe.txt2img(_params("euler", steps=2), control=[dataclasses.replace(unit, scale=-1)])
    # a weight of 0 (or a window that no step falls in) is the uncontrolled image
    off = pipe.txt2img(_params("euler", steps=2), control=[dataclasses.replace(unit, scale=0.0)])
    assert _max_diff(_pixels(off), _pixels(pipe.txt2img(_params("euler", steps=2)))) == 0


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_9_channel_controlnet_parity(ours, theirs, nets, control_images, init_image, mask_image, strength):
    """An inpainting U-Net (9 input channels) with a ControlNet that reads the 4 latent channels only."""
    controlnet, image, args = _diffusers_args(nets, control_images, [0], [1.0], [0.0], [0.9], False)
    base = theirs["inpaint"]
    pipe = _pipe(diffusers.StableDiffusionControlNetInpaintPipeline, base, controlnet)
    ref = _reference_pixels(pipe, "ddim", "epsilon", image=init_image, mask_image=mask_image, control_image=image,
                            strength=strength, height=SIZE, width=SIZE, **args)
    units = _units(nets, control_images, [0], end=0.9)
    got = _pixels(ours["inpaint"].inpaint(init_image, mask_image, _params("ddim", strength=strength), control=units))
    _check(f"controlnet inpaint9 s={strength}", ref, got)
    plain = _pixels(ours["inpaint"].inpaint(init_image, mask_image, _params("ddim", strength=strength)))
    assert _max_diff(plain, got) > 10 * TOL


def test_batch_of_two_controlnet_parity(ours, theirs, nets, control_images):
    """Two images in one batch (seeds SEED, SEED+1): the control image goes with each, as in diffusers."""
    controlnet, image, args = _diffusers_args(nets, control_images, [0], [0.9], [0.0], [1.0], False)
    pipe = _pipe(diffusers.StableDiffusionControlNetPipeline, theirs["epsilon"], controlnet)
    ref = _reference_pixels(pipe, "euler_a", "epsilon", image=image, height=SIZE, width=SIZE,
                            seeds=[tp.SEED, tp.SEED + 1], **args)
    units = _units(nets, control_images, [0], scale=0.9)
    got = _pixels(ours["epsilon"].txt2img(_params("euler_a", batch_size=2), control=units))
    _check("controlnet txt2img euler_a batch=2", ref, got)


def test_control_image_of_another_size_is_resized_as_diffusers_does(ours, theirs, nets, control_images):
    big = control_images[0].resize((96, 80), Image.Resampling.NEAREST)
    pipe = _pipe(diffusers.StableDiffusionControlNetPipeline, theirs["epsilon"], nets[0][0])
    ref = _reference_pixels(pipe, "euler", "epsilon", image=big, height=SIZE, width=SIZE)
    got = _pixels(ours["epsilon"].txt2img(_params("euler"), control=[ControlUnit(net=nets[0][1], image=big)]))
    _check("controlnet txt2img resized control image", ref, got)


def test_guidance_interval_controlnet_parity(ours, theirs, nets, control_images):
    """cfg_start with a ControlNet: above t = 600 the cond half of the full call, as diffusers with its scale switched
    per step (test_pipeline._interval_kwargs)."""
    controlnet, image, args = _diffusers_args(nets, control_images, [0], [0.8], [0.0], [1.0], False)
    pipe = _pipe(diffusers.StableDiffusionControlNetPipeline, theirs["epsilon"], controlnet)
    pipe.scheduler = tp._scheduler(pipe, "dpmpp_2m_karras", "epsilon")
    with torch.no_grad():
        images = pipe(tp.PROMPT, negative_prompt=tp.NEGATIVE, image=image, num_inference_steps=tp.STEPS,
                      generator=[torch.Generator("cpu").manual_seed(tp.SEED)], height=SIZE, width=SIZE,
                      output_type="np", **args, **tp._interval_kwargs(pipe)).images
    ref = (images * 255).round().astype(np.uint8)
    units = _units(nets, control_images, [0], scale=[0.8], start=[0.0], end=[1.0], guess_mode=False)
    got = _pixels(ours["epsilon"].txt2img(_params("dpmpp_2m_karras", cfg_start=tp.CFG_START), control=units))
    _check("controlnet txt2img cfg_start", ref, got)
    everywhere = _pixels(ours["epsilon"].txt2img(_params("dpmpp_2m_karras"), control=units))
    assert _max_diff(everywhere, got) > 10 * TOL


def test_controlnet_parity_test_is_sensitive(ours, nets, control_images):
    """What the parity tests must see: the ControlNet, its scale and the guidance each move the image."""
    def run(scale, **kw):
        units = _units(nets, control_images, [0], scale=[scale], start=[0.0], end=[1.0], guess_mode=False)
        return _pixels(ours["epsilon"].txt2img(_params("dpmpp_2m_karras", **kw), control=units))

    got = run(0.8)
    assert _max_diff(got, _pixels(ours["epsilon"].txt2img(_params("dpmpp_2m_karras")))) > 10 * TOL
    assert _max_diff(got, run(0.4)) > 10 * TOL
    assert _max_diff(got, run(0.8, cfg_scale=1.0)) > 10 * TOL
