"""The generation commands of ``estable``: ``generate``, ``img2img``, ``inpaint`` and ``png-info``.

A thin shell over :mod:`estable.pipeline`: it builds a :class:`~estable.params.GenerationParams` from the flags (or
from a PNG's Estable record with ``--from-png``, flags given explicitly winning), checks every input that can be
checked before the model is loaded (sampler, size, image and mask files, output path), then loads the model,
generates with a progress bar and prints each written path. User errors are raised as EstableError, which
``estable.cli.main`` prints on one line before exiting with status 2.

Wire it into ``estable.cli.build_parser`` with ``add_generate_commands(sub)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from .errors import EstableError
from .params import GenerationParams

__all__ = ["add_generate_commands", "parse_size"]

DEFAULT_OUT = "outputs"
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

# flag dest -> GenerationParams field
_PARAM_FLAGS = {
    "negative": "negative_prompt",
    "sampler": "sampler",
    "steps": "steps",
    "cfg": "cfg_scale",
    "seed": "seed",
    "batch": "batch_size",
    "batch_count": "batch_count",
    "clip_skip": "clip_skip",
    "weighting": "weighting",
    "strength": "strength",
    "eta": "eta",
    "hires_scale": "hires_scale",
    "hires_strength": "hires_strength",
    "hires_upscaler": "hires_upscaler",
    "hires_steps": "hires_steps",
    "tile_vae": "tile_vae",
}


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` → (512, 768); a single number N means NxN. EstableError for anything else."""
    m = _SIZE.match(text)
    if m:
        return int(m.group(1)), int(m.group(2))
    if text.strip().isdigit():
        return int(text), int(text)
    raise EstableError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 512x512, not {text!r}")


# ------------------------------------------------------------------------------------------------- parsers


def add_generate_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``generate``, ``img2img``, ``inpaint`` and ``png-info`` on ``estable``'s sub-parsers."""
    p = sub.add_parser(
        "generate",
        help="make images from a text prompt (txt2img)",
        description="Generate images from a prompt. Every image is saved as a PNG carrying its parameters "
        "(A1111 'parameters' text and an Estable record), so `--from-png` makes it again.",
    )
    _common(p)
    _hires(p)
    p.set_defaults(func=_cmd_generate, mode="txt2img")

    p = sub.add_parser(
        "img2img",
        help="re-draw an image guided by a prompt",
        description="Re-draw --image guided by the prompt: --strength sets how much of the schedule is re-run "
        "(1 = all of it, the image then only sets the colours' starting point).",
    )
    _common(p)
    p.add_argument("--image", metavar="PATH", help="the input image (required); its size is the default --size")
    _strength(p)
    p.set_defaults(func=_cmd_generate, mode="img2img")

    p = sub.add_parser(
        "inpaint",
        help="repaint the masked part of an image",
        description="Repaint the white part of --mask in --image. Inpainting models (9 input channels) see the "
        "mask; ordinary models keep the unmasked part by blending it in at every step.",
    )
    _common(p)
    p.add_argument("--image", metavar="PATH", help="the input image (required)")
    p.add_argument("--mask", metavar="PATH",
                   help="the mask (required), same size as the image: white (≥ 50%%) = repaint, black = keep")
    _strength(p, default_text="0.75; 1 starts from pure noise in the masked area")
    p.set_defaults(func=_cmd_generate, mode="inpaint")

    p = sub.add_parser("png-info", help="print the generation parameters stored in a PNG",
                       description="Print a PNG's A1111 'parameters' text and its Estable JSON record.")
    p.add_argument("file", metavar="FILE", help="a PNG written by Estable (or by the A1111 web UI)")
    p.set_defaults(func=_cmd_png_info)


