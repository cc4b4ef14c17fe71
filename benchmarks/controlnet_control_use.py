"""Does a ControlNet in training read its control image? (issue 12: the shapes ControlNet that ignored its edges)

    PYTHONPATH=src python benchmarks/controlnet_control_use.py [--base MODEL] [--steps 160] [--default-hint-init]

Eight fixed training scenes of the shapes world, their Canny maps (recipes/default/controlnet.json's settings), fresh
noise at t in [500, 1000) every step, AdamW at ``--lr``. Every 40 steps: the loss on four fixed noise draws with each
scene's own control and with the controls rolled by one (another scene's edges). A ControlNet that reads its control
gets the first below the second; equal values mean the control does not reach it. ``--default-hint-init`` puts the
hint encoder back to PyTorch's default initialisation (what training used before commit 2665034).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from estable.pipeline import DEFAULT_MODEL_PATH
from estable.training.builders import collate
from estable.training.config import load_config
from estable.training.controlnet_trainer import ControlNetTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(DEFAULT_MODEL_PATH))
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--default-hint-init", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config("controlnet", "recipes/default/controlnet.json", [
        f"base={args.base}", "device=cpu", "batch_size=8", "data.num_workers=0", "precision=fp32", "data.val_size=8",
        "caption_dropout=0", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false"])
    with tempfile.TemporaryDirectory() as run:
        tr = ControlNetTrainer(cfg, run, progress=False)
    if args.default_hint_init:
        hint = tr.network.controlnet_cond_embedding
        for conv in [hint.conv_in, *hint.blocks]:
            conv.reset_parameters()
    obj = tr.objective
    batch = tr.prepare(collate([tr.train_data[i] for i in range(8)]))
    rolled = {**batch, "control": batch["control"].roll(1, 0)}
    g = torch.Generator().manual_seed(3)

    def high_noise(d: dict) -> dict:
        d["t"] = torch.randint(500, 1000, (8,), generator=g)
        return d

    fixed = [high_noise(obj.draw(8, torch.Generator().manual_seed(100 + i))) for i in range(4)]

    def report(step: int) -> None:
        with torch.no_grad():
            own = sum(obj(batch, d)[0].item() for d in fixed) / len(fixed)
            other = sum(obj(rolled, d)[0].item() for d in fixed) / len(fixed)
        print(f"step {step}: loss with own control {own:.8f}, with another scene's {other:.8f}", flush=True)

    opt = torch.optim.AdamW(tr.network.parameters(), lr=args.lr, weight_decay=0)
    report(0)
    for step in range(1, args.steps + 1):
        loss, _ = obj(batch, high_noise(obj.draw(8, g)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 40 == 0:
            report(step)


if __name__ == "__main__":
    main()
