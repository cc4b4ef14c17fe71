"""strategy=fsdp (FSDP2) on the CPU with gloo, started by torchrun as a user would.

* 2 processes × batch b with the U-Net sharded give the weights and EMA of 1 process × batch 2b (same global
  batches, same noise; grad_accum=2 exercises set_requires_gradient_sync(False) on the first micro-step, and the
  logged grad_norm, from clip_grad_norm_ over DTensors, is compared with the single process's). AdamW runs with
  eps = 1e-3 for the reason given in test_ddp.py (with eps = 1e-8 last-bit gradient differences from the changed
  summation order become weight differences of a few percent of lr); agreement is asserted within 1e-6.
* The FSDP checkpoint has the single-process layout: same tensor files, keys, shapes and dtypes for model and EMA,
  and an optimizer state with the same integer ids, keys and shapes (full tensors, not shards).
* Resume under FSDP from a 2-step checkpoint reaches bit-identical weights, EMA and optimizer state at step 4.
* Every parameter is a DTensor whose local shards over the two ranks add up to the full model.
* Rank 1 writes nothing into the run folders (an audit hook records every write-mode open, rename, mkdir and
  removal it makes there); validation and the sample grid run on both ranks.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from estable.errors import EstableError
from estable.training.config import load_config
from estable.training.runs import load_checkpoint
from estable.training.unet_trainer import UNetTrainer
from estable.training.vae_trainer import VAETrainer
from torchrun import run_workers

B = 2
STEPS = 4
OVER = ["log_every=1", "val_every=2", f"sample_every={STEPS}", "save_every=2", "tensorboard=false",
        f"max_steps={STEPS}", "offset_noise=0.1", "min_snr_gamma=5", "caption_dropout=0.3", "ema_decay=0.9",
        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.eps=1e-3", "grad_accum=2", "optim.max_grad_norm=0.05"]

WORKER = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    root = os.path.abspath(sys.argv[1])
    writes = []
    if os.environ["RANK"] != "0":
        def audit(event, args):
            if event == "open" and args[0] is not None and isinstance(args[0], (str, bytes, os.PathLike)):
                mode, flags = args[1], args[2]
                writing = (mode is not None and any(c in mode for c in "wax+")) or (
                    mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                if writing and os.path.abspath(os.fsdecode(args[0])).startswith(root):
                    writes.append([event, os.fsdecode(args[0])])
            elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
                if os.path.abspath(os.fsdecode(args[0])).startswith(root):
                    writes.append([event, os.fsdecode(args[0])])
        sys.addaudithook(audit)
    from torch.distributed.tensor import DTensor
    from estable.training import distributed as D
    from estable.training.config import load_config
    from estable.training.unet_trainer import UNetTrainer
    cfg = load_config("unet", "tiny-unet", json.loads(sys.argv[2]))
    full = UNetTrainer(cfg, os.path.join(root, "full"), progress=False)
    assert full.dist.world_size == 2 and full.dist.backend == "gloo" and full.sharded, full.dist
    params = list(full.network.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    local = torch.tensor([sum(p.to_local().numel() for p in params)])
    locals_ = [torch.zeros_like(local) for _ in range(2)]
    torch.distributed.all_gather(locals_, local)
    total = sum(p.numel() for p in params)
    assert sum(int(x) for x in locals_) == total and max(int(x) for x in locals_) < 0.6 * total, (locals_, total)
    full.train()
    full.close()
    split = UNetTrainer(cfg, os.path.join(root, "split"), progress=False)
    split.train(until=2)
    split.close()
    resumed = UNetTrainer(cfg, os.path.join(root, "split"), resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    D.cleanup()
    with open(os.path.join(os.path.dirname(root), "ok-rank" + os.environ["RANK"]), "w") as f:
        json.dump(writes, f)
""")


