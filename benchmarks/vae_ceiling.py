"""What the VAE alone costs the shapes-world measures: real held-out renders through encode → decode, judged.

Whatever the U-Net draws reaches the judge through the VAE's decoder, so the decoder's reconstructions of real
renders bound the whole model from above: their compositional accuracy under the judge is the best a perfect
U-Net could score, and their FID against real renders is the lowest FID it could reach.

For each model (its VAE; U-Net and text encoder unused), N held-out renders of world seed 33 (the FID floor's
set of ``estable eval fid``) are encoded to the posterior mean and decoded. Reported:
- judge accuracy (``estable.evaluation.judge.score_detections``) on the originals and on the reconstructions,
  with the plain backgrounds separately;
- FID, judge features, of the reconstructions against N renders of world seed 31 (the reference set of
  ``estable eval fid``), beside the originals' FID against it (the real-vs-real floor).

    PYTHONPATH=src python benchmarks/vae_ceiling.py default [MODEL...] --count 1000 --device cuda --out ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from estable.cli_eval import FID_FLOOR_SEED, FID_REAL_SEED
from estable.evaluation.fid import extract_features, feature_stats, frechet_distance
from estable.evaluation.judge import JudgeFeatures, load_judge_or_default, score_detections
from estable.evaluation.recon import reconstruct
from estable.pipeline import load_pipeline, resolve_device
from estable.training.shapes import ShapesWorld, render

ROWS = (("object_object", "objects, all attributes"), ("count", "count"), ("relation", "relation (pairs)"),
        ("background_kind", "background kind"), ("plain_background", "plain backgrounds, kind"),
        ("scene_exact", "whole scene exact"))


def judged(judge, scenes, images) -> dict:
    dets = judge.detect(images, 32)
    bgs = judge.classify_background(images, 32)
    report = score_detections(scenes, dets, bgs)
    plain = [kind == "plain" for s, (kind, _) in zip(scenes, bgs) if s.background.kind == "plain"]
    report["plain_background"] = sum(plain) / max(len(plain), 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help='model files ("default": the built-in model)')
    ap.add_argument("--count", type=int, default=1000, help="renders per set (default 1000)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    judge = load_judge_or_default(None, device).eval()
    features = JudgeFeatures(judge)
    n = args.count
    scenes = [ShapesWorld("heldout", FID_FLOOR_SEED).scene(i) for i in range(n)]
    reference = ShapesWorld("heldout", FID_REAL_SEED)

    def stats(images):
        return feature_stats(extract_features(iter(images), features, batch_size=64, device=device, total=len(images),
                                              progress=False))

    originals = [render(s, args.size) for s in scenes]
    ref_stats = stats([render(reference.scene(i), args.size) for i in range(n)])
    result = {"count": n, "size": args.size, "originals": judged(judge, scenes, originals)}
    result["originals"]["fid"] = frechet_distance(*stats(originals), *ref_stats)
    for model in args.models:
        vae = load_pipeline(model, device=device, dtype="fp32", cuda_graphs=False).vae.eval()
        recon = []
        for start in tqdm(range(0, n, 32), desc=f"reconstruct ({model})", unit="batch", file=sys.stderr):
            recon += reconstruct(vae, originals[start:start + 32], device)
        rep = judged(judge, scenes, recon)
        rep["fid"] = frechet_distance(*stats(recon), *ref_stats)
        result[model] = rep
        del vae
    names = ["originals", *args.models]
    print(f"{n} held-out renders, {args.size}², judged (%); FID of each set vs {n} other renders")
    print(f"{'':28}" + "".join(f"{Path(m).name[:22]:>24}" for m in names))
    for key, label in ROWS:
        print(f"{label:28}" + "".join(f"{100 * (result[m][key] or 0):24.1f}" for m in names))
    print(f"{'FID (judge features)':28}" + "".join(f"{result[m]['fid']:24.1f}" for m in names))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
