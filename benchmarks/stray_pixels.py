"""The card's stray coloured pixels, counted: pixels whose colour no render of the prompt could hold (issue 11).

    PYTHONPATH=src python benchmarks/stray_pixels.py default OTHER.safetensors [--grid] [--renders 32]
    PYTHONPATH=src python benchmarks/stray_pixels.py default --grid --seeds 0 --prompt-renders 8   # the VAE's floor
    PYTHONPATH=src python benchmarks/stray_pixels.py runs/vae3 runs/vae4 --grid --seeds 0 --prompt-renders 8 --mirror

A pixel further than ``--threshold`` levels (Euclidean RGB) from every colour a render of the prompt could hold is
stray (``estable.evaluation.stray`` says which colours those are): the spots the decoder draws at shape rims are
(yellow, green or magenta on a red circle over grey), a slightly off red is not.

Per model: the generated images of the demo prompt at seeds 1–8 (``--grid``: the sample grid's eight prompts at
seeds 1–4), the model's own sampler and guidance scale unless ``--sampler`` / ``--cfg``, 256², CPU fp32 by default;
and with ``--renders N`` the first N held-out renders (world seed 3; ``--contact``: the first N where two objects of
different colours overlap) encoded and decoded by the model's VAE; with ``--prompt-renders N``, N layouts of each
of the run's prompts (``scene_from_prompt`` at seeds 0..N-1) the same way, counted prompt by prompt: the
autoencoder's own floor for those prompts. The renders themselves are counted once as the measure's own floor.
Prints stray pixels per image (median, mean, the share of images with ``--min-spot`` or more) and, over all images
of each kind, where they lie: where two of the objects' colours are near (``contact``: two
objects meet), where one is (``rim``: an object's edge) or where none is; writes the figures as JSON (``--out``).
``--show DIR`` saves each generated image beside a copy with its stray pixels painted magenta.

A model may also be an autoencoder alone: an ``estable train vae`` run folder or checkpoint folder (its EMA weights
when there are any); it generates nothing, its reconstructions are counted. ``--mirror`` also reconstructs each
render mirrored left-right and, apart, flipped up-down (each mirrored back after the VAE) and says where the stray
pixels lie against the centre of the objects, on average, in each of the three ways, all of them and those within 4
px of an object (at its rim: the spots, apart from an untuned decoder's errors on the background): an autoencoder
whose spots come from its own orientation puts them on its own side, whichever way the image came in (RESULTS.md,
"the spot follows the autoencoder's orientation").
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sample_grid import PROMPTS as GRID  # benchmarks/sample_grid.py, beside this script

from estable.checkpoints.io import read_safetensors_header
from estable.evaluation.stray import object_colours, prompt_colours, stray_mask
from estable.images import to_pil, to_tensor
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.shapes import BACKGROUND_COLOURS, COLOURS, overlap_fraction, parse_caption, scene_from_prompt
from estable.training.shapes.render import render
from estable.training.shapes.world import ShapesWorld

DEMO = ["a red circle above a blue square"]


def scene_colours(scene) -> list[tuple[int, int, int]]:
    return scene_objects(scene) + [BACKGROUND_COLOURS[scene.background.colour]]


def scene_objects(scene) -> list[tuple[int, int, int]]:
    return [COLOURS[o.colour] for o in scene.objects]


def tally(image: np.ndarray, colours, objects, threshold: float, counts: list[int], kinds: dict[str, int]
          ) -> np.ndarray:
    """Count ``image``'s stray pixels into ``counts`` and where they lie into ``kinds``; returns the mask."""
    mask = stray_mask(image, colours, threshold)
    counts.append(int(mask.sum()))
    for kind, n in where(image, mask, objects).items():
        kinds[kind] += n
    return mask


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` with every pixel within ``radius`` pixels (a square) of one of its pixels added."""
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(mask).float()[None, None], 2 * radius + 1, 1, radius)
    return grown[0, 0].numpy() > 0


def where(image: np.ndarray, mask: np.ndarray, objects: list[tuple[int, int, int]], radius: int = 4,
          tolerance: float = 60.0) -> dict[str, int]:
    """The ``mask``'s stray pixels by what lies within ``radius`` pixels: ``contact`` where pixels of two or more of
    the prompt's object colours (each within ``tolerance``) are near (two objects meet), ``rim`` where one is (an
    object's edge on the background), ``elsewhere`` where none is."""
    near, pixels = [], image.astype(np.float64)
    for colour in dict.fromkeys(objects):
        near.append(grow(np.linalg.norm(pixels - np.array(colour, dtype=np.float64), axis=-1) < tolerance, radius))
    objects_near = np.sum(near, axis=0) if near else np.zeros(mask.shape, int)
    return {"contact": int((mask & (objects_near >= 2)).sum()), "rim": int((mask & (objects_near == 1)).sum()),
            "elsewhere": int((mask & (objects_near == 0)).sum())}


def marked(image: np.ndarray, mask: np.ndarray, scale: int = 2) -> Image.Image:
    """The image and, to its right, a copy with the ``mask`` pixels magenta; both enlarged ``scale`` times."""
    painted = image.copy()
    painted[mask] = (255, 0, 255)
    pair = np.concatenate([image, np.full((image.shape[0], 4, 3), 255, np.uint8), painted], axis=1)
    return Image.fromarray(pair).resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.NEAREST)


def has_contact(scene) -> bool:
    """Whether two objects of different colours overlap in ``scene`` (the world allows a little overlap)."""
    objs = scene.objects
    return any(a.colour != b.colour and overlap_fraction(a, b) > 0 for i, a in enumerate(objs) for b in objs[i + 1:])


def held_out_scenes(n: int, contact: bool = False) -> list:
    """The first ``n`` held-out scenes (world seed 3); with ``contact``, the first ``n`` that have a contact."""
    world, found, i = ShapesWorld("heldout", 3), [], 0
    while len(found) < n:
        scene = world.scene(i)
        i += 1
        if not contact or has_contact(scene):
            found.append(scene)
    return found


def count_renders(images, scenes, threshold: float, min_spot: int) -> dict:
    """Stray pixels in each image of a scene (a render, or its reconstruction), summarised, and where they lie."""
    counts, kinds = [], {"contact": 0, "rim": 0, "elsewhere": 0}
    for im, s in zip(images, scenes):
        tally(np.asarray(im), scene_colours(s), scene_objects(s), threshold, counts, kinds)
    return {**summary(counts, min_spot), "where": kinds}


def prompt_scenes(prompts: list[str], n: int) -> list:
    """``n`` layouts of each prompt, prompt by prompt (the world's layout sampler at seeds 0..n-1)."""
    return [scene_from_prompt(parse_caption(p), seed) for p in prompts for seed in range(n)]


@torch.no_grad()
def reconstruct(vae, images, flip: int | None = None) -> list:
    """``images`` encoded and decoded by ``vae`` (the posterior mean), as PIL images; with ``flip`` (3: left-right,
    2: up-down) each image is flipped before the VAE and its reconstruction flipped back."""
    weight = next(vae.parameters())
    out = []
    for i in range(0, len(images), 16):  # in batches: a few hundred renders at once would hold gigabytes
        x = torch.cat([to_tensor(r) for r in images[i:i + 16]]).to(weight.device, weight.dtype)
        if flip is not None:
            x = x.flip(dims=[flip])
        y = vae.decode(vae.encode(x).mean).float()
        out += to_pil((y.flip(dims=[flip]) if flip is not None else y).cpu())
    return out


def offset(images, renders, scenes, threshold: float, radius: int = 4) -> dict:
    """How many stray pixels the reconstructions ``images`` hold (of scenes with an object in view), and where they
    lie on average against the centre of their scene's objects as rendered (pixels; x to the right, y down); under
    ``"near"`` the same for those within ``radius`` pixels of an object as rendered (its rim: the spots, not a
    decoder's errors on the background)."""
    sums = {"all": [0, 0.0, 0.0], "near": [0, 0.0, 0.0]}
    for im, r, s in zip(images, renders, scenes):
        mask = stray_mask(np.asarray(im), scene_colours(s), threshold)
        drawn = np.asarray(r).astype(np.float64)
        objects = np.zeros(mask.shape, bool)
        for colour in scene_objects(s):
            objects |= np.linalg.norm(drawn - np.array(colour, np.float64), axis=-1) < 60
        if not (mask.any() and objects.any()):
            continue
        oy, ox = np.nonzero(objects)
        for key, kept in (("all", mask), ("near", mask & grow(objects, radius))):
            ys, xs = np.nonzero(kept)
            sums[key][0] += len(xs)
            sums[key][1] += float((xs - ox.mean()).sum())
            sums[key][2] += float((ys - oy.mean()).sum())
    (n, dx, dy), (m, mx, my) = sums["all"], sums["near"]
    return {"stray": n, "dx": round(dx / max(n, 1), 2), "dy": round(dy / max(n, 1), 2),
            "near": {"stray": m, "dx": round(mx / max(m, 1), 2), "dy": round(my / max(m, 1), 2)}}


def mirror_test(vae, renders, scenes, threshold: float, plain: list) -> dict:
    """:func:`offset` of the plain reconstructions ``plain``, of the ones mirrored left-right and of the ones flipped
    up-down (each flipped back)."""
    return {"plain": offset(plain, renders, scenes, threshold),
            **{way: offset(reconstruct(vae, renders, flip), renders, scenes, threshold)
               for way, flip in (("mirrored", 3), ("flipped", 2))}}


def is_vae_run(src: str) -> bool:
    """Whether ``src`` is an ``estable train vae`` run or checkpoint folder (not a whole model)."""
    path = Path(src)
    if (path / "checkpoints").is_dir():
        return True
    file = path / "model.safetensors"
    return file.is_file() and read_safetensors_header(file)[1].get("kind") == "vae"


def load_vae(src: str, device: str):
    """The autoencoder of a VAE run or checkpoint folder (EMA weights when present), in fp32 on ``device``."""
    from estable.models.vae import AutoencoderKL
    from estable.training.builders import load_network

    cfg, weights = load_network("vae", src)
    vae = AutoencoderKL(cfg)
    vae.load_state_dict(weights, strict=True)
    return vae.to(device).eval()


def summary(counts: list[int], min_spot: int) -> dict:
    return {"images": len(counts), "median": statistics.median(counts), "mean": round(statistics.fmean(counts), 2),
            f"share_with_{min_spot}_or_more": round(sum(c >= min_spot for c in counts) / len(counts), 4),
            "per_image": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--grid", action="store_true", help="the sample grid's eight prompts at seeds 1-4")
    ap.add_argument("--seeds", type=int, help="seeds 1..N (default 8, with --grid 4; 0: generate none)")
    ap.add_argument("--renders", type=int, default=0, help="also N held-out renders through each model's VAE")
    ap.add_argument("--contact", action="store_true",
                    help="the renders: only scenes where two objects of different colours overlap")
    ap.add_argument("--prompt-renders", type=int, default=0,
                    help="also N renders of each prompt's layouts through each model's VAE, counted per prompt")
    ap.add_argument("--mirror", action="store_true",
                    help="also where the reconstructions' stray pixels lie, plain, mirrored and flipped (see above)")
    ap.add_argument("--threshold", type=float, default=40.0)
    ap.add_argument("--min-spot", type=int, default=4)
    ap.add_argument("--sampler")
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--show", type=Path, help="save each generated image with its stray pixels marked in this folder")
    args = ap.parse_args()
    if args.show:
        args.show.mkdir(parents=True, exist_ok=True)
    prompts = GRID if args.grid else DEMO
    seeds = range(1, (args.seeds if args.seeds is not None else (4 if args.grid else 8)) + 1)  # 0: none generated
    scenes = held_out_scenes(args.renders, args.contact)
    renders = [render(s, 256) for s in scenes]
    own_scenes = prompt_scenes(prompts, args.prompt_renders)
    own_renders = [render(s, 256) for s in own_scenes]
    result: dict = {"threshold": args.threshold, "prompts": prompts, "seeds": list(seeds), "models": {}}
    if renders:
        result["renders"] = count_renders(renders, scenes, args.threshold, args.min_spot)
        print(f"renders themselves: stray pixels per image median {result['renders']['median']}, "
              f"mean {result['renders']['mean']}")
    for m, src in enumerate(args.models):
        vae_only = is_vae_run(src)
        pipe = None if vae_only else load_pipeline(src, device=args.device)
        vae = load_vae(src, args.device) if vae_only else pipe.vae
        counts, kinds = [], {"contact": 0, "rim": 0, "elsewhere": 0}
        for p, prompt in enumerate(prompts if pipe is not None else []):
            colours, objects = prompt_colours(prompt), object_colours(prompt)
            for seed in seeds:
                chosen = {k: v for k, v in (("sampler", args.sampler), ("cfg_scale", args.cfg)) if v is not None}
                params = pipe.with_model_defaults(GenerationParams(prompt=prompt, seed=seed, **chosen),
                                                  cfg=args.cfg is None, sampler=args.sampler is None)
                image = np.asarray(pipe.txt2img(params).images[0].convert("RGB"))
                mask = tally(image, colours, objects, args.threshold, counts, kinds)
                if args.show:
                    marked(image, mask).save(args.show / f"model{m}_prompt{p}_seed{seed}_{counts[-1]}.png")
        row = {"generated": {**summary(counts, args.min_spot), "where": kinds}} if counts else {}
        recon, own_recon = reconstruct(vae, renders), reconstruct(vae, own_renders)
        if renders:
            row["reconstructed"] = count_renders(recon, scenes, args.threshold, args.min_spot)
        if own_renders:
            row["prompts_reconstructed"] = count_renders(own_recon, own_scenes, args.threshold, args.min_spot)
            n = args.prompt_renders
            row["prompts_reconstructed"]["per_prompt"] = {
                p: row["prompts_reconstructed"]["per_image"][i * n:(i + 1) * n] for i, p in enumerate(prompts)}
        if args.mirror:
            row["mirror"] = mirror_test(vae, renders + own_renders, scenes + own_scenes, args.threshold,
                                        recon + own_recon)
            print(f"{src}: mirror test — " + "; ".join(
                f"{way} {v['stray']} stray pixels, {v['dx']:+.1f} px right, {v['dy']:+.1f} px down (at the rims "
                f"{v['near']['stray']}: {v['near']['dx']:+.1f}, {v['near']['dy']:+.1f})"
                for way, v in row["mirror"].items()), flush=True)
        result["models"][src] = row
        counted = {k: v for k, v in row.items() if k != "mirror"}
        line = ", ".join(f"{k}: median {v['median']}, mean {v['mean']}, {args.min_spot}+ in "
                         f"{100 * v[f'share_with_{args.min_spot}_or_more']:.0f} %" for k, v in counted.items())
        where_line = "; ".join(f"{k}: " + ", ".join(f"{w} {n}" for w, n in v["where"].items())
                               for k, v in counted.items())
        print(f"{src}: stray pixels per image — {line}; where (all images) — {where_line}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
