"""LoRA files as A1111 / kohya users share them, plus diffusers' PEFT-style files and the ``<lora:…>`` prompt tag.

kohya naming (sd-scripts ``networks/lora.py``; what A1111's built-in Lora extension reads), one safetensors
file for both networks:

    lora_unet_<module path, dots → underscores>.lora_down.weight     A (r, in) or conv (r, in, kh, kw)
    lora_unet_<…>.lora_up.weight                                     B (out, r) or conv (out, r, 1, 1)
    lora_unet_<…>.alpha                                              α, a 0-d tensor (absent or 0 ⇒ α = r)
    lora_te_<text-encoder module path, dots → underscores>.…        the same for the text encoder

For SD 1.x/2.x sd-scripts trains on a diffusers-layout U-Net, so the U-Net paths are diffusers' names
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); the text encoder is transformers'
CLIPTextModel (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). Some files (converted ones, and all
SDXL files from kohya's sgm U-Net) name the U-Net in the original LDM layout instead
(``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``); we read those through the U-Net's LDM key
table (``ldm.unet_key_map``), the same one the single-file loader uses, and always write diffusers-layout names.
Since module names contain underscores, the underscore name cannot be split back into a path by itself; we
resolve it against the actual model (every Linear/Conv2d path, dots → underscores).

diffusers' PEFT-style files (``pytorch_lora_weights.safetensors``) use dotted paths:
``unet.<path>.lora_A.weight`` (A) / ``unet.<path>.lora_B.weight`` (B), ``text_encoder.<path>.…``; α comes
from the ``lora_adapter_metadata`` JSON (``unet.lora_alpha``, ``unet.alpha_pattern``) when present, else α = r.

Metadata we write: kohya's ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``,
``ss_base_model_version`` (``sd_v1`` / ``sd_v2``), ``ss_v2``, and our own ``estable_lora`` JSON.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import UNetConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..nn.int8 import Int8Conv2d, Int8Linear
from ..nn.lora import LoRALayer, _candidates, _replace, lora_modules, wrap_layer
from .io import read_safetensors, write_safetensors
from .ldm import unet_key_map

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
FORMAT_VERSION = 1
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders/lora_base.py

Component = Literal["unet", "text_encoder"]
_COMPONENTS: tuple[Component, ...] = ("unet", "text_encoder")
_KOHYA_PREFIX: dict[Component, str] = {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX}

# Dotted key parts (regex, matched at the part's start) of adapter kinds that are not plain LoRA, with the name
# users know them by.
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"hada_", "LyCORIS LoHa"),
    (r"lokr_", "LyCORIS LoKr"),
    (r"lora_mid$", "LyCORIS LoCon with Tucker decomposition"),
    (r"dora_scale$", "DoRA"),
    (r"lora_magnitude_vector$", "DoRA"),
    (r"diff(_b)?$", "a full weight difference (LyCORIS 'full')"),
    (r"oft_", "OFT / BOFT"),
)


@dataclass(frozen=True)
class LoRAWeights:
    """One module's adapter: ``down`` (A), ``up`` (B) and α."""

    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoRAState:
    """A LoRA file's content, by module name as the file spells it (kohya: ``lora_unet_…``; PEFT: a dotted
    path without the ``unet.`` / ``text_encoder.`` prefix). Names are resolved against a model by :func:`apply_lora`.
    """

    unet: dict[str, LoRAWeights] = field(default_factory=dict)
    text_encoder: dict[str, LoRAWeights] = field(default_factory=dict)
    naming: Literal["kohya", "peft"] = "kohya"
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<tensors>"

    def __len__(self) -> int:
        return len(self.unet) + len(self.text_encoder)

    def ranks(self) -> collections.Counter[int]:
        return collections.Counter(w.rank for part in (self.unet, self.text_encoder) for w in part.values())


# ----------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------


def kohya_name(component: Component, path: str) -> str:
    """``("unet", "down_blocks.0.attentions.0.proj_in")`` → ``"lora_unet_down_blocks_0_attentions_0_proj_in"``."""
    return _KOHYA_PREFIX[component] + path.replace(".", "_")


def _layer_paths(model: nn.Module) -> list[str]:
    """Dotted paths of every Linear/Conv2d of ``model`` (adapter-wrapped ones included, their insides not)."""
    return [name for name, m in _candidates(model) if name and isinstance(m, (nn.Linear, nn.Conv2d))]


