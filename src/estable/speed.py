"""The fastest mode for inference: ``load_pipeline(..., speed="max")`` or ``estable generate --compile``.

What it does to a :class:`~estable.pipeline.Pipeline` (each step can be turned off in :class:`SpeedOptions`):

* **Fused projections.** Each attention's q/k/v (self-attention) or k/v (cross-attention) matrices are laid out
  as one matrix, so one matrix product replaces three or two (:meth:`Attention.fuse_projections`); the state
  dict is unchanged and the numbers are the same products.
* **Upsampling by phases** (``phase_upsample``): each upsampler's nearest-neighbour doubling and 3×3 convolution
  computed as one 2×2 convolution of the low-resolution input with four phases' kernels, then an interleave
  (:meth:`Upsample.fuse_phases`): 16 instead of 36 multiply-adds per output pixel and channel pair, the same
  numbers up to rounding; the state dict is unchanged. On an H200 it took 15 % off the VAE decode and about 1 % off
  the U-Net call at batch 8 (RESULTS.md, fifteenth GPU run).
* **channels_last.** The convolutions' weights and the U-Net's input in NHWC layout, the layout the tensor-core
  convolution kernels read without transposing; the spatial transformer then flattens pixels to tokens with no
  copy.
* **torch.compile, regionally.** Each repeated block (every ``ResnetBlock``, ``SpatialTransformer`` and
  ``Upsample`` of the U-Net, the VAE decoder's ResNet blocks, attention and upsamplers) is compiled on its own
  with Inductor, which fuses GroupNorm + SiLU, LayerNorm, GEGLU and the residual adds into few kernels. Blocks
  of one class share one compiled graph per input shape, so compiling costs a few dozen small graphs instead of
  one huge one; the glue between blocks runs eagerly. ``regional=False`` compiles the whole U-Net in one graph instead.
  ``resnet_mode="max-autotune-no-cudagraphs"`` autotunes the ResNet blocks' convolutions only (Inductor's Triton
  templates against cuDNN; at batch 2 on an H200 some shapes ran 40 % faster, RESULTS.md) at a cost of minutes of
  compiling per new shape, kept by the disk cache.
* **CUDA graphs** (Estable's :class:`~estable.nn.cuda_graph.GraphedForward`) replay the compiled U-Net per
  batch shape, which removes the remaining launch overhead.
* **A compile cache on disk**: Inductor's caches (compiled kernels, autotuning results, the shapes it saw as
  dynamic) go to ``$ESTABLE_COMPILE_CACHE`` (default ``~/.cache/estable/compile``) unless
  ``TORCHINDUCTOR_CACHE_DIR`` is already set, so a second process skips code generation; the process also
  saves torch's portable "mega-cache" of what it compiled there at exit and loads it at start.
* **Attention kernel**: ``sdpa="cudnn"`` (or "flash", "efficient", "math") puts that SDPA backend first;
  None keeps torch's own choice.

The cost is start-up time: the first image at a new size (batch shape) compiles the blocks, one static graph per
block shape (``dynamic=True`` compiles size-generic graphs instead); later calls at that size replay. Everything
stays within rounding of the eager path (fp32 on the CPU: tests/test_speed.py).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EstableError

__all__ = ["SPEEDS", "SpeedOptions", "accelerate", "compile_blocks", "compile_cache_dir", "fuse_phases",
           "fuse_projections", "refresh_derived", "resolve_speed", "sdpa_context"]

SPEEDS = ("default", "max")
_SDPA = ("cudnn", "flash", "efficient", "math")
_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedOptions:
    """What ``speed="max"`` turns on; ``SpeedOptions(compile=False)`` etc. turn parts off."""

    fuse_qkv: bool = True
    phase_upsample: bool = True  # upsampler + its convolution by phases (Upsample.fuse_phases)
    channels_last: bool = True
    # the VAE's layout when it should differ from the U-Net's (None: as ``channels_last``); on an H100 the decode
    # alone ran 1.2 ms faster in NCHW beside a channels_last U-Net (benchmarks/RESULTS.md; not yet measured whole)
    vae_channels_last: bool | None = None
    compile: bool = True
    regional: bool = True  # compile each repeated block; False: the whole U-Net as one graph
    compile_vae: bool = True  # the VAE decoder's blocks too
    mode: str = "default"  # torch.compile mode; "max-autotune-no-cudagraphs" tunes kernels (slow to compile)
    # The ResNet blocks' mode when it should differ (None: ``mode``): "max-autotune-no-cudagraphs" tunes their
    # convolutions (Triton templates against cuDNN) and leaves the attention blocks' matrix products to cuBLAS
    resnet_mode: str | None = None
    # torch.compile's dynamic. False (default): one static graph per block shape; a new batch or image size compiles
    # again (then cached on disk). None ("automatic dynamic") is wrong for regional compilation: blocks of one class
    # share one code object, so their different shapes would turn every size symbolic (slower kernels, and Inductor
    # failures seen in training: "cannot determine truth value of Relational"). True: symbolic from the start.
    dynamic: bool | None = False
    # Images the VAE decoder takes at once. None: the whole batch. 1: image by image, so the compiled decoder sees
    # one shape whatever the batch size and a new batch size compiles the U-Net's blocks only (with dynamic=True,
    # nothing: its blocks otherwise specialise on a batch of 1 and compile again at the first larger batch).
    decode_batch: int | None = None
    cuda_graphs: bool = True  # replay the (compiled) U-Net as CUDA graphs on a GPU
    sdpa: str | None = None  # None: torch's choice; "cudnn", "flash", "efficient" or "math" first
    cache_dir: str | None = None  # None: $ESTABLE_COMPILE_CACHE or ~/.cache/estable/compile; "": leave torch's

    def __post_init__(self) -> None:
        if self.sdpa is not None and self.sdpa not in _SDPA:
            raise EstableError(f"unknown SDPA backend {self.sdpa!r}; use one of {', '.join(_SDPA)} (or None)")
        if self.resnet_mode is not None and not self.regional:
            raise EstableError("resnet_mode needs regional compilation (regional=True): the whole U-Net compiled "
                               "as one graph has one mode")
        if self.decode_batch is not None and self.decode_batch < 1:
            raise EstableError(f"decode_batch must be 1 or more (or None: the whole batch), not {self.decode_batch}")
        for mode in (self.mode, self.resnet_mode):
            if mode is not None and mode not in _MODES:
                raise EstableError(f"compile mode {mode!r} is not supported here; use 'default' or "
                                   "'max-autotune-no-cudagraphs' (Estable records CUDA graphs itself)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_speed(speed: str | SpeedOptions | None) -> SpeedOptions | None:
    """``None``/"default" → None (plain eager + CUDA graphs), "max" → every option, a SpeedOptions as given."""
    if speed is None or isinstance(speed, SpeedOptions):
        return speed
    if str(speed).lower() == "default":
        return None
    if str(speed).lower() == "max":
        return SpeedOptions()
    raise EstableError(f"unknown speed {speed!r}; use one of {', '.join(SPEEDS)}")


# ------------------------------------------------------------------------------------------------ pieces


def fuse_projections(model: nn.Module) -> int:
    """Fuse the projections of every attention in ``model``; returns how many were fused."""
    from .nn.attention import Attention

    return sum(bool(m.fuse_projections()) for m in model.modules() if isinstance(m, Attention))


def fuse_phases(model: nn.Module) -> int:
    """Compute every upsampler of ``model`` by phases (:meth:`Upsample.fuse_phases`); returns how many."""
    from .nn.resnet import Upsample

    return sum(bool(m.fuse_phases()) for m in model.modules() if isinstance(m, Upsample))


def refresh_derived(*models: nn.Module) -> None:
    """Derive the upsamplers' phase kernels again after weights changed in place (a LoRA merged, a VAE loaded);
    the fused attention projections are views and need nothing."""
    from .nn.resnet import Upsample

    for model in models:
        for m in model.modules():
            if isinstance(m, Upsample):
                m.refresh_phases()


def unfuse_projections(model: nn.Module) -> None:
    from .nn.attention import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.unfuse_projections()


def _raise_recompile_limit(n: int = 256) -> None:
    # One code object (ResnetBlock.forward) serves every block of the class, one compiled graph per input shape:
    # SD 1.5 has ~20 distinct ResNet shapes, more than torch's default limit of 8 recompilations.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 4 * n:
            setattr(cfg, name, 4 * n)


def block_types() -> tuple[type[nn.Module], ...]:
    """The blocks compiled one by one. Upsample is there for its nearest-neighbour interpolation, which ran
    eagerly at 2.1 ms of a 512² image on the H200 (RESULTS.md, fifth GPU run): 3 upsamplers × 25 steps, so about
    28 µs a call for a copy of a few MB. What compiling it gained was not measured on its own."""
    from .nn.attention import SpatialSelfAttention, SpatialTransformer
    from .nn.resnet import ResnetBlock, Upsample

    return (ResnetBlock, SpatialTransformer, SpatialSelfAttention, Upsample)


def compile_blocks(model: nn.Module, *, mode: str = "default", dynamic: bool | None = False,
                   resnet_mode: str | None = None) -> int:
    """``torch.compile`` every repeated block of ``model`` in place (``nn.Module.compile``: the state dict keeps
    its keys, no ``_orig_mod.``), the ResNet blocks with ``resnet_mode`` when given; returns how many blocks."""
    from .nn.resnet import ResnetBlock

    _raise_recompile_limit()
    kinds = block_types()
    n = 0
    for m in model.modules():
        if isinstance(m, kinds):
            m.compile(mode=resnet_mode if resnet_mode and isinstance(m, ResnetBlock) else mode, dynamic=dynamic)
            n += 1
    return n


def sdpa_context(backend: str | None) -> Any:
    """A context that puts ``backend`` first among SDPA's kernels (the others stay as fallbacks)."""
    import contextlib

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    order = [first] + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities, only the set of allowed kernels
        return sdpa_kernel(order)


