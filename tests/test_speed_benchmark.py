"""benchmarks/speed_side_by_side.py --smoke: every part of the GPU side-by-side script runs end to end on tiny CPU
networks and writes its tables (it measures nothing; about 3 minutes on the shared 2-core machine, so heavy)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str):
    """Import ``benchmarks/NAME.py`` (the scripts import each other by plain name)."""
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.heavy
def test_side_by_side_smoke_writes_every_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_side_by_side.py"), "--smoke", "--part",
                           "all", "--profile-start", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "speed.json").read_text())
    for name in ("diffusers eager", "Estable eager", "Estable CUDA graphs", "Estable fastest", "diffusers compiled"):
        assert set(res["inference"][name]) == {"64x1", "64x2", "32x1"}, name
    # fp32 on the CPU: every path agrees with the fp32 reference far below fp16's error
    assert all(v < 1e-4 for v in res["fp16_error"].values()), res["fp16_error"]
    assert set(res["coldstart"]) == {"none (empty cache)", "warm (the cache the first process left)",
                                     "warm, mega-cache not loaded (Inductor's cache only)"}
    for marks in res["coldstart"].values():  # the start-up split into its phases, in order
        steps = [marks[k] for k in ("python_s", "import_s", "device_s", "weights_s", "load_s", "first_image_at")]
        assert steps == sorted(steps) and steps[0] > 0, marks
    for short in ("empty", "warm", "warm-no-mega"):  # the start-up's host profiles
        assert "load_model" in (tmp_path / f"start-profile-{short}.txt").read_text()
    assert {"diffusers", "Estable", "Estable, channels_last"} <= set(res["training"])
    assert res["checkpointing"]["Estable"]["largest"] == 2
    assert set(res["builtin"]) == {"eager", "CUDA graphs", "fastest",
                                   "bulk generate --prompts (CUDA graphs, PNGs written)"}
    md = (tmp_path / "speed.md").read_text()
    assert "| Estable fastest |" in md and "Largest batch with gradient checkpointing" in md
    # a partial run's parts merge into the same tables
    out2 = tmp_path / "merged"
    assert subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_side_by_side.py"), "--report",
                           str(tmp_path), "--out", str(out2)], env=env, timeout=120).returncode == 0
    assert json.loads((out2 / "speed.json").read_text())["inference"].keys() == res["inference"].keys()


def test_train_batch_restricts_the_training_rows(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_side_by_side.py"), "--smoke", "--part",
                           "training", "--train-batch", "2", "--no-checkpointing", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "part-training.json").read_text())
    assert res["train_batches"] == [2]  # the smoke settings' default is (1, 2)
    assert all(list(rows) == ["2"] for rows in res["training"].values()), res["training"]
    # each row also timed with its steps back to back, and the report says so
    assert all(rows["2"]["back_to_back_img_per_s"] > 0 for rows in res["training"].values())
    assert "back to back" in (tmp_path / "part-training.md").read_text()
    # a compiled row with the convolutions pinned to channels_last and concatenations as kernels' outputs (smoke: not
    # compiled, the pins and Inductor's settings in place)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_side_by_side.py"), "--smoke", "--part",
                           "training-compiled", "--train-compile", "whole-reduce-overhead-hint-cat",
                           "--train-compile", "whole-reduce-overhead-hint-bench",
                           "--train-batch", "2", "--out", str(tmp_path / "hint")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "hint" / "part-training-compiled.json").read_text())["training"]
    pinned = "Estable, compiled (whole-reduce-overhead) + channels_last, convolutions pinned to channels_last"
    assert list(rows) == [f"{pinned}, concatenations as kernels' outputs", f"{pinned}, cuDNN's benchmark mode"]
    assert all(row["2"]["img_per_s"] > 0 for row in rows.values())


def test_cudnn_benchmark_mode_only_inside_its_row():
    import torch

    side_by_side = _benchmark_module("speed_side_by_side")
    before = torch.backends.cudnn.benchmark
    with side_by_side.cudnn_benchmark():
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before


def test_concat_kernels_sets_inductor_only_inside():
    """The '-cat' probe: inside the context Inductor lowers no concatenation as a pointwise kernel; after it, its
    settings are back."""
    from torch._inductor import config

    speed_common = _benchmark_module("speed_common")
    before = config.max_pointwise_cat_inputs
    with speed_common.concat_kernels():
        assert config.max_pointwise_cat_inputs == 1
    assert config.max_pointwise_cat_inputs == before > 1


def test_cold_start_rows_in_separate_calls_share_one_cache(tmp_path):
    """--compile-cache DIR --cold-rows: the empty row in one call, the warm row in a later one from the cache it left
    (how a GPU chain split across calls runs them); an 'empty' row refuses a folder that is not empty."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    script, cache = str(REPO / "benchmarks" / "speed_side_by_side.py"), tmp_path / "cache"

    def cold(rows, out):
        return subprocess.run([sys.executable, script, "--smoke", "--part", "coldstart", "--compile-cache", str(cache),
                               "--cold-rows", *rows, "--work", str(tmp_path / "work"), "--out", str(tmp_path / out)],
                              env=env, capture_output=True, text=True, timeout=300)

    proc = cold(["empty"], "a")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(json.loads((tmp_path / "a" / "speed.json").read_text())["coldstart"]) == {"none (empty cache)"}
    assert (cache / "pycache").is_dir()  # the children's bytecode went into the shared folder
    proc = cold(["warm"], "b")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "b" / "speed.json").read_text())["coldstart"]
    assert set(rows) == {"warm (the cache the first process left)"}
    assert rows["warm (the cache the first process left)"]["total_s"] > 0
    proc = cold(["empty"], "c")
    assert proc.returncode == 2 and "is not empty" in proc.stderr


