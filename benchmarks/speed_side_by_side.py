"""Issue 14's side-by-side table: Estable against diffusers on one GPU, in one process per part.

    PYTHONPATH=src python benchmarks/speed_side_by_side.py --part inference --out DIR
    PYTHONPATH=src python benchmarks/speed_side_by_side.py --part all --out DIR          # everything (~25 min)
    PYTHONPATH=src python benchmarks/speed_side_by_side.py --part diffusers-compiled --part inference --shape 512x1 \
        --out DIR                                                                     # one shape, both (~4 min)
    PYTHONPATH=src python benchmarks/speed_side_by_side.py --report DIR1 DIR2 ... --out DIR  # merge parts
    PYTHONPATH=src python benchmarks/speed_side_by_side.py --smoke --part all --out DIR  # CPU, tiny, minutes

Parts (each fits one 10-minute device call on an H200; times are estimates):

* ``inference`` (~6 min): seconds per image of the whole pipeline (text encoding, 25 steps of DPM++ 2M Karras
  at CFG 7.5, VAE decode, PIL) at 512² batch 1 and 4 and 256² batch 1 for diffusers eager (SDPA), Estable eager,
  Estable with CUDA graphs (its default) and Estable's fastest mode (``speed="max"``; with ``--variants`` also
  with cuDNN attention first); fp16 relative error of one U-Net call against fp32 for each path.
* ``builtin`` (~2 min): the built-in model's images/s at batch 64 (eager, CUDA graphs, fastest) with the images'
  difference against eager, and ``estable generate --prompts`` throughput (PNGs written).
* ``diffusers-compiled`` (~6 min): diffusers with torch.compile(mode="reduce-overhead", fullgraph=True) of the
  U-Net and of vae.decode, channels_last and fused QKV (as /work/shared/bench and the issue's table), its compile
  times and fp16 error.
* ``coldstart`` (~3 min): fresh processes timed from their start to the first 512² image in the fastest mode and
  then to the first image at a new batch size, with an empty compile cache, again with the cache it left, and once
  more without loading torch's portable mega-cache (Inductor's own disk cache only); Python's bytecode is cached
  beside the compile cache (PYTHONPYCACHEPREFIX), so only the first process compiles torch's modules. With
  ``--compile-cache DIR --cold-rows empty`` and a later ``--cold-rows warm`` the rows can run in separate calls.
* ``training`` (~4 min): the U-Net training step at 512 px (64² latents), bf16 autocast, fused AdamW, batch 8 and
  32, img/s and peak memory, diffusers and Estable (eager, channels_last); the largest batch with gradient
  checkpointing within 80 GiB and its img/s.
* ``training-compiled`` (~5 min a row): the same step with Estable's blocks compiled (``compile_scope=blocks``),
  with channels_last; ``--train-compile whole`` / ``whole-reduce-overhead`` (repeatable) compile the whole U-Net
  instead, the latter replayed in torch's CUDA graphs; ``whole-hint`` / ``whole-reduce-overhead-hint`` the same with
  every convolution's input and output gradient pinned to channels_last (``estable.nn.layout``, what the trainers'
  ``channels_last=true`` does; RESULTS.md, thirteenth GPU run); ``whole-reduce-overhead-hint-cat`` also with
  Inductor lowering concatenations as buffers that their inputs' kernels write into, ``…-hint-geglu`` with each
  GEGLU as two matrix products (two probes for GEGLU's backward), ``…-hint-bench`` with cuDNN's benchmark mode.

Every part needs diffusers and transformers (the oracle; carry the diffusers wheel to the GPU machine). Progress
lines carry timestamps; each part writes ``DIR/part-NAME.json`` and ``.md``, rewritten after every row (a part cut
off by a time limit still reports what it measured), and ``DIR/speed.json``/``speed.md`` with everything this
process measured.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (  # noqa: E402
    PROMPT,
    Settings,
    back_to_back,
    concat_kernels,
    environment,
    full_settings,
    log,
    make_folder,
    merge,
    no_tf32,
    rel_err,
    smoke_settings,
    timed,
    write_report,
)

_SAVE: list = []  # the running part's "write what we have" function: a part cut off by a time limit still reports


def save_partial() -> None:
    if _SAVE:
        _SAVE[-1]()


PARTS = ("inference", "builtin", "diffusers-compiled", "coldstart", "training", "training-compiled")


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ pipelines


def estable_call(pipe: Any, s: Settings, side: int, batch: int):
    from estable import GenerationParams

    params = GenerationParams(prompt=PROMPT, negative_prompt="", sampler="dpmpp_2m_karras", steps=s.steps,
                              cfg_scale=s.cfg, seed=1, width=side, height=side, batch_size=batch)
    return lambda: pipe.txt2img(params)


def diffusers_call(pipe: Any, s: Settings, side: int, batch: int):
    def call():
        gens = [torch.Generator().manual_seed(1 + k) for k in range(batch)]
        return pipe(prompt=PROMPT, negative_prompt="", num_images_per_prompt=batch, num_inference_steps=s.steps,
                    guidance_scale=s.cfg, height=side, width=side, generator=gens, output_type="pil").images
    return call


def diffusers_pipeline(folder: Path, s: Settings):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=s.dtype, local_files_only=True,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(s.device)


def table_rows(name: str, make_call, s: Settings, res: dict[str, Any], shapes=None) -> None:
    rows = res.setdefault("inference", {}).setdefault(name, {})
    for side, b in shapes or s.shapes:
        log(f"{name}: {side}² batch {b} ...")
        try:
            r = timed(make_call(side, b), s)
        except Exception as exc:  # a failing path is a result too: record it and go on
            log(f"{name}: {side}² batch {b} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            res.setdefault("notes", []).append(f"{name} {side}²×{b} failed: {type(exc).__name__}: "
                                               f"{str(exc).splitlines()[0][:200]}")
            continue
        rows[f"{side}x{b}"] = r
        log(f"{name}: {side}² batch {b}: {r['median_s'] / b:.4f} s/image (first call {r['first_s']:.1f} s)")
        save_partial()


def unet_inputs(s: Settings, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    side = s.unet_kwargs.get("sample_size", 64)
    ctx_dim = s.unet_kwargs.get("cross_attention_dim", 768)
    x = torch.randn(2, 4, side, side, generator=g)
    c = torch.randn(2, 77, ctx_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    return x.to(s.device, dtype), t.to(s.device), c.to(s.device, dtype)


def fp32_reference(folder: Path, s: Settings) -> torch.Tensor:
    """diffusers' U-Net in fp32 on the same (fp16-rounded) weights, TF32 off."""
    import diffusers

    ref = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32,
                                                         local_files_only=True).to(s.device).eval()
    x, t, c = unet_inputs(s, torch.float32)
    with torch.no_grad(), no_tf32():
        out = ref(x, t, encoder_hidden_states=c).sample.float()
    del ref
    free()
    return out


