"""Weight-only int8 quantisation of a whole loaded model (``estable convert … --quantize int8``).

Every ``nn.Linear`` and ``nn.Conv2d`` of the U-Net, the VAE and the text encoder becomes an int8 layer with one
scale per output channel (:mod:`estable.nn.int8`); embeddings, norms and biases stay in floating point. The
model is then saved as an Estable file (metadata ``quantization``), which loads back into the same int8 layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import EstableError
from ..nn.int8 import is_quantized, quantize_model
from .store import COMPONENTS

if TYPE_CHECKING:
    from .store import LoadedModel


def quantize_model_int8(model: LoadedModel) -> dict[str, int]:
    """Quantise ``model``'s networks in place; returns the number of int8 layers per component."""
    out = {}
    for name in COMPONENTS:
        net = getattr(model, name)
        if is_quantized(net.state_dict()):
            raise EstableError(f"{model.source} is already quantised to int8")
        with torch.no_grad():
            out[name] = len(quantize_model(net))
    return out
