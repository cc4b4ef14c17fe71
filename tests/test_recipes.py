"""Every training config in recipes/default is a valid config of its trainer (a recipe a user copies must load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from estable.training.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "default"
KINDS = ("controlnet", "clip", "lora", "unet", "vae")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.json")), ids=lambda p: p.name)
def test_recipe_config_loads(path):
    kind = next((k for k in KINDS if path.name.startswith(k)), None)
    assert kind is not None, f"{path.name}: name it after its trainer ({', '.join(KINDS)})"
    cfg = load_config(kind, path)
    assert cfg.max_steps > 0


def test_relations_ablation_trains_in_segments_and_scores_each_scale(tmp_path):
    """recipes/default/relations_ablation.py (the grow32 stage's driver), on a tiny model: the start scored once, then
    one JSON line per segment and guidance scale; the run resumes across segments, and a grown U-Net trains."""
    import json
    import os
    import subprocess
    import sys

    from test_train_lora import make_base  # the tests folder is on the path, as for the other tests

    base = make_base(tmp_path / "base.safetensors")
    out = tmp_path / "abl.jsonl"
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "relations_ablation.py"), "--config", "tiny-unet", "--run-dir",
         str(tmp_path / "run"), "--every", "1", "--eval-start", "--cfg", "1", "--cfg", "4", "--prompts", "2",
         "--images-per-prompt", "1", "--steps", "2", "--out", str(out), f"init_from={base}", f"text.source={base}",
         f"vae.source={base}", "grow_attention=[1]", "max_steps=2", "device=cpu", "tensorboard=false",
         "sample_every=0", "val_every=0", "save_every=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["cfg"]) for r in rows] == [(0, 1.0), (0, 4.0), (1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)]
    assert all(0 <= r["by_kind"]["pair"]["whole_prompt"] <= 1 for r in rows)
    from estable.checkpoints.store import load_model

    assert load_model(tmp_path / "run" / "model.safetensors").unet.config.attention_levels == (True, True)
