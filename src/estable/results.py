"""What a generation gives back and writes: the images with their seeds, A1111 infotexts and Estable records.

:class:`GenerationResult` is what :class:`~estable.pipeline.Pipeline` returns; :func:`save_result` writes it as PNGs
with both texts embedded; :func:`params_from_record` reads the parameters back out of a record. The infotext is
A1111's ``parameters`` text (:mod:`estable.provenance.infotext` formats it); the record (``RECORD_FORMAT``) holds
every parameter that makes the very image again, the model's identity and the run it came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from . import __version__
from .embeddings import ti_hashes_text
from .errors import EstableError
from .extra_networks import lora_hashes_text
from .outputs import OutputPlan
from .params import GenerationParams
from .provenance.infotext import format_infotext

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .sampling.samplers import SamplerSpec

__all__ = ["RECORD_FORMAT", "GenerationResult", "a1111_sampler_label", "image_infotext", "image_record",
           "params_from_record", "save_result"]

RECORD_FORMAT = "estable.generation/1"
_KARRAS_SUFFIX = " Karras"


@dataclass
class GenerationResult:
    """The images of one request, with each image's seed, infotext and Estable record (same order).

    Iterating, indexing and ``len`` go over the images, so a result can be used as a list of PIL images.
    """

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    records: list[dict[str, Any]]
    params: GenerationParams  # the request with its seed resolved (the seed of image 0)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return self.images[index]


def params_from_record(record: dict[str, Any]) -> GenerationParams:
    """The GenerationParams stored in an Estable record (the ``estable`` PNG chunk), validated."""
    if not isinstance(record, dict) or not isinstance(record.get("params"), dict):
        raise EstableError("the Estable metadata record has no 'params' object; was the image made by Estable?")
    try:
        return GenerationParams.from_dict(record["params"])
    except TypeError as exc:
        raise EstableError(f"the Estable metadata record has invalid parameters: {exc}") from None


def save_result(result: GenerationResult, out: str | Path, *, start: int | None = None,
                overwrite: bool = False, inputs: Sequence[str | Path | None] = ()) -> list[Path]:
    """Write every image of ``result`` as a PNG with its infotext and record; return the paths.

    ``out`` is a ``.png`` file name (one image: that file; several: ``name-0.png``, ``name-1.png``, …) or a
    folder (created if needed), where files are numbered ``00000-<seed>.png`` after the highest number there
    (from ``start`` when given). An existing file is not replaced unless ``overwrite``, and none of ``inputs`` ever
    is (:class:`estable.outputs.OutputPlan`, which also writes a long run batch by batch).
    """
    return OutputPlan(out, len(result), overwrite=overwrite, inputs=inputs, start=start).save(result)


def a1111_sampler_label(spec: SamplerSpec) -> tuple[str, str | None]:
    """A1111's (sampler, schedule type) for a sampler: ("DPM++ 2M", "Karras") for "DPM++ 2M Karras", as A1111 ≥ 1.9
    names them in infotexts and API answers; (label, None) when the schedule is the sampler's own."""
    if spec.label.endswith(_KARRAS_SUFFIX):
        return spec.label[: -len(_KARRAS_SUFFIX)], "Karras"
    return spec.label, None


def _num(v: float) -> float | int:
    """7.0 -> 7 as A1111 writes whole numbers; other values unchanged."""
    v = float(v)
    return int(v) if v.is_integer() else v


def image_infotext(pipe: Pipeline, spec: SamplerSpec, params: GenerationParams, seed: int, mode: str,
                   width: int, height: int) -> str:
    """The A1111 ``parameters`` text of one image that ``pipe`` made with sampler ``spec``."""
    from .hires import hires_infotext

    label, schedule = a1111_sampler_label(spec)
    clip_skip = params.clip_skip or pipe.config.clip_skip
    fields: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": label,
        "Schedule type": schedule,
        "CFG scale": _num(params.cfg_scale),
        "CFG start": _num(params.cfg_start) if params.cfg_start and params.cfg_scale > 1 else None,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": pipe.model_hash,
        "Model": pipe.model_name,
        "VAE hash": pipe.vae_info["hash"] if pipe.vae_info else None,
        "VAE": pipe.vae_info["name"] if pipe.vae_info else None,
        "Denoising strength": _num(params.strength) if mode != "txt2img" else (
            _num(params.hires_strength) if params.hires_scale > 1 else None),
        **hires_infotext(params, mode),
        "Clip skip": clip_skip if clip_skip != 1 else None,
        "Eta": _num(params.eta) if spec.name == "ddim" and params.eta else None,
        "Lora hashes": lora_hashes_text(pipe.lora_stack.active),
        "TI hashes": ti_hashes_text(pipe.used_embeddings),
        "Version": f"estable {__version__}",
    }
    return format_infotext(params.prompt, params.negative_prompt, fields)


def image_record(pipe: Pipeline, spec: SamplerSpec, params: GenerationParams, seed: int, mode: str, width: int,
                 height: int, run: dict[str, Any]) -> dict[str, Any]:
    """The Estable JSON record of one image that ``pipe`` made: the parameters that make this very image again (its
    own seed, one image, the resolved size and clip skip), the model's identity and the run it came from."""
    own = dataclasses.replace(
        params, seed=seed, batch_size=1, batch_count=1, width=width, height=height,
        clip_skip=params.clip_skip or pipe.config.clip_skip, sampler=spec.name,
    )
    return {
        "format": RECORD_FORMAT,
        "estable_version": __version__,
        "mode": mode,
        "params": own.to_dict(),
        "sampler": {"name": spec.name, "label": spec.label},
        "model": {
            "name": pipe.model_name,
            "source": str(Path(pipe.model.source).resolve()),
            "format": pipe.model.format,
            "sha256": pipe.model_sha256,
            "hash": pipe.model_hash,
            "prediction_type": pipe.config.schedule.prediction_type,
        },
        "run": run,
        "loras": [s.to_record() for s in pipe.lora_stack.active],
        "vae": pipe.vae_info,
        "embeddings": [{"name": e.name, "path": str(e.path) if e.path else None, "hash": e.short_hash}
                       for e in pipe.used_embeddings],
    }
