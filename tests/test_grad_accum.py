"""Gradient accumulation: k micro-batches of b give the gradient of one batch of k·b.

The loss of a micro-batch is a mean over its b samples, so the trainer divides each micro-batch's loss by k before
backward: Σ_k (1/k)·∇mean_b = ∇mean_{k·b}. AdamW is nearly blind to a constant factor on the gradient (it divides
by √v), so a lost division hardly changes the weights after a step; this test compares the gradients themselves,
captured when the optimizer steps, with gradient clipping off (clipping both to the same norm would hide a factor).
"""

from __future__ import annotations

import pytest
import torch

from estable.training.config import load_config
from estable.training.registry import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["max_steps=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "ema_decay=null",
          "optim.max_grad_norm=null", "optim.warmup_steps=0", "caption_dropout=0.5", "min_snr_gamma=5"]


def _first_step_gradient(tmp_path, name: str, batch_size: int, accum: int) -> list[torch.Tensor]:
    cfg = load_config("unet", "tiny-unet", [*COMMON, f"batch_size={batch_size}", f"grad_accum={accum}"])
    trainer = make_trainer("unet", cfg, tmp_path / name, progress=False)
    # The random numbers of sample i (timestep, noise, posterior draw, caption dropout) depend on i only, whatever
    # the micro-batch it lands in: the trainer draws per micro-batch from one stream, which would otherwise give
    # the two runs different noise.
    draw, seen = trainer.draw, [0]

    def per_sample(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        parts = [draw(1, torch.Generator().manual_seed(10_000 + seen[0] + i)) for i in range(n)]
        seen[0] += n
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    trainer.draw = per_sample
    grads: list[list[torch.Tensor]] = []
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.append([p.grad.detach().clone() for p in trainer.params])
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(grads) == 1 and seen[0] == 4
    return grads[0]


def test_k_micro_batches_equal_one_batch_of_k_b(tmp_path):
    whole = _first_step_gradient(tmp_path, "whole", 4, 1)
    for b, k in ((2, 2), (1, 4)):
        accumulated = _first_step_gradient(tmp_path, f"accum{k}", b, k)
        norm_w = torch.sqrt(sum((g.double() ** 2).sum() for g in whole))
        norm_a = torch.sqrt(sum((g.double() ** 2).sum() for g in accumulated))
        assert float(norm_a / norm_w) == pytest.approx(1.0, rel=1e-4), (b, k)  # a lost 1/k shows as a factor k
        for gw, ga in zip(whole, accumulated):
            torch.testing.assert_close(ga, gw, rtol=1e-4, atol=1e-6)
