"""Train and measure the noise-residue detector (estable.provenance.detector): generated vs real.

    PYTHONPATH=src python benchmarks/train_residual_detector.py --fake runs/wm/clean --count 200 \
        --weights src/estable/assets/residual_detector.safetensors --out runs/detector.json

Generated: ``--count`` PNGs of the built-in model from ``--fake`` (e.g. the clean set of
benchmarks/watermark_robustness.py; made here with 25 steps of DPM++ 2M Karras if the folder has fewer).
Real: as many shapes-world renders (split "train", world seed 41) at 256 × 256. No photographs: none ship with the
environment. The first 75 % of each class train (40 epochs, AdamW, augmentations: JPEG q 60–95 with p = 0.5,
resize 0.5–1 and back with p = 0.3, both classes alike); the last 25 % are held out. Reported on the held-out
images: accuracy at P = 0.5 and ROC AUC, clean, after JPEG 75 / 50, after resize 0.5 and back, and with the DWT
watermark written into the generated images.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from estable.provenance.detector import DetectorConfig, ResidualDetector, residual_spectrum, save_detector


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resize(im: Image.Image, f: float) -> Image.Image:
    w, h = im.size
    small = im.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def augment(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.3:
        im = resize(im, float(rng.uniform(0.5, 1.0)))
    if rng.random() < 0.5:
        im = jpeg(im, int(rng.integers(60, 96)))
    return im


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def fake_images(args: argparse.Namespace) -> list[Image.Image]:
    folder = Path(args.fake) if args.fake else None
    files = sorted(folder.glob("*.png"))[: args.count] if folder and folder.is_dir() else []
    images = [Image.open(f).convert("RGB") for f in files]
    if len(images) < args.count:
        from estable.evaluation.compositional import make_prompts
        from estable.params import GenerationParams
        from estable.pipeline import load_pipeline

        pipe = load_pipeline("default", device=args.device)
        params = GenerationParams(steps=args.steps, cfg_scale=pipe.config.default_cfg or 7.0)
        prompts = [p.caption for p in make_prompts(args.count)][len(images) :]
        images += pipe.txt2img_each(prompts, [7000 + i for i in range(len(prompts))], params, batch=16)
    return images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fake", help="folder of the built-in model's PNGs")
    ap.add_argument("--count", type=int, default=200, help="images per class (default 200)")
    ap.add_argument("--weights", required=True, help="where to write the detector")
    ap.add_argument("--out", required=True, help="JSON report")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=25, help="sampling steps when images are made here")
    ap.add_argument("--device", default="cpu", help="device for making missing generated images")
    args = ap.parse_args(argv)
    if args.count < 4:
        ap.error("--count must be at least 4")
    from estable.provenance.watermark import mark_image
    from estable.training.shapes import ShapesWorld, render

    t0 = time.time()
    torch.manual_seed(0)
    fake = fake_images(args)
    world = ShapesWorld("train", 41)
    real = [render(world.scene(i), 256) for i in range(args.count)]
    n_train = (3 * args.count) // 4
    train = [(im, 1.0) for im in fake[:n_train]] + [(im, 0.0) for im in real[:n_train]]
    model = ResidualDetector(DetectorConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        order = rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            x = torch.stack([residual_spectrum(augment(train[i][0], rng)) for i in idx])
            y = torch.tensor([train[i][1] for i in idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}: loss {total / len(train):.4f}", file=sys.stderr, flush=True)
    model.eval()

    held_fake, held_real = fake[n_train:], real[n_train:]
    conditions = {
        "clean": lambda im: im,
        "jpeg75": lambda im: jpeg(im, 75),
        "jpeg50": lambda im: jpeg(im, 50),
        "resize0.5": lambda im: resize(im, 0.5),
    }
    report: dict = {"count_per_class": args.count, "train_per_class": n_train, "held_out_per_class": len(held_fake),
                    "epochs": args.epochs, "results": {}}
    for name, fn in conditions.items():
        pf = np.array(model.probability([fn(im) for im in held_fake]))
        pr = np.array(model.probability([fn(im) for im in held_real]))
        acc = float(((pf > 0.5).sum() + (pr <= 0.5).sum()) / (len(pf) + len(pr)))
        report["results"][name] = {"accuracy": acc, "auc": auc(pf, pr)}
    marked = [mark_image(im)[0] for im in held_fake]
    pm = np.array(model.probability(marked))
    pr = np.array(model.probability(held_real))
    report["results"]["dwt_marked"] = {"accuracy": float(((pm > 0.5).sum() + (pr <= 0.5).sum()) / (len(pm) + len(pr))),
                                       "auc": auc(pm, pr)}
    report["seconds"] = time.time() - t0
    save_detector(model, args.weights, info={"trained_on": "built-in model vs shapes-world renders",
                                             "results": report["results"]})
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
