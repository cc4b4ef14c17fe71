"""Named presets and resolving a config: a base (preset, JSON file or dict) plus ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from estable.config import TextConfig, UNetConfig, VAEConfig
from estable.errors import EstableError
from estable.training.config.sections import DataConfig, OptimConfig, TrainConfig
from estable.training.config.trainers import (
    CONFIG_CLASSES,
    CLIPModelConfig,
    CLIPTrainConfig,
    ControlNetTrainConfig,
    ImageTowerConfig,
    LoRAConfig,
    LoRATrainConfig,
    SampleConfig,
    TextSource,
    TITrainConfig,
    UNetTrainConfig,
    VAESource,
    VAETrainConfig,
    check_sampler,
)

_TINY_VAE = VAEConfig(block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8, latent_channels=4,
                      scaling_factor=1.0, sample_size=32)
_TINY_TEXT = TextConfig(vocab_size=49408, max_positions=32, width=32, layers=2, heads=2, mlp_width=64)

PRESETS: dict[str, TrainConfig] = {
    # A few-second CPU smoke run on the shapes world at 32×32 (latents 4×8×8).
    "tiny-unet": UNetTrainConfig(
        model=UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                         num_heads=2, context_dim=32, norm_groups=8, sample_size=8),
        text=TextSource(config=_TINY_TEXT, tokenizer="shapes", max_length=32),
        vae=VAESource(config=_TINY_VAE),
        data=DataConfig(size=32, val_size=4),
        sample=SampleConfig(steps=4, prompts=("a red circle", "two blue squares")),
        batch_size=4, max_steps=100, ema_decay=0.999, optim=OptimConfig(lr=1e-3, warmup_steps=5),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    "tiny-vae": VAETrainConfig(
        model=_TINY_VAE,
        data=DataConfig(size=32, val_size=4),
        batch_size=4, max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=5),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    # A CLIP pair whose text tower (width 32) is a drop-in text encoder for tiny-unet (context_dim 32).
    "tiny-clip": CLIPTrainConfig(
        model=CLIPModelConfig(
            text=TextConfig(vocab_size=1024, max_positions=32, width=32, layers=2, heads=2, mlp_width=64,
                            projection_dim=32, eos_token_id=1023),
            image=ImageTowerConfig(stage_channels=(16, 32), blocks_per_stage=1, stem_stride=2, norm_groups=8),
            embed_dim=32,
        ),
        max_length=32, tokenizer_sample=2000, vocab_size=1024,
        data=DataConfig(size=32, val_size=16),
        batch_size=16, max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=5, weight_decay=0.1),
        log_every=5, val_every=25, sample_every=0, save_every=50,
    ),
    # Rank-4 adapters on the U-Net of a small model (set base=PATH).
    "tiny-lora": LoRATrainConfig(
        lora=LoRAConfig(rank=4, alpha=4.0),
        data=DataConfig(size=32, val_size=4),
        sample=SampleConfig(steps=4, prompts=("a red circle", "two blue squares")),
        batch_size=4, max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=5, weight_decay=0.0),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    # A ControlNet on a small model (set base=PATH): Canny edges of the shapes world.
    "tiny-controlnet": ControlNetTrainConfig(
        data=DataConfig(size=32, val_size=4),
        sample=SampleConfig(steps=4, prompts=("a red circle", "two blue squares")),
        batch_size=4, max_steps=100, optim=OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.0),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    # A new word for an unseen colour (teal) on the built-in model, CPU-sized.
    "tiny-ti": TITrainConfig(
        data=DataConfig(size=256, val_size=4, shapes_length=256),
        batch_size=4, max_steps=200, optim=OptimConfig(lr=5e-3, warmup_steps=10, weight_decay=0.0),
        log_every=10, val_every=50, sample_every=0, save_every=100,
    ),
}
_PRESET_KIND = {"tiny-unet": "unet", "tiny-vae": "vae", "tiny-clip": "clip", "tiny-lora": "lora",
                "tiny-controlnet": "controlnet", "tiny-ti": "ti"}


def config_kind(data: Any) -> str | None:
    """The trainer kind whose config has every top-level key of ``data`` (a run's config.json), when only one has."""
    if not isinstance(data, dict):
        return None
    kinds = [k for k, c in CONFIG_CLASSES.items() if set(data) <= {f.name for f in dataclasses.fields(c)}]
    return kinds[0] if len(kinds) == 1 else None


def _from_dict(kind: str, data: Any, name: str) -> TrainConfig:
    """``CONFIG_CLASSES[kind].from_dict(data)``; a config of another trainer (a VAE run's config.json given to the
    U-Net trainer) is said to be one, not listed key by unknown key."""
    try:
        return CONFIG_CLASSES[kind].from_dict(data)
    except ValueError:
        other = config_kind(data)
        if other is not None and other != kind:
            raise EstableError(f"{name} is for the {other} trainer, not {kind}") from None
        raise


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys) to a FULL config dict; returns a new dict.

    Values are JSON when they parse (``3e-4``, ``[32,64]``, ``true``, ``null``), else strings. A key that is
    not in the config is a ValueError naming the valid keys at that level.
    """
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
        parts = key.split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth])
            if not isinstance(node, dict):
                raise ValueError(f"config key {where!r} is a value, not a section; cannot set {key!r}")
            if part not in node:
                raise ValueError(
                    f"unknown config key {key!r}; valid keys{' under ' + repr(where) if where else ''}: "
                    f"{', '.join(sorted(node))}"
                )
            if depth == len(parts) - 1:
                node[part] = parse_value(raw)
            else:
                node = node[part]
    return out


def parse_value(raw: str) -> Any:
    """JSON if it parses (numbers, lists, objects, true/false/null), Python's None/True/False, else the string."""
    text = raw.strip()
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(kind: str, base: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Resolve a training config: ``base`` (preset name, JSON file, dict or None = defaults) + overrides.

    Raises EstableError for a missing file, bad JSON, an unknown key or an invalid value.
    """
    cls = CONFIG_CLASSES.get(kind)
    if cls is None:
        raise EstableError(f"unknown trainer {kind!r}; choose one of {', '.join(CONFIG_CLASSES)}")
    try:
        if base is None:
            cfg = cls()
        elif isinstance(base, dict):
            cfg = _from_dict(kind, base, "the config")
        elif str(base) in PRESETS:
            if _PRESET_KIND[str(base)] != kind:
                raise EstableError(f"preset {base!r} is for the {_PRESET_KIND[str(base)]} trainer, not {kind}")
            cfg = PRESETS[str(base)]
        else:
            path = Path(base)
            if path.is_dir():
                raise EstableError(f"config {str(base)!r} is a folder; give a JSON file or a preset name")
            if not path.is_file():
                names = ", ".join(n for n, k in _PRESET_KIND.items() if k == kind)
                raise EstableError(f"config {str(base)!r} is neither a file nor a preset (presets: {names})")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EstableError(f"{path}: not valid JSON ({exc})") from None
            except UnicodeDecodeError:
                raise EstableError(f"{path}: not a JSON text file (not UTF-8)") from None
            except OSError as exc:
                raise EstableError(f"cannot read the config {path}: {exc.strerror or exc}") from None
            cfg = _from_dict(kind, data, f"config {str(base)!r}")
        if overrides:
            cfg = cls.from_dict(apply_overrides(cfg.to_dict(), overrides))
        check_sampler(cfg)
    except ValueError as exc:
        raise EstableError(str(exc)) from None
    return cfg
