"""Are the U-Net's low-resolution convolutions faster as one matrix product? (issue 14)

    PYTHONPATH=src python benchmarks/conv_gemm_probe.py --out DIR            # a GPU, about a minute
    PYTHONPATH=src python benchmarks/conv_gemm_probe.py --out DIR --smoke    # the CPU: the code path only

At batch 2 (one image with CFG) a 3×3 convolution at 8² or 16² pixels has few output rows (B·H·W = 128 or 512)
and a long reduction (9·C = 11,520 at 1,280 channels): few output tiles, most of the GPU idle unless the reduction
is split. For every convolution shape of the SD 1.5-shaped U-Net (and a few of the VAE decoder's) this times, at
batch 2 and 8, fp16, channels_last:

* ``cudnn``: ``F.conv2d`` (what the fastest mode runs now);
* ``gemm``: the same convolution as a gather of the k·k shifted windows of the padded input into one
  (B·Hout·Wout, k·k·C) matrix, then one matrix product with the weight laid out as (Cout, k·k·C)
  (``speed_common.conv2d_as_gemm``), cuBLAS choosing its kernel (and whether to split the reduction);

each as a CUDA graph of 20 calls, so that what is timed is the kernels (median of 7 replays), and the relative L2
error of each against the fp32 convolution of the same fp16 inputs; first, the whole U-Net's call with its
convolutions as products by each of :data:`RULES` (:func:`unet_calls`). Writes ``DIR/unet_calls.json``,
``DIR/conv_gemm.json`` and ``.md``. Measured on an H100: benchmarks/RESULTS.md, "the small convolutions as matrix
products".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import WindowsAsProduct, conv2d_as_gemm, gemm_weight, windows_as_product  # noqa: E402

# (name, in channels, side, out channels, kernel, stride, padding)
UNET = [
    ("conv_in", 4, 64, 320, 3, 1, 1),
    ("64² 320→320", 320, 64, 320, 3, 1, 1),
    ("64² 640→320 (up)", 640, 64, 320, 3, 1, 1),
    ("64² 960→320 (up)", 960, 64, 320, 3, 1, 1),
    ("64² down 320", 320, 64, 320, 3, 2, 1),
    ("32² 320→640", 320, 32, 640, 3, 1, 1),
    ("32² 640→640", 640, 32, 640, 3, 1, 1),
    ("32² 960→640 (up)", 960, 32, 640, 3, 1, 1),
    ("32² 1280→640 (up)", 1280, 32, 640, 3, 1, 1),
    ("32² 1920→640 (up)", 1920, 32, 640, 3, 1, 1),
    ("32² down 640", 640, 32, 640, 3, 2, 1),
    ("16² 640→1280", 640, 16, 1280, 3, 1, 1),
    ("16² 1280→1280", 1280, 16, 1280, 3, 1, 1),
    ("16² 1920→1280 (up)", 1920, 16, 1280, 3, 1, 1),
    ("16² 2560→1280 (up)", 2560, 16, 1280, 3, 1, 1),
    ("16² down 1280", 1280, 16, 1280, 3, 2, 1),
    ("8² 1280→1280", 1280, 8, 1280, 3, 1, 1),
    ("8² 2560→1280 (up)", 2560, 8, 1280, 3, 1, 1),
    ("8²→16² phases 1280", 1280, 8, 5120, 2, 1, 1),
    ("16²→32² phases 1280", 1280, 16, 5120, 2, 1, 1),
    ("32²→64² phases 640", 640, 32, 2560, 2, 1, 1),
    ("16² 1×1 2560→1280", 2560, 16, 1280, 1, 1, 0),
    ("8² 1×1 1280→1280", 1280, 8, 1280, 1, 1, 0),
    ("32² 1×1 640→640", 640, 32, 640, 1, 1, 0),
]
VAE = [("VAE 64² 512→512", 512, 64, 512, 3, 1, 1), ("VAE 128² 512→512", 512, 128, 512, 3, 1, 1)]


def graph_time(fn, repeats: int = 7, calls: int = 20) -> float:
    """Seconds per call of ``fn`` (kernels only): ``calls`` calls recorded as one CUDA graph, median of replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


