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
import json
import math
import os
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
    "cfg_start": "cfg_start",
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
    "complete_prompt": "complete_prompt",
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
    p.add_argument("--prompts", metavar="FILE",
                   help="bulk mode: one request per line of FILE (.txt: a prompt per line; .jsonl: a JSON string or "
                   "object of generation parameters per line), written to the folder --out as LINE-IMAGE.png "
                   "(000012-000.png); images already there are skipped, so an interrupted run resumes. --batch is "
                   "then the number of images denoised together (up to 256), the other flags are defaults for the "
                   "lines, --seed S gives line n the seed S + (n-1)*1000. Under `torchrun --nproc_per_node K` the "
                   "lines are shared out over K processes (one GPU each)")
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
    p.add_argument("--full", action="store_true",
                   help="print every character (by default each field stops after 20,000; control characters "
                   "are always shown escaped, e.g. \\x1b)")
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
                   f"(default: the model's recommended sampler if its file records one, else {d.sampler}; an "
                   "unknown name lists them all)")
    p.add_argument("--steps", type=int, metavar="N", help=f"sampling steps (default {d.steps})")
    p.add_argument("--cfg", type=float, metavar="F",
                   help=f"classifier-free guidance scale; ≤ 1 turns guidance off (default: the model's "
                   f"recommended scale if its file records one, else {d.cfg_scale:g})")
    p.add_argument("--cfg-start", type=float, metavar="F",
                   help="guidance only from this fraction of the noise schedule on (a guidance interval): while the "
                   "timestep is above (1 - F) x 1000 the prompt alone steers (one U-Net pass instead of two). Fewer "
                   "guided steps: more varied images, drawn less faithfully to the prompt "
                   f"(default {d.cfg_start:g}: guided at every step)")
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
    p.add_argument("--no-prompt-completion", dest="complete_prompt", action="store_const", const=False, default=None,
                   help="txt2img: draw the prompt as written, without the completion the model's file may ask for "
                   "(e.g. a shapes-world model's grey background for a prompt that names none; `estable info` shows "
                   "a file's completion)")
    p.add_argument("--eta", type=float, metavar="F", help=f"DDIM stochasticity, 0..1 (default {d.eta:g})")
    p.add_argument("--out", metavar="PATH",
                   help=f"a .png file (several images: name-0.png, name-1.png, …) or a folder, where files are "
                   f"numbered 00000-SEED.png (default {DEFAULT_OUT}/)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto: cuda if present)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"),
                   help="weights' precision (default auto: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, run the U-Net eagerly instead of replaying CUDA graphs (debugging, profiling)")
    p.add_argument("--compile", action="store_true",
                   help="the fastest mode on a GPU: torch.compile of the U-Net's and VAE decoder's blocks, fused "
                   "attention projections, channels_last, CUDA graphs. Costs compile time at the first image of "
                   "each size (cached on disk in ~/.cache/estable/compile, $ESTABLE_COMPILE_CACHE, for the next "
                   "run); pays for many images or a long-running process")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow .ckpt/.pt pickle checkpoints (tensors only are loaded; trust the source)")
    p.add_argument("--vae", metavar="FILE",
                   help="use a separate VAE file (A1111's fine-tuned VAEs: LDM or diffusers naming; a diffusers vae/ "
                   "folder) instead of the model's own")
    p.add_argument("--lora", metavar="FILE[:WEIGHT]", action="append",
                   help="apply a LoRA .safetensors (kohya/A1111, diffusers/PEFT or Estable naming) with a multiplier "
                   "(default 1); repeat for several")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="folder (searched recursively) where the A1111 prompt tag <lora:NAME:WEIGHT> finds "
                   "NAME.safetensors (tags in the negative prompt are not applied, as in A1111)")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="folder of textual-inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds.*), "
                   "used by writing a file's name in the prompt or negative prompt (.pt needs --allow-pickle)")
    p.add_argument("--from-png", metavar="FILE",
                   help="take every parameter (and the model path) from a PNG's Estable record; flags given "
                   "explicitly override it")
    p.add_argument("--allow-model-change", action="store_true",
                   help="with --from-png: go on when the model file at the recorded path is not the one the image "
                   "was made with (its SHA-256 differs); without it that is an error")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files named by --out (an input image is never replaced)")
    from .cli_control import add_control_flags

    add_control_flags(p)
    from .cli_provenance import add_generation_flags

    add_generation_flags(p)
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
    from .provenance.reuse import record_model_source

    if args.model is not None:
        return args.model
    if record is not None:
        src = record_model_source(record)
        if src:
            return src
    return DEFAULT_MODEL


