"""DDP on the CPU with gloo: 2 processes × batch b give the weights of 1 process × batch 2b.

Both runs see the same global batches (the seeded order, each rank taking its half) and the same noise (one
generator draws for the whole global batch). DDP averages the two half-batch gradients, which equals the
full-batch mean gradient up to float summation order (~1e-9 here). AdamW's update m/(sqrt(v) + eps) is nearly
sign(g)·lr for entries with |g| ≲ eps, which turns those last-bit gradient differences into weight differences
of a few percent of lr: with the default eps = 1e-8 we measured up to 3e-5 after 3 steps at lr 1e-3. The test
therefore runs AdamW with eps = 1e-3, where d(update)/dg ≤ lr/eps = 1 (an SGD-like regime), and asserts
agreement within 1e-6 absolute; the data order, the noise, DDP's averaging and the rank-0-only writing are what
it checks. The processes are started by torchrun, as a user would, exercising the environment-variable
initialisation; only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from estable.training.config import load_config
from estable.training.runs import load_checkpoint
from estable.training.unet_trainer import UNetTrainer
from torchrun import run_workers

B = 2
STEPS = 3
OVER = ["log_every=1", "val_every=0", "sample_every=0", f"save_every={STEPS}", "tensorboard=false",
        f"max_steps={STEPS}", "offset_noise=0.1", "min_snr_gamma=5", "caption_dropout=0.3", "ema_decay=0.9",
        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.eps=1e-3"]

WORKER = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from estable.training import distributed as D
    from estable.training.config import load_config
    from estable.training.unet_trainer import UNetTrainer
    cfg = load_config("unet", "tiny-unet", json.loads(sys.argv[2]))
    trainer = UNetTrainer(cfg, sys.argv[1], progress=False)
    assert trainer.dist.world_size == 2 and trainer.dist.backend == "gloo", trainer.dist
    trainer.train()
    # every rank ends with the same weights (DDP keeps replicas in sync)
    w = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
    ws = [torch.empty_like(w) for _ in range(2)]
    torch.distributed.all_gather(ws, w)
    assert torch.equal(ws[0], ws[1])
    trainer.close()
    D.cleanup()
    open(os.path.join(os.path.dirname(sys.argv[1]), "ok-rank" + os.environ["RANK"]), "w").close()
""")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_match_one_process_with_double_batch(tmp_path):
    ddp_run = tmp_path / "ddp"
    run_workers(tmp_path, WORKER, str(ddp_run), json.dumps([*OVER, f"batch_size={B}", "device=cpu"]))
    assert (tmp_path / "ok-rank0").is_file() and (tmp_path / "ok-rank1").is_file()  # both ranks finished cleanly

    single = load_config("unet", "tiny-unet", [*OVER, f"batch_size={2 * B}"])
    UNetTrainer(single, tmp_path / "single", progress=False).train()

    a = load_checkpoint(ddp_run / "checkpoints" / f"step_{STEPS:07d}")
    b = load_checkpoint(tmp_path / "single" / "checkpoints" / f"step_{STEPS:07d}")
    assert a.state["data"] == b.state["data"] == {"position": STEPS * 2 * B}
    worst = {}
    for name in ("model", "ema"):
        for k, v in a.tensors[name].items():
            worst[f"{name}.{k}"] = (v - b.tensors[name][k]).abs().max().item()
    start = UNetTrainer(single, tmp_path / "fresh", progress=False).network.state_dict()
    moved = max((b.tensors["model"][k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3, "training must actually change the weights for the comparison to mean anything"
    assert max(worst.values()) < 1e-6, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # rank 0 alone wrote the log; it holds each step once, with the loss averaged over both ranks
    log = [json.loads(line) for line in (ddp_run / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for r, s in zip(log, single_log):
        assert abs(r["loss"] - s["loss"]) < 1e-5
        assert r["images_per_s"] == pytest.approx(2 * B * r["steps_per_s"])


CACHE_WORKER = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from estable.training import distributed as D
    from estable.training.config import load_config
    from estable.training.unet_trainer import UNetTrainer
    cfg = load_config("unet", "tiny-unet", json.loads(sys.argv[2]))
    trainer = UNetTrainer(cfg, sys.argv[1], progress=False)
    data = trainer.train_data  # every rank holds the whole cache: both shares
    torch.save({"mean": data.mean, "captions": data.captions},
               os.path.join(os.path.dirname(sys.argv[1]), "cache-rank" + os.environ["RANK"] + ".pt"))
    trainer.close()
    D.cleanup()
""")


def test_latent_cache_is_shared_between_ranks(tmp_path):
    """latents=cache under torchrun: each rank encodes half of the training set into its own share, and every
    rank ends up with the whole cache, equal to the one a single process builds."""
    import torch

    over = ["latents=cache", "data.shapes_length=10", "tensorboard=false"]
    run_workers(tmp_path, CACHE_WORKER, str(tmp_path / "ddp"), json.dumps([*over, "device=cpu"]))
    shares = sorted(p.name for p in (tmp_path / "ddp").glob("latents_cache.*"))
    assert shares == ["latents_cache.0-of-2.safetensors", "latents_cache.1-of-2.safetensors"]
    ranks = [torch.load(tmp_path / f"cache-rank{r}.pt") for r in (0, 1)]
    single = UNetTrainer(load_config("unet", "tiny-unet", over), tmp_path / "single", progress=False).train_data
    assert len(single) == 10 and single.mean.dtype == torch.float16
    for got in ranks:
        assert got["captions"] == single.captions
        torch.testing.assert_close(got["mean"], single.mean, rtol=1e-3, atol=1e-3)
