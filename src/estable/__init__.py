"""Estable: Stable Diffusion, end to end, on PyTorch.

The public API is imported lazily, so ``import estable`` stays light (no torch) until it is used:

    load_pipeline(source, device="auto", dtype="auto")   a model, ready to generate (estable.pipeline)
    Pipeline, GenerationResult                           txt2img / img2img / inpaint and their results
    GenerationParams                                     every parameter of one request (estable.params)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GenerationParams", "GenerationResult", "Pipeline", "__version__", "load_pipeline"]

_LAZY = {
    "GenerationParams": "estable.params",
    "GenerationResult": "estable.pipeline",
    "Pipeline": "estable.pipeline",
    "load_pipeline": "estable.pipeline",
}

if TYPE_CHECKING:
    from .params import GenerationParams
    from .pipeline import GenerationResult, Pipeline, load_pipeline


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'estable' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