# ------------------------------------------------------------------------------------------------ parts


def part_inference(folder: Path, s: Settings, res: dict[str, Any], args: argparse.Namespace) -> None:
    from estable.nn.cuda_graph import GraphedForward
    from estable.pipeline import load_pipeline
    from estable.speed import SpeedOptions

    errs = res.setdefault("fp16_error", {})
    ref = fp32_reference(folder, s)
    x16, t, c16 = unet_inputs(s, s.dtype)
    log("fp32 reference done")

    def fastest(name: str, opts: SpeedOptions) -> None:
        t0 = time.perf_counter()
        fast = load_pipeline(folder, device=s.device, dtype=s.dtype, speed=opts)
        log(f"{name}: loaded in {time.perf_counter() - t0:.1f} s")
        table_rows(name, lambda side, b, p=fast: estable_call(p, s, side, b), s, res)
        with torch.inference_mode():  # batch 2 at the native size: the shape of 512² batch 1, no recompilation
            errs[name] = rel_err(fast.unet_forward(x16, t, c16), ref)
        log(f"{name}: fp16 error {errs[name]:.3e}")
        del fast
        free()

    # The fastest mode first: its compile time is the unknown; the baselines after it take about a minute.
    cache = {"cache_dir": str(args.compile_cache)} if args.compile_cache else {}
    fastest("Estable fastest", s.fastest(**cache))
    if args.no_baselines:
        return

    pipe = diffusers_pipeline(folder, s)
    with torch.no_grad():
        errs["diffusers eager"] = rel_err(pipe.unet(x16, t, encoder_hidden_states=c16).sample, ref)
    table_rows("diffusers eager", lambda side, b, p=pipe: diffusers_call(p, s, side, b), s, res)
    del pipe
    free()

    est = load_pipeline(folder, device=s.device, dtype=s.dtype, cuda_graphs=False)
    with torch.no_grad():
        errs["Estable eager"] = rel_err(est.unet(x16, t, c16), ref)
        f32 = load_pipeline(folder, device=s.device, dtype="fp32", cuda_graphs=False)
        with no_tf32():
            res.setdefault("parity", {})["Estable fp32 vs diffusers fp32 (rel. error)"] = rel_err(
                f32.unet(*unet_inputs(s, torch.float32)), ref)
        del f32
        free()
    table_rows("Estable eager", lambda side, b, p=est: estable_call(p, s, side, b), s, res)
    est.unet_forward = GraphedForward(est.unet)
    with torch.inference_mode():
        errs["Estable CUDA graphs"] = rel_err(est.unet_forward(x16, t, c16), ref)
    table_rows("Estable CUDA graphs", lambda side, b, p=est: estable_call(p, s, side, b), s, res)
    del est
    free()
    if args.variants:
        fastest("Estable fastest, cuDNN attention", s.fastest(sdpa="cudnn"))