# ------------------------------------------------------------------------------------------------ the cache


def compile_cache_dir(options: SpeedOptions) -> Path | None:
    """Where Inductor's caches go (None: torch's own default), created; sets TORCHINDUCTOR_CACHE_DIR if unset."""
    if options.cache_dir == "":
        return None
    user = _user_inductor_dir()
    if user is not None and options.cache_dir is None:
        return Path(user)
    root = Path(options.cache_dir or os.environ.get("ESTABLE_COMPILE_CACHE")
                or Path.home() / ".cache" / "estable" / "compile").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"compile cache {root} cannot be created ({exc}); using torch's default", RuntimeWarning,
                      stacklevel=3)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
    return root


def _user_inductor_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR when a user set it (torch writes its own default there once it has looked)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if value is None:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(value) == os.path.abspath(default_cache_dir()):
            return None
    except ImportError:  # another torch layout: take the variable as the user's
        pass
    return value


class _MegaCache:
    """torch.compiler's portable cache of this process's compiled artifacts (torch >= 2.7), one file per
    (torch version, device) in the cache folder: loaded before compiling, saved at exit when new ones were made."""

    _saved_once = False

    def __init__(self, root: Path, device: torch.device) -> None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        key = hashlib.sha256(f"{torch.__version__}|{name}".encode()).hexdigest()[:16]
        self.path = root / f"mega-{key}.bin"

    def load(self) -> bool:
        load = getattr(torch.compiler, "load_cache_artifacts", None)
        if load is None or not self.path.is_file():
            return False
        try:
            load(self.path.read_bytes())
            return True
        except Exception as exc:  # a stale or foreign file: compile from scratch
            warnings.warn(f"ignoring the compile cache {self.path}: {exc}", RuntimeWarning, stacklevel=2)
            return False

    def save(self) -> None:
        save = getattr(torch.compiler, "save_cache_artifacts", None)
        if save is None:
            return
        try:
            got = save()
            if got is None:
                return
            blob = got[0]
            if blob and (not self.path.is_file() or len(blob) > self.path.stat().st_size):
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, self.path)
        except Exception:  # never fail a run at exit because of the cache
            pass

    def save_at_exit(self) -> None:
        if not _MegaCache._saved_once:
            _MegaCache._saved_once = True
            atexit.register(self.save)