def _kohya_lookup(component: Component, model: nn.Module) -> dict[str, str]:
    """kohya underscore name → dotted module path, for every layer of ``model``.

    For a U-Net with a config, the original-LDM spellings (``lora_unet_input_blocks_1_1_…``) are added from
    the single-file key table.
    """
    paths = _layer_paths(model)
    table = {kohya_name(component, p): p for p in paths}
    if len(table) != len(paths):  # two paths that differ only in '.' vs '_' (never in our models)
        raise ValueError(f"{type(model).__name__}: module paths collide once dots become underscores")
    config = getattr(model, "config", None)
    if component == "unet" and isinstance(config, UNetConfig):
        known = set(paths)
        for row in unet_key_map(config, prefix=""):
            if not row.key.endswith(".weight"):
                continue
            ours, ldm = row.key[: -len(".weight")], row.ldm[: -len(".weight")]
            if ours in known:
                table.setdefault(UNET_PREFIX + ldm.replace(".", "_"), ours)
    return table


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _check_supported(keys: list[str], source: str) -> None:
    for key in keys:
        # kohya: "<name>.<kind>…"; PEFT: "<component>.<path>.<kind>…" – look at every dotted part after the first
        parts = key.split(".")[1:]
        for fragment, what in _UNSUPPORTED:
            if any(re.match(fragment, p) for p in parts):
                raise UnsupportedModelError(
                    f"{source}: key {key!r} belongs to {what}, which Estable does not implement; only plain LoRA "
                    "(lora_down/lora_up or lora_A/lora_B) files are supported"
                )


def _alpha_value(t: Tensor, key: str, source: str) -> float:
    if t.numel() != 1:
        raise CheckpointError(f"{source}: {key!r} should hold one number (α), it has shape {list(t.shape)}")
    if t.is_complex():
        raise CheckpointError(f"{source}: {key!r} should hold a real number (α), it is {t.dtype}")
    return float(t.float().item())