def part_builtin(s: Settings, res: dict[str, Any]) -> None:
    import numpy as np

    from estable import GenerationParams
    from estable.errors import EstableError
    from estable.pipeline import load_pipeline

    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "star")
    n = s.builtin_batch
    prompts = [f"a {colours[i % 4]} {shapes[(i // 4) % 4]} above a {colours[(i + 1) % 4]} {shapes[(i + 2) % 4]}"
               for i in range(n)]
    seeds = list(range(n))
    out = res.setdefault("builtin", {})
    images: dict[str, list] = {}
    for name, kw in (("eager", dict(cuda_graphs=False)), ("CUDA graphs", {}),
                     ("fastest", dict(speed=s.fastest()))):
        try:
            pipe = load_pipeline("default", device=s.device, dtype=s.dtype, **kw)
        except EstableError as exc:
            res.setdefault("notes", []).append(f"built-in model not measured: {exc}")
            log(f"built-in model: {exc}")
            return
        params = GenerationParams(prompt="x", steps=s.steps, cfg_scale=pipe.config.default_cfg or 7.0,
                                  sampler="dpmpp_2m_karras", width=s.builtin_size, height=s.builtin_size)
        log(f"built-in model, {name}: batch {n} ...")
        got: list = []
        r = timed(lambda p=pipe, g=got, q=params: g.append(p.txt2img_each(prompts, seeds, q, batch=n)), s,
                  repeats=s.builtin_repeats)
        images[name] = got[-1]
        row = {"img_per_s": n / r["median_s"], "first_s": r["first_s"], "median_s": r["median_s"]}
        if name != "eager":
            a = np.stack([np.asarray(i, dtype=np.int16) for i in images["eager"]])
            b = np.stack([np.asarray(i, dtype=np.int16) for i in images[name]])
            row["diff_vs_eager"] = [int(np.abs(a - b).max()), float(np.abs(a - b).mean())]
        out[name] = row
        save_partial()
        log(f"built-in model, {name}: {row['img_per_s']:.1f} images/s (first call {r['first_s']:.1f} s) "
            f"{row.get('diff_vs_eager', '')}")
        del pipe
        free()
    part_bulk(s, res, prompts)


def part_bulk(s: Settings, res: dict[str, Any], prompts: list[str]) -> None:
    """``estable generate --prompts FILE --out DIR`` with the built-in model (CUDA graphs), PNG writing included:
    4 batches of ``builtin_batch`` prompts, the first batch (recording) left out of the rate."""
    from estable.bulk import run_bulk
    from estable.pipeline import load_pipeline

    n = s.builtin_batch
    with tempfile.TemporaryDirectory(prefix="estable-bulk-") as tmp:
        lines = Path(tmp) / "prompts.txt"
        lines.write_text("\n".join(prompts[i % len(prompts)] for i in range(4 * n)) + "\n")
        times: list[float] = []

        def on_path(_path: Path, mark=times) -> None:
            mark.append(time.perf_counter())

        t0 = time.perf_counter()
        stats = run_bulk(lambda dev: load_pipeline("default", device=dev, dtype=s.dtype), lines, Path(tmp) / "out",
                         defaults={"steps": s.steps, "width": s.builtin_size, "height": s.builtin_size},
                         base_seed=1, batch=n, device=s.device, progress=False, on_path=on_path)
        first = times[n - 1] - t0
        rate = 3 * n / (times[-1] - times[n - 1])
    res.setdefault("builtin", {})["bulk generate --prompts (CUDA graphs, PNGs written)"] = {
        "img_per_s": rate, "first_s": first, "made": stats["made"]}
    log(f"bulk generation: {rate:.1f} images/s over {stats['made']} images (first batch {first:.1f} s)")