def _cmd_generate(args: argparse.Namespace) -> int:
    from .cli_provenance import GenerationProvenance
    from .images import check_mask_has_area, load_image
    from .outputs import OutputPlan
    from .pipeline import load_pipeline, resolve_sampler
    from .provenance.infotext import read_png_metadata
    from .provenance.reuse import check_same_model
    from .tokenizer import check_unicode

    for what, text in (("the PROMPT", args.prompt), ("--negative", args.negative)):
        if text is not None:
            check_unicode(text, what)
    if getattr(args, "prompts", None) is not None:
        from .cli_bulk import cmd_bulk

        return cmd_bulk(args)
    record = None
    if args.from_png is not None:
        _, record = read_png_metadata(args.from_png)
        if record is None:
            raise EstableError(f"{args.from_png} has no Estable record (only images made by Estable can be reused)")
        _check_record(record, args.from_png)
    params = _params(args, record)
    check_unicode(params.prompt, "the prompt")  # a record's text (JSON may hold lone surrogates)
    check_unicode(params.negative_prompt or "", "the negative prompt")
    resolve_sampler(params.sampler)  # an unknown sampler fails before the model is loaded
    provenance = GenerationProvenance.from_args(args, params.prompt, record)  # prompt filter, keys

    image = mask = None
    if args.mode in ("img2img", "inpaint"):
        if args.image is None:
            raise EstableError(f"{args.mode} needs --image PATH")
        image = load_image(args.image)
    if args.mode == "inpaint":
        if args.mask is None:
            raise EstableError("inpaint needs --mask PATH (white = repaint, black = keep)")
        mask = load_image(args.mask, mode="mask")
        if mask.size != image.size:  # type: ignore[union-attr]
            raise EstableError(f"the mask {args.mask} is {mask.width}x{mask.height} but the image {args.image} is "
                               f"{image.width}x{image.height}; they must have the same size")  # type: ignore[union-attr]
        check_mask_has_area(mask)
    # Every output name is checked (exists? writable? an input?) before the model is loaded.
    plan = OutputPlan(args.out or DEFAULT_OUT, params.batch_size * params.batch_count,
                      overwrite=bool(getattr(args, "overwrite", False)),
                      inputs=[getattr(args, "image", None), getattr(args, "mask", None), args.from_png])
    loras, lora_dir = _loras(args, record, params)
    embeddings = _embeddings(args, record)
    vae = args.vae if args.vae is not None else ((record or {}).get("vae") or {}).get("path")
    if vae is not None and not Path(vae).exists():
        raise EstableError(f"the VAE {vae} is not there" + ("" if args.vae else " (recorded in the PNG); pass --vae"))
    from .cli_control import control_specs, control_units

    specs = control_specs(args, record)  # checked before the model loads; --from-png: the record's units

    from_record = record is not None and args.model is None
    pipe = load_pipeline(_model_source(args, record), device=args.device or "auto", dtype=args.dtype or "auto",
                         cuda_graphs=args.cuda_graphs, allow_pickle=bool(args.allow_pickle),
                         speed="max" if args.compile else None)
    pipe.loras, pipe.lora_dir, pipe.embeddings = loras, lora_dir, embeddings
    if vae is not None:
        from .checkpoints.vae_file import scaling_note

        pipe.swap_vae(vae, allow_pickle=bool(args.allow_pickle))
        note = scaling_note(vae, pipe.config.vae)
        if note:
            print(f"estable: warning: {note}", file=sys.stderr)
    if from_record:
        note = check_same_model(record, pipe.model_sha256,  # type: ignore[arg-type]
                                allow_change=bool(getattr(args, "allow_model_change", False)))
        if note:
            print(f"estable: warning: {note}", file=sys.stderr)
    if record is None:  # what the model's file recommends, where no flag chose
        params = pipe.with_model_defaults(params, cfg=args.cfg is None, sampler=args.sampler is None)

    control = control_units(specs, args, pipe) if specs else None
    provenance.prepare(pipe, args.mode)
    shown: set[str] = set()

    def warn(notes: list[str]) -> None:  # each note once, as soon as a batch carries it
        for note in notes:
            if note not in shown:
                shown.add(note)
                print(f"estable: warning: {note}", file=sys.stderr)

    def save(batch: Any) -> None:  # each batch is written as soon as it is decoded
        warn(batch.warnings)
        batch = provenance.stamp(batch, pipe)  # output check, watermark, pixel hash, device, signature
        for path in plan.save(batch):
            print(path, flush=True)

    try:
        with _progress(pipe.device.type) as callback:
            if args.mode == "txt2img":
                result = pipe.txt2img(params, callback=callback, on_batch=save, control=control)
            elif args.mode == "img2img":
                result = pipe.img2img(  # type: ignore[arg-type]
                    image, params, callback=callback, on_batch=save, control=control)
            else:
                result = pipe.inpaint(  # type: ignore[arg-type]
                    image, mask, params, callback=callback, on_batch=save, control=control)
    except KeyboardInterrupt:
        print(f"estable: interrupted after {len(plan.written)} of {plan.count} images; those were saved",
              file=sys.stderr)
        raise
    warn(result.warnings)
    provenance.finish()  # images refused by the output check: an error, after the others are written
    return 0