def _common(p: argparse.ArgumentParser) -> None:
    # Every default is None so that --from-png can tell the flags given from the ones left out; the
    # effective defaults are GenerationParams' and are named in the help.
    d = GenerationParams()
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the prompt; A1111 syntax: (word) ×1.1, [word] ÷1.1, (word:1.3), BREAK; no length limit")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt: what the image should not show")
    p.add_argument("--model", metavar="SRC",
                   help="SD .safetensors file, diffusers folder or Estable file (default: the built-in model)")
    p.add_argument("--sampler", metavar="NAME",
                   help=f"sampler: our name or A1111's label, e.g. dpmpp_2m_karras, 'Euler a', ddim, lcm "
                   f"(default {d.sampler}; an unknown name lists them all)")
    p.add_argument("--steps", type=int, metavar="N", help=f"sampling steps (default {d.steps})")
    p.add_argument("--cfg", type=float, metavar="F",
                   help=f"classifier-free guidance scale; ≤ 1 turns guidance off (default: the model's "
                   f"recommended scale if its file records one, else {d.cfg_scale:g})")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed of the first image; image k of the run uses seed + k (default -1: random)")
    p.add_argument("--size", metavar="WxH",
                   help="image size in pixels, multiples of 8 (default: the model's native size, or the input "
                   "image's size)")
    p.add_argument("--batch", type=int, metavar="N", help=f"images denoised together (default {d.batch_size})")
    p.add_argument("--batch-count", type=int, metavar="N",
                   help=f"batches run one after another (default {d.batch_count})")
    p.add_argument("--clip-skip", type=int, metavar="N",
                   help="text-encoder layer: 1 = last, 2 = penultimate (default: the model's, 1 for SD 1.x)")
    p.add_argument("--no-weighting", dest="weighting", action="store_const", const=False, default=None,
                   help="take the prompt literally: no (word:1.2) emphasis syntax")
    p.add_argument("--eta", type=float, metavar="F", help=f"DDIM stochasticity, 0..1 (default {d.eta:g})")
    p.add_argument("--out", metavar="PATH",
                   help=f"a .png file (several images: name-0.png, name-1.png, …) or a folder, where files are "
                   f"numbered 00000-SEED.png (default {DEFAULT_OUT}/)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto: cuda if present)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"),
                   help="weights' precision (default auto: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, run the U-Net eagerly instead of replaying CUDA graphs (debugging, profiling)")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow .ckpt/.pt pickle checkpoints (tensors only are loaded; trust the source)")
    p.add_argument("--from-png", metavar="FILE",
                   help="take every parameter (and the model path) from a PNG's Estable record; flags given "
                   "explicitly override it")
    p.add_argument("--tile-vae", action="store_const", const=True, default=None,
                   help="decode (and encode) in blended 512-pixel tiles: large images in bounded memory")


def _hires(p: argparse.ArgumentParser) -> None:
    d = GenerationParams()
    p.add_argument("--hires-scale", type=float, metavar="F",
                   help="two-pass hires fix (A1111 hr_scale): generate at --size, upscale by F (1..4) and re-run "
                   f"the last --hires-strength of the schedule at the larger size (default {d.hires_scale:g}: off)")
    p.add_argument("--hires-strength", type=float, metavar="F",
                   help=f"hires fix: denoising strength of the second pass, in (0, 1] (default {d.hires_strength:g})")
    p.add_argument("--hires-upscaler", choices=("latent", "pixel"),
                   help="hires fix: upscale the latents (bilinear, A1111's 'Latent') or the decoded image "
                   f"(Lanczos, then encoded again) (default {d.hires_upscaler})")
    p.add_argument("--hires-steps", type=int, metavar="N",
                   help="hires fix: steps of the second pass's schedule (default 0: --steps)")


def _strength(p: argparse.ArgumentParser, default_text: str = "0.75") -> None:
    p.add_argument("--strength", type=float, metavar="F",
                   help=f"how much of the schedule is re-run, in (0, 1] (default {default_text})")


# ------------------------------------------------------------------------------------------------ commands


