"""benchmarks/speed_side_by_side.py --smoke: every part of the GPU side-by-side script runs end to end on tiny CPU
networks and writes its tables (it measures nothing; about 3 minutes on the shared 2-core machine, so heavy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]


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
    """benchmarks/speed_profile.py --smoke: two variants end to end on tiny CPU networks (a few seconds), and the
    kernel names seen in the H200 profile (RESULTS.md, fifth GPU run) sorted into the right kinds."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_profile.py"), "--smoke", "--variant", "max",
                           "--variant", "max-nographs", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "profile.json").read_text())
    for name in ("max", "max-nographs"):
        row = res["variants"][name]
        assert "error" not in row, row
        assert row["fp16_error"] < 1e-4  # fp32 on the CPU
        for key in ("64x1", "64x2"):
            assert row[key]["unet_call_s"] > 0 and row[key]["decode_s"] > 0 and row[key]["image_s"] > 0
    assert "profile" in res["variants"]["max-nographs"]
    assert "| max-nographs |" in (tmp_path / "profile.md").read_text()
    train = tmp_path / "train"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_profile.py"), "--smoke", "--training",
                           "eager", "--training", "whole-ro-cl-cudnn", "--out", str(train)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("eager", "whole-ro-cl-cudnn"):  # the latter: channels_last, cuDNN attention first (CPU: not compiled)
        rows = json.loads((train / "profile.json").read_text())["training"][name]
        assert set(rows) == {"1", "2"} and all(r["img_per_s"] > 0 and "kinds_s" in r["profile"] for r in rows.values())
    assert "| eager | 2 |" in (train / "profile.md").read_text()
    copies = json.loads((train / "profile.json").read_text())["training"]["eager"]["2"]["profile"]["copies"]
    # on the CPU: the timesteps' cast to float, the optimizer's step counters
    assert copies and all(c["op"].startswith("aten::") and c["calls"] > 0 for c in copies)

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from speed_profile import kind_of
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_kernel0_": "attention",
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroup": "convolution",
        "nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN": "matmul",
        "triton_per_fused_clone_native_group_norm_0": "fused by Inductor (Triton)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy_alignedK_contig<": "eager elementwise / copies",
        "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align1>": "matmul",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
    }
    assert {n: kind_of(n) for n in names} == names
