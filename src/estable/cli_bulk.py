"""``estable generate --prompts FILE --out DIR``: the command-line shell of :mod:`estable.bulk`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import EstableError

__all__ = ["cmd_bulk"]

# generate's flag dest -> GenerationParams field, for the defaults of every line (--seed and --batch mean
# something else in bulk mode: the base seed and the number of images denoised together)
_DEFAULT_FLAGS = {
    "negative": "negative_prompt",
    "sampler": "sampler",
    "steps": "steps",
    "cfg": "cfg_scale",
    "cfg_start": "cfg_start",
    "batch_count": "batch_count",
    "clip_skip": "clip_skip",
    "weighting": "weighting",
    "eta": "eta",
}


def cmd_bulk(args: argparse.Namespace) -> int:
    from .bulk import run_bulk
    from .cli_generate import parse_size
    from .pipeline import DEFAULT_MODEL, load_pipeline, resolve_sampler
    from .provenance.policy import ProvenancePolicy

    if args.prompt is not None:
        raise EstableError("give either a PROMPT or --prompts FILE, not both")
    if args.from_png is not None:
        raise EstableError("--from-png cannot be combined with --prompts; put the parameters in the JSONL lines")
    if args.out is None:
        raise EstableError("--prompts needs --out FOLDER for the images")
    defaults: dict[str, Any] = {}
    for flag, name in _DEFAULT_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            defaults[name] = value
    if args.size is not None:
        defaults["width"], defaults["height"] = parse_size(args.size)
    if "sampler" in defaults:
        resolve_sampler(defaults["sampler"])
    speed = "max" if getattr(args, "compile", False) else None

    def load(device: str):
        kw: dict[str, Any] = {"speed": speed} if speed else {}
        return load_pipeline(args.model or DEFAULT_MODEL, device=device, dtype=args.dtype or "auto",
                             cuda_graphs=args.cuda_graphs, allow_pickle=bool(args.allow_pickle), **kw)

    def adjust(pipe: Any, line: Any) -> Any:
        # The model's recommended guidance scale and sampler where neither the line nor a flag sets one (as
        # `generate` does).
        return pipe.with_model_defaults(line.params, cfg="cfg_scale" not in line.given,
                                        sampler="sampler" not in line.given)

    policy = ProvenancePolicy.configure(  # the same filter, marks and records as a single generate
        watermark=args.watermark, watermark_key=args.watermark_key, tree_ring=bool(args.tree_ring),
        sign_key=args.sign_key, blocklists=args.blocklist or (), output_check=args.output_check,
        output_clip=args.output_clip, output_threshold=args.output_threshold)
    stats = run_bulk(load, args.prompts, args.out, defaults=defaults, base_seed=args.seed,
                     batch=args.batch if args.batch is not None else 8, device=args.device or "auto",
                     on_path=print, adjust=adjust, policy=policy)
    rate = stats["made"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    where = f"rank {stats['rank']}/{stats['world_size']}: " if stats["world_size"] > 1 else ""
    print(f"estable: {where}{stats['made']} images made ({rate:.2f}/s), {stats['skipped']} already there",
          file=sys.stderr)
    if stats["refused"]:
        raise EstableError(policy.refusal_message(stats["refused"]))
    return 0