# ------------------------------------------------------------------------------------------------ the pipeline


def accelerate(unet: nn.Module, vae: nn.Module, device: torch.device, options: SpeedOptions,
               ) -> Callable[..., torch.Tensor]:
    """Apply ``options`` to ``unet`` and ``vae`` in place; returns the U-Net forward the samplers should call
    (``forward(sample, timestep, context)``)."""
    from .nn.cuda_graph import GraphedForward

    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.channels_last if options.vae_channels_last is None else options.vae_channels_last:
        vae.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        fuse_projections(unet)
        fuse_projections(vae.decoder)
    if options.phase_upsample:
        fuse_phases(unet)
        fuse_phases(vae.decoder)
    if options.compile:
        root = compile_cache_dir(options)
        if root is not None:
            cache = _MegaCache(root, device)
            cache.load()
            cache.save_at_exit()
        if options.regional:
            compile_blocks(unet, mode=options.mode, dynamic=options.dynamic, resnet_mode=options.resnet_mode)
        else:
            _raise_recompile_limit()
            unet.compile(mode=options.mode, dynamic=options.dynamic, fullgraph=True)
        if options.compile_vae:  # the same mode for every ResnetBlock: its blocks share one code object
            compile_blocks(vae.decoder, mode=options.mode, dynamic=options.dynamic, resnet_mode=options.resnet_mode)

    layout = torch.channels_last if options.channels_last else torch.contiguous_format
    backend = options.sdpa

    def forward(sample: torch.Tensor, timestep: Any, context: torch.Tensor) -> torch.Tensor:
        with sdpa_context(backend):
            return unet(sample.contiguous(memory_format=layout), timestep, context)

    if options.cuda_graphs and device.type == "cuda":
        return GraphedForward(forward)  # type: ignore[arg-type]
    return forward


def describe(options: SpeedOptions | None) -> str:
    if options is None:
        return "default"
    base = SpeedOptions()
    changed = {k: v for k, v in options.to_dict().items() if getattr(base, k) != v}
    return "max" if not changed else "max(" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")"


def with_options(options: SpeedOptions, **changes: Any) -> SpeedOptions:
    return replace(options, **changes)
