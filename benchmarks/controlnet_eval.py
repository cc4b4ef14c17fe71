"""Edge agreement of a shapes-world ControlNet: edge F1 of controlled vs uncontrolled images against the control edges.

    PYTHONPATH=src python benchmarks/controlnet_eval.py --controlnet runs/controlnet/controlnet.safetensors \\
        --count 200 --out benchmarks/controlnet_eval

For ``--count`` scenes of the shapes world (seeded, split "train" with a seed the training never used: the scenes are
new, their vocabulary is not), the caption and the Canny edges of the rendered scene are the prompt and the control
image; the model makes one image with the ControlNet and one without (same seed, sampler, steps, guidance). The
Canny edges of each output are scored against the control edges (estable.evaluation.edges: precision, recall, F1
at ``--tolerance`` pixels). Writes ``OUT/controlnet_eval.json`` (per-image and mean scores, every setting) and
``OUT/controlnet_eval.png`` (rows: control edges, controlled, uncontrolled, first 8 scenes). Runs on a GPU when there
is one (fp16), else on the CPU (fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from estable.checkpoints.controlnet_format import load_controlnet
from estable.control import ControlUnit
from estable.control.preprocess import canny
from estable.evaluation.edges import edge_f1_images
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.shapes import ShapesWorld

EVAL_SEED = 90210  # a world seed no recipe trains on


def evaluate(model: str, controlnet: str, *, count: int, size: int, steps: int, cfg: float, scale: float,
             tolerance: int, low: float, high: float, sigma: float, sampler: str, device: str, dtype: str,
             seed: int = EVAL_SEED) -> tuple[dict, list[tuple[Image.Image, Image.Image, Image.Image]]]:
    pipe = load_pipeline(model, device=device, dtype=dtype)
    net = load_controlnet(controlnet, base=pipe.config.unet, dtype=pipe.dtype, device=pipe.device)
    world = ShapesWorld("train", seed, size=size)
    rows, grid = [], []
    t0 = time.perf_counter()
    for i in range(count):
        image, caption, _ = world.sample(i)
        edges = canny(image, low, high, sigma)
        params = GenerationParams(prompt=caption, sampler=sampler, steps=steps, cfg_scale=cfg, seed=i, width=size,
                                  height=size)
        controlled = pipe.txt2img(params, control=[ControlUnit(net=net.model, image=edges, scale=scale)]).images[0]
        plain = pipe.txt2img(params).images[0]
        with_cn = edge_f1_images(controlled, edges, tolerance, low=low, high=high, sigma=sigma)
        without = edge_f1_images(plain, edges, tolerance, low=low, high=high, sigma=sigma)
        rows.append({"index": i, "caption": caption, "controlled": vars(with_cn) | {"f1": with_cn.f1},
                     "uncontrolled": vars(without) | {"f1": without.f1}})
        if i < 8:
            grid.append((edges, controlled, plain))
    elapsed = time.perf_counter() - t0

    def mean(which: str, key: str) -> float:
        return statistics.fmean(r[which][key] for r in rows)

    kinds = ("controlled", "uncontrolled")
    summary = {which: {k: mean(which, k) for k in ("precision", "recall", "f1")} for which in kinds}
    return {"summary": summary, "images": rows, "seconds": elapsed,
            "settings": {"model": model, "controlnet": controlnet, "count": count, "size": size, "steps": steps,
                         "cfg": cfg, "scale": scale, "tolerance": tolerance, "canny": [low, high, sigma],
                         "sampler": sampler, "device": str(pipe.device), "dtype": str(pipe.dtype),
                         "world_seed": seed}}, grid


def save_grid(grid: list[tuple[Image.Image, Image.Image, Image.Image]], path: Path) -> None:
    if not grid:
        return
    w, h = grid[0][0].size
    out = Image.new("RGB", (w * len(grid), h * 3))
    for col, images in enumerate(grid):
        for row, im in enumerate(images):
            out.paste(im.convert("RGB").resize((w, h)), (col * w, row * h))
    out.save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="base model (default: the built-in model)")
    ap.add_argument("--controlnet", required=True, help="the ControlNet file (RUN/controlnet.safetensors)")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--scale", type=float, default=1.0, help="ControlNet weight")
    ap.add_argument("--tolerance", type=int, default=2, help="pixels")
    ap.add_argument("--low", type=float, default=100.0)
    ap.add_argument("--high", type=float, default=200.0)
    ap.add_argument("--sigma", type=float, default=1.0, help="Canny smoothing (the recipe trains with 1)")
    ap.add_argument("--sampler", default="dpmpp_2m_karras")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    result, grid = evaluate(args.model, args.controlnet, count=args.count, size=args.size, steps=args.steps,
                            cfg=args.cfg, scale=args.scale, tolerance=args.tolerance, low=args.low, high=args.high,
                            sigma=args.sigma, sampler=args.sampler, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controlnet_eval.json").write_text(json.dumps(result, indent=2))
    save_grid(grid, out / "controlnet_eval.png")
    s = result["summary"]
    c, u = s["controlled"], s["uncontrolled"]
    print(f"edge F1 at {args.tolerance} px over {args.count} scenes: controlled {c['f1']:.3f} (P {c['precision']:.3f}, "
          f"R {c['recall']:.3f}), uncontrolled {u['f1']:.3f} (P {u['precision']:.3f}, R {u['recall']:.3f}); "
          f"{result['seconds']:.0f} s; wrote {out}")
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
