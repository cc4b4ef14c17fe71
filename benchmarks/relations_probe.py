"""Does the text tower carry the relation? Linear probes and swapped-caption similarity (issue 11).

    PYTHONPATH=src python benchmarks/relations_probe.py default runs/model.safetensors [--out F] [--paraphrased]

For each model: the per-token context the U-Net cross-attends to (``text_encoder.encode(ids, clip_skip)``) of
shapes-world pair captions. A logistic-regression probe (trained on 3,000 train-split captions, scored on 1,000
held-out-split captions) reads the relation (4 classes, chance 25 %) from

* the last position (padding after the caption, which attends to the whole caption under the causal mask),
* the mean over the second object's tokens (after the relation word),

and the cosine similarity of whole flattened contexts of caption pairs with the same or the opposite meaning.
With ``--paraphrased`` the probes, trained on the grammar's words, also read the held-out captions said with the
paraphrase test's words ("on top of", "beneath", "on the left of", "on the right of"): for each relation asked, how
often each relation is read — what the text tower makes of a word it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from estable import load_pipeline
from estable.evaluation.compositional import paraphrase
from estable.training.shapes import RELATION_PHRASES, RELATIONS, ShapesWorld, caption_for

PAIRS = [  # (caption a, caption b, do they mean the same?)
    ("a red circle above a blue square", "a red circle below a blue square", False),
    ("a red circle above a blue square", "a blue square above a red circle", False),
    ("a red circle above a blue square", "a blue square below a red circle", True),
    ("a red circle to the left of a blue square", "a red circle to the right of a blue square", False),
    ("a red circle to the left of a blue square", "a blue square to the right of a red circle", True),
]


def captions(split: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    """(caption, relation as read in the caption, text after the relation phrase) of n pair scenes."""
    world = ShapesWorld(split, seed, kind_weights={"pair": 1.0})
    out = []
    for i in range(n):
        spec = world.scene(i).spec
        text = caption_for(spec)
        phrase = f" {RELATION_PHRASES[spec.relation]} "
        out.append((text, spec.relation, text.split(phrase, 1)[1]))
    return out


@torch.no_grad()
def features(pipe, rows: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    tok, enc = pipe.model.tokenizer, pipe.model.text_encoder
    ids = tok([r[0] for r in rows])
    ctx = enc.encode(ids, clip_skip=pipe.model.config.clip_skip).float()  # (B, L, d)
    last = ctx[:, -1]
    second = []
    for i, (_, _, tail) in enumerate(rows):  # tokens of the second object: the caption's last real tokens
        end = int((ids[i] == tok.eos_token_id).nonzero()[0])  # the first eos ends the caption
        second.append(ctx[i, end - len(tok.encode(tail)):end].mean(0))
    return last, torch.stack(second)


def fit(x_tr: torch.Tensor, y_tr: torch.Tensor):
    """A 4-class logistic regression on standardised features; returns its predict function."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr = (x_tr - mu) / sd
    w = torch.zeros(x_tr.shape[1], 4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_tr @ w + b, y_tr) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda x: (((x - mu) / sd) @ w + b).argmax(1).detach()


def read_as(predict, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, int]]:
    """For each relation asked, how many captions the probe reads as each relation."""
    got = predict(x)
    return {asked: {RELATIONS[k]: int(((y == i) & (got == k)).sum()) for k in range(len(RELATIONS))}
            for i, asked in enumerate(RELATIONS)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--paraphrased", action="store_true",
                    help="also read held-out captions said in the paraphrase test's words with the probes")
    args = ap.parse_args()
    train, test = captions("train", 3000, 5), captions("heldout", 1000, 6)
    y_tr = torch.tensor([RELATIONS.index(r[1]) for r in train])
    y_te = torch.tensor([RELATIONS.index(r[1]) for r in test])
    report = {}
    for src in args.models:
        pipe = load_pipeline(src, device="cpu", dtype="fp32")
        (l_tr, s_tr), (l_te, s_te) = features(pipe, train), features(pipe, test)
        tok, enc = pipe.model.tokenizer, pipe.model.text_encoder
        sims = []
        with torch.no_grad():
            for a, b, same in PAIRS:
                ca, cb = enc.encode(tok([a, b]), clip_skip=pipe.model.config.clip_skip).flatten(1)
                sims.append({"a": a, "b": b, "same_meaning": same,
                             "cosine": float(torch.nn.functional.cosine_similarity(ca, cb, dim=0))})
        read_last, read_second = fit(l_tr, y_tr), fit(s_tr, y_tr)  # each probe fitted once, used for both
        report[src] = {"probe_last_position": float((read_last(l_te) == y_te).float().mean()),
                       "probe_second_object": float((read_second(s_te) == y_te).float().mean()), "cosines": sims}
        if args.paraphrased:
            said = [(paraphrase(text), relation, tail) for text, relation, tail in test]
            l_pa, s_pa = features(pipe, said)
            report[src]["paraphrased_read_as"] = {"last_position": read_as(read_last, l_pa, y_te),
                                                  "second_object": read_as(read_second, s_pa, y_te)}
        r = report[src]
        print(f"{src}: relation probe, last position {100 * r['probe_last_position']:.1f} %, second object "
              f"{100 * r['probe_second_object']:.1f} % (chance 25 %)")
        for s in sims:
            print(f"  {s['cosine']:.3f}  {'same    ' if s['same_meaning'] else 'opposite'}  {s['a']!r} vs {s['b']!r}")
        for where, table in r.get("paraphrased_read_as", {}).items():
            print(f"  held-out words, read at the {where.replace('_', ' ')} as " + ", ".join(RELATIONS) + ":")
            for asked, row in table.items():
                print(f"    {paraphrase(f' {RELATION_PHRASES[asked]} ').strip()!r:>18}: "
                      + " ".join(f"{row[k]:4d}" for k in RELATIONS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
