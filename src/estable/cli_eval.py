"""The evaluation commands: ``estable eval compositional | fid | clipscore | vae | guidance-sweep | train-judge |
judge-accuracy``.

A thin shell over :mod:`estable.evaluation`. Model-dependent parts import :mod:`estable.pipeline` lazily, so
judge and FID work on real renders needs no diffusion model. Wire into ``estable.cli.build_parser`` with
``add_eval_commands(sub)``. To add a sub-command (e.g. ``clipscore``), write one ``_add_<name>(esub)`` function
that registers its parser and ``func``, and append it to ``EVAL_COMMANDS``; ``model_generator`` turns the common
model flags (``add_model_flags``) into a ``generate(prompts, seeds) -> images`` callable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import EstableError

__all__ = ["EVAL_COMMANDS", "add_eval_commands", "add_model_flags", "check_args", "load_model_pipeline",
           "model_generator"]

DEFAULT_MODEL = "default"  # the built-in model (estable.pipeline.DEFAULT_MODEL; not imported: keeps torch lazy)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_REAL_SEED = 31  # world seed of the reference ("real") renders for FID
FID_PROMPT_SEED = 32  # world seed whose captions the model is asked to draw for FID
FID_FLOOR_SEED = 33  # a second independent real set: real-vs-real FID, the floor


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``estable eval …`` on ``estable``'s sub-parsers."""
    p = sub.add_parser("eval", help="evaluate a model (compositional accuracy, FID) and train or check the judge",
                       description="Evaluation on the shapes world; the judge recognises objects in images.")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    p.set_defaults(func=lambda args: p.print_help() or 0)
    for add in EVAL_COMMANDS:
        add(esub)


# --------------------------------------------------------------------------------------------- shared flags


CFG_HELP = ("classifier-free guidance scale (default: the scale the model's file recommends, as `estable generate` "
            "uses; 7 for a file that records none)")


CFG_START_HELP = ("guidance only from this fraction of the noise schedule on: no guidance while the timestep is above "
                  "(1 - F) x 1000 (default 0: guided at every step; as `estable generate --cfg-start`)")


def add_model_flags(p: argparse.ArgumentParser, *, required: bool = False, cfg: bool = True) -> None:
    """--model and the generation flags every model-driven evaluation takes (``cfg=False`` leaves out --cfg, for
    commands that take their own). Without --model the built-in default model is used, as ``estable generate``."""
    p.add_argument("--model", required=required, default=DEFAULT_MODEL, metavar="SRC",
                   help="checkpoint file or diffusers folder ('shapes' = real renders: the ceiling; "
                   "default: the built-in model)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    if cfg:
        p.add_argument("--cfg", type=float, default=None, help=CFG_HELP)
    p.add_argument("--cfg-start", type=float, default=0.0, metavar="F", help=CFG_START_HELP)
    p.add_argument("--sampler", default=None, help="sampler name (default: the generation default)")
    p.add_argument("--no-prompt-completion", dest="complete_prompt", action="store_false",
                   help="draw each caption as written, without the completion the model's file may ask for (the "
                   "report records the completion used)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default auto)")


def _add_judge_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", metavar="FILE", default=None,
                   help="judge weights (default: the judge shipped with Estable)")