def probe(shape, batch: int, device: torch.device, dtype: torch.dtype, timing: bool) -> dict:
    name, cin, side, cout, k, stride, pad = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cin, side, side, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(device, dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    b = (torch.randn(cout, generator=g) * 0.1).to(device, dtype)
    w2 = gemm_weight(w)
    ref = F.conv2d(x.float(), w.float(), b.float(), stride, pad)
    got = conv2d_as_gemm(x, w2, b, k, stride, pad)
    row = {"name": name, "batch": batch, "rows": int(got.shape[0] * got.shape[2] * got.shape[3]),
           "reduction": cin * k * k, "cols": cout,
           "err_cudnn": rel(F.conv2d(x, w, b, stride, pad), ref), "err_gemm": rel(got, ref),
           "gemm_channels_last": bool(got.is_contiguous(memory_format=torch.channels_last))}
    if timing:
        row["cudnn_ms"] = 1e3 * graph_time(lambda: F.conv2d(x, w, b, stride, pad))
        row["gemm_ms"] = 1e3 * graph_time(lambda: conv2d_as_gemm(x, w2, b, k, stride, pad))
    return row


# (max output pixels, max kernel): a convolution is a product where both hold
RULES = ((0, 3), (512, 3), (2048, 3), (8192, 3), (10**9, 1))


def unet_calls(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[dict]:
    """The SD 1.5-shaped U-Net (random weights; channels_last, fused projections, phase upsampling, uncompiled) called
    as a CUDA graph at batch 2 and 8 (64² latents), with its convolutions as products by each of :data:`RULES` (the
    last: every 1 × 1 convolution, none other; the upsamplers' phase convolutions are not modules and stay cuDNN's),
    and its relative error against the same weights in fp32, batch 2."""
    from estable.config import UNetConfig
    from estable.models.unet import UNet
    from estable.speed import fuse_phases, fuse_projections

    cfg = UNetConfig() if not smoke else UNetConfig(block_channels=(32, 64), attention_levels=(True, True),
                                                    num_heads=2, context_dim=32, norm_groups=8, layers_per_block=1)
    side = 64 if not smoke else 8
    torch.manual_seed(0)
    with torch.device(device):
        ref = UNet(cfg).eval()
    unet = UNet(cfg).to(device).eval()
    unet.load_state_dict(ref.state_dict())
    unet.to(dtype=dtype, memory_format=torch.channels_last)
    fuse_projections(unet)
    fuse_phases(unet)
    windows_as_product(unet, 0)
    wrappers = [m for m in unet.modules() if isinstance(m, WindowsAsProduct)]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for batch in (2, 8) if not smoke else (2,):
        x = torch.randn(batch, 4, side, side, generator=g).to(device)
        c = torch.randn(batch, 77, cfg.context_dim, generator=g).to(device)
        t = torch.full((batch,), 500.0, device=device)
        with torch.inference_mode():
            want = ref(x, t, c) if batch == 2 else None
            xl, cl = x.to(dtype).contiguous(memory_format=torch.channels_last), c.to(dtype)
            for max_rows, max_kernel in RULES:
                for m in wrappers:
                    m.max_rows, m.max_kernel = max_rows, max_kernel
                row = {"batch": batch, "gemm_rows": max_rows, "max_kernel": max_kernel}
                if want is not None:
                    row["fp16_error"] = rel(unet(xl, t, cl), want)
                if not smoke:
                    row["unet_ms"] = 1e3 * graph_time(lambda xl=xl, t=t, cl=cl: unet(xl, t, cl), repeats=9, calls=5)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="the CPU, fp32, two shapes: the code path, not the numbers")
    ap.add_argument("--unet-only", action="store_true", help="only the whole U-Net's calls")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    shapes = UNET + VAE if cuda else [UNET[12], UNET[18]]
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    calls = unet_calls(device, dtype, not cuda)
    (args.out / "unet_calls.json").write_text(json.dumps({"env": env, "rows": calls}, indent=1))
    if args.unet_only:
        return
    rows = []
    for batch in ((2, 8) if cuda else (2,)):
        for shape in shapes:
            if shape in VAE and batch != 2:
                continue
            rows.append(r := probe(shape, batch if shape not in VAE else 1, device, dtype, cuda))
            print(json.dumps(r), flush=True)
    (args.out / "conv_gemm.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    md = [f"{env}", "", "| shape | batch | rows × reduction → cols | cuDNN ms | GEMM ms | GEMM / cuDNN | error cuDNN | "
          "error GEMM |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, gm = r.get("cudnn_ms"), r.get("gemm_ms")
        ratio = f"{gm / c:.2f}" if c else "–"
        md.append(f"| {r['name']} | {r['batch']} | {r['rows']} × {r['reduction']} → {r['cols']} | "
                  f"{c if c is None else round(c, 4)} | {gm if gm is None else round(gm, 4)} | {ratio} | "
                  f"{r['err_cudnn']:.2e} | {r['err_gemm']:.2e} |")
    for batch in sorted({r["batch"] for r in rows if "cudnn_ms" in r}):
        sel = [r for r in rows if r["batch"] == batch and "cudnn_ms" in r and not r["name"].startswith("VAE")]
        cudnn, gemm = sum(r["cudnn_ms"] for r in sel), sum(r["gemm_ms"] for r in sel)
        best = sum(min(r["cudnn_ms"], r["gemm_ms"]) for r in sel)
        md.append(f"\nbatch {batch}: sum over the U-Net shapes (each once): cuDNN {cudnn:.3f} ms, GEMM {gemm:.3f} ms, "
                  f"the faster of the two per shape {best:.3f} ms")
    (args.out / "conv_gemm.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
