"""Robustness of Estable's watermarks, and what the Tree-Ring key costs, on the built-in model.

    PYTHONPATH=src python benchmarks/watermark_robustness.py --count 200 --out runs/wm          # everything
    PYTHONPATH=src python benchmarks/watermark_robustness.py --count 200 --parts dwtdct --out runs/wm_dwt

Images: ``--count`` held-out prompts of the compositional benchmark (one image each, seed 5000 + index, 25 steps
of DPM++ 2M Karras at the model's guidance scale), made twice with the same seeds: *clean* (no marks) and
*ring* (Tree-Ring key in the initial noise). *marked* = ring + the DWT watermark, i.e. what
``estable generate --tree-ring`` writes (with ``--parts dwtdct`` alone: clean + the DWT watermark). Kept as PNGs
under OUT/{clean,ring,marked}/ and reused by later runs.

Attacks (each image, then re-read): none; JPEG quality 75 / 50 / 25 (Pillow's defaults, 4:2:0 chroma); resize
to 0.5 and back (bicubic); crop of a random 75 % × 75 % window, resized back; rotation by 15° (bilinear, same
canvas); Gaussian blur radius 2 (the Tree-Ring paper's 4 at 512 px, scaled to 256 px); Gaussian noise σ = 0.1
(of the full range, the paper's); brightness × 1.5.

Parts (``--parts``):
* ``dwtdct``: bit accuracy of the 64-bit message on marked images, the share of marked images in which the
  mark is found (≥ 28 of 32 mark bits) and the share of clean images in which it is wrongly found; beside it,
  when invisible-watermark is installed, the bit accuracy of that package's own dwtDct marks (its encoder on the
  clean images, its decoder) under the same attacks.
* ``treering``: DDIM inversion (``--inversion-steps``, 50) of every marked and clean image under every attack;
  score −log10 p; ROC AUC and TPR at 1 % FPR (threshold: the clean scores' 99th percentile), and the share
  found at the detector's threshold p < 1e-3. 2 × count × 10 inversions: run it on a GPU at full size.
* ``quality``: compositional accuracy (Estable's judge) and judge-feature FID against ``count`` held-out renders,
  for clean and ring images: what the key costs.

Writes OUT/results.json and OUT/table.md.
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
from PIL import Image, ImageEnhance, ImageFilter

from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.provenance import treering
from estable.provenance.watermark import MARK, detect_dwtdct, mark_image, message_bytes

SEED = 5000
ATTACKS = ["none", "jpeg75", "jpeg50", "jpeg25", "resize0.5", "crop75", "rot15", "blur", "noise", "bright"]


def attack(name: str, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if name == "none":
        return image
    if name.startswith("jpeg"):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(name[4:]))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if name == "resize0.5":
        small = image.resize((w // 2, h // 2), Image.Resampling.BICUBIC)
        return small.resize((w, h), Image.Resampling.BICUBIC)
    if name == "crop75":
        cw, ch = int(round(w * 0.75)), int(round(h * 0.75))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
    if name == "rot15":
        return image.rotate(15, resample=Image.Resampling.BILINEAR)
    if name == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=2))
    if name == "noise":
        arr = np.asarray(image, dtype=np.float64) + rng.normal(0, 0.1 * 255, (h, w, 3))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if name == "bright":
        return ImageEnhance.Brightness(image).enhance(1.5)
    raise ValueError(name)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score of a marked image > score of a clean one), ties counted half (Mann–Whitney)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    threshold = np.quantile(neg, 1.0 - fpr, method="higher")
    return float((pos > threshold).mean())


def generate_sets(pipe, args, prompts, out: Path, ring: bool = True) -> dict[str, list[Image.Image]]:
    cfg = args.cfg if args.cfg is not None else (pipe.config.default_cfg or GenerationParams().cfg_scale)
    params = GenerationParams(steps=args.steps, cfg_scale=cfg, sampler="dpmpp_2m_karras")
    seeds = [SEED + i for i in range(len(prompts))]
    sets: dict[str, list[Image.Image]] = {}
    for name, hook in (("clean", None), ("ring", treering.inject))[: 2 if ring else 1]:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / f"{i:05d}.png" for i in range(len(prompts))]
        missing = [i for i, f in enumerate(files) if not f.is_file()]
        t = time.time()
        pipe.noise_hook = hook
        try:
            for start in range(0, len(missing), args.batch):
                idx = missing[start : start + args.batch]
                images = pipe.txt2img_each([prompts[i] for i in idx], [seeds[i] for i in idx], params,
                                           batch=args.batch)
                for i, im in zip(idx, images):
                    im.save(files[i])
                print(f"  {name}: {min(start + args.batch, len(missing))}/{len(missing)} made "
                      f"({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
        finally:
            pipe.noise_hook = None
        sets[name] = [Image.open(f).convert("RGB") for f in files]
    folder = out / "marked"
    folder.mkdir(exist_ok=True)
    sets["marked"] = []
    for i, im in enumerate(sets["ring" if ring else "clean"]):
        marked, note = mark_image(im)
        if note:
            raise SystemExit(note)
        marked.save(folder / f"{i:05d}.png")
        sets["marked"].append(marked)
    return sets


def reference_codec():
    """(encode, decode) of the invisible-watermark package's dwtDct on RGB arrays, or None when not installed: the
    same attacks on the reference's own marks, to tell the scheme's limits from this implementation's."""
    try:
        import cv2
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        return None
    enc = WatermarkEncoder()
    enc.set_watermark("bytes", message_bytes())

    def encode(im: Image.Image) -> Image.Image:
        bgr = enc.encode(cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR), "dwtDct")
        return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def decode(im: Image.Image) -> np.ndarray:
        dec = WatermarkDecoder("bits", 64)
        return np.asarray(dec.decode(cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR), "dwtDct"), dtype=np.uint8)

    return encode, decode


