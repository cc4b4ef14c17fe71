"""Shared pieces of benchmarks/speed_side_by_side.py: logging, timing, the SD 1.5-shaped random-weight model
folder (written by diffusers, read by both systems), the settings of a full run and of the CPU smoke run, and
the markdown report."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

T0 = time.perf_counter()
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"


def log(msg: str) -> None:
    """A progress line with the wall-clock time and the seconds since start (flushed: a cut-off run still tells)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


@dataclass
class Settings:
    device: str = "cuda"
    dtype: torch.dtype = torch.float16
    steps: int = 25
    cfg: float = 7.5
    repeats: int = 5
    shapes: tuple[tuple[int, int], ...] = ((512, 1), (512, 4), (256, 1))  # (side, batch)
    new_batch: int = 4  # cold start: the batch size asked for after the first image
    train_batches: tuple[int, ...] = (8, 32)
    train_steps: int = 10
    ckpt_batches: tuple[int, ...] = (64, 96, 128, 192, 256, 320, 384, 448, 512)
    memory_cap_gib: float | None = 80.0  # "fits 80 GiB": the largest-batch search caps the allocator here
    builtin_batch: int = 64
    builtin_size: int | None = None  # None: the built-in model's native size
    builtin_repeats: int = 3
    smoke: bool = False
    speed_dynamic: bool = False  # SpeedOptions.dynamic of the fastest mode (--dynamic: True)
    decode_batch: int | None = None  # SpeedOptions.decode_batch of the fastest mode (--decode-batch)
    unet_kwargs: dict[str, Any] = field(default_factory=dict)

    def fastest(self, **changes: Any) -> Any:
        """The fastest mode's SpeedOptions as this run asks for it (no compiling in a smoke run)."""
        from estable.speed import SpeedOptions

        return SpeedOptions(**{"compile": not self.smoke, "dynamic": self.speed_dynamic,
                               "decode_batch": self.decode_batch, **changes})

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def full_settings(repeats: int) -> Settings:
    return Settings(repeats=repeats, unet_kwargs=dict(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)))


def smoke_settings() -> Settings:
    """Tiny networks on the CPU in fp32: every code path of the script, none of its numbers."""
    return Settings(
        device="cpu", dtype=torch.float32, steps=1, repeats=1, shapes=((64, 1), (64, 2), (32, 1)), new_batch=2,
        train_batches=(1, 2), train_steps=1, ckpt_batches=(1, 2), memory_cap_gib=None, builtin_batch=2,
        builtin_size=32, builtin_repeats=1, smoke=True,
        unet_kwargs=dict(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32))


def timed(fn: Callable[[], Any], s: Settings, repeats: int | None = None) -> dict[str, Any]:
    """First call (warm-up: compilation, graph recording) then the median of ``repeats`` calls, in seconds."""
    s.sync()
    t = time.perf_counter()
    fn()
    s.sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(s.repeats if repeats is None else repeats):
        s.sync()
        t = time.perf_counter()
        fn()
        s.sync()
        times.append(time.perf_counter() - t)
    return {"first_s": first, "median_s": statistics.median(times), "all_s": times}


def back_to_back(fn, s, steps: int) -> float:
    """Seconds per call of ``steps`` calls with no sync between them (as a training loop that does not read its
    loss every step runs): the host's work for one call overlaps the GPU's for the one before."""
    fn()
    s.sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    s.sync()
    return (time.perf_counter() - t) / steps


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


class no_tf32:
    """fp32 references in true fp32: TF32 off for matmuls and convolutions inside the block."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# ------------------------------------------------------------------------------------------------ the model


def _byte_symbols() -> list[str]:
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(moved)}
    return [table[b] for b in keep + moved]


def write_tokenizer(folder: Path) -> tuple[int, int]:
    """A byte-level CLIP-format vocabulary without merges (every character one token): the text encoder still sees
    77 positions, so the work is SD's; no vocabulary download needed. Returns (bos id, eos id)."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab) - 2, len(vocab) - 1


