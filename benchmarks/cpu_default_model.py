"""Size candidates for the default model: time Estable's own networks on the CPU.

For each candidate U-Net, one classifier-free-guidance step (batch 2, 32×32×4 latents = 256×256 images, a 77-token
context), a VAE decode at 256×256 and a text encoding, fp32, eager, random weights; medians of repeated runs.
25 steps of DPM++ 2M cost 25 U-Net calls, so "25 steps" = 25 × step + decode + 2 text encodings.

    PYTHONPATH=src python benchmarks/cpu_default_model.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from estable.config import TextConfig, UNetConfig, VAEConfig
from estable.models.text import TextEncoder
from estable.models.unet import UNet
from estable.models.vae import AutoencoderKL

TEXT = TextConfig(vocab_size=1024, width=256, layers=4, heads=4, mlp_width=1024, eos_token_id=1023)
VAES = {
    "vae-32-64-128-128": VAEConfig(block_channels=(32, 64, 128, 128), sample_size=256),
    "vae-32-64-128-128-l1": VAEConfig(block_channels=(32, 64, 128, 128), layers_per_block=1, sample_size=256),
}
UNETS = {
    "unet-48-96-192": UNetConfig(block_channels=(48, 96, 192), attention_levels=(False, True, True), norm_groups=16,
                                 num_heads=None, head_channels=32, context_dim=256, sample_size=32),
    "unet-64-128-256": UNetConfig(block_channels=(64, 128, 256), attention_levels=(False, True, True),
                                  num_heads=None, head_channels=32, context_dim=256, sample_size=32),
    "unet-64-128-256-l1": UNetConfig(block_channels=(64, 128, 256), layers_per_block=1,
                                     attention_levels=(False, True, True), num_heads=None, head_channels=32,
                                     context_dim=256, sample_size=32),
}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def params_m(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        text = TextEncoder(TEXT).eval()
        ids = torch.randint(0, 1000, (1, 77))
        res["text"] = {"params_M": params_m(text), "ms": median_ms(lambda: text.encode(ids), args.repeats)}
        for name, cfg in VAES.items():
            vae = AutoencoderKL(cfg).eval()
            z = torch.randn(1, 4, 32, 32)
            res[name] = {"params_M": params_m(vae), "decoder_params_M": params_m(vae.decoder),
                         "decode_ms": median_ms(lambda vae=vae, z=z: vae.decode(z), args.repeats)}
        for name, cfg in UNETS.items():
            unet = UNet(cfg).eval()
            x, t, c = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 256)
            ms = median_ms(lambda unet=unet, x=x, t=t, c=c: unet(x, t, c), args.repeats)
            res[name] = {"params_M": params_m(unet), "cfg_step_ms": ms, "25_steps_s": 25 * ms / 1e3}
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": res}, indent=1))


if __name__ == "__main__":
    main()