def _check_record(record: dict[str, Any], source: str) -> None:
    """EstableError naming the first field of a ``--from-png`` record (LoRAs, VAE, embeddings) of the wrong type."""
    def bad(field: str, value: Any, want: str) -> EstableError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return EstableError(f"{source}: the Estable record's {field} must be {want}, not {shown}")

    vae = record.get("vae")
    if vae is not None and not isinstance(vae, dict):
        raise bad("vae", vae, "an object")
    if vae is not None and vae.get("path") is not None and not isinstance(vae["path"], str):
        raise bad("vae.path", vae["path"], "text")
    for key in ("loras", "embeddings"):
        items = record.get(key)
        if items is not None and not isinstance(items, list):
            raise bad(key, items, "a list")
        for i, item in enumerate(items or []):
            if not isinstance(item, dict):
                raise bad(f"{key}[{i}]", item, "an object")
            path = item.get("path")
            if path is not None and not isinstance(path, str):
                raise bad(f"{key}[{i}].path", path, "text")
            if key == "loras" and item.get("source") in ("flag", "prompt") and not path:
                raise bad(f"{key}[{i}].path", path, "a file name")
            if key == "loras" and item.get("source") == "flag":
                for net in ("te", "unet"):
                    value = item.get(net)
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise bad(f"{key}[{i}].{net}", value, "a finite number")


def _loras(args: argparse.Namespace, record: dict[str, Any] | None, params: GenerationParams) -> tuple[list, Any]:
    """The --lora files and the --lora-dir (from the PNG's record when --from-png and the flags are left out),
    checked before the model is loaded."""
    from .extra_networks import LoRASpec, negative_prompt_tags, parse_lora_arg, resolve_prompt_loras

    recorded = (record or {}).get("loras") or []
    if args.lora is not None:
        loras = [parse_lora_arg(a) for a in args.lora]
    else:
        loras = []
        for r in recorded:
            if r.get("source") == "flag":
                if not Path(r["path"]).is_file():
                    raise EstableError(f"the PNG was made with the LoRA {r['path']}, which is not there; pass --lora")
                loras.append(LoRASpec(path=Path(r["path"]), te=float(r["te"]), unet=float(r["unet"])))
    lora_dir = args.lora_dir
    if lora_dir is not None and not Path(lora_dir).expanduser().is_dir():
        raise EstableError(f"--lora-dir {lora_dir} is not a folder")
    tagged = [Path(r["path"]).parent for r in recorded if r.get("source") == "prompt"]
    if lora_dir is None and tagged:
        lora_dir = os.path.commonpath([str(p) for p in tagged])
    resolve_prompt_loras(params.prompt, lora_dir)  # every tag names a file: fail before loading the model
    if negative_prompt_tags(params.negative_prompt):
        print("estable: warning: <lora:…> tags in the negative prompt are not applied (as in A1111); they are "
              "encoded as text", file=sys.stderr)
    return loras, lora_dir


def _embeddings(args: argparse.Namespace, record: dict[str, Any] | None) -> Any:
    """The textual-inversion library of --embeddings-dir (from the PNG's record when --from-png and it is left out)."""
    from .embeddings import EmbeddingLibrary

    folder = args.embeddings_dir
    recorded = [Path(e["path"]).parent for e in (record or {}).get("embeddings") or [] if e.get("path")]
    if folder is None and recorded:
        folder = os.path.commonpath([str(p) for p in recorded])
    if folder is None:
        return None
    library = EmbeddingLibrary(folder, allow_pickle=bool(args.allow_pickle))
    for note in library.shadowed_notes():
        print(f"estable: warning: {note}", file=sys.stderr)
    return library


class _progress:
    """A tqdm bar on stderr driven by the pipeline's step callback (hidden when stderr is not a terminal). The bar
    is shown before the first step (which alone can take a minute on the CPU); after it, a run estimated to take
    longer than ``LONG_S`` gets a warning with the estimate."""

    LONG_S = 120.0

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type

    def __enter__(self):
        import time

        from tqdm import tqdm

        self.start = time.monotonic()
        self.warned = False
        self.bar = tqdm(total=None, unit="step", file=sys.stderr, disable=None, leave=False)
        self.bar.refresh()
        return self.update

    def update(self, step: int, total: int, latents: Any, denoised: Any) -> None:
        import time

        del latents, denoised
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(step + 1 - self.bar.n)
        if not self.warned:
            self.warned = True
            per_step = (time.monotonic() - self.start) / (step + 1)
            estimate = per_step * total
            if estimate > self.LONG_S:
                note = (f"estable: warning: this run will take about {estimate / 60:.0f} min on the "
                        f"{self.device_type.upper()} ({per_step:.1f} s per step x {total} steps); a smaller --size "
                        "or fewer --steps is faster" + (", and a GPU much faster" if self.device_type == "cpu" else ""))
                self.bar.write(note, file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def _cmd_png_info(args: argparse.Namespace) -> int:
    from .provenance.infotext import read_png_metadata

    text, record = read_png_metadata(args.file)
    if text is None and record is None:
        raise EstableError(f"{args.file} carries no generation parameters")
    from .terminal import printable

    limit = None if getattr(args, "full", False) else 20_000
    if text is not None:
        print(printable(text, limit))
    if record is not None:
        if text is not None:
            print()
        print(printable(json.dumps(record, indent=2, ensure_ascii=False), limit))
    return 0