def make_folder(root: Path, s: Settings) -> Path:
    """An SD 1.5-shaped diffusers folder with random weights (saved in the run's dtype), made once per run."""
    import diffusers
    import transformers

    folder = root / ("sd15-random" if not s.smoke else "tiny-random")
    if (folder / "model_index.json").is_file():
        return folder
    bos, eos = write_tokenizer(root / "vocab")
    tok = transformers.CLIPTokenizer(str(root / "vocab" / "vocab.json"), str(root / "vocab" / "merges.txt"),
                                     model_max_length=77)
    dev = s.device
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the GPU: seconds instead of a minute on the CPU
        unet = diffusers.UNet2DConditionModel(**s.unet_kwargs)
        if s.smoke:
            vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32, 32),
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                          norm_num_groups=32, layers_per_block=1, sample_size=64)
            text_cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        else:
            vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                                          latent_channels=4, sample_size=512)
            text_cfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=bos,
            eos_token_id=eos, pad_token_id=eos, **text_cfg))
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=s.dtype)  # (diffusers ignores a torch_dtype= here: the folders before commit ef2e65c were fp32)
    pipe.save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": False}))
    del pipe, unet, vae, text
    if s.cuda:
        torch.cuda.empty_cache()
    return folder


# ------------------------------------------------------------------------------------------------ the report


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(res: dict[str, Any]) -> str:
    """The side-by-side tables of issue 14 from the merged results of the parts that ran."""
    out = [f"# Speed side by side ({res.get('device', '?')}, torch {res.get('torch', '?')}, diffusers "
           f"{res.get('diffusers', '?')}{', SMOKE: tiny CPU networks, not a measurement' if res.get('smoke') else ''})",
           ""]
    inf = res.get("inference", {})
    if inf:
        shapes = res.get("shapes", [])
        out += ["Seconds per image, full pipeline (text encoding, sampling, VAE decode, PIL), median of "
                f"{res.get('repeats')} after a warm-up; first call in brackets where it compiles or records.", "",
                "| system | " + " | ".join(f"{side}², batch {b}" for side, b in shapes) + " |",
                "|---|" + "---|" * len(shapes)]
        order = ["diffusers eager", "diffusers compiled", "Estable eager", "Estable CUDA graphs", "Estable fastest"]
        names = sorted(inf, key=lambda n: (order.index(n) if n in order else len(order), n))
        for name in names:
            rows = inf[name]
            cells = []
            for side, b in shapes:
                r = rows.get(f"{side}x{b}")
                if r is None:
                    cells.append("–")
                    continue
                cell = f"{r['median_s'] / b:.3f}"
                if r.get("first_s", 0) > 5 * r["median_s"] + 1:
                    cell += f" (first call {r['first_s']:.0f} s)"
                cells.append(cell)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    for key, title in (("fp16_error", "One U-Net call in fp16 against fp32 (same fp16-rounded weights, TF32 off), "
                        "relative L2 error"),):
        if res.get(key):
            out += [title, "", "| path | relative error | × diffusers eager fp16 |", "|---|---|---|"]
            base = res[key].get("diffusers eager")
            for name, v in res[key].items():
                out.append(f"| {name} | {v:.3e} | {_f(v / base if base else None, '{:.2f}')} |")
            out.append("")
    cs = res.get("coldstart")
    if cs:
        side = (res.get("shapes") or [[512]])[0][0]
        out += [f"Cold start of the fastest mode, fresh process: seconds from start to the first image ({side}², batch "
                f"1), then to the first image at batch {res.get('new_batch')} (a new batch size)", "",
                "| disk cache | import + load | of which: imports, CUDA context, weights, pipeline (cache load) | "
                "first image | + new batch size | total |", "|---|---|---|---|---|---|"]
        for name, r in cs.items():
            steps = [r.get(k) for k in ("import_s", "device_s", "weights_s", "load_s")]
            split = ("–" if None in steps else  # runs before the split was recorded
                     " / ".join(f"{b - a:.1f}" for a, b in zip([0.0] + steps[:-1], steps)))
            out.append(f"| {name} | {_f(r.get('load_s'), '{:.1f}')} | {split} | "
                       f"{_f(r.get('first_image_s'), '{:.1f}')} | "
                       f"{_f(r.get('new_batch_s'), '{:.1f}')} | {_f(r.get('total_s'), '{:.1f}')} |")
        out.append("")
    tr = res.get("training")
    if tr:
        out += ["U-Net training step, 512 px (64² latents), bf16 autocast, AdamW; img/s and peak GiB", "",
                "| system | " + " | ".join(f"batch {b}" for b in res.get("train_batches", [])) + " |",
                "|---|" + "---|" * len(res.get("train_batches", []))]
        for name, rows in tr.items():
            cells = []
            for b in res.get("train_batches", []):
                r = rows.get(str(b))
                run = (r or {}).get("back_to_back_img_per_s")
                btb = f" ({run:.1f} back to back)" if run else ""
                cells.append("–" if r is None else r.get("error") or
                             f"{r['img_per_s']:.1f} img/s{btb}, {r['peak_gib']:.1f} GiB")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    ck = res.get("checkpointing")
    if ck:
        cap = res.get("memory_cap_gib")
        out += [f"Largest batch with gradient checkpointing{f' within {cap} GiB' if cap else ''}", "",
                "| system | largest batch | img/s there | peak GiB | batch 64: img/s, GiB |", "|---|---|---|---|---|"]
        for name, r in ck.items():
            b64 = r.get("at_64") or {}
            out.append(f"| {name} | {r.get('largest')} | {_f(r.get('img_per_s'), '{:.1f}')} | "
                       f"{_f(r.get('peak_gib'), '{:.1f}')} | {_f(b64.get('img_per_s'), '{:.1f}')}, "
                       f"{_f(b64.get('peak_gib'), '{:.1f}')} |")
        out.append("")
    bi = res.get("builtin")
    if bi:
        out += [f"Built-in model, batch {res.get('builtin_batch')}, {res.get('steps')} steps, DPM++ 2M Karras, its "
                "recommended CFG (throughput mode)", "",
                "| path | images/s | first call s | pixel difference vs eager (max, mean of 255) |",
                "|---|---|---|---|"]
        for name, r in bi.items():
            diff = r.get("diff_vs_eager")
            out.append(f"| {name} | {r['img_per_s']:.1f} | {r['first_s']:.1f} | "
                       f"{'–' if diff is None else f'{diff[0]}, {diff[1]:.3f}'} |")
        out.append("")
    if res.get("targets"):
        out += ["Targets", ""] + [f"- {t}" for t in res["targets"]] + [""]
    if res.get("notes"):
        out += ["Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(out)


def targets(res: dict[str, Any]) -> list[str]:
    """Issue 14's targets, each met or missed by how much (only those whose numbers are there)."""
    lines = []
    inf = res.get("inference", {})
    fast = inf.get("Estable fastest", {})
    dc = inf.get("diffusers compiled", {})
    key1, key4 = _shape_key(res, 0), _shape_key(res, 1)
    if key1 in fast:
        v = fast[key1]["median_s"]
        line = f"512² batch 1, fastest mode: {v:.3f} s (target ≤ 0.15 s: {'met' if v <= 0.15 else 'missed'})"
        if key1 in dc:
            ratio = v / dc[key1]["median_s"]
            line += f"; {ratio:.2f}× diffusers compiled (target ≤ 0.7×: {'met' if ratio <= 0.7 else 'missed'})"
        lines.append(line)
    if key4 in fast:
        b = res["shapes"][1][1]
        v = fast[key4]["median_s"] / b
        lines.append(f"512² batch {b}, per image: {v:.3f} s (target ≤ 0.10 s: {'met' if v <= 0.10 else 'missed'})")
    for name, r in (res.get("coldstart") or {}).items():
        if r.get("total_s") is not None:
            lines.append(f"cold start ({name}), new batch size included: {r['total_s']:.1f} s (target ≤ 20 s: "
                         f"{'met' if r['total_s'] <= 20 else 'missed'})")
    tr = res.get("training") or {}
    base = tr.get("diffusers") or {}
    for name, rows in tr.items():
        if name == "diffusers":
            continue
        for b, r in rows.items():
            d = base.get(b)
            if d and "img_per_s" in r and "img_per_s" in d:
                ratio = r["img_per_s"] / d["img_per_s"]
                ok = ratio >= 1.5 and r["peak_gib"] <= d["peak_gib"] * 1.001
                lines.append(f"training batch {b}, {name}: {ratio:.2f}× diffusers, {r['peak_gib']:.1f} vs "
                             f"{d['peak_gib']:.1f} GiB (target ≥ 1.5×, same or less memory: "
                             f"{'met' if ok else 'missed'})")
                if "back_to_back_img_per_s" in r and "back_to_back_img_per_s" in d:
                    lines.append(f"training batch {b}, {name}, steps back to back (no sync between them): "
                                 f"{r['back_to_back_img_per_s'] / d['back_to_back_img_per_s']:.2f}× diffusers")
    return lines


def _shape_key(res: dict[str, Any], i: int) -> str | None:
    shapes = res.get("shapes") or []
    return f"{shapes[i][0]}x{shapes[i][1]}" if len(shapes) > i else None


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                for kk, vv in v.items():
                    if isinstance(vv, dict) and isinstance(out[k].get(kk), dict):
                        out[k][kk].update(vv)
                    else:
                        out[k][kk] = vv
            elif isinstance(v, list) and isinstance(out.get(k), list) and k in ("notes",):
                out[k] += [x for x in v if x not in out[k]]
            else:
                out[k] = v
    out["targets"] = targets(out)
    return out


def write_report(res: dict[str, Any], out: Path, name: str, *, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res = {**res, "targets": targets(res)}
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(res))
    if not quiet:
        log(f"wrote {out / name}.json and .md")


def environment(s: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "smoke": s.smoke,
                            "device": torch.cuda.get_device_name(0) if s.cuda else "cpu", "steps": s.steps,
                            "cfg": s.cfg, "repeats": s.repeats, "shapes": [list(x) for x in s.shapes],
                            "new_batch": s.new_batch, "train_batches": list(s.train_batches),
                            "memory_cap_gib": s.memory_cap_gib, "builtin_batch": s.builtin_batch,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


# ------------------------------------------------------------------ probes swapped into a U-Net (training step)


class PointwiseAsLinear(torch.nn.Module):
    """A 1 × 1 convolution computed as a matrix product over the channels (the same arithmetic; its parameters are
    the convolution's own): on a channels_last input the channels are the innermost axis, so the product reads and
    writes the tensors in place of a convolution kernel — and its backward has no convolution backward, which
    makes the incoming gradient match the input's memory format with a copy when it does not (RESULTS.md, eleventh
    GPU run). A probe of where the training step's copies come from, not a library path."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # (out, in, 1, 1), (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)  # (B, H, W, out)
        return y.permute(0, 3, 1, 2)  # (B, out, H, W), channels_last in memory


def swap_convolutions(model: torch.nn.Module, wrap: Callable[[torch.nn.Conv2d], torch.nn.Module],
                      which: Callable[[torch.nn.Conv2d], bool] = lambda conv: True) -> int:
    """Replace each convolution of ``model`` that ``which`` picks by ``wrap(conv)``; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.Conv2d) and which(child)]
    for parent, name, conv in swaps:
        setattr(parent, name, wrap(conv))
    return len(swaps)