def part_diffusers_compiled(folder: Path, s: Settings, res: dict[str, Any]) -> None:
    ref = fp32_reference(folder, s)
    x16, t, c16 = unet_inputs(s, s.dtype)
    pipe = diffusers_pipeline(folder, s)
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if not s.smoke:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)
    else:
        res.setdefault("notes", []).append("smoke: diffusers 'compiled' ran without torch.compile")
    table_rows("diffusers compiled", lambda side, b, p=pipe: diffusers_call(p, s, side, b), s, res)
    with torch.no_grad():  # batch 2 at the native size: the shape compiled for 512² batch 1, no recompile
        out = pipe.unet(x16, t, encoder_hidden_states=c16).sample.clone()
    res.setdefault("fp16_error", {})["diffusers compiled"] = rel_err(out, ref)
    log(f"diffusers compiled: fp16 error {res['fp16_error']['diffusers compiled']:.3e}")
    del pipe
    free()


def child_coldstart(args: argparse.Namespace) -> None:
    """Run in a fresh process: load the fastest mode, first image, then a new batch size; print the times."""
    marks = {"python_s": time.time() - args.t0}  # the interpreter, torch and this script's imports
    from estable import speed as speed_module
    from estable.checkpoints.store import load_model
    from estable.pipeline import Pipeline

    if args.no_mega_cache:  # what loading torch's portable cache costs or saves, with Inductor's own cache warm
        speed_module._MegaCache.load = lambda self: False

    marks["import_s"] = time.time() - args.t0
    s = smoke_settings() if args.smoke else full_settings(1)
    side = s.shapes[0][0]
    if s.cuda:
        torch.zeros(1, device=s.device)  # the CUDA context on its own, so that the weights' copy is timed alone
    marks["device_s"] = time.time() - args.t0
    prof = cProfile.Profile() if args.profile_out else None  # where the start-up's host time goes
    if prof:
        prof.enable()
    model = load_model(args.folder, dtype=s.dtype, device=s.device)
    s.sync()
    marks["weights_s"] = time.time() - args.t0
    s.speed_dynamic, s.decode_batch = bool(args.dynamic), args.decode_batch
    speed = s.fastest(cache_dir=args.cache_dir)
    pipe = Pipeline(model, device=torch.device(s.device), dtype=s.dtype, speed=speed)  # loads the compile cache
    marks["load_s"] = time.time() - args.t0
    estable_call(pipe, s, side, 1)()
    s.sync()
    marks["first_image_at"] = time.time() - args.t0
    if prof:
        prof.disable()
        with open(args.profile_out, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
    estable_call(pipe, s, side, s.new_batch)()
    s.sync()
    marks["total_s"] = time.time() - args.t0
    marks["first_image_s"] = marks["first_image_at"] - marks["load_s"]
    marks["new_batch_s"] = marks["total_s"] - marks["first_image_at"]
    t = time.perf_counter()
    estable_call(pipe, s, side, 1)()
    s.sync()
    marks["steady_image_s"] = time.perf_counter() - t
    print("RESULT " + json.dumps(marks), flush=True)


def part_coldstart(folder: Path, s: Settings, res: dict[str, Any], args: argparse.Namespace) -> None:
    out = res.setdefault("coldstart", {})
    args.out.mkdir(parents=True, exist_ok=True)  # the children's profiles go there
    with tempfile.TemporaryDirectory(prefix="estable-compile-cache-") as tmp:
        cache = str(args.compile_cache or tmp)
        os.makedirs(cache, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        env["PYTHONUNBUFFERED"] = "1"
        # Python's bytecode beside the compile cache: on the lent GPU machine every fresh process compiled ~1,450
        # modules from source (about 6 s of a profiled warm start; no usable bytecode there, and the dev machine
        # sets PYTHONDONTWRITEBYTECODE), which an ordinary install (pip writes bytecode) does not. The first child
        # writes it, the warm ones read it.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(cache, "pycache")
        rows = {"none (empty cache)": "empty", "warm (the cache the first process left)": "warm",
                "warm, mega-cache not loaded (Inductor's cache only)": "warm-no-mega"}  # row: its profile's name
        for name, short in rows.items():
            if short not in args.cold_rows:
                continue
            log(f"cold start, disk cache {name} ...")
            cmd = [sys.executable, __file__, "--child", "coldstart", "--folder", str(folder), "--cache-dir", cache,
                   "--t0", repr(time.time())]
            cmd += ["--smoke"] if s.smoke else []
            cmd += ["--dynamic"] if args.dynamic else []
            cmd += ["--decode-batch", str(args.decode_batch)] if args.decode_batch else []
            cmd += ["--no-mega-cache"] if short == "warm-no-mega" else []
            cmd += ["--profile-out", str(args.out / f"start-profile-{short}.txt")] if args.profile_start else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                msg = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                log(f"cold start child failed ({proc.returncode}): {msg}")
                res.setdefault("notes", []).append(f"cold start ({name}) failed: {msg}")
                continue
            out[name] = json.loads(line[-1][len("RESULT "):])
            log(f"cold start, cache {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[name].items()))
            save_partial()


# ------------------------------------------------------------------------------------------------ training


def _unets(s: Settings):
    import diffusers

    from estable.config import UNetConfig
    from estable.models.unet import UNet

    def build_diffusers():
        with torch.device(s.device):
            return diffusers.UNet2DConditionModel(**s.unet_kwargs)

    def build_estable():
        ref = build_diffusers()  # the same architecture, read off diffusers' config
        k = s.unet_kwargs
        cfg = UNetConfig(
            block_channels=tuple(k["block_out_channels"]), layers_per_block=k.get("layers_per_block", 2),
            attention_levels=tuple(t.startswith("CrossAttn") for t in ref.config.down_block_types),
            num_heads=k.get("attention_head_dim", 8), context_dim=k["cross_attention_dim"],
            norm_groups=k.get("norm_num_groups", 32), sample_size=k["sample_size"])
        with torch.device(s.device):
            unet = UNet(cfg)
        unet.load_state_dict(ref.state_dict())
        del ref
        return unet

    return build_diffusers, build_estable


def _step(model, opt, call, x, t, c, s: Settings, sdpa: str | None = None):
    """One training step; ``sdpa``: the attention kernel put first (estable.speed.sdpa_context) in the forward and,
    being the kernel the forward picked, the backward."""
    from estable.speed import sdpa_context

    def step():
        with torch.autocast(s.device.split(":")[0], dtype=torch.bfloat16, enabled=s.cuda), sdpa_context(sdpa):
            loss = torch.nn.functional.mse_loss(call(model, x, t, c).float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compile_for_training(model: torch.nn.Module, scope: str | None) -> None:
    """``scope``: None (eager), "blocks" (each block compiled), "whole" or "whole-reduce-overhead" (the whole U-Net,
    the latter replayed in torch's CUDA graphs)."""
    if scope == "blocks":
        from estable.speed import compile_blocks

        compile_blocks(model)
    elif scope == "whole":
        model.compile()
    elif scope == "whole-reduce-overhead":
        model.compile(mode="reduce-overhead")


def _train_system(name: str, build, call, s: Settings, batches, *, ckpt: bool = False, cl: bool = False,
                  compile_scope: str | None = None, sdpa: str | None = None, repeats: int | None = None,
                  rows: dict[str, Any] | None = None, pipelined: bool = True, hints: bool = False,
                  geglu: bool = False) -> dict[str, Any]:
    """img/s and peak memory per batch size, filled into ``rows`` (the part's table) as each is measured, so that
    a part cut off by a time limit still reports the rows it finished; ``pipelined``: also the img/s of steps run
    back to back, with no sync between them (where the host's launching hides behind the GPU's work); ``hints``:
    every convolution pinned to channels_last (estable.nn.layout.pin_channels_last); ``geglu``: each GEGLU as two
    matrix products (estable.nn.attention.split_geglu)."""
    rows = {} if rows is None else rows
    model = build().train()
    if cl:
        model.to(memory_format=torch.channels_last)
    if ckpt:
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        else:
            model.gradient_checkpointing = True
    if geglu:
        from estable.nn.attention import split_geglu

        split_geglu(model)
    if hints:
        from estable.nn.layout import pin_channels_last

        pin_channels_last(model)
    compile_for_training(model, compile_scope)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s.cuda)
    side = s.unet_kwargs["sample_size"]
    ctx_dim = s.unet_kwargs["cross_attention_dim"]
    for b in batches:
        try:
            x = torch.randn(b, 4, side, side, device=s.device)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, 1000, (b,), device=s.device)
            c = torch.randn(b, 77, ctx_dim, device=s.device)

            if s.cuda:
                torch.cuda.reset_peak_memory_stats()
            step = _step(model, opt, call, x, t, c, s, sdpa=sdpa)
            r = timed(step, s, repeats=repeats or s.train_steps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if s.cuda else 0.0
            rows[str(b)] = {"img_per_s": b / r["median_s"], "peak_gib": peak, "step_s": r["median_s"],
                            "first_s": r["first_s"]}
            if pipelined:
                rows[str(b)]["back_to_back_img_per_s"] = b / back_to_back(step, s, repeats or s.train_steps)
            log(f"train {name}, batch {b}: {b / r['median_s']:.1f} img/s, {peak:.1f} GiB (first step "
                f"{r['first_s']:.1f} s)" + (f"; {rows[str(b)]['back_to_back_img_per_s']:.1f} img/s back to back"
                                            if pipelined else ""))
            save_partial()
        except torch.OutOfMemoryError:
            rows[str(b)] = {"error": "out of memory"}
            log(f"train {name}, batch {b}: out of memory")
            opt.zero_grad(set_to_none=True)
            x = t = c = None
            free()
            break
        finally:
            x = t = c = None
    del model, opt
    free()
    return rows


def _calls():
    def dif(model, x, t, c):
        return model(x, t, encoder_hidden_states=c).sample

    def est(model, x, t, c):
        return model(x, t, c)

    return dif, est


def part_training(s: Settings, res: dict[str, Any], checkpointing: bool = True) -> None:
    build_d, build_e = _unets(s)
    dif, est = _calls()
    tr = res.setdefault("training", {})
    _train_system("diffusers", build_d, dif, s, s.train_batches, rows=tr.setdefault("diffusers", {}))
    _train_system("Estable", build_e, est, s, s.train_batches, rows=tr.setdefault("Estable", {}))
    _train_system("Estable, channels_last", build_e, est, s, s.train_batches, cl=True,
                  rows=tr.setdefault("Estable, channels_last", {}))
    if checkpointing:
        part_checkpointing(s, res, [("diffusers", build_d, dif, {}), ("Estable", build_e, est, {})])


def part_checkpointing(s: Settings, res: dict[str, Any], systems) -> None:
    ck = res.setdefault("checkpointing", {})
    total = torch.cuda.get_device_properties(0).total_memory if s.cuda else 0
    if s.cuda and s.memory_cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, s.memory_cap_gib * 2**30 / total))
    try:
        for name, build, call, kw in systems:
            log(f"gradient checkpointing, {name}: the largest batch ...")
            rows = _train_system(f"{name} (checkpointing)", build, call, s, s.ckpt_batches, ckpt=True,
                                 repeats=1 if s.smoke else 2, pipelined=False, **kw)
            ok = [(int(b), r) for b, r in rows.items() if "img_per_s" in r]
            best = max(ok, key=lambda br: br[0]) if ok else (None, {})
            ck[name] = {"largest": best[0], "img_per_s": best[1].get("img_per_s"), "peak_gib": best[1].get("peak_gib"),
                        "at_64": rows.get("64") if "64" in rows else rows.get(str(s.ckpt_batches[0])),
                        "tried": rows, "limit": "largest tried" if len(ok) == len(s.ckpt_batches) else "memory"}
    finally:
        if s.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)


