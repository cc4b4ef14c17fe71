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
