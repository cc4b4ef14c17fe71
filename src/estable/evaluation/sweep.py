"""Guidance sweep: compositional accuracy and judge-feature FID as functions of the classifier-free guidance scale.

For each CFG value g the same held-out prompts and seeds are generated with guidance g (Ho & Salimans 2022, eq. 6)
and measured twice:

    accuracy   whole-prompt accuracy (and per prompt kind) under the judge (``compositional.evaluate``)
    FID        Fréchet distance of judge features (``fid``) between ``fid_count`` images generated for captions of
               the shapes world and ``fid_count`` independent real renders; the real-vs-real floor (a second
               independent real set) is computed once

Guidance trades diversity for prompt fidelity: accuracy usually rises with g while FID first falls then rises
(Ho & Salimans 2022, fig. 4, on ImageNet). The recommended default is the g with the best whole-prompt accuracy;
ties (equal accuracy) go to the lower FID, then to the lower g.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .compositional import Detector, EvalPrompt, evaluate
from .fid import extract_features, feature_stats, frechet_distance
from .plot import HLine, Panel, Series, line_plot

__all__ = ["DEFAULT_CFGS", "parse_cfgs", "recommend", "run_sweep", "sweep_markdown", "sweep_plot"]

DEFAULT_CFGS = (1.0, 3.0, 5.0, 7.5, 10.0)
Generator = Callable[[list[str], list[int]], list[Image.Image]]


def parse_cfgs(text: str) -> list[float]:
    """"1,3,5,7.5,10" → [1.0, 3.0, 5.0, 7.5, 10.0] (sorted, distinct, each ≥ 0)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--cfg takes comma-separated numbers such as 1,3,5,7.5,10, not {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"--cfg needs one or more finite, non-negative guidance scales, got {text!r}")
    return sorted(set(values))


def _stream(generate: Generator, captions: Sequence[str], seeds: Sequence[int],
            chunk: int = 32) -> Iterator[Image.Image]:
    for start in range(0, len(captions), chunk):
        yield from generate(list(captions[start : start + chunk]), list(seeds[start : start + chunk]))


