"""The `estable` command. A thin shell over the library: parse, call, print; errors on one line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EstableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estable", description="Stable Diffusion, end to end.")
    parser.add_argument("--version", action="version", version=f"estable {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .cli_control import add_control_commands
    from .cli_eval import add_eval_commands
    from .cli_generate import add_generate_commands
    from .cli_provenance import add_provenance_commands
    from .cli_serve import add_serve_command
    from .cli_train import add_train_commands

    add_generate_commands(sub)
    _add_convert(sub)
    _add_info(sub)
    _add_data(sub)
    add_train_commands(sub)
    add_eval_commands(sub)
    add_serve_command(sub)
    add_control_commands(sub)
    add_provenance_commands(sub)
    return parser


# ---------------------------------------------------------------- convert / info


def _os_error(exc: OSError, fallback: object) -> EstableError:
    """An OSError from a bad path as a one-line EstableError that names the path."""
    where = exc.filename if exc.filename is not None else fallback
    return EstableError(f"{where}: {exc.strerror or exc}")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a model between SD single-file (ldm), diffusers and Estable formats",
        description="Convert a model: SRC is an SD .safetensors file (or, with --allow-pickle, a .ckpt), a "
        "diffusers folder or an Estable file; DST is written atomically in the --to format. A ControlNet converts "
        "between its own layouts (ldm: control_model. keys, diffusers: a ControlNetModel folder, estable).",
    )
    p.add_argument("src", metavar="SRC",
                   help='checkpoint file or diffusers folder to read ("default": the built-in model)')
    p.add_argument("dst", metavar="DST", help="file (ldm, estable: *.safetensors) or folder (diffusers) to write")
    p.add_argument("--to", required=True, choices=("ldm", "diffusers", "estable"), help="output format")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="convert the weights (default: keep)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of an LDM file's U-Net")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt/.pth/.bin pickles (tensors only are loaded; trust the source)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the prediction type (LDM files do not record it)")
    p.add_argument("--default-cfg", type=float, metavar="F",
                   help="record the guidance scale `estable generate` uses when --cfg is not given (--to estable)")
    p.add_argument("--default-sampler", metavar="NAME",
                   help="record the sampler `estable generate` and the server use when none is asked for, e.g. "
                   "dpmpp_2m (--to estable)")
    p.add_argument("--prompt-completion", metavar="NAME",
                   help="record the prompt completion the pipeline applies to this model's txt2img prompts, e.g. "
                   "shapes-grey-background (estable.prompt_completion), or none to remove one (--to estable)")
    p.add_argument("--vae", metavar="FILE",
                   help="bake in another VAE of the same shape (an A1111 VAE file, a diffusers vae/ folder, the "
                   "model.safetensors of an `estable train vae` checkpoint, e.g. a decoder fine-tune, or another "
                   "Estable model file, whose VAE it takes); the model's latent scaling factor is kept")
    p.add_argument("--quantize", choices=("int8",),
                   help="int8: store every Linear/Conv weight as int8 with one scale per output channel "
                   "(about 0.26x the fp32 size; --to estable only)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (a folder only when it is a diffusers model, with model_index.json)")
    p.set_defaults(func=_cmd_convert)


def _source(src: str) -> str:
    """``src``, or the built-in model's file for "default" (when no file or folder of that name exists)."""
    if src == "default" and not Path(src).exists():
        from .pipeline import default_model_path

        return str(default_model_path())
    return src