def load_model_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline of ``args.model`` on ``args.device`` / ``args.dtype`` (file errors as one-line EstableErrors)."""
    from .pipeline import load_pipeline

    try:
        return load_pipeline(args.model, device=args.device, dtype=args.dtype)
    except OSError as exc:
        raise EstableError(f"{exc.filename or args.model}: {exc.strerror or exc}") from exc


def completion_used(args: argparse.Namespace, pipe: Any) -> str | None:
    """The prompt completion an evaluation's images are drawn with: the model file's, unless --no-prompt-completion."""
    return pipe.config.prompt_completion if getattr(args, "complete_prompt", True) else None


def model_generator(args: argparse.Namespace, pipe: Any = None) -> Callable[[list[str], list[int]], list[Any]]:
    """A ``generate(prompts, seeds) -> images`` for ``args.model``: real renders for 'shapes', else a pipeline
    (``pipe`` when given, so that one loaded model serves several settings, else loaded from ``args.model``).

    Up to 32 images on a GPU (8 on the CPU), whatever their prompts, share one sampler run
    (``Pipeline.txt2img_each``).
    """
    if args.model == "shapes":
        from .evaluation.compositional import render_generator

        return render_generator(args.size or 256)
    from .params import GenerationParams

    if pipe is None:
        pipe = load_model_pipeline(args)
    if args.cfg is None:  # the model's recommended scale; the report records the one used
        args.cfg = float(pipe.config.default_cfg) if pipe.config.default_cfg is not None else 7.0
    extra = {} if args.sampler is None else {"sampler": args.sampler}
    base = GenerationParams(steps=args.steps, cfg_scale=args.cfg, cfg_start=getattr(args, "cfg_start", 0.0),
                            width=args.size, height=args.size, complete_prompt=getattr(args, "complete_prompt", True),
                            **extra)
    args.prompt_completion = completion_used(args, pipe)  # for the report

    # Large batches pay on a GPU; on the CPU, 256² decodes of 32 images at once ran 2-3× slower per image than 8.
    batch = 32 if pipe.device.type == "cuda" else 8

    def generate(prompts: list[str], seeds: list[int]) -> list[Any]:
        return pipe.txt2img_each(prompts, seeds, base, batch=batch)

    return generate


def _add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")


def check_args(args: argparse.Namespace, *, out_file: bool = True) -> None:
    """Checks made before any work: ``args.size`` within what renders and generation allow, ``args.seed`` not
    negative, ``args.batch_size`` positive, ``args.device`` known, and ``args.out`` (a file written at the end) not
    an existing file unless --overwrite, not a folder, in a folder that accepts files (unless ``out_file`` is
    false: ``args.out`` is then a folder)."""
    from .params import MAX_SIDE

    size = getattr(args, "size", None)
    if size is not None and not 8 <= size <= MAX_SIDE:
        raise EstableError(f"--size {size} is out of range: 8 to {MAX_SIDE} pixels")
    seed = getattr(args, "seed", None)
    if seed is not None and seed < 0:
        raise EstableError(f"--seed must be 0 or more, not {seed}")
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise EstableError(f"--batch-size must be at least 1, not {batch_size}")
    device = getattr(args, "device", None)
    if device is not None:  # an unknown device (or cuda without a GPU) fails before any work
        from .pipeline import resolve_device

        resolve_device(device)
    if out_file and getattr(args, "out", None):
        from .outputs import check_new_file

        check_new_file(args.out, overwrite=bool(getattr(args, "overwrite", False)))


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        from .checkpoints.io import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ compositional


def _add_compositional(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("compositional", help="GenEval-style compositional accuracy on held-out prompts",
                        description="Generate images for held-out shapes-world prompts (colour x shape combinations "
                        "never seen in training) and score them with the judge per category and prompt kind.")
    add_model_flags(p)
    _add_judge_flag(p)
    p.add_argument("--prompts", type=int, default=500, metavar="N", help="number of prompts (default 500)")
    p.add_argument("--images-per-prompt", type=int, default=4, metavar="K", help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--kinds", metavar="KIND[,KIND...]",
                   help="only these prompt kinds, in equal shares (single, count, pair, colour_binding; default: "
                   "the shapes world's own mix)")
    p.add_argument("--paraphrase", nargs="?", const="synonyms", choices=("synonyms", "unseen"), metavar="SET",
                   help="say the relations in words no training caption uses: synonyms (on top of, beneath, on the "
                   "left of, on the right of; the default set, which `estable train synonyms` can teach) or unseen "
                   "(over, under, left of, right of: taught by no recipe)")
    p.add_argument("--out", metavar="FILE", help="write the full report (with per-image verdicts) as JSON")
    _add_overwrite_flag(p)
    p.set_defaults(func=_cmd_compositional)


def parse_kinds(text: str | None) -> dict[str, float] | None:
    """``"pair,single"`` → {"pair": 1.0, "single": 1.0}; None → None (the default mix)."""
    if text is None:
        return None
    from .training.shapes import PROMPT_KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PROMPT_KINDS]
    if bad or not kinds:
        raise EstableError(f"--kinds takes some of {', '.join(PROMPT_KINDS)}, not {text!r}")
    return dict.fromkeys(kinds, 1.0)


def _cmd_compositional(args: argparse.Namespace) -> int:
    from .evaluation.compositional import evaluate, format_report, make_prompts
    from .evaluation.judge import load_judge_or_default
    from .pipeline import resolve_device

    check_args(args)

    if args.prompts < 1 or args.images_per_prompt < 1:
        raise EstableError("--prompts and --images-per-prompt must be positive")
    judge = load_judge_or_default(args.judge, resolve_device(args.device))
    try:
        prompts = make_prompts(args.prompts, mix=parse_kinds(args.kinds), paraphrased=args.paraphrase or False)
    except ValueError as exc:
        raise EstableError(str(exc)) from None
    generate = model_generator(args)
    report = evaluate(generate, judge, prompts, args.images_per_prompt, args.seed, progress=True)
    report["model"] = args.model
    report["paraphrase"] = args.paraphrase
    report["generation"] = {"steps": args.steps, "cfg": args.cfg, "cfg_start": args.cfg_start,
                            "sampler": args.sampler, "size": args.size,
                            "prompt_completion": getattr(args, "prompt_completion", None)}
    print(format_report(report))
    _write_json(args.out, report)
    return 0


# ------------------------------------------------------------------------------------------------------ fid


def _add_fid(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("fid", help="Fréchet distance between generated and real images (with the real-vs-real floor)",
                        description="FID between two image sets. A set is a folder of images, 'shapes:N' (N fresh "
                        "real renders) or, for --fake, 'model:SRC' (images generated for shapes-world captions).")
    p.add_argument("--real", default="shapes:10000", metavar="DIR_OR_shapes:N",
                   help="reference images (default shapes:10000)")
    p.add_argument("--fake", required=True, metavar="DIR_OR_model:SRC", help="images to evaluate")
    p.add_argument("--features", choices=("judge", "inception"), default="judge",
                   help="feature network (default judge; inception needs --inception-weights)")
    p.add_argument("--inception-weights", metavar="FILE", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    _add_judge_flag(p)
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="images per set (default: N of shapes:N, else all in the folder)")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="shapes-world split of the real renders and captions (default train: the model's own "
                   "distribution, at seeds it never trained on)")
    p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor")
    p.add_argument("--batch-size", type=int, default=64, help="feature batch size (default 64)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=None, help=CFG_HELP)
    p.add_argument("--cfg-start", type=float, default=0.0, metavar="F", help=CFG_START_HELP)
    p.add_argument("--sampler", default=None)
    p.add_argument("--no-prompt-completion", dest="complete_prompt", action="store_false",
                   help="model:SRC: draw each caption as written, without the completion the model's file may ask "
                   "for (the result records the completion used)")
    p.add_argument("--size", type=int, default=None, help="render / generation size (default 256 / native)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", metavar="FILE", help="write the result as JSON")
    _add_overwrite_flag(p)
    p.set_defaults(func=_cmd_fid)


def _folder_images(folder: Path, count: int | None) -> tuple[list[Path], int]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if count is not None:
        files = files[:count]
    if len(files) < 2:
        raise EstableError(f"{folder} holds {len(files)} image(s); FID needs at least 2 per set")
    bad = []
    for f in files:  # headers only: a file that is not an image is found before any feature is computed
        try:
            with Image.open(f):
                pass
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad.append(f)
    if bad:
        raise EstableError(f"{len(bad)} file(s) in {folder} are not readable images, e.g. {bad[0].name}; "
                           "remove them or point at another folder")
    return files, len(files)


def _iter_files(files: list[Path]) -> Iterator[Any]:
    from .images import load_image

    for f in files:
        yield load_image(f)


def _iter_renders(split: str, seed: int, n: int, size: int) -> Iterator[Any]:
    from .training.shapes import ShapesWorld, render

    world = ShapesWorld(split, seed)
    for i in range(n):
        yield render(world.scene(i), size)


def _count_of(spec: str, count: int | None) -> int:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise EstableError(f"expected shapes:N with a number N, not {spec!r}") from None
    n = n if count is None else min(n, count)
    if n < 2:
        raise EstableError("FID needs at least 2 images per set")
    return n


def _image_set(spec: str, args: argparse.Namespace, seed: int, n_default: int | None) -> tuple[Iterator[Any], int]:
    """(image stream, count) for a --real / --fake spec."""
    size = args.size or 256
    if spec.startswith("shapes:"):
        n = _count_of(spec, args.count)
        return _iter_renders(args.split, seed, n, size), n
    if spec.startswith("model:"):
        from .training.shapes import ShapesWorld

        n = args.count or n_default
        if not n or n < 2:
            raise EstableError("with --fake model:SRC pass --count N (or a shapes:N reference)")
        if not spec.split(":", 1)[1]:
            raise EstableError(f"{spec!r} names no model: give model:SRC, e.g. model:default or model:FILE")
        model_args = argparse.Namespace(**{**vars(args), "model": spec.split(":", 1)[1]})
        generate = model_generator(model_args)
        args.prompt_completion = model_args.prompt_completion  # for the report
        world = ShapesWorld(args.split, FID_PROMPT_SEED)

        def stream() -> Iterator[Any]:
            for start in range(0, n, 32):
                idx = range(start, min(start + 32, n))
                yield from generate([world.scene(i).caption for i in idx], [FID_PROMPT_SEED * 100_000 + i for i in idx])

        return stream(), n
    folder = Path(spec)
    if not folder.is_dir():
        raise EstableError(f"{spec} is neither a folder nor shapes:N / model:SRC")
    files, n = _folder_images(folder, args.count)
    return _iter_files(files), n


def _cmd_fid(args: argparse.Namespace) -> int:
    from .evaluation.fid import extract_features, feature_stats, frechet_distance
    from .pipeline import resolve_device

    check_args(args)
    if args.count is not None and args.count < 2:  # files[:count] would silently drop files for a negative count
        raise EstableError(f"--count must be at least 2 (FID needs 2 images per set), not {args.count}")
    if args.inception_weights is not None and args.features != "inception":
        raise EstableError("--inception-weights is read with --features inception (the default features are the "
                           "judge's)")

    device = resolve_device(args.device)
    if args.features == "inception":
        from .evaluation.inception import InceptionFeatures

        extractor: Any = InceptionFeatures(args.inception_weights, device)
    else:
        from .evaluation.judge import JudgeFeatures, load_judge_or_default

        extractor = JudgeFeatures(load_judge_or_default(args.judge, device))

    def feats(stream: Iterator[Any], n: int, desc: str) -> Any:
        return extract_features(stream, extractor, batch_size=args.batch_size, device=device, total=n,
                                progress=True, desc=desc)

    # Both sets are resolved (folders listed and their files checked, a model loaded) before any feature is made.
    real, n_real = _image_set(args.real, args, FID_REAL_SEED, None)
    fake, n_fake = _image_set(args.fake, args, FID_FLOOR_SEED + 1, n_real)
    f_real = feats(real, n_real, "real")
    f_fake = feats(fake, n_fake, "fake")
    stats_real = feature_stats(f_real)
    result: dict[str, Any] = {
        "fid": frechet_distance(*feature_stats(f_fake), *stats_real),
        "features": args.features,
        "real": args.real,
        "fake": args.fake,
        "n_real": n_real,
        "n_fake": n_fake,
        "prompt_completion": getattr(args, "prompt_completion", None),
    }
    if not args.no_floor:
        if args.real.startswith("shapes:"):
            floor_set = _iter_renders(args.split, FID_FLOOR_SEED, n_real, args.size or 256)
            f_floor = feats(floor_set, n_real, "floor")
            result["floor"] = frechet_distance(*feature_stats(f_floor), *stats_real)
            result["floor_note"] = f"{n_real} independent real renders vs the reference"
        else:
            half = n_real // 2
            result["floor"] = frechet_distance(*feature_stats(f_real[:half]), *feature_stats(f_real[half:]))
            result["floor_note"] = f"two halves of the reference ({half} vs {n_real - half}), biased upward"
    print(f"FID ({args.features} features, {n_fake} fake vs {n_real} real): {result['fid']:.4f}")
    if "floor" in result:
        print(f"floor, real vs real ({result['floor_note']}): {result['floor']:.4f}")
    _write_json(args.out, result)
    return 0


# ----------------------------------------------------------------------------------------- judge commands


def _add_train_judge(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("train-judge", help="train the attribute judge on fresh shapes-world renders",
                        description="Train the judge (a small detector) on renders rendered on the fly, then report "
                        "its accuracy on held-out renders and store it in the file's metadata.")
    p.add_argument("--steps", type=int, default=8000, help="optimiser steps (default 8000)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--size", type=int, default=128, help="judge input side in pixels (default 128)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (the schedule follows)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: CPU cores - 1 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-count", type=int, default=2000, help="held-out renders to measure accuracy on")
    p.add_argument("--out", default="judge.safetensors", metavar="FILE", help="output file")
    _add_overwrite_flag(p)
    p.set_defaults(func=_cmd_train_judge)


def _cmd_train_judge(args: argparse.Namespace) -> int:
    from .evaluation.judge import format_accuracy, judge_accuracy, save_judge, train_judge

    check_args(args)
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise EstableError(f"--minutes must be a positive number, not {args.minutes:g}")
    try:
        judge = train_judge(args.steps, args.batch, args.size, args.device, args.seed, workers=args.workers,
                            time_limit_s=None if args.minutes is None else 60 * args.minutes)
    except ValueError as exc:
        raise EstableError(str(exc)) from None
    report = judge_accuracy(judge, args.eval_count, progress=True) if args.eval_count > 0 else None
    info = {"steps": judge.trained_steps, "batch": args.batch, "seed": args.seed, "accuracy": report}
    path = save_judge(judge, args.out, info)
    if report is not None:
        print(format_accuracy(report))
    print(f"wrote {path}")
    return 0


def _add_judge_accuracy(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("judge-accuracy", help="measure the judge on fresh held-out real renders",
                        description="Accuracy per attribute (colour, shape, size, centre), count, relation, "
                        "background and whole-scene exact match on renders the judge never saw.")
    _add_judge_flag(p)
    p.add_argument("--count", type=int, default=2000, help="renders (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="world seed (default: the evaluation seed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_judge_accuracy)


def _cmd_judge_accuracy(args: argparse.Namespace) -> int:
    from .evaluation.judge import EVAL_SEED, format_accuracy, judge_accuracy, load_judge_or_default
    from .pipeline import resolve_device

    check_args(args)
    if args.count < 1:
        raise EstableError("--count must be positive")
    judge = load_judge_or_default(args.judge, resolve_device(args.device))
    report = judge_accuracy(judge, args.count, seed=EVAL_SEED if args.seed is None else args.seed, progress=True)
    print(json.dumps(report, indent=2) if args.json else format_accuracy(report))
    return 0


# ---------------------------------------------------------------------------------------------- clipscore


def _add_clipscore(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("clipscore", help="CLIP score of generated images, next to real renders and shuffled pairs",
                        description="Mean CLIP score (100 * max(cos, 0)) of images generated for held-out prompts, "
                        "with the same score of real renders of those prompts (the reference) and of mismatched "
                        "prompt/image pairs (the floor), under a CLIP trained with `estable train clip`.")
    p.add_argument("--clip", required=True, metavar="FILE_OR_CLIP_RUN",
                   help="clip.safetensors, or the folder of a CLIP run holding it")
    add_model_flags(p)
    p.add_argument("--prompts", type=int, default=100, metavar="N", help="held-out prompts (default 100)")
    p.add_argument("--images-per-prompt", type=int, default=4, metavar="K", help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--out", metavar="FILE", help="write the report (with per-image scores) as JSON")
    _add_overwrite_flag(p)
    p.set_defaults(func=_cmd_clipscore)


def _prompt_set(n: int) -> Any:
    from .evaluation.compositional import make_prompts

    try:
        return make_prompts(n)
    except ValueError as exc:
        raise EstableError(str(exc)) from None


def _cmd_clipscore(args: argparse.Namespace) -> int:
    from .evaluation.clipscore import evaluate_clipscore, format_clipscore, load_clip
    from .pipeline import resolve_device

    check_args(args)

    if args.prompts < 2 or args.images_per_prompt < 1:
        raise EstableError("--prompts must be at least 2 (the floor pairs images with other prompts) and "
                           "--images-per-prompt positive")
    device = resolve_device(args.device)
    pair, tok = load_clip(args.clip, device)
    prompts = _prompt_set(args.prompts)
    generate = model_generator(args)
    report = evaluate_clipscore(generate, pair, tok, prompts, args.images_per_prompt, args.seed,
                                render_size=args.size or 256, device=device, progress=True)
    report["model"] = args.model
    report["clip"] = str(args.clip)
    report["generation"] = {"steps": args.steps, "cfg": args.cfg, "cfg_start": args.cfg_start,
                            "sampler": args.sampler, "size": args.size,
                            "prompt_completion": getattr(args, "prompt_completion", None)}
    print(format_clipscore(report))
    _write_json(args.out, report)
    return 0


# ---------------------------------------------------------------------------------------------------- vae


def _add_vae(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("vae", help="VAE reconstruction PSNR / SSIM on held-out renders (and photographs)",
                        description="Encode (posterior mean) and decode images with the model's VAE and report PSNR "
                        "(dB, on 8-bit images) and SSIM per image and on average: held-out shapes-world renders, "
                        "and with --photos scikit-image's bundled photographs (needs scikit-image).")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="SRC",
                   help="checkpoint file or diffusers folder (default: the built-in model)")
    p.add_argument("--count", type=int, default=64, metavar="N", help="held-out renders (default 64; 0: none)")
    p.add_argument("--size", type=int, default=None, metavar="S",
                   help="image side, a multiple of the VAE's factor (default: the model's native size)")
    p.add_argument("--photos", action="store_true", help="also scikit-image's photographs (astronaut, coffee, …)")
    p.add_argument("--seed", type=int, default=None, help="world seed of the renders (default: the evaluation's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--dtype", default="fp32", help="fp32, fp16, bf16 (default fp32)")
    p.add_argument("--out", metavar="FILE", help="write the report as JSON")
    _add_overwrite_flag(p)
    p.set_defaults(func=_cmd_vae)


def _cmd_vae(args: argparse.Namespace) -> int:
    from .evaluation import recon

    check_args(args)

    if args.count < 0 or args.batch_size < 1:
        raise EstableError("--count must be ≥ 0 and --batch-size positive")
    if args.count == 0 and not args.photos:
        raise EstableError("nothing to reconstruct: give --count N > 0 or --photos")
    if args.photos:
        recon.require_skimage_data()  # fail on a missing scikit-image before loading the model
    pipe = load_model_pipeline(args)
    factor = pipe.factor
    size = args.size or pipe.native_size[0]
    if size % factor or size < max(factor, 11):
        raise EstableError(f"--size {size} must be a multiple of {factor} (the VAE's factor) and at least 11 px "
                           "(the SSIM window)")
    report: dict[str, Any] = {"model": args.model, "size": size, "dtype": str(args.dtype)}
    kw = {"device": pipe.device, "batch_size": args.batch_size, "progress": True}
    if args.count:
        seed = recon.RENDER_SEED if args.seed is None else args.seed
        report["renders"] = recon.evaluate_reconstruction(pipe.vae, recon.heldout_renders(args.count, size, seed), **kw)
        report["renders"]["seed"] = seed
        print(recon.format_reconstruction("held-out shapes renders", report["renders"]))
    if args.photos:
        report["photos"] = recon.evaluate_reconstruction(pipe.vae, recon.skimage_photos(size), **kw)
        print(recon.format_reconstruction("scikit-image photographs", report["photos"]))
    _write_json(args.out, report)
    return 0


# ----------------------------------------------------------------------------------------- guidance sweep


def _add_guidance_sweep(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("guidance-sweep", help="compositional accuracy and FID for several CFG scales",
                        description="For each CFG scale: whole-prompt compositional accuracy (per prompt kind) and "
                        "judge-feature FID against real renders (with the real-vs-real floor). Writes sweep.json, "
                        "sweep.md and sweep.png (with matplotlib: pip install 'estable[plot]') to --out and recommends "
                        "the default CFG.")
    add_model_flags(p, cfg=False)
    _add_judge_flag(p)
    p.add_argument("--cfg", default="1,3,5,7.5,10", metavar="LIST",
                   help="comma-separated guidance scales (default 1,3,5,7.5,10)")
    p.add_argument("--prompts", type=int, default=200, metavar="N", help="held-out prompts per CFG (default 200)")
    p.add_argument("--images-per-prompt", type=int, default=2, metavar="K", help="images per prompt (default 2)")
    p.add_argument("--fid-count", type=int, default=1000, metavar="N",
                   help="images per set for FID (default 1000; 0 skips FID)")
    p.add_argument("--fid-split", choices=("train", "heldout"), default="heldout",
                   help="shapes-world split of the FID captions and real renders (default heldout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="feature batch size (default 64)")
    p.add_argument("--out", default="sweep", metavar="DIR", help="output folder (default ./sweep)")
    p.set_defaults(func=_cmd_guidance_sweep)


def _cmd_guidance_sweep(args: argparse.Namespace) -> int:
    from .evaluation.judge import JudgeFeatures, load_judge_or_default
    from .evaluation.plot import INSTALL_HINT, plotting_available
    from .evaluation.sweep import parse_cfgs, run_sweep, sweep_markdown, sweep_plot
    from .pipeline import resolve_device
    from .training.shapes import ShapesWorld

    try:
        cfgs = parse_cfgs(args.cfg)
    except ValueError as exc:
        raise EstableError(str(exc)) from None
    check_args(args, out_file=False)
    if args.prompts < 1 or args.images_per_prompt < 1 or args.fid_count < 0 or args.fid_count == 1:
        raise EstableError("--prompts and --images-per-prompt must be positive and --fid-count 0 or at least 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EstableError(f"--out {out} is a file; give a folder")
    plot = plotting_available()
    if not plot:  # said before the long part: the sweep still writes its table and JSON
        print(f"sweep.png will not be drawn ({INSTALL_HINT})", file=sys.stderr)
    device = resolve_device(args.device)
    judge = load_judge_or_default(args.judge, device)
    prompts = _prompt_set(args.prompts)
    pipe = None if args.model == "shapes" else load_model_pipeline(args)

    def make_generator(cfg: float) -> Callable[[list[str], list[int]], list[Any]]:
        return model_generator(argparse.Namespace(**{**vars(args), "cfg": cfg}), pipe)

    size = args.size or 256
    world = ShapesWorld(args.fid_split, FID_PROMPT_SEED)
    n = args.fid_count
    result = run_sweep(
        make_generator, judge, JudgeFeatures(judge), cfgs, prompts,
        images_per_prompt=args.images_per_prompt, seed=args.seed,
        real_images=lambda k: _iter_renders(args.fid_split, FID_REAL_SEED, k, size),
        floor_images=lambda k: _iter_renders(args.fid_split, FID_FLOOR_SEED, k, size),
        fid_captions=[world.scene(i).caption for i in range(n)],
        fid_seeds=[FID_PROMPT_SEED * 100_000 + i for i in range(n)],
        device=device, batch_size=args.batch_size, progress=True,
    )
    result.update(model=args.model, fid_split=args.fid_split,
                  generation={"steps": args.steps, "cfg_start": args.cfg_start, "sampler": args.sampler,
                              "size": args.size,
                              "prompt_completion": None if pipe is None else completion_used(args, pipe)})
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EstableError(f"cannot create {out}: {exc.strerror or exc}") from None
    from .checkpoints.io import atomic_write_text

    md = sweep_markdown(result, title=f"Guidance sweep: {args.model}")
    _write_json(str(out / "sweep.json"), result)
    atomic_write_text(out / "sweep.md", md)
    if plot:
        sweep_plot(result, out / "sweep.png")
    print(md)
    print(f"wrote {out / 'sweep.md'}" + (f" and {out / 'sweep.png'}" if plot else ""), file=sys.stderr)
    print(f"recommended default CFG: {result['recommended_cfg']:g}")
    return 0


EVAL_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_compositional,
    _add_fid,
    _add_clipscore,
    _add_vae,
    _add_guidance_sweep,
    _add_train_judge,
    _add_judge_accuracy,
]