def run_sweep(
    make_generator: Callable[[float], Generator],
    judge: Detector,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    cfgs: Sequence[float],
    prompts: Sequence[EvalPrompt],
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    real_images: Callable[[int], Iterator[Image.Image]],
    floor_images: Callable[[int], Iterator[Image.Image]],
    fid_captions: Sequence[str],
    fid_seeds: Sequence[int],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy and FID for every guidance scale in ``cfgs``.

    ``make_generator(g)`` returns a ``generate(prompts, seeds) -> images`` that samples with guidance g.
    ``real_images(n)`` / ``floor_images(n)`` stream n reference renders and n independent ones;
    ``fid_captions`` / ``fid_seeds`` (one per FID image) are what the model is asked to draw for FID.
    """
    n_fid = len(fid_captions)
    if n_fid != len(fid_seeds):
        raise ValueError("one seed per FID caption")
    if n_fid and n_fid < 2:
        raise ValueError("FID needs at least 2 images per set")

    def feats(images: Iterator[Image.Image], desc: str) -> torch.Tensor:
        return extract_features(images, extractor, batch_size=batch_size, device=device, total=n_fid,
                                progress=progress, desc=desc)

    fid_info: dict[str, Any] = {"count": n_fid}
    stats_real = None
    if n_fid:
        stats_real = feature_stats(feats(real_images(n_fid), "real"))
        fid_info["floor"] = frechet_distance(*feature_stats(feats(floor_images(n_fid), "floor")), *stats_real)
    rows = []
    for g in cfgs:
        generate = make_generator(float(g))
        report = evaluate(generate, judge, prompts, images_per_prompt, seed, progress=progress)
        row: dict[str, Any] = {
            "cfg": float(g),
            "whole_prompt": report["overall"]["whole_prompt"],
            "by_kind": {k: v["whole_prompt"] for k, v in report["by_kind"].items()},
            "overall": {k: v for k, v in report["overall"].items() if k != "images"},
            "images": report["overall"]["images"],
        }
        if stats_real is not None:
            f_fake = feats(_stream(generate, fid_captions, fid_seeds), f"fake cfg {g:g}")
            row["fid"] = frechet_distance(*feature_stats(f_fake), *stats_real)
        rows.append(row)
    result: dict[str, Any] = {
        "cfgs": [float(g) for g in cfgs],
        "prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "fid": fid_info,
        "rows": rows,
    }
    result["recommended_cfg"] = recommend(rows)
    return result


def recommend(rows: Sequence[dict[str, Any]]) -> float:
    """The CFG with the best whole-prompt accuracy; ties → lower FID (when measured), then lower CFG."""
    if not rows:
        raise ValueError("no sweep rows to choose from")

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        fid = r.get("fid")
        return (-(r["whole_prompt"] or 0.0), math.inf if fid is None else fid, r["cfg"])

    return min(rows, key=key)["cfg"]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def sweep_markdown(result: dict[str, Any], title: str = "Guidance sweep") -> str:
    """The sweep as a Markdown table (one row per CFG), with the FID floor and the recommendation."""
    kinds = list(dict.fromkeys(k for r in result["rows"] for k in r["by_kind"]))
    has_fid = any("fid" in r for r in result["rows"])
    head = ["CFG", "whole prompt", *kinds] + (["FID (judge)"] if has_fid else [])
    lines = [f"# {title}", "",
             f"{result['prompts']} held-out prompts × {result['images_per_prompt']} images per CFG; whole-prompt "
             "accuracy overall and per prompt kind (judge)" + (f"; FID of {result['fid']['count']} images against "
                                                               "as many real renders (judge features)." if has_fid
                                                               else "."),
             "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join("---:" for _ in head) + "|"]
    best = result["recommended_cfg"]
    for r in result["rows"]:
        cfg = f"**{r['cfg']:g}**" if r["cfg"] == best else f"{r['cfg']:g}"
        cells = [cfg, _pct(r["whole_prompt"]), *(_pct(r["by_kind"].get(k)) for k in kinds)]
        if has_fid:
            cells.append(f"{r['fid']:.3f}" if "fid" in r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if has_fid:
        lines.append(f"FID floor (real vs real, {result['fid']['count']} images each): {result['fid']['floor']:.3f}")
        lines.append("")
    lines.append(f"Recommended default CFG: **{best:g}** (best whole-prompt accuracy; ties go to the lower FID).")
    return "\n".join(lines) + "\n"


def sweep_plot(result: dict[str, Any], path: str | Path, *, panel_size: tuple[int, int] = (480, 360)) -> Path:
    """Two panels into ``path`` (matplotlib, the ``plot`` extra): accuracy (%) vs CFG (overall and per kind), FID vs
    CFG with the floor dashed."""
    rows = result["rows"]
    xs = [r["cfg"] for r in rows]
    kinds = list(dict.fromkeys(k for r in rows for k in r["by_kind"]))
    acc = [Series("whole prompt", xs, [None if r["whole_prompt"] is None else 100 * r["whole_prompt"] for r in rows])]
    for k in kinds:
        vals = [r["by_kind"].get(k) for r in rows]
        acc.append(Series(k, xs, [None if v is None else 100 * v for v in vals]))
    panels = [Panel("Compositional accuracy", "CFG scale", "accuracy (%)", acc, ylim=(0.0, 100.0))]
    if any("fid" in r for r in rows):
        fid_panel = Panel("FID (judge features)", "CFG scale", "FID", [Series("generated", xs, [r.get("fid")
                                                                                               for r in rows])])
        if "floor" in result["fid"]:
            fid_panel.hlines.append(HLine("real vs real", result["fid"]["floor"]))
        panels.append(fid_panel)
    return line_plot(panels, path, panel_size=panel_size)