def run_dwtdct(sets, count, attacks=tuple(ATTACKS)) -> dict[str, dict[str, float]]:
    want = np.unpackbits(np.frombuffer(message_bytes(), np.uint8))
    ref = reference_codec()
    ref_marked = [ref[0](im) for im in sets["clean"]] if ref else None
    rows = {}
    for name in attacks:
        acc, found, false_pos = [], 0, 0
        rng = np.random.default_rng(1)
        for im in sets["marked"]:
            f = detect_dwtdct(attack(name, im, rng))
            bits = np.unpackbits(np.frombuffer(bytes.fromhex(f.message), np.uint8)) if f.message else want * 0
            acc.append(float((bits == want).mean()))
            found += f.found
        rng = np.random.default_rng(1)
        for im in sets["clean"]:
            false_pos += detect_dwtdct(attack(name, im, rng)).found
        rows[name] = {"bit_accuracy": float(np.mean(acc)), "detected": found / count,
                      "false_positive": false_pos / count}
        if ref:
            rng = np.random.default_rng(1)
            rows[name]["reference_bit_accuracy"] = float(np.mean(
                [(ref[1](attack(name, im, rng)) == want).mean() for im in ref_marked]))
        print(f"  dwtdct {name}: {rows[name]}", file=sys.stderr, flush=True)
    return rows


