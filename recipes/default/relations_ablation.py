"""Issue 11's ablations: a U-Net run trained in segments, the model scored after each segment.

    python recipes/default/relations_ablation.py --config recipes/default/unet_relations.json \
        --run-dir runs/abl-frozen --every 300 --out OUT/abl-frozen.jsonl [--minutes 4] [KEY=VALUE ...]

After every ``--every`` steps (and once before the first, with ``--eval-start``) the run's model (EMA weights,
its text encoder as trained or as frozen) is exported next to the run and scored on ``--prompts`` held-out
prompts of ``--kinds`` with the shipped judge at each ``--cfg`` scale; one JSON line per evaluation and scale goes
to ``--out``: the step, the scale and the accuracy per category, overall and per prompt kind. ``--minutes`` stops
starting new segments after that much wall time. Runs resume: calling the script again continues where the run stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from estable import load_pipeline
from estable.cli_eval import parse_kinds
from estable.evaluation.compositional import evaluate, make_prompts
from estable.evaluation.judge import load_default_judge
from estable.params import GenerationParams
from estable.training.assemble import assemble_model
from estable.training.config import load_config
from estable.training.runs import latest_checkpoint
from estable.training.unet_trainer import UNetTrainer


def score(pipe, args: argparse.Namespace, device: str, judge, cfg_scale: float) -> dict:
    base = GenerationParams(steps=args.steps, cfg_scale=cfg_scale, width=256, height=256)
    prompts = make_prompts(args.prompts, mix=parse_kinds(args.kinds))

    def generate(texts: list[str], seeds: list[int]) -> list:
        return pipe.txt2img_each(texts, seeds, base, batch=32 if device == "cuda" else 8)

    report = evaluate(generate, judge, prompts, args.images_per_prompt, seed=0, prompts_per_call=16)
    return {"overall": report["overall"], "by_kind": report["by_kind"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--every", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--kinds", default="pair")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, action="append",
                    help="guidance scale of the scoring (repeatable: one line per scale; default 5)")
    ap.add_argument("--eval-start", action="store_true", help="also score the model before training")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    cfg = load_config("unet", args.config, args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge = load_default_judge(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def record(step: int, model: Path) -> None:
        pipe = load_pipeline(str(model), device=device, dtype="fp16" if device == "cuda" else "fp32")
        for scale in args.cfg or [5.0]:
            row = {"run": str(args.run_dir), "step": step, "minutes": round((time.monotonic() - t0) / 60, 2),
                   "cfg": scale, **score(pipe, args, device, judge, scale)}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            o = row["by_kind"].get("pair", row["overall"])
            print(f"{args.run_dir.name} step {step}, CFG {scale:g}: pair whole {o['whole_prompt']:.3f} position "
                  f"{o.get('position')}", flush=True)

    if args.eval_start and cfg.init_from:
        record(0, Path(cfg.init_from))
    while True:
        resume = latest_checkpoint(args.run_dir / "checkpoints") is not None
        trainer = UNetTrainer(cfg, args.run_dir, resume=resume, progress=False)
        if trainer.step >= cfg.max_steps:
            break
        trainer.train(until=min(trainer.step + args.every, cfg.max_steps))
        step = trainer.step
        trainer.close()
        del trainer
        model = assemble_model(args.run_dir, args.run_dir / "model.safetensors", dtype="fp16", overwrite=True)
        record(step, model)
        if args.minutes is not None and time.monotonic() - t0 > 60 * args.minutes:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