def test_speed_profile_smoke_and_kernel_kinds(tmp_path):
    """benchmarks/speed_profile.py --smoke: five variants end to end on tiny CPU networks (a few seconds), and the
    kernel names seen in the H200 profile (RESULTS.md, fifth GPU run) sorted into the right kinds."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    variants = ("max", "max-nographs", "no-fused-qkv", "no-channels-last", "vae-nchw")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_profile.py"), "--smoke",
                           *(arg for name in variants for arg in ("--variant", name)), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "profile.json").read_text())
    for name in variants:
        row = res["variants"][name]
        assert "error" not in row, row
        assert row["fp16_error"] < 1e-4  # fp32 on the CPU
        for key in ("64x1", "64x2"):
            assert row[key]["unet_call_s"] > 0 and row[key]["decode_s"] > 0 and row[key]["image_s"] > 0
    assert "profile" in res["variants"]["max-nographs"]
    assert "| max-nographs |" in (tmp_path / "profile.md").read_text()
    train = tmp_path / "train"
    systems = ["eager", "whole-ro-cl-cudnn", "whole-cl-pw", "whole-ro-cl-hint-cat", "whole-ro-cl-hint-geglu"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_profile.py"), "--smoke",
                           *(arg for name in systems for arg in ("--training", name)), "--train-batch", "2",
                           "--trace", "--out", str(train)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # channels_last with cuDNN attention first / with 1 × 1 convolutions as matrix products (CPU: not compiled)
    for name in systems:
        rows = json.loads((train / "profile.json").read_text())["training"][name]
        assert set(rows) == {"2"} and all(r["img_per_s"] > 0 and "kinds_s" in r["profile"] for r in rows.values())
        assert all(r["back_to_back_step_s"] > 0 for r in rows.values())
        with gzip.open(train / f"trace-{name}-2.json.gz", "rt") as f:  # --trace: the step's Chrome trace
            assert json.load(f)["traceEvents"]
    assert "| eager | 2 |" in (train / "profile.md").read_text()
    copies = json.loads((train / "profile.json").read_text())["training"]["eager"]["2"]["profile"]["copies"]
    # on the CPU: the timesteps' cast to float, the optimizer's step counters
    assert copies and all(c["op"].startswith("aten::") and c["calls"] > 0 for c in copies)

    speed_profile = _benchmark_module("speed_profile")
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_kernel0_": "attention",
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroup": "convolution",
        "nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN": "matmul",
        "triton_per_fused_clone_native_group_norm_0": "fused by Inductor (Triton)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy_alignedK_contig<": "eager elementwise / copies",
        "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align1>": "matmul",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
    }
    assert {n: speed_profile.kind_of(n) for n in names} == names
    # a record_function label on the GPU timeline is not a kernel; a kernel whose name holds a "#" is (the
    # profile once dropped ATen's copy kernels, "{lambda()#3}", with the optimizer's label)
    assert speed_profile.ANNOTATION.fullmatch("Optimizer.step#AdamW.step")
    copy_kernel = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
                   "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}")
    assert not speed_profile.ANNOTATION.fullmatch(copy_kernel)


def test_pointwise_as_linear_is_the_convolution():
    """The ``*-pw`` probe (speed_common): a 1 × 1 convolution as a matrix product over the channels gives the
    convolution's outputs and gradients, in either memory format, and the swap finds the U-Net's 1 × 1 convolutions
    only."""
    import torch

    speed_common = _benchmark_module("speed_common")
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 4, 3, generator=gen).contiguous(memory_format=fmt).requires_grad_()
        ref = conv(x)
        (ref * torch.arange(ref.numel()).view_as(ref)).sum().backward()
        grads = [x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
        x.grad = conv.weight.grad = conv.bias.grad = None
        out = speed_common.PointwiseAsLinear(conv)(x)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        for got, want in zip([x.grad, conv.weight.grad, conv.bias.grad], grads):
            assert torch.allclose(got, want, atol=1e-4)
        x.grad = conv.weight.grad = conv.bias.grad = None

    from estable.config import UNetConfig
    from estable.models.unet import UNet

    unet = UNet(UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, True), num_heads=2,
                           context_dim=16, norm_groups=8, sample_size=8))
    ones = sum(1 for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))
    others = sum(1 for m in unet.modules() if isinstance(m, torch.nn.Conv2d)) - ones
    assert ones > 0 and speed_common.pointwise_as_linear(unet) == ones
    assert sum(1 for m in unet.modules() if isinstance(m, torch.nn.Conv2d)) == others


@pytest.mark.parametrize("c,h,w,o,k,s,p", [(8, 9, 7, 5, 3, 2, 1), (8, 8, 8, 6, 3, 1, 1), (4, 5, 6, 3, 1, 1, 0),
                                            (4, 6, 6, 3, 2, 1, 1), (3, 7, 7, 2, 3, 2, 0), (4, 6, 5, 3, 1, 2, 0)])
def test_convolution_as_one_product_of_its_windows_is_the_convolution(c, h, w, o, k, s, p):
    """conv_gemm_probe.py's product (speed_common.conv2d_as_gemm): the convolution's numbers (fp64) for square kernels
    of 1–3, strides 1–2, paddings 0–1, either memory format in, channels-last out; the U-Net wrapper computes it only
    where its rule says, and as the convolution elsewhere."""
    import torch
    import torch.nn.functional as F

    speed_common = _benchmark_module("speed_common")
    g = torch.Generator().manual_seed(c * h + k)
    weight = torch.randn(o, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
        want = F.conv2d(x, weight, bias, s, p)
        got = speed_common.conv2d_as_gemm(x, speed_common.gemm_weight(weight), bias, k, s, p)
        assert got.shape == want.shape and (got - want).abs().max() < 1e-12
        assert got.is_contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c, o, k, s, p).double()
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    rows = 2 * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1)
    for max_rows, max_kernel, product in ((rows, k, True), (rows - 1, k, False), (rows, k - 1, False)):
        with mock.patch.object(speed_common, "conv2d_as_gemm", wraps=speed_common.conv2d_as_gemm) as calls:
            got = speed_common.WindowsAsProduct(conv, max_rows, max_kernel)(x)
        assert (got - conv(x)).abs().max() < 1e-12 and calls.call_count == int(product)


def test_conv_gemm_probe_smoke_writes_its_tables(tmp_path):
    """conv_gemm_probe.py --smoke: the U-Net section by every rule and the per-shape table, in fp32 on the CPU,
    where the products equal the convolutions far below fp16's error."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "conv_gemm_probe.py"), "--smoke", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = json.loads((tmp_path / "unet_calls.json").read_text())["rows"]
    assert len(calls) == 5 and all(r["fp16_error"] < 1e-5 for r in calls)
    shapes = json.loads((tmp_path / "conv_gemm.json").read_text())["rows"]
    assert shapes and all(r["err_gemm"] < 1e-5 and r["gemm_channels_last"] for r in shapes)
    assert "| shape | batch |" in (tmp_path / "conv_gemm.md").read_text()


def test_idle_gaps_finds_the_longest_stretches_without_a_kernel():
    """speed_profile.idle_gaps: overlapping kernels close no gap; the gaps come longest first, placed after the
    first kernel's start, with the kernels on either side (the one that ended last before the gap)."""
    speed_profile = _benchmark_module("speed_profile")
    spans = [(1000.0, 1500.0, "a"), (1100.0, 1200.0, "b"), (1700.0, 1800.0, "c"), (4800.0, 5000.0, "d")]
    gaps = speed_profile.idle_gaps(spans)
    assert [(g["at_ms"], g["ms"], g["after"], g["before"]) for g in gaps] == [(0.8, 3.0, "c", "d"),
                                                                            (0.5, 0.2, "a", "c")]
    assert speed_profile.idle_gaps(spans, top=1) == gaps[:1] and speed_profile.idle_gaps([]) == []