# probes a compiled training row can add (a suffix of its --train-compile name) and how the row's name says so
TRAIN_PROBES = {"-cat": "concatenations as kernels' outputs", "-geglu": "GEGLU as two matrix products",
                "-bench": "cuDNN's benchmark mode"}


def part_training_compiled(s: Settings, res: dict[str, Any], scopes: list[str], sdpa: str | None = None) -> None:
    _, build_e = _unets(s)
    _, est = _calls()
    tr = res.setdefault("training", {})
    if s.smoke:
        res.setdefault("notes", []).append("smoke: training-compiled ran without torch.compile")
    for row in scopes:
        probe = next((p for p in TRAIN_PROBES if row.endswith(p)), None)
        row = row.removesuffix(probe or "")
        scope, hints = row.removesuffix("-hint"), row.endswith("-hint")
        name = (f"Estable, compiled ({scope}) + channels_last" + (f", {sdpa} attention first" if sdpa else "")
                + (", convolutions pinned to channels_last" if hints else "")
                + (f", {TRAIN_PROBES[probe]}" if probe else ""))
        context = {"-cat": concat_kernels, "-bench": cudnn_benchmark}.get(probe or "", contextlib.nullcontext)
        with context():
            _train_system(name, build_e, est, s, s.train_batches, cl=True, compile_scope=None if s.smoke else scope,
                          sdpa=sdpa, rows=tr.setdefault(name, {}), hints=hints, geglu=probe == "-geglu")


