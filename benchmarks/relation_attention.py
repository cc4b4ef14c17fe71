"""How much of the U-Net's cross-attention goes to the relation word? (issue 11)

    PYTHONPATH=src python benchmarks/relation_attention.py --model default --seeds 8

The demo prompt "a red circle above a blue square" (25 steps DPM++ 2M Karras, the model's CFG, 256², CPU fp32):
forward hooks on every cross-attention's query and key projections record the attention weights of the
conditional half, softmax(q·kᵀ/√d) per head; for each attention layer the share of the weight that goes to each
token, averaged over heads, query positions, steps and seeds. Also the spatial spread of each word's attention
map: the share of its weight on the quarter of the image positions it attends to most (0.25 = uniform, 1 = all on
a quarter). A word the U-Net ignores gets little weight or a uniform map.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from estable.params import GenerationParams
from estable.pipeline import load_pipeline

PROMPT = "a red circle above a blue square"
WORDS = ["<start>", "a", "red", "circle", "above", "a ", "blue", "square", "<end>"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pipe = load_pipeline(args.model, device="cpu", dtype="fp32")
    words = ["<start>", *args.prompt.split(), "<end>"]
    n_words = len(words)
    layers = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    share = {n: torch.zeros(n_words + 1, dtype=torch.float64) for n in layers}  # last slot: the padding
    spread = {n: torch.zeros(n_words, dtype=torch.float64) for n in layers}
    calls = dict.fromkeys(layers, 0)
    side = dict.fromkeys(layers, 0)
    captured: dict[str, torch.Tensor] = {}

    def on_q(name):
        def hook(_m, _inp, out):
            captured[name] = out
        return hook

    def on_k(name, attn):
        def hook(_m, _inp, k):
            q = captured.pop(name)
            b = q.shape[0] // 2  # guided: unconditional half first
            q, k = q[b:], k[b:]
            h = attn.heads
            d = q.shape[-1] // h
            qh = q.view(q.shape[0], q.shape[1], h, d).transpose(1, 2)  # (B, H, N, d)
            kh = k.view(k.shape[0], k.shape[1], h, d).transpose(1, 2)  # (B, H, T, d)
            w = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1).mean(1)  # (B, N, T)
            per_token = w.mean(1).mean(0).double()  # (T,)
            share[name][:n_words] += per_token[:n_words]
            share[name][n_words] += per_token[n_words:].sum()
            maps = w.mean(0)[:, :n_words].double()  # (N, words): each word's map over positions
            top = maps.sort(dim=0, descending=True).values[: max(1, maps.shape[0] // 4)].sum(0)
            spread[name] += top / maps.sum(0).clamp_min(1e-12)
            calls[name] += 1
            side[name] = int(round(q.shape[1] ** 0.5))
        return hook

    handles = []
    for name, attn in layers.items():
        handles.append(attn.to_q.register_forward_hook(on_q(name)))
        handles.append(attn.to_k.register_forward_hook(on_k(name, attn)))
    cfg = pipe.config.default_cfg or 5.0
    for seed in range(1, args.seeds + 1):
        pipe.txt2img(GenerationParams(prompt=args.prompt, steps=25, cfg_scale=cfg, sampler="dpmpp_2m_karras",
                                      seed=seed, width=256, height=256))
    for h in handles:
        h.remove()
    rows = {}
    print(f"{'layer':55s} side  " + " ".join(f"{w[:7]:>7s}" for w in words) + "     pad")
    for name in layers:
        s = (share[name] / calls[name]).tolist()
        sp = (spread[name] / calls[name]).tolist()
        rows[name] = {"side": side[name], "share": dict(zip([*words, "<pad>"], s)), "top_quarter": dict(zip(words, sp))}
        print(f"{name:55s} {side[name]:4d}  " + " ".join(f"{v:7.3f}" for v in s))
        print(f"{'   top-quarter share of each word map':55s}       " + " ".join(f"{v:7.3f}" for v in sp))
    if args.out:
        args.out.write_text(json.dumps({"prompt": args.prompt, "model": pipe.model_name, "seeds": args.seeds,
                                        "layers": rows}, indent=1))


if __name__ == "__main__":
    main()