def _pair(source: str, name: str, down: Tensor, up: Tensor, alpha: float | None) -> LoRAWeights:
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise CheckpointError(
            f"{source}: {name}: LoRA factors must be 2-D (Linear) or 4-D (Conv2d), got down {list(down.shape)} "
            f"and up {list(up.shape)}"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise CheckpointError(f"{source}: {name}: lora_up must be a 1×1 convolution, got {list(up.shape)}")
    if down.shape[0] != up.shape[1]:
        raise CheckpointError(
            f"{source}: {name}: rank mismatch, lora_down has {down.shape[0]} rows but lora_up {up.shape[1]} columns"
        )
    if not (down.is_floating_point() and up.is_floating_point()):
        raise CheckpointError(f"{source}: {name}: LoRA factors must be floating-point tensors, got down {down.dtype} "
                              f"and up {up.dtype}")
    rank = int(down.shape[0])
    if rank < 1:
        raise CheckpointError(f"{source}: {name}: the LoRA has rank 0 (empty factors)")
    # A NaN or infinite α or factor would turn the merged weights into NaN: a black image blamed on the model.
    if (alpha is not None and not math.isfinite(alpha)) or not all(
            bool(torch.isfinite(t.float()).all()) for t in (down, up)):  # float(): isfinite has no fp8 kernel
        raise CheckpointError(f"{source}: {name}: the LoRA holds NaN or infinite values (α = {alpha}); the file is "
                              "corrupt")
    # kohya / A1111: a missing or zero alpha means α = r (scaling 1).
    return LoRAWeights(down=down, up=up, alpha=alpha if alpha else float(rank))


def _read_kohya(tensors: Mapping[str, Tensor], source: str) -> tuple[dict[str, LoRAWeights], dict[str, LoRAWeights]]:
    parts: dict[Component, dict[str, LoRAWeights]] = {"unet": {}, "text_encoder": {}}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, dot, rest = key.partition(".")
        if not dot or rest not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise CheckpointError(
                f"{source}: unexpected key {key!r}; a kohya LoRA has only <name>.lora_down.weight, "
                "<name>.lora_up.weight and <name>.alpha"
            )
        groups.setdefault(name, {})[rest] = t
    for name, g in groups.items():
        if name.startswith(("lora_te1_", "lora_te2_")):
            raise UnsupportedModelError(
                f"{source} is an SDXL LoRA ({name!r}: two text encoders); Estable loads SD 1.x/2.x LoRAs only"
            )
        if name.startswith(UNET_PREFIX):
            component: Component = "unet"
        elif name.startswith(TEXT_PREFIX):
            component = "text_encoder"
        else:
            raise CheckpointError(f"{source}: module name {name!r} starts with neither {UNET_PREFIX} nor {TEXT_PREFIX}")
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            missing = "lora_down.weight" if "lora_down.weight" not in g else "lora_up.weight"
            raise CheckpointError(f"{source}: {name} has no {missing}")
        alpha = _alpha_value(g["alpha"], f"{name}.alpha", source) if "alpha" in g else None
        parts[component][name] = _pair(source, name, g["lora_down.weight"], g["lora_up.weight"], alpha)
    return parts["unet"], parts["text_encoder"]


def _peft_alphas(metadata: Mapping[str, str], source: str) -> dict[str, Any]:
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{source}: metadata {PEFT_METADATA_KEY!r} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _peft_alpha(cfg: Mapping[str, Any], component: Component, path: str, rank: int) -> float:
    """α of one module from diffusers' LoRA config (``<component>.lora_alpha`` / ``.alpha_pattern``)."""
    alpha = cfg.get(f"{component}.lora_alpha")
    pattern = cfg.get(f"{component}.alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{component}.alpha_pattern should map module names to numbers, not {pattern!r}")
    for key, value in pattern.items():  # PEFT matches pattern keys as suffixes of the module path
        # Files written by diffusers and PEFT hold module names here. PEFT would also take any regular expression;
        # one from a file could take exponential time to match ("(a|aa)+x"), so only names are read.
        if not re.fullmatch(r"[\w.]+", key):
            raise ValueError(f"{component}.alpha_pattern key {key!r} is not a module name (Estable does not "
                             "evaluate regular expressions from files)")
        if path == key or path.endswith("." + key):
            alpha = value
            break
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise ValueError(f"the α of {component}.{path} should be a number, not {alpha!r}")
    alpha = float(rank) if alpha is None else float(alpha)
    if cfg.get(f"{component}.use_rslora"):  # rank-stabilised LoRA scales by α/√r; express it as α'/r
        alpha *= math.sqrt(rank)
    return alpha


def _read_peft(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str
) -> tuple[dict[str, LoRAWeights], dict[str, LoRAWeights]]:
    cfg = _peft_alphas(metadata, source)
    groups: dict[tuple[Component, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise CheckpointError(
                f"{source}: unexpected key {key!r}; a diffusers LoRA has unet.<path>.lora_A.weight / lora_B.weight "
                "and text_encoder.<path>.lora_A.weight / lora_B.weight"
            )
        component: Component = m.group(1)  # type: ignore[assignment]
        groups.setdefault((component, m.group(2)), {})[m.group(3)] = t
    parts: dict[Component, dict[str, LoRAWeights]] = {"unet": {}, "text_encoder": {}}
    for (component, path), g in groups.items():
        if "lora_A" not in g or "lora_B" not in g:
            raise CheckpointError(f"{source}: {component}.{path} has only {', '.join(g)}")
        down, up = g["lora_A"], g["lora_B"]
        try:
            alpha = _peft_alpha(cfg, component, path, int(down.shape[0]) if down.ndim else 1)
        except ValueError as exc:
            raise CheckpointError(f"{source}: metadata {PEFT_METADATA_KEY!r}: {exc}") from None
        weights = _pair(source, path, down, up, alpha)
        parts[component][path] = weights
    return parts["unet"], parts["text_encoder"]


def lora_state_from_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *, source: str = "<tensors>"
) -> LoRAState:
    """Parse LoRA tensors (kohya or diffusers-PEFT naming, detected from the keys) into a :class:`LoRAState`."""
    metadata = dict(metadata or {})
    keys = list(tensors)
    if not keys:
        raise CheckpointError(f"{source} holds no tensors")
    _check_supported(keys, source)
    if all(k.startswith("lora_") for k in keys):
        unet, text = _read_kohya(tensors, source)
        naming: Literal["kohya", "peft"] = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        unet, text = _read_peft(tensors, metadata, source)
        naming = "peft"
    elif any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        raise UnsupportedModelError(
            f"{source} uses diffusers' old attention-processor LoRA naming (…to_q_lora.down.weight); load it with "
            "diffusers and save it again (pipe.save_lora_weights) to get lora_A/lora_B names"
        )
    else:
        raise CheckpointError(
            f"{source} does not look like a LoRA file: expected keys such as "
            f"'{UNET_PREFIX}…lora_down.weight' or 'unet.….lora_A.weight', found {_listing(sorted(keys), 3)}"
        )
    return LoRAState(unet=unet, text_encoder=text, naming=naming, metadata=metadata, source=source)


def load_lora(path: str | os.PathLike[str]) -> LoRAState:
    """Read a LoRA ``.safetensors`` file (kohya/A1111 or diffusers naming) into a :class:`LoRAState`."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: LoRA files are read from .safetensors only (pickles can run code)")
    tensors, metadata = read_safetensors(path)
    return lora_state_from_tensors(tensors, metadata, source=path.name)


# ----------------------------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------------------------


def _fit(w: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """``w`` reshaped to ``shape`` when it differs only by trailing 1×1 dims (Linear ↔ 1×1 conv), else None."""
    if tuple(w.shape) == shape:
        return w
    if w.numel() == math.prod(shape) and tuple(w.shape[:2]) == tuple(shape[:2]) and all(
        d == 1 for d in (*w.shape[2:], *shape[2:])
    ):
        return w.reshape(shape)
    return None


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    assert isinstance(layer, nn.Conv2d)
    return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)


def _resolve(
    state: LoRAState, component: Component, model: nn.Module
) -> list[tuple[str, str, LoRAWeights]]:
    """(file name, module path, weights) for every module of one component; CheckpointError on unknown names."""
    weights = getattr(state, component)
    if state.naming == "kohya":
        lookup = _kohya_lookup(component, model)
    else:
        lookup = {p: p for p in _layer_paths(model)}
        if component == "text_encoder":  # transformers 5 names CLIPTextModel's modules without "text_model."
            lookup.update({p.removeprefix("text_model."): p for p in list(lookup) if p.startswith("text_model.")})
    unknown = sorted(n for n in weights if n not in lookup)
    if unknown:
        what = "U-Net" if component == "unet" else "text encoder"
        raise CheckpointError(
            f"{state.source}: {len(unknown)} LoRA module(s) do not exist in this {what}: {_listing(unknown)}. "
            "The LoRA was made for a different model (SD 1.x vs 2.x vs SDXL, or another architecture)"
        )
    return [(name, lookup[name], w) for name, w in weights.items()]


def apply_lora(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    state: LoRAState,
    scale: float = 1.0,
    merge: bool = False,
    *,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, LoRALayer]:
    """Add the adapters of ``state`` to the models in place; return them keyed ``"unet.<path>"`` /
    ``"text_encoder.<path>"``.

    Every name and shape is checked before any model is touched: a module the model lacks or a shape that does
    not fit raises :class:`CheckpointError` and leaves both models as they were. ``scale`` is the runtime
    multiplier (A1111's ``<lora:name:scale>``); ``merge`` bakes the update into the weights (still reversible
    with ``unmerge_lora`` / ``remove_lora(merge=False)``). Pass None for a network the LoRA does not touch.
    """
    models: dict[Component, nn.Module | None] = {"unet": unet, "text_encoder": text_encoder}
    plan: list[tuple[Component, str, nn.Module, LoRAWeights, Tensor, Tensor]] = []
    for component in _COMPONENTS:
        weights = getattr(state, component)
        if not weights:
            continue
        model = models[component]
        if model is None:
            raise ValueError(f"{state.source} has {component} weights ({len(weights)} modules); pass the {component}")
        what = "U-Net" if component == "unet" else "text encoder"
        if any(isinstance(m, (Int8Linear, Int8Conv2d)) for m in model.modules()):
            raise UnsupportedModelError(
                f"{state.source}: this model's {what} is quantised to int8 (estable convert --quantize int8); a LoRA "
                "cannot be merged into int8 weights: use the model before quantisation"
            )
        shape_errors: list[str] = []
        named: dict[str, str] = {}  # module path -> the file's name for it
        for file_name, path, w in _resolve(state, component, model):
            if path in named:  # e.g. one module under its diffusers and its LDM name: one would silently be lost
                raise CheckpointError(
                    f"{state.source}: {named[path]} and {file_name} are the same {what} module ({path}); the file "
                    "names each module once"
                )
            named[path] = file_name
            layer = model.get_submodule(path)
            if isinstance(layer, LoRALayer):
                raise ValueError(
                    f"{component}.{path} already has a LoRA adapter; remove_lora() it (or merge it with "
                    "remove_lora(model, merge=True)) before applying another"
                )
            down_shape, up_shape = _expected_shapes(layer, w.rank)
            down, up = _fit(w.down, down_shape), _fit(w.up, up_shape)
            if down is None or up is None:
                shape_errors.append(
                    f"{file_name}: down {list(w.down.shape)} / up {list(w.up.shape)} but {component}.{path} needs "
                    f"{list(down_shape)} / {list(up_shape)}"
                )
                continue
            plan.append((component, path, layer, w, down, up))
        if shape_errors:
            raise CheckpointError(
                f"{state.source}: {len(shape_errors)} LoRA module(s) do not fit this model: "
                f"{'; '.join(shape_errors[:3])}{' …' if len(shape_errors) > 3 else ''}. "
                "The LoRA was made for a different model (e.g. SD 1.x vs 2.x)"
            )
    applied: dict[str, LoRALayer] = {}
    for component, path, layer, w, down, up in plan:
        model = models[component]
        assert model is not None
        lora = wrap_layer(layer, rank=w.rank, alpha=w.alpha, dtype=dtype)
        with torch.no_grad():
            lora.lora_down.weight.copy_(down)
            lora.lora_up.weight.copy_(up)
        lora.scale = scale
        _replace(model, path, lora)  # type: ignore[arg-type]
        if merge:
            lora.merge()
        applied[f"{component}.{path}"] = lora
    return applied


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _as_layers(what: nn.Module | Mapping[str, LoRALayer] | None) -> dict[str, LoRALayer]:
    if what is None:
        return {}
    if isinstance(what, nn.Module):
        return lora_modules(what)
    return dict(what)


def lora_tensors(
    unet: nn.Module | Mapping[str, LoRALayer] | None = None,
    text_encoder: nn.Module | Mapping[str, LoRALayer] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The kohya-named tensors of the adapters of ``unet`` / ``text_encoder`` (models, or the path → layer
    dicts :func:`~estable.nn.lora.inject_lora` returns). ``dtype`` None keeps the adapters' dtype; α is float32.
    """
    out: dict[str, Tensor] = {}
    for component, what in (("unet", unet), ("text_encoder", text_encoder)):
        for path, layer in _as_layers(what).items():
            name = kohya_name(component, path)  # type: ignore[arg-type]
            if f"{name}.alpha" in out:
                raise ValueError(f"two modules map to the same LoRA name {name!r}")
            down = layer.lora_down.weight.detach()
            up = layer.lora_up.weight.detach()
            out[f"{name}.lora_down.weight"] = down.to(dtype) if dtype else down
            out[f"{name}.lora_up.weight"] = up.to(dtype) if dtype else up
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return out


def _base_model_version(unet: nn.Module | Mapping[str, LoRALayer] | None) -> str | None:
    config = getattr(unet, "config", None)
    if not isinstance(config, UNetConfig):
        return None
    return {768: "sd_v1", 1024: "sd_v2"}.get(config.context_dim)


def save_lora(
    path: str | os.PathLike[str],
    unet: nn.Module | Mapping[str, LoRALayer] | None = None,
    text_encoder: nn.Module | Mapping[str, LoRALayer] | None = None,
    *,
    dtype: torch.dtype | None = None,
    base_model_version: str | None = None,
    metadata: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write the adapters to a kohya/A1111-compatible ``.safetensors`` file (atomically); return the metadata.

    ``base_model_version`` is kohya's ``ss_base_model_version`` (``sd_v1`` / ``sd_v2``; guessed from the U-Net's
    context width when None). ``info`` is added to our ``estable_lora`` JSON (e.g. the training config);
    ``metadata`` adds or overrides string entries.
    """
    tensors = lora_tensors(unet, text_encoder, dtype=dtype)
    if not tensors:
        raise ValueError("save_lora: no LoRA layers found; inject_lora() the models (or pass its result) first")
    ranks = collections.Counter(int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = collections.Counter(float(t) for k, t in tensors.items() if k.endswith(".alpha"))
    dim = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    version = base_model_version or _base_model_version(unet) or "sd_v1"
    components = [c for c, w in (("unet", unet), ("text_encoder", text_encoder)) if _as_layers(w)]
    ours: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "naming": "kohya",
        "components": components,
        "rank": dim,
        "alpha": alpha,
        "ranks": sorted(ranks),
        "alphas": sorted(alphas),
        "modules": len(tensors) // 3,
    }
    ours.update(dict(info or {}))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": repr(float(alpha)),  # kohya writes the float, e.g. "8.0"
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "estable_lora": json.dumps(ours, sort_keys=True),
    }
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    write_safetensors(path, tensors, meta)
    return meta


# ----------------------------------------------------------------------------------------------------------
# A1111 prompt tags
# ----------------------------------------------------------------------------------------------------------

def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove ``<lora:name:weight>`` tags from ``prompt``; return the text to encode and ``[(name, weight)]``.

    Kept for callers of the first version; :func:`estable.extra_networks.parse_prompt_networks` is the full
    A1111 reading (separate text-encoder / U-Net multipliers). As in A1111 only the tags are cut out:
    ``"a cat <lora:ink:0.6>, sketch"`` → ``("a cat , sketch", [("ink", 0.6)])``.
    """
    from ..extra_networks import parse_prompt_networks

    text, tags = parse_prompt_networks(prompt)
    return text, [(t.name, t.te) for t in tags]