@contextlib.contextmanager
def cudnn_benchmark():
    """cuDNN's benchmark mode for the row: ATen times every algorithm of each new convolution shape (forward, data
    and weight gradient) at its first call and keeps the fastest, instead of its heuristics' pick."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for the JSON and markdown results")
    ap.add_argument("--part", action="append", choices=(*PARTS, "all"),
                    help="what to run (repeatable; default inference)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny networks on the CPU: checks the script, measures nothing")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row after the warm-up (default 5)")
    ap.add_argument("--work", type=Path, help="where the random-weight model folder is made (default: a temp dir)")
    ap.add_argument("--variants", action="store_true",
                    help="inference: also the fastest mode with cuDNN attention first (compiles again: +3-5 min)")
    ap.add_argument("--no-baselines", action="store_true",
                    help="inference: only the fastest mode's rows (no diffusers eager, Estable eager or CUDA graphs)")
    ap.add_argument("--compile-cache", type=Path, metavar="DIR",
                    help="coldstart and inference: keep the fastest mode's compile cache (and the children's bytecode) "
                    "in DIR, so that another invocation starts warm from it (default: a fresh temporary folder for "
                    "coldstart, the user's cache for inference)")
    ap.add_argument("--cold-rows", nargs="+", choices=("empty", "warm", "warm-no-mega"),
                    default=["empty", "warm", "warm-no-mega"],
                    help="coldstart: which rows to run (default all three; 'warm' alone needs --compile-cache with "
                    "a cache an earlier 'empty' row left)")
    ap.add_argument("--train-compile", action="append",
                    choices=("blocks", "whole", "whole-reduce-overhead", "whole-hint", "whole-reduce-overhead-hint",
                             *(f"whole-reduce-overhead-hint{p}" for p in TRAIN_PROBES)),
                    help="training-compiled: compile each block (default), the whole U-Net, or the whole U-Net with "
                    "torch's own CUDA graphs (mode reduce-overhead); '-hint': with every convolution's input and "
                    "output gradient pinned to channels_last; '-cat': concatenations lowered as Inductor's "
                    "ConcatKernel (speed_common.concat_kernels); '-geglu': each GEGLU as two matrix products "
                    "(estable.nn.attention.split_geglu);"
                    " '-bench': cuDNN's benchmark mode; repeatable, rows in the order given")
    ap.add_argument("--train-sdpa", choices=("cudnn", "flash", "efficient"),
                    help="training-compiled: put this attention kernel first (default: torch's choice)")
    ap.add_argument("--train-batch", type=int, action="append", metavar="N",
                    help="training parts: only these batch sizes (repeatable; default 8 and 32)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="training: skip the largest-batch search with gradient checkpointing (~2 min)")
    ap.add_argument("--dynamic", action="store_true",
                    help="fastest mode with SpeedOptions(dynamic=True): compile for any batch size at once (fewer "
                    "recompiles for a new batch size; kernels with symbolic sizes)")
    ap.add_argument("--decode-batch", type=int, metavar="N",
                    help="fastest mode with SpeedOptions(decode_batch=N): the VAE decodes N images at a time (1: the "
                    "compiled decoder keeps one shape for every batch size)")
    ap.add_argument("--shape", action="append", metavar="SIDExBATCH",
                    help="inference parts: only this shape of the table (e.g. 512x1; repeatable; default all)")
    ap.add_argument("--report", type=Path, nargs="+", metavar="DIR", help="merge the part-*.json found in these "
                    "folders into --out/speed.json and speed.md, and exit")
    ap.add_argument("--profile-start", action="store_true",
                    help="coldstart: also write a cProfile of each process's load and first image (its times then "
                    "include the profiler's overhead) to --out/start-profile-*.txt")
    ap.add_argument("--child", choices=("coldstart",), help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--no-mega-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "coldstart":
        child_coldstart(args)
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    if args.report:
        parts = [json.loads(p.read_text()) for d in args.report for p in sorted(Path(d).glob("part-*.json"))]
        if not parts:
            ap.error("no part-*.json found in " + ", ".join(map(str, args.report)))
        write_report(merge(parts), args.out, "speed")
        return 0

    s = smoke_settings() if args.smoke else full_settings(args.repeats)
    s.speed_dynamic, s.decode_batch = bool(args.dynamic), args.decode_batch
    if args.shape:
        known = {f"{side}x{b}": (side, b) for side, b in s.shapes}
        if any(k not in known for k in args.shape):
            ap.error(f"--shape must be one of {', '.join(known)}")
        s.shapes = tuple(v for k, v in known.items() if k in args.shape)
    if args.train_batch:
        if min(args.train_batch) < 1:
            ap.error("--train-batch must be positive")
        s.train_batches = tuple(args.train_batch)
    if not s.cuda and not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --smoke for the CPU check")
    parts = list(PARTS) if "all" in (args.part or []) else (args.part or ["inference"])
    if "coldstart" in parts and args.compile_cache and "empty" in args.cold_rows and any(args.compile_cache.glob("*")):
        ap.error(f"--compile-cache {args.compile_cache} is not empty: the 'empty' row needs an empty folder")
    if s.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    log(f"parts {parts}; {'SMOKE (tiny CPU networks)' if s.smoke else torch.cuda.get_device_name(0)}")
    everything: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="estable-speed-") as tmp:
        work = args.work or Path(tmp)
        folder = None
        if any(p in parts for p in ("inference", "diffusers-compiled", "coldstart")):  # builtin needs no folder
            log("making the random-weight model folder ...")
            folder = make_folder(work, s)
            log(f"model folder ready: {folder}")
        for part in parts:
            res: dict[str, Any] = environment(s)
            if s.speed_dynamic or s.decode_batch:  # the fastest mode's rows are not the default options'
                res.setdefault("notes", []).append(f"fastest mode: SpeedOptions(dynamic={s.speed_dynamic}, "
                                                   f"decode_batch={s.decode_batch})")
            log(f"--- part {part} ---")
            t0 = time.perf_counter()
            _SAVE.append(lambda res=res, part=part: write_report(res, args.out, f"part-{part}", quiet=True))
            try:
                if part == "inference":
                    part_inference(folder, s, res, args)
                elif part == "builtin":
                    part_builtin(s, res)
                elif part == "diffusers-compiled":
                    part_diffusers_compiled(folder, s, res)
                elif part == "coldstart":
                    part_coldstart(folder, s, res, args)
                elif part == "training":
                    part_training(s, res, checkpointing=not args.no_checkpointing)
                else:
                    part_training_compiled(s, res, args.train_compile or ["blocks"], args.train_sdpa)
            except Exception as exc:
                log(f"part {part} stopped: {type(exc).__name__}: {exc}")
                res.setdefault("notes", []).append(f"part {part} stopped: {type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
                if s.smoke:
                    raise
            res["seconds"] = {part: time.perf_counter() - t0}
            write_report(res, args.out, f"part-{part}")
            everything.append(res)
            free()
    write_report(merge(everything), args.out, "speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
