"""The seeded random streams of a training run.

A run is a function of its config: every random stream (model init, the frozen random networks, the per-step
draws, the validation draws and data, the global generators) gets its own seed, derived from ``config.seed`` and a
fixed stream number, so that adding a stream never shifts another.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# Stream numbers: each seeded stream of a run gets its own seed (model init, frozen random networks, draws, …).
SEED_INIT, SEED_TEXT, SEED_VAE, SEED_DRAWS, SEED_VAL, SEED_VAL_DATA, SEED_GLOBAL = 0, 1, 2, 3, 4, 5, 6


def seeded(seed: int, stream: int) -> int:
    """The seed of stream ``stream`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + stream * 7_919) % (2**63)


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the CPU one, and CUDA's through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)
