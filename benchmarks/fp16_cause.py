"""Which of diffusers' fp16 steps moves its fp16 images away from its fp32 images (issue 16).

The built-in model is exported to a diffusers folder (as `estable convert default out/ --to diffusers`) and run
through diffusers' StableDiffusionPipeline in fp32 and in fp16, and through a copy of that pipeline's denoising
loop (prompt encoding, noise, U-Net, classifier-free guidance, DPM++ 2M Karras scheduler step, VAE decode, in
diffusers' own order with diffusers' own scheduler object) in which each fp16 step can be switched to fp32 on
its own:

    text    the text encoder (fp32: the prompt embeddings are computed in fp32, then cast for the fp16 U-Net)
    noise   the initial noise (fp32: drawn in float32, then cast; diffusers draws it in the pipeline's dtype)
    cfg     the guidance combination uncond + g·(cond − uncond) (fp32: on the U-Net's outputs cast to fp32)
    sched   the latents kept between steps and the scheduler's inputs, i.e. its x0 = (x − σ·ε)/α conversion and
            the stored model outputs of the multistep solver (fp32: the latents stay float32 throughout)
    unet    the U-Net itself (fp32 weights and inputs; its outputs are then fp32 too)
    vae     the VAE decoder
and, on a GPU only, two kernel choices with everything else in fp16:
    math_attention   scaled_dot_product_attention restricted to the math backend (no flash / memory-efficient)
    fp32_reduction   torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

Unless switched, the U-Net and the VAE run in fp16 (as Estable's fp16 mode runs them). Estable's own fp16 and
fp32 images are measured alongside: Estable keeps the text encoder in the weights' dtype but draws the noise in fp32 and
does guidance and every sampler step in fp32 (pipeline.py, points 2 and 4).

Every figure is the mean over seeds of the mean absolute difference of 8-bit pixels to diffusers' fp32 images
(and the max); "loop, all fp16" must equal diffusers' fp16 pipeline output (checked and printed), so that the
single switches measure diffusers' own behaviour.

    PYTHONPATH=src python benchmarks/fp16_cause.py --out DIR [--device cuda] [--generator cpu|device]
        [--size 256] [--steps 25] [--cfg 5] [--seeds 1 2 3 4]

On the CPU (torch runs fp16 convolutions there, slowly) it reproduces the figures recorded in RESULTS.md;
``--generator device`` draws diffusers' noise with a generator on the GPU instead of the CPU (Estable always
draws on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from estable.checkpoints.store import load_model, save_model
from estable.params import GenerationParams
from estable.pipeline import load_pipeline

PROMPT = "a red circle above a blue square"
F16, F32 = torch.float16, torch.float32


@dataclass(frozen=True)
class Knobs:
    """Which steps of diffusers' loop run in fp32 (the rest in fp16)."""

    text: bool = False
    noise: bool = False
    cfg: bool = False
    sched: bool = False
    unet: bool = False
    vae: bool = False
    math_attention: bool = False
    fp32_reduction: bool = False

    @property
    def label(self) -> str:
        on = [k for k in self.__dataclass_fields__ if getattr(self, k)]
        return "loop, all fp16" if not on else "loop, fp32 " + " + ".join(on)

    @property
    def gpu_only(self) -> bool:
        return self.math_attention or self.fp32_reduction


