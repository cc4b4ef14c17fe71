"""Where the fastest mode's time goes (issue 14), and what each of its options is worth; where a training step's goes.

    PYTHONPATH=src python benchmarks/speed_profile.py --out DIR                      # every variant (~9 min, H200)
    PYTHONPATH=src python benchmarks/speed_profile.py --out DIR --variant max --variant cudnn
    PYTHONPATH=src python benchmarks/speed_profile.py --out DIR --training eager --training blocks-cl
    PYTHONPATH=src python benchmarks/speed_profile.py --smoke --out DIR              # CPU, tiny networks, a minute

The SD 1.5-shaped pipeline of ``speed_side_by_side.py`` (random weights, fp16, 25 steps of DPM++ 2M Karras, CFG
7.5) is loaded once per variant of :class:`estable.speed.SpeedOptions`. Per variant: seconds per image of the whole
pipeline at 512² batch 1 and 4 (median of 5 after the compiling call), the U-Net call alone at those batches (median
of 20 replays), the VAE decode alone, what is left (text encoding, the sampler's own arithmetic, the NaN checks,
PIL), and the fp16 error of one U-Net call against diffusers' fp32 U-Net. For the variant ``max-nographs`` (the
same compiled kernels launched one by one, so the profiler sees each) a CUDA kernel profile of one 512² image,
grouped by kind (and the same for ``max`` itself: is the GPU ever idle?), and per variant the whole call in
phases (text encoding, sampling, decode, the rest) timed with a GPU sync on each side. ``--shape 512x1`` measures
one of the two shapes only (an autotuning variant compiles for minutes per shape). Writes ``DIR/profile.json`` and
``DIR/profile.md`` after every measurement (a run cut off by a time limit still reports). Needs diffusers to write
the random-weight folder and the fp32 reference.

``--training NAME`` (repeatable) profiles the U-Net training step instead (speed_side_by_side.py's step: 512 px,
bf16 autocast, fused AdamW, batch 8 and 32): img/s, and wall, kernel and GPU-busy time of one profiled step — a
GPU that is idle for part of the step is waiting for launches, which CUDA graphs would remove. ``whole-ro-cl*``
profile the fastest training step measured so far (the whole U-Net compiled and replayed in torch's CUDA graphs,
channels_last), also with cuDNN's or FlashAttention's kernel put first for the attention; ``whole-cl`` the same
compiled step without the graphs, so that the profile sees the operators: every profile lists the operators that copy
tensors, by input shapes, with their kernels' GPU time. ``*-pw`` compute the 1 × 1 convolutions as matrix products
over the channels (`speed_common.PointwiseAsLinear`): do the step's copies go with them? ``*-hint`` pin every
convolution's input and output gradient to channels_last (`estable.nn.layout.pin_channels_last`), where ATen's
convolution backward would copy them. ``--trace`` also writes each profiled step's Chrome trace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (  # noqa: E402
    back_to_back,
    concat_kernels,
    environment,
    full_settings,
    log,
    make_folder,
    pointwise_as_linear,
    rel_err,
    smoke_settings,
    timed,
)
from speed_side_by_side import estable_call, fp32_reference, free, unet_inputs  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "max": {},  # what speed="max" turns on
    "max-nographs": {"cuda_graphs": False},
    "no-phases": {"phase_upsample": False},  # upsamplers as interpolation + 3×3 convolution (the fifteenth run's "max")
    "no-fused-qkv": {"fuse_qkv": False},  # each attention's projections as separate matrix products
    "no-channels-last": {"channels_last": False},  # the networks in NCHW
    "vae-nchw": {"vae_channels_last": False},  # the U-Net channels_last, the VAE in NCHW
    "cudnn": {"sdpa": "cudnn"},
    "flash": {"sdpa": "flash"},
    "efficient": {"sdpa": "efficient"},
    "whole": {"regional": False},  # the U-Net compiled as one graph
    "autotune-resnets": {"resnet_mode": "max-autotune-no-cudagraphs"},  # convolutions tuned, attention as "max"
    "autotune": {"mode": "max-autotune-no-cudagraphs"},
}
KINDS = (  # kernel name → kind, first match wins
    ("attention", r"flash|fmha|sdpa|attention|fort_native|mha"),
    ("convolution", r"conv|fprop|dgrad|wgrad|winograd|implicit"),
    ("matmul", r"gemm|nvjet|cutlass|matmul|splitk|xmma"),
    ("fused by Inductor (Triton)", r"^triton"),
    ("eager elementwise / copies", r"elementwise|copy|cast|fill|reduce|cat|index|native"),
)


def kind_of(kernel: str) -> str:
    """The kind of a CUDA kernel, from its name (see KINDS)."""
    return next((k for k, rx in KINDS if re.search(rx, kernel.lower())), "other")


def kernel_profile(call, s, trace: Path | None = None) -> dict[str, Any]:
    """One call under torch.profiler: CUDA kernel time by kind, the top kernels, and how busy the GPU was;
    ``trace``: also write the profiler's Chrome trace there, gzipped (host and GPU timelines)."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    s.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t = time.perf_counter()
        call()
        s.sync()
        wall = time.perf_counter() - t
    if trace is not None:
        prof.export_chrome_trace(str(trace.with_suffix("")))
        with open(trace.with_suffix(""), "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.with_suffix("").unlink()
    # kernels only: a user annotation on the GPU timeline (the optimizer's "Optimizer.step#AdamW.step") spans the
    # kernels under it and would count them twice (a kernel's name may hold a "#" too: "{lambda()#3}")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and not ANNOTATION.fullmatch(e.name)]
    by_name: dict[str, list[float]] = {}
    spans = []
    for e in kernels:
        us = e.time_range.elapsed_us()
        by_name.setdefault(e.name, []).append(us)
        spans.append((e.time_range.start, e.time_range.end, e.name))
    busy, end = 0.0, None  # the union of kernel intervals: time the GPU was running something
    for a, b, _ in sorted(spans):
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    kinds: dict[str, float] = {}
    for name, times in by_name.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + sum(times) / 1e6
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    return {"wall_s": wall, "kernel_s": sum(kinds.values()), "busy_s": busy / 1e6, "kernels": len(kernels),
            "kinds_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "calls": len(t), "total_s": sum(t) / 1e6} for n, t in top],
            "copies": copy_ops(prof), "gaps": idle_gaps(spans)}


def idle_gaps(spans: list[tuple[float, float, str]], top: int = 12) -> list[dict[str, Any]]:
    """The longest stretches with no kernel running (µs spans of (start, end, kernel name)), each with where it
    starts (ms after the first kernel) and the kernels on either side: what the GPU waits for inside a step."""
    gaps, end, last = [], None, ""
    spans = sorted(spans)
    for a, b, name in spans:
        if end is not None and a > end:
            gaps.append({"at_ms": (end - spans[0][0]) / 1e3, "ms": (a - end) / 1e3, "after": last[:80],
                         "before": name[:80]})
        if end is None or b > end:
            end, last = b, name
    return sorted(gaps, key=lambda g: -g["ms"])[:top]


def copy_ops(prof) -> list[dict[str, Any]]:
    """The operators that copy tensors (copy_, clone, contiguous, _to_copy), by input shapes, with the GPU time of
    the kernels they launched: which layouts or dtypes a step converts. Graph replays hide their operators (the
    kernels have no CPU parent): profile a variant without CUDA graphs to see these."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if re.fullmatch(r"aten::(copy_|clone|contiguous|_to_copy)", e.key):
            device_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            rows.append({"op": e.key, "shapes": str(e.input_shapes)[:200], "calls": e.count,
                         "device_s": device_us / 1e6})
    return sorted(rows, key=lambda r: -r["device_s"])[:20]


def median_time(fn, s, repeats: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        s.sync()
        t = time.perf_counter()
        fn()
        s.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


PHASES = {"text encoding": "encode_prompts", "sampling": "_sample", "decode": "_decode"}  # name → Pipeline method


def phase_times(pipe, call, s, repeats: int = 5) -> dict[str, float]:
    """Medians (s) of one call's phases: the Pipeline methods of PHASES timed with a GPU sync on each side, and
    "other" (the call minus those: PIL conversion, infotexts and records, the prompt parsing)."""
    runs: list[dict[str, float]] = []
    current: dict[str, float] = {}

    def timed_method(name: str, method):
        def wrapper(*args, **kwargs):
            s.sync()
            t = time.perf_counter()
            out = method(*args, **kwargs)
            s.sync()
            current[name] = current.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    for name, attr in PHASES.items():
        setattr(pipe, attr, timed_method(name, getattr(pipe, attr)))
    try:
        for _ in range(repeats):
            current.clear()
            s.sync()
            t = time.perf_counter()
            call()
            s.sync()
            total = time.perf_counter() - t
            runs.append({**current, "other": total - sum(current.values()), "whole call": total})
    finally:
        for attr in PHASES.values():
            delattr(pipe, attr)  # the instance attribute shadowed the class's method
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def measure(name: str, folder: Path, s, res: dict[str, Any], ref: torch.Tensor, save,
            only: tuple[str, ...] = ()) -> None:
    from estable.pipeline import load_pipeline
    from estable.speed import SpeedOptions

    opts = SpeedOptions(compile=not s.smoke, **VARIANTS[name])
    row: dict[str, Any] = res["variants"].setdefault(name, {"options": VARIANTS[name]})
    t0 = time.perf_counter()
    pipe = load_pipeline(folder, device=s.device, dtype=s.dtype, speed=opts)
    row["load_s"] = time.perf_counter() - t0
    side = s.unet_kwargs["sample_size"]
    ctx = s.unet_kwargs["cross_attention_dim"]
    with torch.inference_mode():
        x16, t, c16 = unet_inputs(s, s.dtype)
        row["fp16_error"] = rel_err(pipe.unet_forward(x16, t, c16), ref)
        for img_side, b in s.shapes[:2]:
            key = f"{img_side}x{b}"
            if only and key not in only:
                continue
            r = timed(estable_call(pipe, s, img_side, b), s)
            x = torch.randn(2 * b, 4, side, side, device=s.device, dtype=s.dtype)
            c = torch.randn(2 * b, 77, ctx, device=s.device, dtype=s.dtype)
            unet_s = median_time(lambda x=x, c=c, p=pipe: p.unet_forward(x, 500.0, c), s, 20)
            z = torch.randn(b, 4, side, side, device=s.device, dtype=s.dtype)
            decode_s = median_time(lambda z=z, p=pipe: p.vae.decode(z), s, 10, warm=2)
            row[key] = {"image_s": r["median_s"] / b, "call_s": r["median_s"], "first_s": r["first_s"],
                        "unet_call_s": unet_s, "unet_total_s": s.steps * unet_s, "decode_s": decode_s,
                        "rest_s": r["median_s"] - s.steps * unet_s - decode_s}
            log(f"{name} {key}: {r['median_s'] / b:.4f} s/image (first {r['first_s']:.1f} s); U-Net {unet_s * 1e3:.2f} "
                f"ms/call × {s.steps}, decode {decode_s * 1e3:.1f} ms, rest {row[key]['rest_s'] * 1e3:.1f} ms")
            save()
            row[key]["phases_s"] = phases = phase_times(pipe, estable_call(pipe, s, img_side, b), s)
            log(f"{name} {key} phases (synchronized): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()))
            save()
        if name in ("max", "max-nographs"):  # with CUDA graphs: is the GPU ever idle during a call?
            img_side, b = s.shapes[0]
            row["profile"] = kernel_profile(estable_call(pipe, s, img_side, b), s)
            p = row["profile"]
            log(f"profile: wall {p['wall_s'] * 1e3:.1f} ms, kernels {p['kernel_s'] * 1e3:.1f} ms, GPU busy "
                f"{p['busy_s'] * 1e3:.1f} ms; " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in p["kinds_s"].items()))
            save()
    del pipe
    free()


ANNOTATION = re.compile(r"[\w.]+#[\w.]+")  # a record_function label on the GPU timeline, not a kernel

TRAINING = {  # name → (compile scope, channels_last, SDPA backend first, probe swapped into the U-Net)
    "eager": (None, False, None, None),
    "eager-cl": (None, True, None, None),  # channels_last
    "blocks-cl": ("blocks", True, None, None),  # each block compiled, channels_last
    "whole-ro-cl": ("whole-reduce-overhead", True, None, None),  # the whole U-Net compiled, torch's CUDA graphs
    "whole-ro": ("whole-reduce-overhead", False, None, None),  # the same in the default memory format
    "whole-cl": ("whole", True, None, None),  # the same kernels without the graphs: the profile sees their operators
    "whole-ro-cl-cudnn": ("whole-reduce-overhead", True, "cudnn", None),  # the same with cuDNN's attention first
    "whole-ro-cl-flash": ("whole-reduce-overhead", True, "flash", None),
    "whole-ro-cl-pw": ("whole-reduce-overhead", True, None, "pw"),  # 1 × 1 convolutions as matrix products
    "whole-cl-pw": ("whole", True, None, "pw"),
    "whole-ro-cl-hint": ("whole-reduce-overhead", True, None, "hint"),  # convolutions pinned to channels_last
    "whole-cl-hint": ("whole", True, None, "hint"),
    "whole-ro-cl-hint-flash": ("whole-reduce-overhead", True, "flash", "hint"),  # pinned, FlashAttention first
    "whole-ro-cl-hint-pw": ("whole-reduce-overhead", True, None, "hint-pw"),  # 1 × 1 as products, the rest pinned
    "whole-ro-cl-hint-cat": ("whole-reduce-overhead", True, None, "hint-cat"),  # + concatenations as ConcatKernel
    "whole-ro-cl-hint-geglu": ("whole-reduce-overhead", True, None, "hint-geglu"),  # + GEGLU as two products
}


def measure_training(name: str, s, res: dict[str, Any], batches: tuple[int, ...], save,
                     trace_dir: Path | None = None) -> None:
    """The U-Net training step (512 px, bf16 autocast, fused AdamW; speed_side_by_side's step): img/s (median of
    5 after 3 warm-up steps) and a kernel profile of one step per batch size — is the GPU busy, and with what?"""
    from speed_side_by_side import _calls, _unets, compile_for_training

    scope, cl, sdpa, probe = TRAINING[name]
    _, build = _unets(s)
    _, call = _calls()
    model = build().train()
    if cl:
        model.to(memory_format=torch.channels_last)
    if probe in ("pw", "hint-pw"):
        log(f"{pointwise_as_linear(model)} 1 × 1 convolutions computed as matrix products")
    if probe == "hint-geglu":
        from estable.nn.attention import split_geglu

        log(f"{split_geglu(model)} GEGLUs computed as two matrix products")
    if probe in ("hint", "hint-pw", "hint-cat", "hint-geglu"):
        from estable.nn.layout import pin_channels_last

        log(f"{pin_channels_last(model)} convolutions pinned to channels_last")
    compile_for_training(model, None if s.smoke else scope)
    rows = res.setdefault("training", {}).setdefault(name, {})
    with concat_kernels() if probe == "hint-cat" else contextlib.nullcontext():  # Inductor compiles at the first step
        _measure_steps(name, model, call, rows, s, batches, save, trace_dir, cl=cl, sdpa=sdpa)
    del model
    free()


def _measure_steps(name: str, model, call, rows: dict[str, Any], s, batches: tuple[int, ...], save,
                   trace_dir: Path | None, *, cl: bool, sdpa: str | None) -> None:
    from speed_side_by_side import _step

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s.cuda)
    side, ctx = s.unet_kwargs["sample_size"], s.unet_kwargs["cross_attention_dim"]
    for b in batches:
        x = torch.randn(b, 4, side, side, device=s.device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (b,), device=s.device)
        c = torch.randn(b, 77, ctx, device=s.device)
        step = _step(model, opt, call, x, t, c, s, sdpa=sdpa)
        step_s = median_time(step, s, 5)
        run_s = back_to_back(step, s, 10)
        p = kernel_profile(step, s, trace_dir / f"trace-{name}-{b}.json.gz" if trace_dir else None)
        rows[str(b)] = {"img_per_s": b / step_s, "step_s": step_s, "back_to_back_step_s": run_s, "profile": p}
        log(f"train {name}, batch {b}: {b / step_s:.1f} img/s ({b / run_s:.1f} back to back); profiled step: wall "
            f"{p['wall_s'] * 1e3:.1f} ms, kernels {p['kernel_s'] * 1e3:.1f} ms, GPU busy {p['busy_s'] * 1e3:.1f} ms")
        save()


def markdown(res: dict[str, Any]) -> str:
    out = [f"# Where the time goes ({res['device']}, torch {res['torch']}"
           f"{', SMOKE: tiny CPU networks, not a measurement' if res.get('smoke') else ''})"]
    (s1, b1), (s4, b4) = res["shapes"][:2]
    k1, k4 = f"{s1}x{b1}", f"{s4}x{b4}"
    if res["variants"]:
        out += ["", f"SD 1.5-shaped random weights, fp16, {res['steps']} steps DPM++ 2M Karras, CFG {res['cfg']}. "
                "Milliseconds.", ""]
        out += [f"| variant | options | {s1}² b{b1} per image | U-Net call (b{b1}) | decode (b{b1}) | rest (b{b1}) | "
                f"{s4}² b{b4} per image | U-Net call (b{b4}) | first calls (s) | fp16 error |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        a, b = r.get(k1, {}), r.get(k4, {})

        def ms(d, k):
            return f"{d[k] * 1e3:.1f}" if k in d else "–"

        first = ", ".join(f"{d['first_s']:.0f}" for d in (a, b) if "first_s" in d) or "–"
        err = f"{r['fp16_error']:.2e}" if "fp16_error" in r else "–"
        opts = json.dumps(r["options"]) if r["options"] else 'speed="max"'
        out.append(f"| {name} | {opts} | {ms(a, 'image_s')} | "
                   f"{ms(a, 'unet_call_s')} | {ms(a, 'decode_s')} | {ms(a, 'rest_s')} | {ms(b, 'image_s')} | "
                   f"{ms(b, 'unet_call_s')} | {first} | {err} |")
    phased = [(name, key, r[key]["phases_s"]) for name, r in res["variants"].items() for key in (k1, k4)
              if "phases_s" in r.get(key, {})]
    if phased:
        cols = list(phased[0][2])
        out += ["", "The whole call in phases (each timed with a GPU sync on both sides, median of 5), ms per call:",
                "",
                "| variant | shape | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        out += [f"| {name} | {key} | " + " | ".join(f"{ph.get(c, 0.0) * 1e3:.1f}" for c in cols) + " |"
                for name, key, ph in phased]
    profiles = [(f"variant {name}", r["profile"]) for name, r in res["variants"].items() if r.get("profile")]
    if res.get("training"):
        out += ["", "U-Net training step, 512 px, bf16 autocast, fused AdamW (the step of speed_side_by_side.py)", "",
                "| system | batch | img/s | step ms | back to back: img/s, step ms | profiled step: wall / kernels / "
                "GPU busy ms |", "|---|---|---|---|---|---|"]
        for name, rows in res["training"].items():
            for b, r in rows.items():
                p, run = r["profile"], r.get("back_to_back_step_s")
                btb = f"{int(b) / run:.1f}, {run * 1e3:.1f}" if run else "–"
                out.append(f"| {name} | {b} | {r['img_per_s']:.1f} | {r['step_s'] * 1e3:.1f} | {btb} | "
                           f"{p['wall_s'] * 1e3:.1f} / {p['kernel_s'] * 1e3:.1f} / {p['busy_s'] * 1e3:.1f} |")
                profiles.append((f"training step, {name}, batch {b}", p))
    for what, p in profiles:
        out += ["", f"Kernel profile, {what}: wall {p['wall_s'] * 1e3:.1f} ms, kernels "
                f"{p['kernel_s'] * 1e3:.1f} ms ({p['kernels']} launches), GPU busy {p['busy_s'] * 1e3:.1f} ms", "",
                "| kind | ms | share of kernel time |", "|---|---|---|"]
        out += [f"| {k} | {v * 1e3:.1f} | {v / max(p['kernel_s'], 1e-12):.0%} |" for k, v in p["kinds_s"].items()]
        out += ["", "| kernel | calls | ms |", "|---|---|---|"]
        out += [f"| `{k['name'][:100]}` | {k['calls']} | {k['total_s'] * 1e3:.2f} |" for k in p["top"]]
        if p.get("gaps"):
            out += ["", "| GPU idle: at ms | for ms | after kernel | before kernel |", "|---|---|---|---|"]
            out += [f"| {g['at_ms']:.2f} | {g['ms']:.3f} | `{g['after'][:60]}` | `{g['before'][:60]}` |"
                    for g in p["gaps"]]
        if p.get("copies"):
            out += ["", "| copying operator | input shapes | calls | GPU ms |", "|---|---|---|---|"]
            out += [f"| {c['op']} | `{c['shapes']}` | {c['calls']} | {c['device_s'] * 1e3:.2f} |" for c in p["copies"]]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", choices=tuple(VARIANTS), help="repeatable; default: all, in order")
    ap.add_argument("--training", action="append", choices=tuple(TRAINING),
                    help="profile the U-Net training step of this system instead of inference (repeatable)")
    ap.add_argument("--train-batch", type=int, action="append", metavar="N",
                    help="with --training: this batch size only (repeatable; default 8 and 32)")
    ap.add_argument("--trace", action="store_true",
                    help="with --training: also write each profiled step's Chrome trace (OUT/trace-NAME-BATCH.json.gz)")
    ap.add_argument("--shape", action="append", metavar="SIDExBATCH",
                    help="measure only this of the two inference shapes (e.g. 512x1; repeatable; default both)")
    ap.add_argument("--smoke", action="store_true", help="tiny networks on the CPU: the code paths, not the numbers")
    args = ap.parse_args()
    s = smoke_settings() if args.smoke else full_settings(repeats=5)
    only = tuple(args.shape or ())
    known = [f"{side}x{b}" for side, b in s.shapes[:2]]
    if any(k not in known for k in only):
        ap.error(f"--shape must be one of {', '.join(known)}")
    res: dict[str, Any] = {**environment(s), "variants": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "profile.md").write_text(markdown(res))

    if args.training:  # no pipeline, no folder: the U-Net alone (built from diffusers' config, as in the side-by-side)
        for name in args.training:
            log(f"--- training: {name} ---")
            measure_training(name, s, res, tuple(args.train_batch or s.train_batches), save,
                             args.out if args.trace else None)
        log(f"wrote {args.out / 'profile.md'}")
        return
    folder = make_folder(args.out / "model", s)
    ref = fp32_reference(folder, s)
    for name in args.variant or list(VARIANTS):
        log(f"--- {name} ---")
        try:
            measure(name, folder, s, res, ref, save, only)
        except Exception as exc:  # a failing variant is a result too
            log(f"{name} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            res["variants"].setdefault(name, {"options": VARIANTS[name]})["error"] = f"{type(exc).__name__}: {exc}"
            free()
        save()
    log(f"wrote {args.out / 'profile.md'}")


if __name__ == "__main__":
    main()
