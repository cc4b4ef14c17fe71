"""benchmarks/fid_sensitivity.py (what the judge-feature FID responds to) and benchmarks/background_kinds.py (which
background kinds a model draws): the probes behind issue 11's FID section in RESULTS.md do what it says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import background_kinds  # noqa: E402
import fid_sensitivity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_border_range_is_zero_on_a_plain_background_and_the_ramp_on_a_gradient():
    plain = Image.new("RGB", (64, 64), (40, 90, 200))
    assert background_kinds.border_range(plain) == 0.0
    ramp = np.repeat(np.linspace(0, 100, 64, dtype=np.float32)[None, :, None], 64, 0).repeat(3, 2)
    spread = background_kinds.border_range(Image.fromarray(ramp.astype(np.uint8)))
    assert 80 < spread <= 100  # 10th to 90th percentile of a 0–100 ramp, its ends weighed up by the side columns


def test_table_counts_judged_kinds_per_true_kind():
    t = background_kinds.table(["plain", "plain", "gradient"], ["plain", "textured", "gradient"])
    assert t["plain"] == {"plain": 1, "gradient": 0, "textured": 1}
    assert t["gradient"]["gradient"] == 1 and sum(t["textured"].values()) == 0


def test_changes_edit_the_scenes_and_restore_the_renderer():
    scene_edit, image_edit, constants = fid_sensitivity.CHANGES["every background plain (no gradient or texture)"]
    images = list(fid_sensitivity.changed_renders(6, scene_edit, image_edit, constants, seed=0))
    assert all(background_kinds.border_range(im) == 0.0 for im in images)
    untouched = list(fid_sensitivity.changed_renders(6, None, None, {}, seed=0))
    assert any(background_kinds.border_range(im) > 10 for im in untouched)  # the world draws gradients and textures

    amplitude = fid_sensitivity.render_module.NOISE_AMPLITUDE
    _, _, half = fid_sensitivity.CHANGES["textures and gradients at half contrast"]
    assert half["NOISE_AMPLITUDE"] == 0.5 * amplitude
    renders = fid_sensitivity.changed_renders(2, None, None, half, seed=0)
    next(renders)
    during = fid_sensitivity.render_module.NOISE_AMPLITUDE
    list(renders)
    after = fid_sensitivity.render_module.NOISE_AMPLITUDE
    assert during == 0.5 * amplitude and after == amplitude  # set while the set renders, put back after


def test_a_change_the_fid_sees_scores_above_the_floor(tmp_path):
    out = tmp_path / "fid.json"
    floor, plain = "none (the floor)", "every background plain (no gradient or texture)"
    fid_sensitivity.main(["--count", "96", "--only", floor, "--only", plain, "--out", str(out)])
    fid = json.loads(out.read_text())["fid"]
    assert set(fid) == {floor, plain}
    assert fid[plain] > 2 * fid[floor]


def test_background_kinds_reports_kinds_and_fid(tmp_path):
    background_kinds.main(["--count", "3", "--steps", "2", "--fid", "--device", "cpu", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "background_kinds.json").read_text())
    named, unnamed = res["caption names the background"], res["caption does not"]
    assert named["scenes"] + unnamed["scenes"] == 3
    tables = [part["model, judged (true kind → judged)"] for part in (named, unnamed)]
    assert sum(n for t in tables for row in t.values() for n in row.values()) == 3
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert Image.open(tmp_path / "background_kinds.png").size == (3 * 128, 256)


def test_background_kinds_of_the_empty_prompt(tmp_path, monkeypatch):
    seen: list[list[str]] = []
    real = background_kinds.model_generator

    def recording(args, pipe=None):
        generate = real(args, pipe)

        def wrapped(texts, seeds):
            seen.append(list(texts))
            return generate(texts, seeds)
        return wrapped

    monkeypatch.setattr(background_kinds, "model_generator", recording)
    background_kinds.main(["--count", "3", "--steps", "2", "--cfg", "1", "--empty-prompt", "--device", "cpu",
                           "--out", str(tmp_path)])
    assert seen and all(t == "" for texts in seen for t in texts)  # every image from the empty prompt
    res = json.loads((tmp_path / "background_kinds.json").read_text())
    world, model = res["all backgrounds: world's kinds / the empty prompt's, judged"]
    assert sum(world.values()) == sum(model.values()) == 3
    grey_world, grey_model = res["all backgrounds: world's grey ones / the empty prompt's, judged"]
    assert 0 <= grey_world <= 3 and 0 <= grey_model <= 3
    kinds_world, kinds_model = res["grey backgrounds' kinds: world's / the empty prompt's, judged"]
    assert sum(kinds_world.values()) == grey_world and sum(kinds_model.values()) == grey_model


def test_append_goes_only_after_captions_that_name_no_background():
    from estable.training.shapes import ShapesWorld

    scenes = [ShapesWorld("heldout", 7).scene(i) for i in range(40)]
    silent = [s for s in scenes if not s.background.mentioned]
    named = [s for s in scenes if s.background.mentioned]
    assert silent and named
    assert all(background_kinds.caption(s, "on a textured background") == s.caption + " on a textured background"
               for s in silent)
    assert all(background_kinds.caption(s, "on a textured background") == s.caption for s in named)
    assert all(background_kinds.caption(s, None) == s.caption for s in scenes)
