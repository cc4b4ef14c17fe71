"""benchmarks/stray_pixels.py: a render holds no stray pixel; a spot of a colour the scene cannot hold is counted
pixel by pixel; shading and anti-aliased blends are not; a tiny model's run writes its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stray_pixels import (  # noqa: E402
    has_contact,
    held_out_scenes,
    main,
    marked,
    object_colours,
    prompt_colours,
    scene_colours,
    stray_mask,
    where,
)

from estable.evaluation.stray import count_stray  # noqa: E402
from estable.training.shapes import COLOURS  # noqa: E402
from estable.training.shapes.render import render  # noqa: E402
from estable.training.shapes.world import ShapesWorld  # noqa: E402


def test_renders_hold_none_and_a_spot_is_counted_pixel_by_pixel():
    world = ShapesWorld("heldout", 3)
    for i in range(12):  # textured and gradient backgrounds, anti-aliased edges, every kind of scene
        scene = world.scene(i)
        assert stray_mask(np.asarray(render(scene, 128)), scene_colours(scene), 40).sum() == 0
    colours = prompt_colours("a red circle above a blue square")
    assert colours == [COLOURS["red"], COLOURS["blue"], (140, 140, 140)]
    image = np.full((32, 32, 3), 140, np.uint8)
    image[:16] = COLOURS["red"]
    image[16, :] = (np.array(COLOURS["red"]) * 0.5 + 140 * 0.5).astype(np.uint8)  # an edge's blend
    image[20:24, 20:24] = 70  # a darker grey: shading
    assert stray_mask(image, colours, 40).sum() == 0
    image[5:8, 10:13] = COLOURS["yellow"]  # a 3 × 3 yellow spot on the red circle
    mask = stray_mask(image, colours, 40)
    assert mask.sum() == 9 and mask[5:8, 10:13].all()
    assert stray_mask(image, colours + [COLOURS["yellow"]], 40).sum() == 0  # where yellow is named, it is no spot
    black = [COLOURS["black"], COLOURS["black"], COLOURS["black"]]  # one colour named thrice: still a spot
    assert stray_mask(image[5:8, 10:13], black, 40).all()
    # the library's count, image by image, each with its own prompt's colours (what the preference fine-tune uses)
    assert count_stray([Image.fromarray(image)] * 2, [colours, colours + [COLOURS["yellow"]]]) == [9, 0]


def test_a_tiny_run_writes_its_figures(tmp_path, capsys, monkeypatch):
    from tiny_model import tiny_model_file

    model = tiny_model_file(tmp_path)
    out = tmp_path / "stray.json"
    monkeypatch.setattr(sys, "argv", ["stray_pixels.py", str(model), "--seeds", "2", "--renders", "2",
                                      "--out", str(out), "--show", str(tmp_path / "show"), "--contact"])
    main()
    result = json.loads(out.read_text())
    row = result["models"][str(model)]
    assert result["renders"]["per_image"] == [0, 0] and len(row["generated"]["per_image"]) == 2
    assert len(row["reconstructed"]["per_image"]) == 2 and "stray pixels per image" in capsys.readouterr().out
    for kind in ("generated", "reconstructed"):
        assert sum(row[kind]["where"].values()) == sum(row[kind]["per_image"])
    shown = sorted(f.name for f in (tmp_path / "show").iterdir())  # named by model, prompt, seed and count
    assert shown == [f"model0_prompt0_seed{s}_{n}.png" for s, n in zip((1, 2), row["generated"]["per_image"])]
    # the autoencoder's floor alone: layouts of each grid prompt through the VAE, nothing generated
    monkeypatch.setattr(sys, "argv", ["stray_pixels.py", str(model), "--grid", "--seeds", "0", "--prompt-renders", "2",
                                      "--out", str(out)])
    main()
    row = json.loads(out.read_text())["models"][str(model)]
    assert list(row) == ["prompts_reconstructed"]
    per_prompt = row["prompts_reconstructed"]["per_prompt"]
    assert len(per_prompt) == 8 and all(len(v) == 2 for v in per_prompt.values())
    assert sum(map(sum, per_prompt.values())) == sum(row["prompts_reconstructed"]["per_image"])


def test_where_tells_a_contact_from_a_rim_and_from_nowhere_near():
    image = np.full((40, 40, 3), 140, np.uint8)
    image[5:15, 5:15] = COLOURS["red"]  # a red square whose right edge touches a blue one
    image[5:15, 15:25] = COLOURS["blue"]
    mask = np.zeros((40, 40), bool)
    mask[4, 14:16] = True  # 2 where the two meet
    mask[16, 6] = True  # 1 under the red square only
    mask[35, 35] = mask[30, 2] = mask[2, 38] = True  # 3 far from both
    objects = object_colours("a red square to the left of a blue square")
    assert objects == [COLOURS["red"], COLOURS["blue"]]
    assert where(image, mask, objects) == {"contact": 2, "rim": 1, "elsewhere": 3}
    assert where(image, mask, [COLOURS["red"], COLOURS["red"]]) == {"contact": 0, "rim": 3, "elsewhere": 3}


def test_contact_scenes_are_the_held_out_ones_where_two_colours_overlap():
    from estable.training.shapes import overlap_fraction

    plain, contact = held_out_scenes(100), held_out_scenes(3, contact=True)
    assert plain[:3] == held_out_scenes(3) and any(not has_contact(s) for s in plain)
    assert contact == [s for s in plain if has_contact(s)][:3]  # the first three with a contact, in order
    for s in contact:
        pairs = [(a, b) for i, a in enumerate(s.objects) for b in s.objects[i + 1:] if a.colour != b.colour]
        assert any(overlap_fraction(a, b) > 0 for a, b in pairs)


def test_marked_paints_the_stray_pixels_beside_the_image():
    image = np.full((8, 8, 3), 140, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2, 3] = True
    pair = np.asarray(marked(image, mask, scale=1))
    assert pair.shape == (8, 20, 3) and (pair[:, :8] == 140).all()  # the image untouched on the left
    assert tuple(pair[2, 12 + 3]) == (255, 0, 255) and (pair[:, 12:] == 140).all(axis=-1).sum() == 63


def test_offset_says_where_the_stray_pixels_lie_against_the_objects():
    from stray_pixels import offset

    from estable.training.shapes import parse_caption, scene_from_prompt

    scene = scene_from_prompt(parse_caption("a red square"), 0)
    drawn = np.asarray(render(scene, 64)).copy()
    red = np.linalg.norm(drawn.astype(float) - np.array(COLOURS["red"], float), axis=-1) < 60
    ys, xs = np.nonzero(red)
    image = drawn.copy()
    y, x = int(ys.mean()) - 2, int(xs.max()) + 2  # a 2 × 2 yellow spot right of the square, level with its centre
    image[y:y + 2, x:x + 2] = COLOURS["yellow"]
    got = offset([Image.fromarray(image)], [Image.fromarray(drawn)], [scene], 40)
    assert got["stray"] == 4 and got["near"]["stray"] == 4  # 2-3 px from the square: at its rim
    assert abs(got["dx"] - (x + 0.5 - xs.mean())) < 0.01 and abs(got["dy"] - (y + 0.5 - ys.mean())) < 0.01
    assert got["near"]["dx"] == got["dx"] and got["near"]["dy"] == got["dy"]
    # a second spot in the corner furthest from the square counts in all, not at the rims
    cy, cx = max(((0, 0), (0, 62), (62, 0), (62, 62)), key=lambda c: abs(c[0] - ys.mean()) + abs(c[1] - xs.mean()))
    assert np.hypot(ys - cy, xs - cx).min() > 8
    image[cy:cy + 2, cx:cx + 2] = COLOURS["yellow"]
    both = offset([Image.fromarray(image)], [Image.fromarray(drawn)], [scene], 40)
    assert both["stray"] == 8 and both["near"] == got["near"]
    assert abs(both["dx"] - (got["dx"] + cx + 0.5 - xs.mean()) / 2) < 0.01
    none = offset([Image.fromarray(drawn)], [Image.fromarray(drawn)], [scene], 40)
    assert none == {"stray": 0, "dx": 0, "dy": 0, "near": {"stray": 0, "dx": 0, "dy": 0}}


def test_a_vae_run_is_a_model_of_reconstructions_only_and_the_mirror_test_reports_three_ways(tmp_path, monkeypatch):
    import torch

    from estable.config import VAEConfig
    from estable.models.vae import AutoencoderKL
    from estable.training.runs import save_checkpoint

    cfg = VAEConfig(block_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_groups=4, sample_size=32)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg)
    save_checkpoint(tmp_path / "vae-run" / "checkpoints", 2, {"model": vae.state_dict()}, {},
                    {"kind": "vae", "config": cfg.to_json()})
    out = tmp_path / "stray.json"
    monkeypatch.setattr(sys, "argv", ["stray_pixels.py", str(tmp_path / "vae-run"), "--renders", "2", "--mirror",
                                      "--out", str(out)])
    main()
    row = json.loads(out.read_text())["models"][str(tmp_path / "vae-run")]
    assert list(row) == ["reconstructed", "mirror"]  # nothing generated: an autoencoder alone
    assert list(row["mirror"]) == ["plain", "mirrored", "flipped"]
    assert row["mirror"]["plain"]["stray"] == sum(row["reconstructed"]["per_image"])
