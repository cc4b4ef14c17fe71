"""Training configurations: one dataclass per trainer, named presets, JSON files and ``key=value`` overrides.

A config is resolved in three layers: a base (a preset name defined below, or a JSON file holding any subset
of the fields; missing fields keep their defaults), then ``key=value`` overrides from the command line, then
validation. Dotted keys reach nested fields (``optim.lr=3e-4``, ``model.block_channels=[32,64]``); values are
parsed as JSON when they parse (numbers, lists, ``true``/``false``/``null``), otherwise taken as strings. An
unknown key is an error that lists the valid keys at that level.

The resolved config is written into the run folder (``config.json``) and into every checkpoint; a run's
``config.json`` is itself a valid ``--config`` file.

Glossary:
  batch_size    samples per process per micro-step; the global batch is batch_size × grad_accum × world size
  objective     what the U-Net predicts: "eps" (ε, Ho et al. 2020) or "v" (Salimans & Ho 2022, sec. 4)
  min_snr_gamma γ of min-SNR-γ loss weighting (Hang et al. 2023), None = uniform weights
  offset_noise  strength of the per-channel constant added to ε (Guttenberg 2023, "diffusion with offset noise")
  timestep_bias the noisiest `portion` of the training timesteps drawn `multiplier` times as often (uniform by default)
  role_contrast pair captions with their objects exchanged: the U-Net's error under them held above its error
                under the true caption (off by default)

Modules:
  plain.py     dict ⇄ dataclass conversion, the ``_Plain`` mixin (to_dict/from_dict/to_json/replace), number checks
  sections.py  what every trainer has: OptimConfig, DataConfig and TrainConfig (their common fields)
  trainers.py  one config per trainer and its own sections; CONFIG_CLASSES (trainer kind → config class)
  presets.py   PRESETS and resolving a config: load_config, apply_overrides, parse_value
Every name importers use is re-exported here: ``from estable.training.config import load_config, TrainConfig``.
"""

from estable.training.config.plain import build_dataclass
from estable.training.config.presets import PRESETS, apply_overrides, config_kind, load_config, parse_value
from estable.training.config.sections import LR_SCHEDULES, PRECISIONS, STRATEGIES, DataConfig, OptimConfig, TrainConfig
from estable.training.config.trainers import (
    CONFIG_CLASSES,
    CONTROL_KINDS,
    LORA_TARGETS,
    OBJECTIVES,
    CLIPModelConfig,
    CLIPTrainConfig,
    ControlNetTrainConfig,
    DiscriminatorConfig,
    ImageTowerConfig,
    LoRAConfig,
    LoRATrainConfig,
    SampleConfig,
    TextSource,
    TITrainConfig,
    UNetTrainConfig,
    VAESource,
    VAETrainConfig,
)

__all__ = [
    "CONFIG_CLASSES",
    "CONTROL_KINDS",
    "LORA_TARGETS",
    "LR_SCHEDULES",
    "OBJECTIVES",
    "PRECISIONS",
    "STRATEGIES",
    "PRESETS",
    "CLIPModelConfig",
    "CLIPTrainConfig",
    "ControlNetTrainConfig",
    "DataConfig",
    "DiscriminatorConfig",
    "ImageTowerConfig",
    "LoRAConfig",
    "LoRATrainConfig",
    "OptimConfig",
    "SampleConfig",
    "TITrainConfig",
    "TextSource",
    "TrainConfig",
    "UNetTrainConfig",
    "VAESource",
    "VAETrainConfig",
    "apply_overrides",
    "build_dataclass",
    "config_kind",
    "load_config",
    "parse_value",
]