def run_treering(pipe, sets, args) -> dict[str, dict[str, float]]:
    rows = {}
    for name in args.attacks:
        t = time.time()
        scores: dict[str, np.ndarray] = {}
        for which in ("marked", "clean"):
            rng = np.random.default_rng(2)
            ps = []
            for im in sets[which]:
                p, _ = treering.p_value(treering.invert(pipe, attack(name, im, rng), args.inversion_steps))
                ps.append(p)
            scores[which] = -np.log10(np.maximum(np.array(ps), 1e-300))
        pos, neg = scores["marked"], scores["clean"]
        rows[name] = {"auc": auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg),
                      "found_at_p_1e-3": float((pos > 3).mean()), "clean_found_at_p_1e-3": float((neg > 3).mean())}
        print(f"  treering {name}: {rows[name]} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    return rows


def run_quality(args, sets, prompts_full, device) -> dict[str, dict[str, float]]:
    from estable.evaluation.compositional import score_image, summarise
    from estable.evaluation.fid import extract_features, feature_stats, frechet_distance
    from estable.evaluation.judge import JudgeFeatures, load_judge_or_default
    from estable.training.shapes import ShapesWorld, render

    judge = load_judge_or_default(None, device)
    world = ShapesWorld("heldout", 31)
    renders = [render(world.scene(i), 256) for i in range(len(prompts_full))]
    feats = JudgeFeatures(judge)
    stats_real = feature_stats(extract_features(renders, feats, device=device))
    out = {}
    for name in ("clean", "ring"):
        images = sets[name]
        dets = judge.detect(images)
        bgs = judge.classify_background(images) if hasattr(judge, "classify_background") else [None] * len(images)
        per_prompt = [{"index": p.index, "kind": p.kind, "prompt": p.caption, "images": [score_image(p.spec, d, b)]}
                      for p, d, b in zip(prompts_full, dets, bgs)]
        summary = summarise(per_prompt, images_per_prompt=1, seed=SEED)
        fid = frechet_distance(*feature_stats(extract_features(images, feats, device=device)), *stats_real)
        out[name] = {"compositional_whole_prompt": summary["overall"]["whole_prompt"], "fid_judge": fid}
        print(f"  quality {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def table(results: dict) -> str:
    lines = []
    if "dwtdct" in results:
        lines += ["| attack | DWT bit accuracy | DWT mark found (marked) | DWT mark found (clean) "
                  "| invisible-watermark's own marks: bit accuracy |", "|---|---|---|---|---|"]
        for k, r in results["dwtdct"].items():
            ref = r.get("reference_bit_accuracy")
            lines.append(f"| {k} | {r['bit_accuracy']:.3f} | {100 * r['detected']:.1f} % | "
                         f"{100 * r['false_positive']:.1f} % | {'–' if ref is None else f'{ref:.3f}'} |")
        lines.append("")
    if "treering" in results:
        lines += ["| attack | Tree-Ring AUC | TPR @ 1 % FPR | found at p < 1e-3 (marked / clean) |",
                  "|---|---|---|---|"]
        for k, r in results["treering"].items():
            lines.append(f"| {k} | {r['auc']:.3f} | {100 * r['tpr_at_1pct_fpr']:.1f} % | "
                         f"{100 * r['found_at_p_1e-3']:.1f} % / {100 * r['clean_found_at_p_1e-3']:.1f} % |")
        lines.append("")
    if "quality" in results:
        lines += ["| images | compositional accuracy (whole prompt) | FID (judge features) |", "|---|---|---|"]
        for k, r in results["quality"].items():
            lines.append(f"| {k} | {100 * r['compositional_whole_prompt']:.1f} % | {r['fid_judge']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="images per set (default 200)")
    ap.add_argument("--out", required=True, help="folder for the images, results.json and table.md")
    ap.add_argument("--parts", default="dwtdct,treering,quality", help="comma-separated: dwtdct, treering, quality")
    ap.add_argument("--attacks", default=",".join(ATTACKS),
                    help="comma-separated attacks to run (default: all: " + ", ".join(ATTACKS) + ")")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--inversion-steps", type=int, default=treering.INVERSION_STEPS)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not args.attacks or not set(args.attacks) <= set(ATTACKS):
        ap.error(f"--attacks takes a comma-separated subset of {', '.join(ATTACKS)}")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"dwtdct", "treering", "quality"} or args.count < 2:
        ap.error("--parts takes dwtdct, treering, quality; --count must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    from estable.evaluation.compositional import make_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = load_pipeline(args.model, device=args.device, dtype="fp32" if args.device == "cpu" else "auto")
    prompts_full = make_prompts(args.count)
    # the DWT watermark alone needs no ring images: then marked = clean + DWT (half the generation)
    ring = bool(parts & {"treering", "quality"})
    sets = generate_sets(pipe, args, [p.caption for p in prompts_full], out, ring=ring)
    results: dict = {"count": args.count, "model": pipe.model_name, "device": str(pipe.device),
                     "steps": args.steps, "inversion_steps": args.inversion_steps, "mark": MARK.hex(),
                     "generation_s": time.time() - t0}
    if "dwtdct" in parts:
        t = time.time()
        results["dwtdct"] = run_dwtdct(sets, args.count, args.attacks)
        results["dwtdct_s"] = time.time() - t
    if "treering" in parts:
        t = time.time()
        results["treering"] = run_treering(pipe, sets, args)
        results["treering_s"] = time.time() - t
    if "quality" in parts:
        results["quality"] = run_quality(args, sets, prompts_full, pipe.device)
    results["total_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (out / "table.md").write_text(table(results))
    print(table(results))
    print(f"total {results['total_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
