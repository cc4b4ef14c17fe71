"""The procedural shapes world: determinism, ground truth against pixels, grammar, held-out split, folders."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from estable.training.data import ImageCaptionFolder
from estable.training.shapes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    MAX_OVERLAP,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    SIZES,
    BackgroundSpec,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapesWorld,
    caption_for,
    parse_caption,
    polygon_area,
    relation_holds,
    render,
    scene_from_prompt,
    write_folder,
)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def _coverage(pixels: np.ndarray, obj_rgb, bg_rgb) -> np.ndarray:
    """Per-pixel fraction of the object colour, from projecting (pixel − bg) onto (obj − bg); (H, W)."""
    d = np.asarray(obj_rgb, np.float64) - np.asarray(bg_rgb, np.float64)
    return np.clip(((pixels - np.asarray(bg_rgb, np.float64)) @ d) / (d @ d), 0.0, 1.0)


def test_same_seed_and_index_give_identical_bytes():
    a = ShapesWorld("train", seed=3).sample(17)
    b = ShapesWorld("train", seed=3).sample(17)
    assert a[1] == b[1] and a[2] == b[2]
    assert a[0].tobytes() == b[0].tobytes()
    c = ShapesWorld("train", seed=3).sample(18)
    assert c[0].tobytes() != a[0].tobytes()
    d = ShapesWorld("train", seed=4).sample(17)
    assert d[0].tobytes() != a[0].tobytes()


@pytest.mark.parametrize("size", [32, 64, 256])
def test_renders_at_any_resolution_with_the_same_content(size):
    world = ShapesWorld("train", seed=1)
    for index in range(4):
        scene = world.scene(index)
        img = render(scene, size)
        assert img.size == (size, size) and img.mode == "RGB"
        # The same scene at 512 box-filtered down must match the direct render (resolution independence).
        ref = render(scene, 512).resize((size, size), Image.BOX)
        err = np.abs(_pixels(img) - _pixels(ref)).mean()
        assert err < 1.5, (size, index, err)  # measured ≤ 0.67 grey levels at 32 px


@pytest.mark.parametrize("shape", SHAPES)
def test_single_object_pixels_match_ground_truth(shape):
    size = 256
    for k, colour in enumerate(COLOURS):
        bg = "grey" if colour not in ("white",) else "black"
        spec = PromptSpec("single", (ObjectSpec(shape, colour, SIZES[k % 3]),), background=BackgroundSpec("plain", bg))
        scene = scene_from_prompt(spec, rng=k)
        obj = scene.objects[0]
        px = _pixels(render(scene, size))
        cov = _coverage(px, COLOURS[colour], BACKGROUND_COLOURS[bg])  # (H, W) in [0, 1]
        # Area: summed coverage equals the polygon's area (anti-aliasing conserves coverage).
        area_px = obj.area * size * size
        assert abs(cov.sum() - area_px) / area_px < 0.02, (shape, colour, cov.sum(), area_px)
        # Colour: fully covered pixels carry the named RGB.
        inner = cov > 0.95
        assert inner.sum() > 50
        assert np.abs(px[inner].mean(axis=0) - COLOURS[colour]).max() < 6.0, (shape, colour)
        # Centre: the coverage-weighted centroid is the stated centre (pixel centres at i + 0.5).
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        cx, cy = (cov * xs).sum() / cov.sum() / size, (cov * ys).sum() / cov.sum() / size
        assert abs(cx - obj.center[0]) < 0.25 / size and abs(cy - obj.center[1]) < 0.25 / size, (shape, colour)
        # Bounding box: the pixels with any coverage span the stated bbox to within a pixel (sharp tips may
        # cover less than one 4×4 subsample, so the edge pixel can be empty).
        yy, xx = np.nonzero(cov > 0.01)
        got = np.array([xx.min(), yy.min(), xx.max() + 1, yy.max() + 1]) / size
        assert np.abs(got - np.array(obj.bbox)).max() < 1.25 / size, (shape, colour, got, obj.bbox)
        # Nothing else is in the picture: background pixels away from the object are the background colour.
        x0, y0, x1, y1 = (np.array(obj.bbox) * size).astype(int)
        outside = np.ones((size, size), bool)
        outside[max(y0 - 2, 0) : y1 + 3, max(x0 - 2, 0) : x1 + 3] = False
        assert np.abs(px[outside] - BACKGROUND_COLOURS[bg]).max() <= 1.0


def test_captions_parse_back_and_describe_the_scene():
    world = ShapesWorld("train", seed=5)
    for index in range(400):
        scene = world.scene(index)
        caption = caption_for(scene)
        if index < 20:
            assert world.sample(index, size=32)[1] == caption
        spec = parse_caption(caption)
        assert spec == scene.spec, caption
        named = spec.count if spec.kind == "count" else len(spec.objects)
        assert scene.count == named, caption  # no unmentioned objects
        # Rebuilding a scene from the caption gives a scene with the same caption (canonical phrasing "on").
        again = scene_from_prompt(spec, rng=index)
        assert caption_for(again) == caption.replace(" against ", " on "), caption


def test_relations_in_captions_hold_geometrically():
    world = ShapesWorld("train", seed=7, kind_weights={"pair": 1.0})
    checked = 0
    for index in range(300):
        scene = world.scene(index)
        spec = parse_caption(caption_for(scene))
        # Find the captioned objects in the scene by colour and shape.
        by_attr = {(o.colour, o.shape): o for o in scene.objects}
        a = by_attr[(spec.objects[0].colour, spec.objects[0].shape)]
        b = by_attr[(spec.objects[1].colour, spec.objects[1].shape)]
        assert relation_holds(a.center, b.center, spec.relation)
        dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
        axis = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[spec.relation]
        assert axis >= RELATION_MARGIN
        for other in set(RELATIONS) - {spec.relation}:
            assert not relation_holds(a.center, b.center, other)
        checked += 1
    assert checked == 300
    # Pixels: for pairs of different colours on a plain background, the measured centroids obey the relation.
    for index in range(12):
        rel = RELATIONS[index % 4]
        spec = PromptSpec(
            "pair",
            (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")),
            relation=rel,
            background=BackgroundSpec("plain", "white"),
        )
        px = _pixels(render(scene_from_prompt(spec, rng=index), 128))
        cents = []
        for colour in ("red", "blue"):
            near = np.abs(px - COLOURS[colour]).max(axis=2) < 30
            ys, xs = np.nonzero(near)
            cents.append(((xs.mean() + 0.5) / 128, (ys.mean() + 0.5) / 128))
        assert relation_holds(cents[0], cents[1], rel, margin=RELATION_MARGIN - 0.03), (rel, cents)


def test_relation_axis_ratio_keeps_training_pairs_off_the_diagonal():
    # "A left of B" with B 0.2 to the right and 0.12 down: the judge's rule (ratio 1) and 1.5 hold, 2 does not
    assert relation_holds((0.5, 0.5), (0.7, 0.62), "left of")
    assert relation_holds((0.5, 0.5), (0.7, 0.62), "left of", axis_ratio=1.5)
    assert not relation_holds((0.5, 0.5), (0.7, 0.62), "left of", axis_ratio=2.0)

    def ratios(world):  # the relation's axis over the other, per pair scene
        out = []
        for index in range(200):
            scene = world.scene(index)
            a, b = scene.objects
            dx, dy = abs(b.center[0] - a.center[0]), abs(b.center[1] - a.center[1])
            along, across = (dx, dy) if scene.relation in ("left of", "right of") else (dy, dx)
            out.append(along / max(across, 1e-9))
        return np.array(out)

    plain = ratios(ShapesWorld("train", seed=5, kind_weights={"pair": 1.0}))
    strict = ratios(ShapesWorld("train", seed=5, kind_weights={"pair": 1.0}, relation_axis_ratio=1.5))
    assert plain.min() >= 1.0 and (plain < 1.5).mean() > 0.2  # the world's own pairs come near the diagonal
    assert strict.min() >= 1.5
    same = ShapesWorld("train", seed=5, kind_weights={"pair": 1.0}, relation_axis_ratio=1.0)
    assert same.scene(3) == ShapesWorld("train", seed=5, kind_weights={"pair": 1.0}).scene(3)
    with pytest.raises(ValueError, match="at least 1"):
        ShapesWorld("train", relation_axis_ratio=0.5)


def test_layout_rules_inside_image_overlap_bound():
    world = ShapesWorld("train", seed=11)
    for index in range(300):
        scene = world.scene(index)
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.bbox
            assert min(x0, y0) >= 0.0 and max(x1, y1) <= 1.0
            for b in scene.objects[i + 1 :]:
                # Overlap measured on a finer raster than the sampler's.
                ov = _overlap_hi(a, b)
                if a.colour == b.colour:
                    assert ov == 0.0
                else:
                    assert ov <= MAX_OVERLAP + 0.05


def _overlap_hi(a, b, n=256):
    from PIL import ImageDraw

    masks = []
    for o in (a, b):
        m = Image.new("1", (n, n), 0)
        ImageDraw.Draw(m).polygon((o.polygon() * n).ravel().tolist(), fill=1)
        masks.append(np.asarray(m, bool))
    return (masks[0] & masks[1]).sum() / max(1, min(masks[0].sum(), masks[1].sum()))


def test_heldout_combinations_never_in_train_and_always_in_heldout():
    train = ShapesWorld("train", seed=0)
    reserved = train.reserved
    n_combos = len(COLOURS) * len(SHAPES)
    assert 0.1 <= len(reserved) / n_combos <= 0.2
    assert ShapesWorld("train", seed=123).reserved == reserved  # independent of the sampling seed
    for colour in COLOURS:  # every colour and shape keeps most of its pairings in training
        assert sum(c == colour for c, _ in reserved) <= 2
    for shape in SHAPES:
        assert sum(s == shape for _, s in reserved) <= 2
    seen = set()
    for index in range(2000):
        scene = train.scene(index)
        combos = scene.combinations()
        assert not combos & reserved, (index, caption_for(scene))
        assert parse_caption(caption_for(scene)).combinations() == combos
        seen |= combos
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - reserved  # every other combination is trained
    heldout = ShapesWorld("heldout", seed=0)
    for index in range(500):
        scene = heldout.scene(index)
        assert scene.combinations() & reserved, (index, caption_for(scene))
        assert parse_caption(caption_for(scene)).combinations() & reserved


def test_grammar_coverage():
    colours, shapes, sizes, relations, counts, bg_kinds, bg_colours, kinds = (set() for _ in range(8))
    for split in ("train", "heldout"):
        world = ShapesWorld(split, seed=2)
        for index in range(1500):
            scene = world.scene(index)
            spec = parse_caption(caption_for(scene))
            kinds.add(spec.kind)
            for o in spec.objects:
                colours.add(o.colour)
                shapes.add(o.shape)
                if o.size:
                    sizes.add(o.size)
            if spec.relation:
                relations.add(spec.relation)
            if spec.kind == "count":
                counts.add(spec.count)
            if spec.background:
                bg_kinds.add(spec.background.kind)
                bg_colours.add(spec.background.colour)
    assert len(colours) >= 8 and colours == set(COLOURS)
    assert len(shapes) >= 6 and shapes == set(SHAPES)
    assert sizes == set(SIZES)
    assert relations == set(RELATIONS)
    assert counts == {2, 3, 4}
    assert bg_kinds == set(BACKGROUND_KINDS)
    assert bg_colours == set(COLOURS)
    assert kinds == {"single", "count", "pair", "colour_binding"}


def test_example_captions_parse():
    examples = {
        "a red circle above a blue square": ("pair", "above"),
        "a blue square below a red circle": ("pair", "below"),
        "two green triangles on a yellow background": ("count", None),
        "a small purple star": ("single", None),
        "three orange hearts": ("count", None),
        "a large white hexagon to the left of a black cross": ("pair", "left of"),
        "a red square and a blue circle": ("colour_binding", None),
        "an orange diamond against a textured white background": ("single", None),
        "four small black stars on a red gradient background": ("count", None),
    }
    for text, (kind, rel) in examples.items():
        spec = parse_caption(text)
        assert spec.kind == kind and spec.relation == rel, text
        assert caption_for(spec) == text.replace(" against ", " on ")
        scene = scene_from_prompt(spec, rng=0)
        assert scene.spec == spec


def test_bad_prompts_are_rejected_with_messages():
    with pytest.raises(ValueError, match="differ in colour AND shape"):
        PromptSpec("colour_binding", (ObjectSpec("circle", "red"), ObjectSpec("square", "red")))
    with pytest.raises(ValueError, match="background colour"):
        PromptSpec("single", (ObjectSpec("circle", "red"),), background=BackgroundSpec("plain", "red"))
    with pytest.raises(ValueError, match="unknown colour"):
        ObjectSpec("circle", "teal")
    with pytest.raises(ValueError, match="do not fit"):
        PromptSpec("count", (ObjectSpec("circle", "red", "large"),), count=4)
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption("a red circle next to a blue square")
    with pytest.raises(ValueError, match="split"):
        ShapesWorld("test")


def test_scene_dict_round_trip_renders_identically():
    world = ShapesWorld("heldout", seed=9)
    for index in range(10):
        img, caption, scene = world.sample(index, size=64)
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert again == scene and caption_for(again) == caption
        assert render(again, 64).tobytes() == img.tobytes()


def test_polygons_are_centred_and_counts_render_distinct_blobs():
    for shape in SHAPES:
        obj_spec = ObjectSpec(shape, "black", "small")
        scene = scene_from_prompt(PromptSpec("count", (obj_spec,), count=4), rng=1)
        assert scene.count == 4
        areas = [polygon_area(o.polygon()) for o in scene.objects]
        assert min(areas) > 0


def test_write_folder_round_trip(tmp_path):
    meta = write_folder(tmp_path / "shapes", count=6, size=64, split="train", seed=0, progress=False)
    lines = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(lines) == 6 and len(list((tmp_path / "shapes").glob("*.png"))) == 6
    world = ShapesWorld("train", seed=0, size=64)
    ds = ImageCaptionFolder(tmp_path / "shapes", 64)
    assert len(ds) == 6 and ds.skipped == 0
    for i, line in enumerate(lines):
        img, caption, scene = world.sample(i)
        assert line["file_name"] == f"{i:08d}.png" and line["text"] == caption
        assert Scene.from_dict(line["attributes"]) == scene
        item = ds[i]
        assert item["text"] == caption and item["pixel_values"].shape == (3, 64, 64)
        expected = np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1  # PNG is lossless
        assert np.abs(item["pixel_values"].numpy() - expected).max() < 1e-6


def test_rendering_speed_is_reported(capsys):
    world = ShapesWorld("train", seed=0)
    n = 100
    t0 = time.perf_counter()
    scenes = [world.scene(i) for i in range(n)]
    t1 = time.perf_counter()
    for s in scenes:
        render(s, 256)
    t2 = time.perf_counter()
    with capsys.disabled():
        print(
            f"\nshapes world: {n / (t1 - t0):.0f} scenes/s (layout), {n / (t2 - t1):.0f} renders/s at 256², "
            f"{n / (t2 - t0):.0f} samples/s end to end (one core)"
        )
    # Measured 267 renders/s at 256² on one core of the 2-core dev machine; the training loader renders on the fly,
    # so a 10x slowdown (e.g. a supersampling factor gone wrong) must fail here even on a busy machine.
    assert n / (t2 - t1) > 25, f"rendering at 256² fell to {n / (t2 - t1):.1f}/s (measured 267/s)"
    assert n / (t1 - t0) > 100, f"scene layout fell to {n / (t1 - t0):.1f}/s (measured 1648/s)"


def test_named_background_odds_change_only_the_named_kinds():
    import hashlib
    from collections import Counter

    # the default world draws what it drew before the option existed (digest taken at commit 9536449)
    plain = ShapesWorld("train", seed=5)
    text = "\n".join(caption_for(plain.scene(i)) + "|" + plain.scene(i).background.kind for i in range(200))
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "b56978e1df9e9958b9eca663b3dd787ac7f8bbf699dcb246ae503fdc53a49d47")
    odds = ShapesWorld("train", seed=5, named_background_kinds={"plain": 2, "gradient": 1, "textured": 1})
    named, unnamed = Counter(), Counter()
    for i in range(3000):
        bg = odds.scene(i).background
        (named if bg.mentioned else unnamed)[bg.kind] += 1
    # named backgrounds now half plain, as the unnamed ones always were (3 sigma: about 0.04 at ~1,200 scenes)
    assert abs(named["plain"] / sum(named.values()) - 0.5) < 0.05, named
    assert abs(unnamed["plain"] / sum(unnamed.values()) - 0.5) < 0.05, unnamed
    only = ShapesWorld("train", seed=5, named_background_kinds={"textured": 1})
    assert {only.scene(i).background.kind for i in range(200) if only.scene(i).background.mentioned} == {"textured"}
    with pytest.raises(ValueError, match="named_background_kinds"):
        ShapesWorld("train", named_background_kinds={"stripy": 1})


def test_grey_named_captions_name_the_unnamed_grey_and_leave_the_default_world_alone():
    from collections import Counter

    from estable.training.shapes.captions import name_grey_background

    # (grey_named_p=0, the default, leaves the world as it was: the digest test above pins it)
    world = ShapesWorld("train", seed=5, grey_named_p=1.0)
    kinds = Counter()
    for i in range(1200):
        scene = world.scene(i)
        bg, spec = scene.background, parse_caption(caption_for(scene))
        assert bg.mentioned and spec.background == BackgroundSpec(bg.kind, bg.colour)  # no caption is silent
        if bg.colour == "grey":
            kinds[bg.kind] += 1
    # the grey ones at the unnamed odds, half plain (3 sigma: about 0.05 at ~700 scenes)
    assert abs(kinds["plain"] / sum(kinds.values()) - 0.5) < 0.06 and kinds["textured"] and kinds["gradient"], kinds
    half = ShapesWorld("train", seed=5, grey_named_p=0.5)
    greys = [half.scene(i) for i in range(1000) if half.scene(i).background.colour == "grey"]
    said = Counter("grey" in caption_for(scene) for scene in greys)
    assert abs(said[True] / sum(said.values()) - 0.5) < 0.08, said
    with pytest.raises(ValueError, match="grey_named_p"):
        ShapesWorld("train", grey_named_p=1.5)

    completed = [name_grey_background("a red circle above a blue square", seed) for seed in range(400)]
    specs = [parse_caption(c) for c in completed]
    assert all(s.background.colour == "grey" and s.objects == specs[0].objects for s in specs)
    odds = Counter(s.background.kind for s in specs)
    assert abs(odds["plain"] / 400 - 0.5) < 0.08 and abs(odds["textured"] / 400 - 0.25) < 0.07, odds
    assert name_grey_background("Three green triangles.", 3) == name_grey_background("three green triangles", 3)
    assert name_grey_background("a red circle on a white background", 1) == "a red circle on a white background"
    assert name_grey_background("a photo of a cat", 1) == "a photo of a cat"


def test_contact_layouts_put_two_colours_against_each_other_and_leave_other_scenes_alone():
    from estable.training.shapes import overlap_fraction

    plain = ShapesWorld("train", seed=9)
    world = ShapesWorld("train", seed=9, contact_p=1.0)
    touching = two = 0
    for index in range(300):
        scene = world.scene(index)
        objs = scene.objects
        if len({o.colour for o in objs}) < 2:  # one colour: no draw is made, so the scene is the plain world's
            assert scene == plain.scene(index)
            continue
        two += 1
        a, b = objs[0], objs[1]
        touching += a.colour != b.colour and overlap_fraction(a, b) > 0
        assert overlap_fraction(a, b) <= MAX_OVERLAP  # the world's bound on a contact
        assert _overlap_hi(a, b) <= MAX_OVERLAP + 0.05  # and on a finer raster
        if scene.relation is not None:
            assert relation_holds(a.center, b.center, scene.relation)
    assert two > 100 and touching / two > 0.95, (touching, two)
    # the plain world's scenes with two colours touch far less often
    plain_touching = sum(
        overlap_fraction(s.objects[0], s.objects[1]) > 0
        for s in (plain.scene(i) for i in range(300)) if len({o.colour for o in s.objects}) > 1)
    assert plain_touching / two < 0.5
    assert ShapesWorld("train", seed=9, contact_p=0.0).scene(7) == plain.scene(7)
    with pytest.raises(ValueError, match="contact_p"):
        ShapesWorld("train", contact_p=1.5)


def test_shapes_contact_reaches_the_training_world():
    from estable.errors import EstableError
    from estable.training.builders import build_datasets
    from estable.training.config import load_config

    cfg = load_config("vae", "tiny-vae", ["data.shapes_contact=0.5", "data.val_size=1", "data.shapes_length=4"])
    train, _ = build_datasets(cfg, 0, 1)
    assert train.world.contact_p == 0.5
    with pytest.raises(EstableError, match="data.shapes_contact must be between 0 and 1"):
        load_config("vae", "tiny-vae", ["data.shapes_contact=2"])