VARIANTS = [
    Knobs(),
    Knobs(text=True),
    Knobs(noise=True),
    Knobs(cfg=True),
    Knobs(sched=True),
    Knobs(cfg=True, sched=True),
    Knobs(text=True, noise=True, cfg=True),
    Knobs(text=True, noise=True, cfg=True, sched=True),
    Knobs(unet=True),
    Knobs(vae=True),
    Knobs(math_attention=True),
    Knobs(fp32_reduction=True),
]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """diffusers' postprocess (in the decoder's dtype) and np output rounded ×255. (H, W, 3)"""
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def diffusers_pipeline(pipe, seed: int, args, gen_device: str) -> np.ndarray:
    import diffusers

    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    gen = torch.Generator(gen_device).manual_seed(seed)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.cfg,
                   width=args.size, height=args.size, generator=[gen], output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def diffusers_loop(p16, p32, seed: int, knobs: Knobs, args, gen_device: str) -> np.ndarray:
    """StableDiffusionPipeline.__call__'s txt2img loop (diffusers 0.42) with per-step dtype switches."""
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    dev = p16.device
    unet = (p32 if knobs.unet else p16).unet
    vae = (p32 if knobs.vae else p16).vae
    net_dtype = F32 if knobs.unet else F16
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if knobs.math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if knobs.fp32_reduction:
            before = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            stack.callback(setattr, torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", before)
        enc = p32 if knobs.text else p16
        cond, uncond = enc.encode_prompt(PROMPT, dev, 1, True, negative_prompt="")
        context = torch.cat([uncond, cond]).to(net_dtype)  # (2, T, D), the U-Net's dtype
        sched = diffusers.DPMSolverMultistepScheduler.from_config(p16.scheduler.config, use_karras_sigmas=True)
        sched.set_timesteps(args.steps, device=dev)
        shape = (1, p16.unet.config.in_channels, args.size // 8, args.size // 8)
        gen = torch.Generator(gen_device).manual_seed(seed)
        latents = randn_tensor(shape, generator=[gen], device=dev, dtype=F32 if knobs.noise or knobs.unet else F16)
        lat_dtype = F32 if knobs.sched or knobs.unet else F16
        latents = latents.to(lat_dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
            out = unet(x_in.to(net_dtype), t, encoder_hidden_states=context, return_dict=False)[0]
            out = out.to(F32 if knobs.cfg or knobs.unet else F16)
            out_u, out_c = out.chunk(2)
            eps = out_u + args.cfg * (out_c - out_u)
            latents = sched.step(eps.to(lat_dtype), t, latents, return_dict=False)[0]
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return to_uint8(image)


def estable_images(model: str, dtype: str, seeds: list[int], args) -> list[np.ndarray]:
    pipe = load_pipeline(model, device=args.device, dtype=dtype, cuda_graphs=False)
    out = []
    for seed in seeds:
        params = GenerationParams(prompt=PROMPT, negative_prompt="", sampler="dpmpp_2m_karras", steps=args.steps,
                                  cfg_scale=args.cfg, seed=seed, width=args.size, height=args.size)
        out.append(np.asarray(pipe.txt2img(params)[0].convert("RGB")))
    return out


def compare(images: list[np.ndarray], refs: list[np.ndarray]) -> dict[str, float]:
    d = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(images, refs, strict=True)]
    return {"mean_abs": float(np.mean([x.mean() for x in d])), "max_abs": int(max(x.max() for x in d)),
            "per_seed_mean_abs": [round(float(x.mean()), 3) for x in d]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="default", help="an Estable model (default: the built-in one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--generator", choices=("cpu", "device"), default="cpu",
                    help="where diffusers draws its noise (Estable: always the CPU)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = ap.parse_args()
    import diffusers

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    gen_device = args.device if args.generator == "device" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        src = "default" if args.model == "default" else args.model
        from estable.pipeline import default_model_path

        folder = save_model(load_model(default_model_path() if src == "default" else src), Path(tmp) / "model",
                            to="diffusers")
        p32 = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=F32).to(args.device)
        p16 = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=F16).to(args.device)
        for p in (p32, p16):
            p.set_progress_bar_config(disable=True)
        ref = [diffusers_pipeline(p32, s, args, gen_device) for s in args.seeds]
        rows: dict[str, dict] = {}
        pipe16 = [diffusers_pipeline(p16, s, args, gen_device) for s in args.seeds]
        rows["diffusers fp16 pipeline"] = compare(pipe16, ref)
        for knobs in VARIANTS:
            if knobs.gpu_only and not args.device.startswith("cuda"):
                continue
            imgs = [diffusers_loop(p16, p32, s, knobs, args, gen_device) for s in args.seeds]
            rows[knobs.label] = compare(imgs, ref)
            if knobs == Knobs():
                rows[knobs.label]["vs_fp16_pipeline_max_abs"] = compare(imgs, pipe16)["max_abs"]
        est32 = estable_images(args.model, "fp32", args.seeds, args)
        rows["Estable fp32"] = compare(est32, ref)
        for dtype in ("fp16", "bf16"):
            imgs = estable_images(args.model, dtype, args.seeds, args)
            rows[f"Estable {dtype}"] = {**compare(imgs, ref), "vs_estable_fp32": compare(imgs, est32)}
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "size": args.size,
              "steps": args.steps, "cfg": args.cfg, "seeds": args.seeds, "generator": gen_device,
              "seconds": round(time.time() - t0, 1), "rows": rows}
    (args.out / "fp16_cause.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| run (U-Net and VAE in fp16 unless Estable fp32) | mean abs Δ to diffusers fp32 | max |",
             "|---|---|---|"]
    lines += [f"| {name} | {r['mean_abs']:.3f} | {r['max_abs']} |" for name, r in rows.items()]
    (args.out / "fp16_cause.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