def _params(args: argparse.Namespace, record: dict[str, Any] | None) -> GenerationParams:
    from .pipeline import params_from_record

    values: dict[str, Any] = params_from_record(record).to_dict() if record is not None else {}
    if args.prompt is not None:
        values["prompt"] = args.prompt
    for flag, name in _PARAM_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[name] = value
    if args.size is not None:
        values["width"], values["height"] = parse_size(args.size)
    if "prompt" not in values:
        raise EstableError("give a PROMPT (or --from-png FILE to reuse an image's parameters)")
    return GenerationParams(**values)


def _model_source(args: argparse.Namespace, record: dict[str, Any] | None) -> str:
    from .pipeline import DEFAULT_MODEL

    if args.model is not None:
        return args.model
    if record is not None:
        src = (record.get("model") or {}).get("source")
        if src and Path(src).exists():
            return str(src)
        if src:
            raise EstableError(f"the PNG was made with the model {src}, which is not there; pass --model")
    return DEFAULT_MODEL


def _check_out(out: Path) -> None:
    if out.suffix.lower() == ".png":
        if str(out.parent) and not out.parent.is_dir():
            raise EstableError(f"cannot write {out}: folder {out.parent} does not exist")
    elif out.exists() and not out.is_dir():
        raise EstableError(f"--out {out} is an existing file that is not a .png; give a folder or a .png name")


def _cmd_generate(args: argparse.Namespace) -> int:
    from .images import load_image
    from .pipeline import load_pipeline, resolve_sampler, save_result
    from .provenance.infotext import read_png_metadata

    record = None
    if args.from_png is not None:
        _, record = read_png_metadata(args.from_png)
        if record is None:
            raise EstableError(f"{args.from_png} has no Estable record (only images made by Estable can be reused)")
    params = _params(args, record)
    resolve_sampler(params.sampler)  # an unknown sampler fails before the model is loaded

    image = mask = None
    if args.mode in ("img2img", "inpaint"):
        if args.image is None:
            raise EstableError(f"{args.mode} needs --image PATH")
        image = load_image(args.image)
    if args.mode == "inpaint":
        if args.mask is None:
            raise EstableError("inpaint needs --mask PATH (white = repaint, black = keep)")
        mask = load_image(args.mask, mode="L")
        if mask.size != image.size:  # type: ignore[union-attr]
            raise EstableError(f"the mask {args.mask} is {mask.width}x{mask.height} but the image {args.image} is "
                               f"{image.width}x{image.height}; they must have the same size")  # type: ignore[union-attr]
    out = Path(args.out or DEFAULT_OUT)
    _check_out(out)

    pipe = load_pipeline(_model_source(args, record), device=args.device or "auto", dtype=args.dtype or "auto",
                         cuda_graphs=args.cuda_graphs, allow_pickle=bool(args.allow_pickle))
    if args.cfg is None and record is None and pipe.config.default_cfg is not None:
        params = dataclasses.replace(params, cfg_scale=float(pipe.config.default_cfg))
    with _progress() as callback:
        if args.mode == "txt2img":
            result = pipe.txt2img(params, callback=callback)
        elif args.mode == "img2img":
            result = pipe.img2img(image, params, callback=callback)  # type: ignore[arg-type]
        else:
            result = pipe.inpaint(image, mask, params, callback=callback)  # type: ignore[arg-type]
    for note in result.warnings:
        print(f"estable: warning: {note}", file=sys.stderr)
    for path in save_result(result, out):
        print(path)
    return 0


class _progress:
    """A tqdm bar on stderr driven by the pipeline's step callback (hidden when stderr is not a terminal)."""

    def __enter__(self):
        self.bar = None
        return self.update

    def update(self, step: int, total: int, latents: Any, denoised: Any) -> None:
        del latents, denoised
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, disable=None, leave=False)
        self.bar.update(step + 1 - self.bar.n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_png_info(args: argparse.Namespace) -> int:
    from .provenance.infotext import read_png_metadata

    text, record = read_png_metadata(args.file)
    if text is None and record is None:
        raise EstableError(f"{args.file} carries no generation parameters")
    if text is not None:
        print(text)
    if record is not None:
        if text is not None:
            print()
        print(json.dumps(record, indent=2, ensure_ascii=False))
    return 0
