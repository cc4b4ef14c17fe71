"""How well a textual-inversion word draws its colour on the built-in model (CPU or GPU).

    PYTHONPATH=src python benchmarks/ti_colour.py --embeddings RUN --out DIR [--seeds 4] [--model default]

RUN holds the ``<token>.safetensors`` of ``estable train ti`` (token and target colour are read from the run's
config.json). For every shape of the shapes world and every seed, "a <token> <shape>" is generated three ways:
with the embedding, without it (the word as the tokenizer spells it), and with the known colour name nearest to
the target. For each image the object's pixels (those far from the grey background) are averaged; reported: the
mean RGB distance of that colour to the target, and how often the target is the nearest of the palette
(the eight shapes-world colours plus the target). Writes DIR/ti_colour.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from estable import GenerationParams, load_pipeline
from estable.embeddings import EmbeddingLibrary
from estable.training.shapes import COLOURS, SHAPES

GREY = np.array([140, 140, 140], dtype=np.float64)


def object_colour(image) -> np.ndarray | None:
    """Mean RGB of the pixels that differ from the grey background by more than 50 levels in some channel."""
    px = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    mask = np.abs(px - GREY).max(axis=1) > 50
    return px[mask].mean(axis=0) if mask.sum() >= 20 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embeddings", required=True, help="the ti run folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    run = Path(args.embeddings)
    cfg = json.loads((run / "config.json").read_text())
    token, target = cfg["token"], np.array(cfg["colour"], dtype=np.float64)
    nearest = min(COLOURS, key=lambda c: float(np.linalg.norm(np.array(COLOURS[c]) - target)))
    palette = {**{c: np.array(v, dtype=np.float64) for c, v in COLOURS.items()}, token: target}

    pipe = load_pipeline(args.model, device=args.device, dtype="fp32")
    library = EmbeddingLibrary(run)
    results: dict[str, dict] = {}
    t0 = time.time()
    for label, word, lib in (("with embedding", token, library), ("without (plain word)", token, None),
                             (f"known nearest colour '{nearest}'", nearest, None)):
        pipe.embeddings = lib
        dists, hits, missing = [], 0, 0
        for shape in SHAPES:
            for seed in range(args.seeds):
                params = GenerationParams(prompt=f"a {word} {shape}", seed=seed, steps=args.steps,
                                          cfg_scale=pipe.config.default_cfg or 5.0)
                colour = object_colour(pipe.txt2img(params).images[0])
                if colour is None:
                    missing += 1
                    continue
                dists.append(float(np.linalg.norm(colour - target)))
                hits += min(palette, key=lambda c: float(np.linalg.norm(palette[c] - colour))) == token
        n = len(SHAPES) * args.seeds
        results[label] = {"images": n, "no_object": missing, "mean_rgb_distance": float(np.mean(dists)),
                          "target_nearest_fraction": hits / n}
        print(label, results[label], f"{time.time() - t0:.0f} s", flush=True)
    pipe.embeddings = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"token": token, "target": target.tolist(), "model": args.model, "seeds": args.seeds,
              "steps": args.steps, "seconds": round(time.time() - t0, 1), "results": results}
    (out / "ti_colour.json").write_text(json.dumps(record, indent=2))
    print(f"| prompt 'a {token} SHAPE' | mean RGB distance to {tuple(int(v) for v in target)} | "
          "target is the nearest palette colour | no object found |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['mean_rgb_distance']:.1f} | {r['target_nearest_fraction']:.0%} | {r['no_object']} |")


if __name__ == "__main__":
    main()