pytestmark = pytest.mark.usefixtures("one_thread")


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_matches_single_process_and_resumes_exactly(tmp_path):
    runs = tmp_path / "runs"
    run_workers(tmp_path, WORKER, str(runs), json.dumps([*OVER, f"batch_size={B}", "device=cpu", "strategy=fsdp"]))
    assert (tmp_path / "ok-rank0").is_file()
    assert json.loads((tmp_path / "ok-rank1").read_text()) == [], "rank 1 wrote into a run folder"

    single_cfg = load_config("unet", "tiny-unet", [*OVER, f"batch_size={2 * B}"])
    UNetTrainer(single_cfg, tmp_path / "single", progress=False).train()

    step = f"step_{STEPS:07d}"
    a = load_checkpoint(runs / "full" / "checkpoints" / step)
    b = load_checkpoint(tmp_path / "single" / "checkpoints" / step)
    # Layout: the same files, keys, shapes and dtypes as a single-process checkpoint.
    assert a.tensors.keys() == b.tensors.keys() == {"model", "ema"}
    for name in a.tensors:
        assert a.tensors[name].keys() == b.tensors[name].keys()
        for k, v in a.tensors[name].items():
            assert (v.shape, v.dtype) == (b.tensors[name][k].shape, b.tensors[name][k].dtype), f"{name}.{k}"
    oa, ob = a.state["optimizer"], b.state["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for pid, st in oa["state"].items():
        assert st.keys() == ob["state"][pid].keys()
        for k, v in st.items():
            assert type(v) is torch.Tensor and v.shape == ob["state"][pid][k].shape, f"optimizer {pid}.{k}"
    assert a.state["data"] == b.state["data"] == {"position": STEPS * 2 * 2 * B}

    # Weights: 2 × b under FSDP == 1 × 2b.
    start = UNetTrainer(single_cfg, tmp_path / "fresh", progress=False).network.state_dict()
    assert _worst(b.tensors["model"], start) > 1e-3, "training must change the weights for the test to mean anything"
    worst = {name: _worst(a.tensors[name], b.tensors[name]) for name in ("model", "ema")}
    worst["exp_avg"] = max((st["exp_avg"] - ob["state"][pid]["exp_avg"]).abs().max().item()
                           for pid, st in oa["state"].items())
    print("FSDP vs single process, max abs difference:", worst)
    assert max(worst.values()) < 1e-6, worst

    # Logs: rank 0 alone wrote them; losses and clipped-gradient norms agree with the single process.
    def records(run: Path, kind: str) -> list[dict]:
        lines = (run / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["type"] == kind]

    log, single_log = records(runs / "full", "train"), records(tmp_path / "single", "train")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for r, s in zip(log, single_log, strict=True):
        assert abs(r["loss"] - s["loss"]) < 1e-5
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)
        assert r["grad_norm"] > 0.05  # clipping was active
    val, single_val = records(runs / "full", "val"), records(tmp_path / "single", "val")
    assert [r["step"] for r in val] == [2, 4]
    for r, s in zip(val, single_val, strict=True):
        assert abs(r["loss"] - s["loss"]) < 1e-5
    assert [r["step"] for r in records(runs / "full", "sample")] == [STEPS]
    assert (runs / "full" / records(runs / "full", "sample")[0]["path"]).is_file()

    # Resume under FSDP from the 2-step checkpoint reproduces the uninterrupted FSDP run exactly.
    c = load_checkpoint(runs / "split" / "checkpoints" / step)
    for name in a.tensors:
        for k in a.tensors[name]:
            assert torch.equal(a.tensors[name][k], c.tensors[name][k]), f"resumed {name}.{k} differs"
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, c.state["optimizer"]["state"][pid][k]), f"resumed optimizer {pid}.{k} differs"
    assert torch.equal(a.state["generator"], c.state["generator"])


def test_fsdp_refusals(tmp_path):
    with pytest.raises(EstableError, match="precision=bf16"):
        load_config("unet", "tiny-unet", ["strategy=fsdp", "precision=fp16"])
    with pytest.raises(EstableError, match="compile"):
        load_config("unet", "tiny-unet", ["strategy=fsdp", "compile=true"])
    with pytest.raises(EstableError, match="not available for the vae trainer"):
        VAETrainer(load_config("vae", "tiny-vae", ["strategy=fsdp"]), tmp_path / "vae")
    from estable.training.clip_trainer import CLIPTrainer
    from estable.training.lora_trainer import LoRATrainer

    with pytest.raises(EstableError, match="not available for the clip trainer"):
        CLIPTrainer(load_config("clip", "tiny-clip", ["strategy=fsdp"]), tmp_path / "clip")
    with pytest.raises(EstableError, match="not available for the lora trainer"):
        LoRATrainer(load_config("lora", "tiny-lora", ["strategy=fsdp", "base=x"]), tmp_path / "lora")
    # One process with strategy=fsdp trains unsharded, as strategy=ddp does.
    one = UNetTrainer(load_config("unet", "tiny-unet", ["strategy=fsdp", "max_steps=1", "tensorboard=false"]),
                      tmp_path / "one", progress=False)
    assert not one.sharded
