"""The trainer kinds of ``estable train KIND`` and where their classes live: the one place that maps a kind to
its Trainer.

A trainer module is imported on first use (a run loads only its own trainer, and ``estable --help`` no training
code). No trainer module imports this one and :mod:`estable.training.loop` imports no trainer, so the training
modules form no import circle (``tests/test_training_registry.py`` checks both, and that every entry resolves).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estable.errors import EstableError

if TYPE_CHECKING:
    from estable.training.config import TrainConfig
    from estable.training.loop import Trainer

# kind → "module:Class"
TRAINERS: dict[str, str] = {
    "unet": "estable.training.unet_trainer:UNetTrainer",
    "vae": "estable.training.vae_trainer:VAETrainer",
    "clip": "estable.training.clip_trainer:CLIPTrainer",
    "lora": "estable.training.lora_trainer:LoRATrainer",
    "controlnet": "estable.training.controlnet_trainer:ControlNetTrainer",
    "ti": "estable.training.ti_trainer:TITrainer",
}
TRAINER_KINDS = tuple(TRAINERS)


def trainer_class(kind: str) -> type[Trainer]:
    """The Trainer subclass for ``kind`` (its module is imported now)."""
    if kind not in TRAINERS:
        raise EstableError(f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}")
    module, name = TRAINERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def make_trainer(kind: str, config: TrainConfig, run_dir: str | Path, **kwargs: Any) -> Trainer:
    """The trainer for ``kind`` (one of :data:`TRAINER_KINDS`) on ``config``, writing into ``run_dir``."""
    return trainer_class(kind)(config, run_dir, **kwargs)


__all__ = ["TRAINERS", "TRAINER_KINDS", "make_trainer", "trainer_class"]