def _cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .checkpoints.store import LOAD_STAGES, SAVE_STAGES, load_model, save_model

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise EstableError(f"{dst} already exists; pass --overwrite to replace it")
    for flag, value in (("--default-cfg", args.default_cfg), ("--default-sampler", args.default_sampler),
                        ("--prompt-completion", args.prompt_completion)):
        if value is not None and args.to != "estable":
            raise EstableError(f"{flag} is recorded in Estable files only; {args.to} has no place for it "
                               "(use --to estable)")
    if args.default_sampler is not None:
        from .pipeline import resolve_sampler

        args.default_sampler = resolve_sampler(args.default_sampler).name  # an unknown name lists the valid ones
    if args.prompt_completion not in (None, "none"):
        from .prompt_completion import check_completion

        check_completion(args.prompt_completion)
    if args.quantize and args.to != "estable":
        raise EstableError(f"--quantize {args.quantize} writes an Estable file; use --to estable, not {args.to}")
    if args.default_cfg is not None and not 0.0 <= args.default_cfg <= 100.0:
        raise EstableError(f"--default-cfg must be between 0 and 100, not {args.default_cfg:g}")
    from .checkpoints.controlnet_format import convert_controlnet, is_controlnet

    if is_controlnet(args.src):  # a ControlNet: between its own three layouts
        for flag, value in (("--ema", args.ema), ("--prediction-type", args.prediction_type),
                            ("--default-cfg", args.default_cfg), ("--default-sampler", args.default_sampler),
                            ("--prompt-completion", args.prompt_completion), ("--vae", args.vae)):
            if value:
                raise EstableError(f"{flag} applies to whole models, not to a ControlNet")
        out = convert_controlnet(args.src, dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                                 allow_pickle=args.allow_pickle)
        print(f"wrote {out} ({args.to} ControlNet)")
        return 0
    if args.to == "diffusers":
        from .checkpoints.store import check_replaceable_folder

        check_replaceable_folder(dst)  # before the model loads: --overwrite replaces only a diffusers model folder
    bar = tqdm(total=LOAD_STAGES + SAVE_STAGES, unit="stage", file=sys.stderr, leave=False, disable=None,
               bar_format="{desc:<32} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
    started = False

    def stage(label: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_description_str(label)

    try:
        model = load_model(_source(args.src), allow_pickle=args.allow_pickle, ema=args.ema,
                           prediction_type=args.prediction_type, progress=stage)
        if args.default_cfg is not None:
            model.config = dataclasses.replace(model.config, default_cfg=args.default_cfg)
        if args.default_sampler is not None:
            model.config = dataclasses.replace(model.config, default_sampler=args.default_sampler)
        if args.prompt_completion is not None:
            completion = None if args.prompt_completion == "none" else args.prompt_completion
            model.config = dataclasses.replace(model.config, prompt_completion=completion)
        if args.vae:
            from .checkpoints.vae_file import load_vae_into

            load_vae_into(model.vae, args.vae, allow_pickle=args.allow_pickle)
        if args.quantize:
            from .checkpoints.quantize import quantize_model_int8

            quantize_model_int8(model)
        out = save_model(model, dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite, progress=stage)
        bar.update(1)
    except OSError as exc:
        raise _os_error(exc, args.src) from exc
    finally:
        bar.close()
    print(f"wrote {out} ({args.to})")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint file or diffusers folder (reads headers only)",
                       description="Describe a checkpoint: format, family, components, dtypes, prediction "
                       "type, resolution, size and hashes. Networks are not built.")
    p.add_argument("path", metavar="FILE_OR_FOLDER", help='a checkpoint, or "default" for the built-in model')
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--no-hash", action="store_true", help="skip the SHA-256 (slow on multi-GB files)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a pickle checkpoint's tensors (safely) to describe them")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints.info import describe, format_info

    try:
        info = describe(_source(args.path), hashes=not args.no_hash, allow_pickle=args.allow_pickle)
    except OSError as exc:
        raise _os_error(exc, args.path) from exc
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make training data", description="Make training data.")
    kinds = p.add_subparsers(dest="data_command", metavar="KIND", required=True)
    s = kinds.add_parser(
        "shapes",
        help="write the procedural shapes world as an image folder (PNG + metadata.jsonl)",
        description="Render seeded shapes-world scenes with captions and ground-truth attributes into OUT, in the "
        "image-folder layout the trainers read (metadata.jsonl with file_name and text).",
    )
    s.add_argument("out", metavar="OUT", help="folder to write (created if missing)")
    s.add_argument("--count", type=int, required=True, help="number of images")
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="train, or held-out attribute combinations never seen in training (default train)")
    s.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the images and metadata an earlier `estable data shapes` wrote in OUT (other files "
                   "are kept)")
    s.add_argument("--append", action="store_true",
                   help="add COUNT new images (the next scenes of the same world) after those already in OUT")
    s.set_defaults(func=_cmd_data_shapes)


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from .training.shapes import write_folder

    if args.overwrite and args.append:
        raise EstableError("--overwrite and --append exclude each other")
    if args.count < 1:
        raise EstableError(f"--count must be at least 1, not {args.count}")
    existing = "overwrite" if args.overwrite else "append" if args.append else "refuse"
    try:
        meta = write_folder(args.out, args.count, args.size, args.split, args.seed, progress=True, existing=existing)
    except KeyboardInterrupt:
        lines = Path(args.out) / "metadata.jsonl"
        kept = sum(1 for _ in lines.open(encoding="utf-8")) if lines.is_file() else 0
        print(f"estable: interrupted; {args.out} holds {kept} complete images, each with its metadata line "
              "(--append continues)", file=sys.stderr)
        raise
    except ValueError as exc:
        raise EstableError(str(exc)) from exc
    except OSError as exc:
        raise _os_error(exc, args.out) from exc
    print(f"wrote {args.count} images and {meta}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                            for e in extra):
        args.overrides += extra  # `train … --no-progress key=value`: overrides after an option are overrides too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe can still be handled below, not at interpreter exit
        return code
    except EstableError as exc:
        print(f"estable: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("estable: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`estable info … | head`): stop without a traceback, and
        with contextlib.suppress(OSError, ValueError):  # without another when Python flushes stdout on exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
