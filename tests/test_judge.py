"""The judge: target/decoding round trip with an oracle head, a short CPU training run, save/load, features."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from estable.errors import CheckpointError, EstableError
from estable.evaluation import judge as judge_mod
from estable.evaluation.judge import (
    Judge,
    JudgeConfig,
    JudgeFeatures,
    composite_scene,
    decode,
    focal_heat_loss,
    judge_accuracy,
    load_default_judge,
    load_judge,
    match_by_position,
    save_judge,
    scene_targets,
    score_detections,
    train_judge,
)
from estable.training.shapes import BACKGROUND_COLOURS, COLOURS, SHAPES, SIZES, ShapesWorld, overlap_fraction

TINY = JudgeConfig(64, (8, 16, 16, 16))


def _oracle_raw(scenes, grid: int) -> dict[str, torch.Tensor]:
    """Raw head outputs that say exactly what the targets say: logit(heat), one-hot classes, exact offsets."""
    t = [scene_targets(s, grid) for s in scenes]
    heat = torch.from_numpy(np.stack([x["heat"] for x in t])).double().clamp(1e-6, 1 - 1e-6)
    cls = torch.from_numpy(np.stack([x["cls"] for x in t]))  # (B, 3, G, G)

    def onehot(labels: torch.Tensor, n: int) -> torch.Tensor:  # (B, G, G) -> (B, n, G, G), -1 -> zeros
        out = torch.zeros(labels.shape[0], n, grid, grid)
        m = labels >= 0
        out.permute(0, 2, 3, 1)[m] = torch.nn.functional.one_hot(labels[m], n).float()
        return out

    bg = torch.from_numpy(np.stack([x["bg"] for x in t]))
    return {
        "heat": torch.log(heat / (1 - heat)).float(),
        "offset": torch.from_numpy(np.stack([x["offset"] for x in t])),
        "colour": onehot(cls[:, 0], len(COLOURS)),
        "shape": onehot(cls[:, 1], len(SHAPES)),
        "size": onehot(cls[:, 2], len(SIZES)),
        "bg_colour": torch.nn.functional.one_hot(bg[:, 0], len(BACKGROUND_COLOURS)).float(),
        "bg_kind": torch.nn.functional.one_hot(bg[:, 1], 3).float(),
    }


def _scenes(n: int, seed: int = 5) -> list:
    worlds = [ShapesWorld("train", seed), ShapesWorld("heldout", seed)]
    return [worlds[i % 2].scene(i) for i in range(n)]


@pytest.mark.parametrize("grid", [16, 32])
def test_oracle_head_decodes_exactly(grid: int) -> None:
    scenes = _scenes(120)
    scenes += [composite_scene(scenes[i : i + 3]) for i in range(0, 60, 3)]  # 3-4 unrelated objects
    raw = _oracle_raw(scenes, grid)
    dets = decode(raw, threshold=0.35)
    for scene, found in zip(scenes, dets):
        assert len(found) == scene.count
        pairs = match_by_position([o.center for o in scene.objects], [d.center for d in found], 1e-4)
        assert len(pairs) == scene.count
        for i, j in pairs:
            o, d = scene.objects[i], found[j]
            assert (d.colour, d.shape, d.size) == (o.colour, o.shape, o.size)
            assert math.dist(d.center, o.center) < 1e-5
    bgs = [("plain", "grey")] * len(scenes)  # wrong on purpose for most: only the background score may drop
    report = score_detections(scenes, dets, bgs)
    for key in ("object_colour", "object_shape", "object_size", "object_position", "count", "scene_exact",
                "relation"):
        assert report[key] == 1.0, key
    assert report["max_center_error"] < 1e-5
    assert report["background_colour"] < 1.0


def test_score_detections_counts_mistakes() -> None:
    scenes = _scenes(20)
    dets = decode(_oracle_raw(scenes, 32), 0.35)
    dets[0] = [judge_mod.Detection("red" if d.colour != "red" else "blue", d.shape, d.size, d.center)
               for d in dets[0]]  # every object of scene 0 gets a wrong colour
    dets[1] = dets[1][:-1]  # scene 1 misses an object
    report = score_detections(scenes, dets)
    n_obj = sum(s.count for s in scenes)
    assert report["object_colour"] == pytest.approx(1 - (scenes[0].count + 1) / n_obj)
    assert report["count"] == pytest.approx(19 / 20)
    assert report["scene_exact"] == pytest.approx(18 / 20)


def test_composite_scenes_follow_the_layout_rules() -> None:
    scenes = _scenes(60)
    for i in range(0, 60, 3):
        c = composite_scene(scenes[i : i + 3])
        assert 1 <= c.count <= 4
        for a in range(c.count):
            for b in range(a + 1, c.count):
                oa, ob = c.objects[a], c.objects[b]
                if oa.colour != ob.colour:
                    assert overlap_fraction(oa, ob) <= 0.2


def test_focal_loss_prefers_the_truth() -> None:
    target = torch.from_numpy(scene_targets(_scenes(1)[0], 16)["heat"])[None]  # (1, G, G)
    good = torch.log(target.clamp(1e-4, 1 - 1e-4) / (1 - target.clamp(1e-4, 1 - 1e-4)))
    assert focal_heat_loss(good, target) < focal_heat_loss(torch.zeros_like(target), target)
    assert focal_heat_loss(good, target) < focal_heat_loss(-good, target)


def test_short_cpu_training_beats_chance() -> None:
    # Single objects at 64 px, a pre-rendered pool of 400 samples, 150 steps of batch 32 (one thread: the test
    # machines are shared). Measured on 200 fresh held-out renders: colour 0.91, shape 0.46, count 0.985, centre 0.96
    # (chance: 1/8 for colour and shape). The 98 % judge is trained on a GPU (`estable eval train-judge`).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.monotonic()
        judge = train_judge(150, 32, 64, "cpu", 0, config=JudgeConfig(64, (16, 32, 32, 48)), lr=3e-3,
                            kind_weights={"single": 1.0}, composite_p=0.0, pool_size=400, progress=False)
        took = time.monotonic() - t0
        report = judge_accuracy(judge, 200, splits=("heldout",), kind_weights={"single": 1.0}, render_size=64)
    finally:
        torch.set_num_threads(threads)
    print(f"trained in {took:.1f} s: {report}")
    assert report["object_colour"] >= 0.6
    assert report["object_shape"] >= 0.3
    assert report["count"] >= 0.9
    assert report["object_position"] >= 0.9


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    judge = Judge(TINY).eval()
    path = save_judge(judge, tmp_path / "j.safetensors", {"note": "test"})
    loaded = load_judge(path)
    assert loaded.config == judge.config
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = judge(judge.prepare(x)), loaded(loaded.prepare(x))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # PIL input and tensor input agree on the decode path's shape.
    from PIL import Image

    img = Image.new("RGB", (96, 96), (140, 140, 140))
    assert len(loaded.detect([img, img])) == 2
    assert len(loaded.classify_background([img])) == 1


def test_load_errors(tmp_path, monkeypatch) -> None:
    from estable.checkpoints.io import write_safetensors

    with pytest.raises(CheckpointError):
        load_judge(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    write_safetensors(other, {"w": torch.zeros(2)}, {"format": "something-else"})
    with pytest.raises(CheckpointError, match="not an Estable judge"):
        load_judge(other)
    broken = tmp_path / "broken.safetensors"
    state = {k: v for k, v in Judge(TINY).state_dict().items() if not k.startswith("head.")}
    write_safetensors(broken, state, {"format": "estable-judge", "format_version": "1", "config": TINY.to_json()})
    with pytest.raises(CheckpointError, match="do not match"):
        load_judge(broken)
    monkeypatch.setattr(judge_mod, "DEFAULT_JUDGE_PATH", tmp_path / "nope.safetensors")
    with pytest.raises(EstableError, match="estable eval train-judge"):
        load_default_judge()


@pytest.mark.parametrize("meta, words", [
    ({"format_version": "abc"}, "format version 'abc' is not a number"),
    ({"config": None}, "has no 'config' entry"),
    ({"config": "{not json"}, "the judge config in the metadata is invalid"),
    ({"config": "[1, 2]"}, "the judge config in the metadata is invalid"),
    ({"config": '{"image_size": 64}'}, "invalid (no 'widths' field)"),
    ({"config": JudgeConfig(64, (8, 16, 16, 24)).to_json()}, "judge weights do not match its config"),  # shapes
])
def test_a_judge_file_with_damaged_metadata_is_a_checkpoint_error(tmp_path, meta, words) -> None:
    from estable.checkpoints.io import write_safetensors

    full = {"format": "estable-judge", "format_version": "1", "config": TINY.to_json(), **meta}
    path = tmp_path / "judge.safetensors"
    write_safetensors(path, Judge(TINY).state_dict(), {k: v for k, v in full.items() if v is not None})
    with pytest.raises(CheckpointError) as info:
        load_judge(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_judge_features_shape() -> None:
    judge = Judge(TINY)
    feats = JudgeFeatures(judge)(torch.rand(3, 3, 128, 128))
    w4, w16 = TINY.widths[1], TINY.widths[3]
    assert feats.shape == (3, w4 + 4 * w16)
    assert torch.isfinite(feats).all()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        JudgeConfig(image_size=60)
    with pytest.raises(ValueError):
        JudgeConfig(threshold=1.5)
    assert JudgeConfig.from_json(TINY.to_json()) == TINY


def test_shipped_judge_accuracy_on_fixed_renders() -> None:
    """Regression test of the shipped judge (estable/assets/judge.safetensors): on 64 fixed renders (the evaluation
    seed, both splits) it must stay near its recorded 99.7 % whole-scene accuracy. It measured 100 % on every
    attribute here when written; random weights score 0 (seen: object_colour 0.0)."""
    torch.manual_seed(0)
    report = judge_accuracy(load_default_judge(), 64, seed=judge_mod.EVAL_SEED, batch_size=32)
    assert report["scenes"] == 64 and report["objects"] > 100
    for key in ("object_colour", "object_shape", "object_size", "object_position", "count", "background_colour",
                "background_kind"):
        assert report[key] >= 0.97, (key, report[key])
    assert report["relation"] >= 0.95 and report["scene_exact"] >= 0.93, report