def pointwise_as_linear(model: torch.nn.Module) -> int:
    """Swap every 1 × 1 convolution (stride 1, no padding, one group) of ``model`` for :class:`PointwiseAsLinear`;
    returns how many were swapped."""
    return swap_convolutions(model, PointwiseAsLinear, lambda c: c.kernel_size == (1, 1) and c.stride == (1, 1)
                             and c.padding == (0, 0) and c.groups == 1)


def conv2d_as_gemm(x: torch.Tensor, weight2d: torch.Tensor, bias: torch.Tensor | None, kernel: int,
                   stride: int = 1, padding: int = 0) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, padding)`` of a square kernel as one matrix product (im2col): the k·k shifted
    windows of the padded input side by side, (B·Hout·Wout, k·k·C), times ``weight2d`` = (Cout, k·k·C) in the window
    order (row, column, channel) — for a channels-last weight a view of it. Output channels-last. A probe
    (conv_gemm_probe.py: slower than cuDNN for the U-Net's 3 × 3 convolutions on an H100), not a library path."""
    b, c, h, w = x.shape
    xh = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view when x is channels-last
    if padding:
        xh = torch.nn.functional.pad(xh, (0, 0, padding, padding, padding, padding))
    hout, wout = ((n + 2 * padding - kernel) // stride + 1 for n in (h, w))
    views = [xh[:, dy:dy + stride * (hout - 1) + 1:stride, dx:dx + stride * (wout - 1) + 1:stride]
             for dy in range(kernel) for dx in range(kernel)]
    cols = torch.cat(views, dim=-1).reshape(b * hout * wout, kernel * kernel * c)
    out = torch.nn.functional.linear(cols, weight2d, bias)  # (B·Hout·Wout, Cout)
    return out.view(b, hout, wout, -1).permute(0, 3, 1, 2)


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, k, k) → (Cout, k·k·Cin), the window order of :func:`conv2d_as_gemm` (a view when channels-last)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class WindowsAsProduct(torch.nn.Module):
    """A square convolution computed by :func:`conv2d_as_gemm` when its output has at most ``max_rows`` pixels over
    the batch and its kernel is at most ``max_kernel`` wide (else as itself); its parameters are the convolution's."""

    def __init__(self, conv: torch.nn.Conv2d, max_rows: int, max_kernel: int = 3) -> None:
        super().__init__()
        self.conv, self.max_rows, self.max_kernel = conv, max_rows, max_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
        hout, wout = ((n + 2 * p - k) // s + 1 for n in x.shape[2:])
        if x.shape[0] * hout * wout > self.max_rows or k > self.max_kernel:
            return c(x)
        return conv2d_as_gemm(x, gemm_weight(c.weight), c.bias, k, s, p)


def windows_as_product(model: torch.nn.Module, max_rows: int) -> int:
    """Swap every square convolution of ``model`` (one group, zero padding) for :class:`WindowsAsProduct`."""
    return swap_convolutions(model, lambda conv: WindowsAsProduct(conv, max_rows), lambda c: (
        c.groups == 1 and c.padding_mode == "zeros" and c.dilation == (1, 1) and c.kernel_size[0] == c.kernel_size[1]
        and c.stride[0] == c.stride[1] and isinstance(c.padding, tuple) and c.padding[0] == c.padding[1]))


def concat_kernels():
    """A context in which Inductor lowers every concatenation as a buffer its inputs' kernels write into (its
    ConcatKernel) instead of a pointwise kernel that computes each input, masked, for every output element: GEGLU's
    backward concatenates the gradients of its two halves, and as a pointwise cat each element of the 64² result
    evaluates both halves' GELU terms (the thirteenth run's profile: 6.2 ms for five calls at 64², about a quarter
    of the card's bandwidth). A probe, not a library path."""
    from torch._inductor import config

    keys = ("max_pointwise_cat_inputs", "max_complex_pointwise_cat_inputs")  # the second is newer than torch 2.11
    return config.patch({k: 1 for k in keys if hasattr(config, k)})
