"""Exact resume and crash-safe checkpoints.

* N steps in one go and N/2 + resume + N/2 give bit-identical weights, EMA, optimizer state and draw generator
  (U-Net, VAE, CLIP pair, LoRA adapters; for the last two the exported files agree bit for bit as well).
* A process SIGKILLed in the middle of writing a checkpoint leaves the previous one intact, ``latest`` pointing
  at it, and a resume from there reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from estable.errors import EstableError
from estable.training.clip_trainer import CLIPTrainer
from estable.training.config import load_config
from estable.training.lora_trainer import LoRATrainer
from estable.training.runs import PAUSE_ENV, latest_checkpoint, load_checkpoint, save_checkpoint
from estable.training.unet_trainer import UNetTrainer
from estable.training.vae_trainer import VAETrainer

REPO = Path(__file__).resolve().parents[1]
# Everything that draws random numbers is on: caption dropout, offset noise, min-SNR, grad accumulation, EMA.
OVER = ["log_every=1", "val_every=2", "sample_every=0", "save_every=2", "tensorboard=false", "offset_noise=0.1",
        "min_snr_gamma=5", "caption_dropout=0.3", "grad_accum=2", "batch_size=2", "optim.schedule=cosine"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same_state(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    assert set(ca.tensors) == set(cb.tensors)
    for name in ca.tensors:
        ta, tb = ca.tensors[name], cb.tensors[name]
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} differs"
    oa, ob = ca.state["optimizer"], cb.state["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert torch.equal(ca.state["generator"], cb.state["generator"])
    assert ca.state["data"] == cb.state["data"]


def test_resume_is_exact_unet(tmp_path):
    n = 4
    full = load_config("unet", "tiny-unet", [*OVER, f"max_steps={n}"])
    UNetTrainer(full, tmp_path / "full", progress=False).train()

    UNetTrainer(full, tmp_path / "split", progress=False).train(until=n // 2)  # "preempted" half-way
    resumed = UNetTrainer(full, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == n // 2 and resumed.position == (n // 2) * 2 * 2
    resumed.train()

    _assert_same_state(tmp_path / "full/checkpoints/step_0000004", tmp_path / "split/checkpoints/step_0000004")
    # The logs agree too (the resumed run continues the same log file).
    read = lambda p: [line for line in (p / "log.jsonl").read_text().splitlines() if '"train"' in line]  # noqa: E731
    strip = lambda lines: [{k: v for k, v in __import__("json").loads(x).items()  # noqa: E731
                            if k not in ("steps_per_s", "images_per_s")} for x in lines]
    assert strip(read(tmp_path / "full")) == strip(read(tmp_path / "split"))


def test_resume_is_exact_vae_with_discriminator(tmp_path):
    over = ["log_every=1", "val_every=0", "sample_every=0", "save_every=2", "tensorboard=false", "ema_decay=0.99",
            "disc.enabled=true", "disc.start=1", "disc.channels=8", "disc.layers=2"]
    VAETrainer(load_config("vae", "tiny-vae", [*over, "max_steps=4"]), tmp_path / "full", progress=False).train()
    cfg = load_config("vae", "tiny-vae", [*over, "max_steps=4"])
    VAETrainer(cfg, tmp_path / "split", progress=False).train(until=2)
    VAETrainer(cfg, tmp_path / "split", resume=True, progress=False).train()
    _assert_same_state(tmp_path / "full/checkpoints/step_0000004", tmp_path / "split/checkpoints/step_0000004")


def _assert_same_file(a: Path, b: Path) -> None:
    from estable.checkpoints.io import read_safetensors

    (ta, ma), (tb, mb) = read_safetensors(a), read_safetensors(b)
    assert ta.keys() == tb.keys() and ma == mb
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def test_resume_is_exact_clip(tmp_path):
    over = ["log_every=1", "val_every=2", "sample_every=0", "save_every=2", "tensorboard=false", "ema_decay=0.9",
            "grad_accum=2", "batch_size=8", "optim.schedule=cosine", "max_steps=4"]
    cfg = load_config("clip", "tiny-clip", over)
    CLIPTrainer(cfg, tmp_path / "full", progress=False).train()
    CLIPTrainer(cfg, tmp_path / "split", progress=False).train(until=2)
    resumed = CLIPTrainer(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 2 and resumed.position == 2 * 2 * 8
    resumed.train()
    _assert_same_state(tmp_path / "full/checkpoints/step_0000004", tmp_path / "split/checkpoints/step_0000004")
    for name in ("clip.safetensors", "text_encoder.safetensors"):
        _assert_same_file(tmp_path / "full" / name, tmp_path / "split" / name)


def test_resume_is_exact_lora(tmp_path):
    from test_train_lora import make_base

    base = make_base(tmp_path / "base.safetensors")
    # Random numbers from everywhere: LoRA dropout (the global RNG), caption dropout, offset noise, accumulation.
    over = ["log_every=1", "val_every=2", "sample_every=0", "save_every=2", "tensorboard=false", f"base={base}",
            "lora.targets=unet+text", "lora.dropout=0.1", "caption_dropout=0.3", "offset_noise=0.1",
            "min_snr_gamma=5", "ema_decay=0.9", "grad_accum=2", "batch_size=2", "max_steps=4"]
    cfg = load_config("lora", "tiny-lora", over)
    LoRATrainer(cfg, tmp_path / "full", progress=False).train()
    LoRATrainer(cfg, tmp_path / "split", progress=False).train(until=2)
    resumed = LoRATrainer(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    _assert_same_state(tmp_path / "full/checkpoints/step_0000004", tmp_path / "split/checkpoints/step_0000004")
    _assert_same_file(tmp_path / "full/lora.safetensors", tmp_path / "split/lora.safetensors")
    first = load_checkpoint(tmp_path / "full/checkpoints/step_0000002").tensors["model"]
    last = load_checkpoint(tmp_path / "full/checkpoints/step_0000004").tensors["model"]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the adapters did move between the halves


_KILLED_RUN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from estable.training.config import load_config
    from estable.training.unet_trainer import UNetTrainer
    cfg = load_config("unet", "tiny-unet", sys.argv[2:])
    UNetTrainer(cfg, sys.argv[1], progress=False).train()
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    over = ["log_every=1", "val_every=0", "sample_every=0", "save_every=2", "tensorboard=false", "max_steps=4"]
    run = tmp_path / "killed"
    env = {**os.environ, PAUSE_ENV: "4:60", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(run), *over], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list((run / "checkpoints").glob(".tmp-step_0000004-*/*.safetensors"))
            if partial:  # the save of step 4 has written its first file and is now pausing
                break
            time.sleep(0.1)
        assert partial, f"the save never started: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000002"
    assert not (ckpts / "step_0000004").exists()
    assert latest_checkpoint(ckpts) == ckpts / "step_0000002"
    previous = load_checkpoint(ckpts / "step_0000002")  # intact: headers validate, state.pt loads weights_only
    assert previous.step == 2 and {"model", "ema"} <= set(previous.tensors)

    # Resume from the survivor; the result equals a run that was never interrupted.
    cfg = load_config("unet", "tiny-unet", over)
    UNetTrainer(cfg, run, resume=True, progress=False).train()
    assert not list(ckpts.glob(".tmp-*")), "the next save removes the killed save's leftovers"
    UNetTrainer(cfg, tmp_path / "clean", progress=False).train()
    _assert_same_state(tmp_path / "clean/checkpoints/step_0000004", ckpts / "step_0000004")


def test_checkpoint_primitives(tmp_path):
    root = tmp_path / "ck"
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"model": {"module._orig_mod.w": sd["w"] * step}}, {"x": step}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000003"]
    ck = load_checkpoint(root / "step_0000003")
    assert list(ck.tensors["model"]) == ["w"] and torch.equal(ck.tensors["model"]["w"], sd["w"] * 3)
    assert ck.state["x"] == 3 and ck.metadata["model"]["format"] == "estable-train"
    # Saving the same step again replaces it atomically.
    save_checkpoint(root, 3, {"model": {"w": sd["w"]}}, {"x": 30})
    assert load_checkpoint(root / "step_0000003").state["x"] == 30
    # A dangling pointer falls back to the newest complete checkpoint.
    (root / "latest").write_text("step_0000009\n")
    assert latest_checkpoint(root) == root / "step_0000003"
    with pytest.raises(EstableError, match="training checkpoint"):
        load_checkpoint(tmp_path)


def test_max_minutes_stops_with_a_checkpoint_and_resume_finishes(tmp_path):
    from estable.training.config import load_config
    from estable.training.runs import latest_checkpoint
    from estable.training.unet_trainer import UNetTrainer

    over = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "device=cpu",
            "max_steps=4"]
    run = tmp_path / "run"
    first = UNetTrainer(load_config("unet", "tiny-unet", [*over, "max_minutes=0"]), run, progress=False)
    first.train()  # out of time at the first check: stops after step 1 and saves it
    first.close()
    assert first.step == 1 and latest_checkpoint(run / "checkpoints").name == "step_0000001"
    second = UNetTrainer(load_config("unet", "tiny-unet", over), run, resume=True, progress=False)
    second.train()
    second.close()
    assert second.step == 4 and latest_checkpoint(run / "checkpoints").name == "step_0000004"
