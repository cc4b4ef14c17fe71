"""Generation: txt2img, img2img and inpainting on top of the models and the samplers.

One request is a :class:`~estable.params.GenerationParams`; :func:`load_pipeline` reads a model and
:class:`Pipeline` runs requests on it. The pixels are those of diffusers' ``StableDiffusionPipeline``,
``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` for the same model, seed, sampler
and settings (tests/test_pipeline.py holds the two side by side), because every step below follows the
reference's order of operations:

1. **Prompts.** Positive and negative prompts are cut into 77-token windows (A1111 weighting syntax, long
   prompts: :mod:`estable.prompts`), padded to the same number of windows, encoded window by window at the
   requested CLIP layer, re-weighted and concatenated. A plain prompt of ≤ 75 tokens is exactly the single
   window diffusers' tokenizer call produces.
2. **Noise.** Image k of a run uses seed + k. Each image owns a CPU ``torch.Generator`` seeded with its seed;
   its initial noise is a float32 draw of shape (1, 4, H/8, W/8) from it, and the same generator then feeds
   every later random draw of that image (VAE posterior samples, ancestral / SDE / LCM noise), in diffusers'
   order. diffusers does exactly this when given a list of CPU generators, so an image does not depend on
   the device, on the batch it was made in, or on its position in the batch.
3. **Guidance.** Classifier-free guidance (Ho & Salimans 2022, eq. 6) runs only when cfg_scale > 1: the
   unconditional and conditional passes share one U-Net call, batch order [uncond, cond], and the raw outputs
   (ε or v) are combined, out = out_u + g·(out_c − out_u), before conversion to x0 (:func:`vp_denoiser`).
4. **Sampling** in the VE variable x̃ = x0 + σ ε of :mod:`estable.sampling.samplers`; latents stay in float32
   whatever the weights' dtype, the U-Net sees them cast to its dtype.
5. **img2img** (SDEdit, Meng et al. 2022): the schedule of ``steps`` steps is entered at index
   t_start = steps − min(int(steps·strength), steps), with x̃ = z0 + σ_start·ε, where z0 is a sample of the
   VAE posterior of the input image times the scaling factor.
6. **Inpainting.** A 9-channel inpainting U-Net sees [x_t, mask, z(masked image)] (Rombach et al. 2022,
   sec. 4.5); an ordinary 4-channel U-Net gets "latent blending": before every network call after the first,
   the region to keep is replaced by the original latents noised to the current level with the run's
   noise, and after the last step by the clean original latents (what diffusers' inpaint pipeline does
   after each scheduler step; see :func:`_blended_denoiser`).
7. **Decoding** in the VAE's dtype; a NaN/inf or an all-black image from non-zero latents under fp16/bf16 is
   retried in float32 with a warning (never a silent black image).

8. **ControlNet** (optional ``control`` units): before each U-Net call the ControlNets read the same latents and
   text plus their control images, and their summed residuals are added to the U-Net's skips and mid block, as
   diffusers' ControlNet pipelines do (:mod:`estable.control.guidance`).

Each image comes back with its seed, its A1111 infotext and an Estable JSON record that holds every
parameter needed to make it again (:meth:`Pipeline.record`, :func:`params_from_record`).

Where Estable departs from diffusers on purpose:
* Every random number is drawn on the CPU in float32 (diffusers draws the VAE posterior's noise in the VAE's
  dtype): a seed gives the same image in fp32, fp16 and bf16 and on every device, up to rounding.
* Inpainting with batch_size > 1: diffusers encodes the single input image once with the first generator and
  repeats it; here every image's posterior sample comes from its own generator, so that image k is the image
  made alone with seed + k. Identical at batch size 1.
* PLMS (PNDM) img2img: diffusers slices PNDM's timestep list, whose second entry is repeated for the start-up
  step, at t_start, so the run starts one level too noisy and evaluates the network at a level the sample is
  not at. Estable enters the PLMS schedule at t_start. Identical at strength 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from .embeddings import Embedding, EmbeddingLibrary
from .errors import EstableError
from .extra_networks import LoRASpec, LoRAStack, resolve_prompt_loras
from .images import as_mask, as_rgb, check_mask_has_area, mask_to_tensor, resize_note, to_pil, to_tensor
from .nn.cuda_graph import GraphedEncoder, GraphedForward
from .outputs import OutputPlan, next_index  # noqa: F401  (next_index: re-exported)
from .params import MAX_SIDE, GenerationParams
from .prompt_completion import complete_prompt
from .prompts import apply_weights, build_chunks, match_chunk_counts
from .results import (  # noqa: F401  (RECORD_FORMAT, a1111_sampler_label, params_from_record, save_result: re-exported)
    RECORD_FORMAT,
    GenerationResult,
    a1111_sampler_label,
    image_infotext,
    image_record,
    params_from_record,
    save_result,
)
from .sampling.samplers import SamplerSpec, SigmaPlan, get_sampler, make_sigmas, vp_denoiser
from .speed import SpeedOptions, accelerate, refresh_derived, resolve_speed
from .tiled_vae import tiled_decode, tiled_encode

if TYPE_CHECKING:
    from .checkpoints.store import LoadedModel
    from .control.guidance import ControlUnit

__all__ = [
    "DEFAULT_MODEL_PATH",
    "RECORD_FORMAT",
    "GenerationResult",
    "Pipeline",
    "ProgressCallback",
    "default_model_path",
    "load_pipeline",
    "params_from_record",
    "resolve_sampler",
    "save_result",
]

#: ``callback(step, total, latents, denoised)``: step counts from 0 over the whole run (all batches).
ProgressCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
#: ``on_batch(result)``: the images of one batch, as soon as they are decoded (a GenerationResult of that batch).
BatchCallback = Callable[["GenerationResult"], None]
Mode = Literal["txt2img", "img2img", "inpaint"]

DEFAULT_MODEL = "default"
#: The built-in model (``--model default`` or no --model): an Estable file made by ``estable train export`` from the
#: recipe in recipes/default/, shipped inside the package with its model card beside it.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "assets" / "default_model.safetensors"
DEFAULT_MODEL_CARD = DEFAULT_MODEL_PATH.with_name("MODEL_CARD.md")


# ------------------------------------------------------------------------------------------------- loading


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → cuda if present, else cpu; EstableError for an unknown device or cuda without a GPU (every
    command's one device check)."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EstableError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise EstableError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    from .checkpoints.store import parse_dtype

    resolved = parse_dtype(str(dtype))
    assert resolved is not None  # parse_dtype maps every accepted string to a dtype
    return resolved


def load_pipeline(
    source: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    cuda_graphs: bool = True,
    speed: str | SpeedOptions | None = None,
    **load_kwargs: Any,
) -> Pipeline:
    """Load a model (SD single file, diffusers folder or Estable file) and return a :class:`Pipeline`.

    ``device``: "auto" (CUDA when available, else CPU), "cpu", "cuda" or a torch.device. ``dtype``: "auto"
    (fp16 on CUDA, fp32 on CPU), "fp32", "fp16", "bf16" or a torch.dtype. ``cuda_graphs``: on a GPU, replay the
    U-Net as CUDA graphs (:mod:`estable.nn.cuda_graph`). ``speed``: "max" (or a :class:`estable.speed.SpeedOptions`)
    for the fastest mode (compiled blocks, fused projections, channels_last; it compiles at the first image of
    each size), None/"default" for plain eager networks. ``load_kwargs`` go to
    :func:`estable.checkpoints.load_model` (allow_pickle, ema, prediction_type, progress).
    """
    if str(source) == DEFAULT_MODEL:
        source = default_model_path()
    from .checkpoints.store import load_model

    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    model = load_model(source, dtype=dt, device=dev, **load_kwargs)
    return Pipeline(model, device=dev, dtype=dt, cuda_graphs=cuda_graphs, speed=speed)


def default_model_path() -> Path:
    """The built-in model's file, or an EstableError saying how to get one when this install has none."""
    # Read the module attribute at call time, so that a test (or a packager) can point it elsewhere.
    path = Path(DEFAULT_MODEL_PATH)
    if not path.is_file():
        raise EstableError(
            "the built-in default model is not available yet (it is trained from the recipe in recipes/default/ "
            f"and exported to {path.name}); pass --model with a checkpoint file or diffusers folder"
        )
    return path


# ------------------------------------------------------------------------------------------------ samplers


def resolve_sampler(name: str) -> SamplerSpec:
    """:func:`get_sampler` with its ValueError turned into a one-line EstableError for users."""
    try:
        return get_sampler(name)
    except ValueError as exc:
        raise EstableError(str(exc)) from None


# ------------------------------------------------------------------------------------------------ pipeline


def _round_down(v: int, f: int) -> int:
    return max(f, v // f * f)


class Pipeline:
    """A loaded model ready to generate. Not thread-safe: one request at a time per instance."""

    def __init__(self, model: LoadedModel, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True, speed: str | SpeedOptions | None = None):
        self.model = model
        self.config = model.config
        self.device = torch.device(device)
        self.unet = model.unet.eval()
        self.vae = model.vae.eval()
        self.text_encoder = model.text_encoder.eval()
        self.dtype = dtype or next(self.unet.parameters()).dtype
        self._sha256: str | None = None
        # The U-Net's forward pass as used by the samplers: replayed CUDA graphs on a GPU when asked for. Changing
        # self.unet other than in place (new modules, attributes) needs self.reset_graphs().
        graphs = cuda_graphs and self.device.type == "cuda"
        self.unet_forward: Callable[..., torch.Tensor] = GraphedForward(self.unet) if graphs else self.unet
        self.speed = resolve_speed(speed)  # the fastest mode (estable.speed), None when off
        graphs = graphs and (self.speed is None or self.speed.cuda_graphs)
        # The text encoder's encode(ids, clip_skip), replayed too: eagerly it launches a few hundred small kernels
        self.text_encode: Callable[..., torch.Tensor] = (
            GraphedEncoder(self.text_encoder) if graphs else self.text_encoder.encode)
        if self.speed is not None:
            self.unet_forward = accelerate(self.unet, self.vae, self.device, dataclasses.replace(
                self.speed, cuda_graphs=self.speed.cuda_graphs and cuda_graphs))
        # LoRAs (estable.extra_networks): ``loras`` apply to every request; ``<lora:NAME:W>`` tags in a prompt are
        # looked up in ``lora_dir``. Both are merged into the weights for a run and taken out when they change.
        self.loras: list[LoRASpec] = []
        self.lora_dir: Path | None = None
        self.lora_stack = LoRAStack(self.unet, self.text_encoder)
        # Textual-inversion embeddings called by name in prompts (estable.embeddings), and those the last
        # encode_prompts used.
        self.embeddings: EmbeddingLibrary | None = None
        self.used_embeddings: list[Embedding] = []
        self.vae_info: dict[str, Any] | None = None  # set by swap_vae: name, path, sha256, hash
        # Provenance hook: txt2img's initial noise (B, C, h, w) float32 on the CPU passes through it, e.g. to write
        # a Tree-Ring key (estable.provenance.treering.inject). It must not draw from the images' generators.
        self.noise_hook: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- model facts ---------------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Pixels per latent cell (8 for SD's autoencoder)."""
        return self.config.vae.downsample_factor

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the U-Net was trained at: sample_size latents × the autoencoder's factor."""
        side = self.config.unet.sample_size * self.factor
        return side, side

    @property
    def model_name(self) -> str:
        src = Path(self.model.source)
        return src.name if src.is_dir() else src.stem

    @property
    def model_sha256(self) -> str | None:
        """SHA-256 of the checkpoint file (of the U-Net weights file for a diffusers folder), computed once (and
        remembered across processes for large files: :func:`~estable.checkpoints.io.cached_sha256`)."""
        if self._sha256 is None:
            from .checkpoints.io import cached_sha256

            src = Path(self.model.source)
            target: Path | None = src
            if src.is_dir():
                files = sorted((src / "unet").glob("diffusion_pytorch_model*.safetensors")) or sorted(
                    (src / "unet").glob("*.bin")
                )
                target = files[0] if len(files) == 1 else None
            if target is None or not target.is_file():
                return None
            self._sha256 = cached_sha256(target)
        return self._sha256

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of :attr:`model_sha256`."""
        sha = self.model_sha256
        return sha[:10] if sha else None

    def with_model_defaults(self, params: GenerationParams, *, cfg: bool = True, sampler: bool = True,
                            ) -> GenerationParams:
        """``params`` with what this model's file recommends, for what the request did not choose: the guidance
        scale (``default_cfg``) when ``cfg``, the sampler (``default_sampler``) when ``sampler`` (the CLI without
        --cfg / --sampler, the server without cfg_scale / sampler)."""
        changes: dict[str, Any] = {}
        if cfg and self.config.default_cfg is not None:
            changes["cfg_scale"] = float(self.config.default_cfg)
        if sampler and self.config.default_sampler is not None:
            changes["sampler"] = self.config.default_sampler
        return dataclasses.replace(params, **changes) if changes else params

    def completed_prompt(self, params: GenerationParams, seed: int, prompt: str | None = None) -> str:
        """The prompt image ``seed`` of a txt2img request is drawn from: ``prompt`` (default ``params.prompt``)
        completed as this model's file asks (``ModelConfig.prompt_completion``; estable.prompt_completion), or as
        written when the file asks for none or ``params.complete_prompt`` is off."""
        name = self.config.prompt_completion if params.complete_prompt else None
        return complete_prompt(name, params.prompt if prompt is None else prompt, seed)

    def swap_vae(self, path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
        """Load a separate VAE file (LDM or diffusers naming; estable.checkpoints.vae_file) into this pipeline's
        autoencoder in place; a VAE that does not fit is a CheckpointError and leaves the autoencoder as it was."""
        from .checkpoints.vae_file import load_vae_into

        self.vae_info = load_vae_into(self.vae, path, allow_pickle=allow_pickle)
        refresh_derived(self.vae)
        return self.vae_info

    # -- prompts -------------------------------------------------------------------------------------------
    def prepare_networks(self, prompt: str) -> str:
        """Merge ``self.loras`` and the prompt's ``<lora:…>`` LoRAs into the model; return the text to encode."""
        text, tagged = resolve_prompt_loras(prompt, self.lora_dir)
        changed = True  # a LoRA that fails half-way has put the weights back: derive from them again too
        try:
            changed = self.lora_stack.activate([*self.loras, *tagged])
        finally:
            if changed:
                refresh_derived(self.unet)
                self.reset_graphs()
        return text

    def reset_graphs(self) -> None:
        """Forget the recorded CUDA graphs (U-Net and text encoder), and the memory they hold; the next call records
        again. Needed after changing the networks other than in place."""
        for graphed in (self.unet_forward, self.text_encode):
            if isinstance(graphed, (GraphedForward, GraphedEncoder)):
                graphed.reset()

    def encode_prompts(
        self, prompt: str, negative_prompt: str, *, clip_skip: int, weighting: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) contexts, each (1, N·L, D) in the U-Net's dtype, with the same N; L is the tokenizer's
        window (77 for CLIP: BOS + 75 tokens + EOS)."""
        tok = self.model.require_tokenizer()
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        comma = tok.encode(",")
        kw: dict[str, Any] = {"bos": bos, "eos": eos, "pad": pad, "weighting": weighting,
                              "comma_id": comma[0] if len(comma) == 1 else None, "max_chunk": tok.max_length - 2}
        session = None if self.embeddings is None else \
            self.embeddings.session(tok.encode, self.config.text.vocab_size, self.config.text.width)
        encode = tok.encode if session is None else session.encode
        pos = build_chunks(prompt, encode, **kw)
        neg = build_chunks(negative_prompt, encode, **kw)
        self.used_embeddings = [] if session is None else session.used
        (pos_ids, pos_w), (neg_ids, neg_w) = match_chunk_counts(pos, neg, bos=bos, eos=eos, pad=pad)
        layers = self.config.text.layers
        if not 1 <= clip_skip <= layers:
            raise EstableError(f"clip skip {clip_skip} is out of range: this text encoder has {layers} layers")
        out = []
        with torch.inference_mode(), \
                (contextlib.nullcontext() if session is None else session.installed(self.text_encoder)):
            # a textual-inversion session swaps the token embedding: the recorded graphs would not see it
            encode = self.text_encoder.encode if session is not None else self.text_encode
            for ids, w in ((pos_ids, pos_w), (neg_ids, neg_w)):
                ctx = encode(ids.to(self.device), clip_skip)  # (N, L, D)
                out.append(apply_weights(ctx, w).to(self.dtype))  # (1, N·L, D)
        return out[0], out[1]

    # -- public API ----------------------------------------------------------------------------------------
    def txt2img(self, params: GenerationParams, *, callback: ProgressCallback | None = None,
                on_batch: BatchCallback | None = None,
                control: Sequence[ControlUnit] | None = None) -> GenerationResult:
        """Generate ``batch_size × batch_count`` images from text. ``on_batch(result)`` is called with each batch's
        images (a GenerationResult of that batch) as soon as they are decoded, e.g. to save them at once;
        ``control``: ControlNet units (:class:`estable.control.ControlUnit`), their residuals summed in order."""
        return self._run("txt2img", params, None, None, callback, on_batch=on_batch, control=control)

    def txt2img_each(
        self, prompts: Sequence[str], seeds: Sequence[int], params: GenerationParams, *, batch: int = 32
    ) -> list[Image.Image]:
        """One image per (prompt, seed) pair, ``batch`` images per sampler run whatever their prompts; the other
        settings come from ``params`` (its prompt, seed and batch fields are ignored). Image i is the image
        ``txt2img`` gives for ``prompts[i]`` with seed ``seeds[i]``, up to batched-arithmetic rounding. For
        evaluation, where every image has its own prompt: no infotexts or records."""
        if len(prompts) != len(seeds):
            raise EstableError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        if batch < 1:
            raise EstableError(f"batch must be positive, got {batch}")
        params = dataclasses.replace(params, prompt=prompts[0] if prompts else "", batch_size=1, batch_count=1)
        params, spec, plan, width, height, clip_skip = self._setup("txt2img", params, None)
        self.prepare_networks("")  # self.loras only
        prompts = [self.completed_prompt(params, s, p) for p, s in zip(prompts, seeds)]
        contexts = [self.encode_prompts(p, params.negative_prompt, clip_skip=clip_skip, weighting=params.weighting)
                    for p in prompts]
        images: list[Image.Image] = []
        start = 0
        while start < len(prompts):
            # Consecutive prompts whose contexts have the same length (the same number of token windows).
            end = start + 1
            while end < len(prompts) and end - start < batch and \
                    contexts[end][0].shape == contexts[start][0].shape:
                end += 1
            cond = torch.cat([c for c, _ in contexts[start:end]])  # (B, T, D)
            uncond = torch.cat([u for _, u in contexts[start:end]])
            z = self._sample("txt2img", params, spec, plan, seeds[start:end], cond, uncond, None, None,
                             width, height, lambda *_: None)
            images.extend(to_pil(self._decode(z)[0]))
            start = end
        return images

    def img2img(
        self, image: Image.Image, params: GenerationParams, *, callback: ProgressCallback | None = None,
        on_batch: BatchCallback | None = None,
        control: Sequence[ControlUnit] | None = None,
    ) -> GenerationResult:
        """Re-draw ``image`` guided by the prompt; ``params.strength`` in (0, 1] is how much of the schedule
        is re-run. Without a size in ``params`` the image's own size (rounded down to a multiple of 8) is used;
        the image is resized to the generation size when they differ."""
        return self._run("img2img", params, image, None, callback, on_batch=on_batch, control=control)
    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image,
        params: GenerationParams,
        *,
        callback: ProgressCallback | None = None,
        on_batch: BatchCallback | None = None,
        control: Sequence[ControlUnit] | None = None,
    ) -> GenerationResult:
        """Repaint the white (≥ 50 %) part of ``mask`` in ``image``; the mask must have the image's size. An
        all-black mask (nothing to repaint) is an EstableError."""
        if mask.size != image.size:
            raise EstableError(
                f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                "they must have the same size"
            )
        check_mask_has_area(mask)
        return self._run("inpaint", params, image, mask, callback, on_batch=on_batch, control=control)

    # -- metadata ------------------------------------------------------------------------------------------
    def infotext(self, params: GenerationParams, seed: int, mode: Mode, width: int, height: int) -> str:
        """The A1111 ``parameters`` text of one image."""
        return image_infotext(self, resolve_sampler(params.sampler), params, seed, mode, width, height)

    def record(self, params: GenerationParams, seed: int, mode: Mode, width: int, height: int,
               run: dict[str, Any]) -> dict[str, Any]:
        """The Estable JSON record of one image: the parameters that make this very image again (its own seed,
        one image, the resolved size and clip skip), the model's identity and the run it came from."""
        return image_record(self, resolve_sampler(params.sampler), params, seed, mode, width, height, run)

    # -- the loop ------------------------------------------------------------------------------------------
    def _size(self, params: GenerationParams, image: Image.Image | None) -> tuple[int, int]:
        f = self.factor
        if image is not None:  # a multiple of 8 as every size (GenerationParams), and of the model's factor
            m = math.lcm(f, 8)
            default = (_round_down(image.width, m), _round_down(image.height, m))
        else:
            default = self.native_size
            side = default[0]
            if (params.width is None or params.height is None) and (side > MAX_SIDE or side % math.lcm(f, 8)):
                # sample_size comes from the model's config: a wild value must not decide an impossible size
                raise EstableError(
                    f"this model's U-Net config gives a default size of {side}x{side} (sample_size "
                    f"{self.config.unet.sample_size} × {f}), which is not a usable size (a multiple of "
                    f"{math.lcm(f, 8)} up to {MAX_SIDE}); give the width and height (--size WxH)")
        width = params.width or default[0]
        height = params.height or default[1]
        if width % f or height % f:
            raise EstableError(f"width and height must be multiples of {f} for this model, got {width}x{height}")
        return width, height

    def _setup(
        self, mode: Mode, params: GenerationParams, image: Image.Image | None
    ) -> tuple[GenerationParams, SamplerSpec, SigmaPlan, int, int, int]:
        """Checked and resolved settings: (params, sampler, sigma plan, width, height, clip skip)."""
        params.validate()
        params = params.resolved()
        spec = resolve_sampler(params.sampler)
        width, height = self._size(params, image)
        in_ch = self.config.unet.in_channels
        if mode != "inpaint" and in_ch != 4:
            raise EstableError(
                f"this U-Net has {in_ch} input channels (an inpainting model); use it with the inpaint command"
            )
        if mode == "inpaint" and in_ch not in (4, 9):
            raise EstableError(f"inpainting needs a U-Net with 4 or 9 input channels, this one has {in_ch}")
        try:
            plan = make_sigmas(spec, self.config.schedule, params.steps)
        except ValueError as exc:
            raise EstableError(str(exc)) from None
        return params, spec, plan, width, height, params.clip_skip or self.config.clip_skip

    def _run(
        self,
        mode: Mode,
        params: GenerationParams,
        image: Image.Image | None,
        mask: Image.Image | None,
        callback: ProgressCallback | None,
        on_batch: BatchCallback | None = None,
        control: Sequence[ControlUnit] | None = None,
    ) -> GenerationResult:
        params, spec, plan, width, height, clip_skip = self._setup(mode, params, image)
        control = list(control or [])
        if control:
            from .control.guidance import check_units, control_infotext, control_record

            check_units(control, self.config.unet, dtype=self.dtype, device=self.device)
        if mode != "txt2img":
            # SDEdit entry point, as diffusers' get_timesteps: the last init_timestep steps of the schedule.
            params.check_runs_a_step(mode)
            t_start = params.steps - min(int(params.steps * params.strength), params.steps)
            plan = _slice_plan(plan, t_start)

        request_text = self.prepare_networks(params.prompt)  # the request's LoRAs merged; its text without their tags
        contexts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def context(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            """(cond, uncond) of one image's prompt, encoded once per distinct prompt of the request."""
            if prompt not in contexts:  # a completed prompt is of the caption grammar: no LoRA tags
                contexts[prompt] = self.encode_prompts(request_text if prompt == params.prompt else prompt,
                                                       params.negative_prompt, clip_skip=clip_skip,
                                                       weighting=params.weighting)
            return contexts[prompt]

        pixels = masks = None
        notes: list[str] = []
        if image is not None:
            pixels = to_tensor(_fit(as_rgb(image), width, height))  # (1, 3, H, W) in [-1, 1]
            if image.size != (width, height):
                notes.append(resize_note(image.size, (width, height), self.factor))
        if mask is not None:
            masks = mask_to_tensor(_fit(as_mask(mask), width, height))  # (1, 1, H, W) in {0, 1}

        images: list[Image.Image] = []
        seeds: list[int] = []
        infotexts, records = [], []
        run = {"seed": params.seed, "batch_size": params.batch_size, "batch_count": params.batch_count}
        from .hires import hires_steps, run_hires

        hires = hires_steps(params) if mode == "txt2img" else 0  # second-pass steps (0: no hires fix)
        total = params.batch_count * (plan.steps + hires)
        for b in range(params.batch_count):
            batch_seeds = [params.seed + b * params.batch_size + k for k in range(params.batch_size)]
            offset = b * (plan.steps + hires)
            # each image's own prompt: the model's completion of the request's (estable.prompt_completion)
            prompts = [self.completed_prompt(params, s) if mode == "txt2img" else params.prompt for s in batch_seeds]
            if len(set(prompts)) == 1:
                cond, uncond = context(prompts[0])  # (1, T, D): one prompt for the batch
            else:  # (B, T, D); the completions of one caption have its number of token windows
                cond = torch.cat([context(p)[0] for p in prompts])
                uncond = torch.cat([context(p)[1] for p in prompts])

            def step_cb(i: int, n: int, x: torch.Tensor, d: torch.Tensor, offset: int = offset) -> None:
                if callback is not None:
                    callback(offset + i, total, x, d)

            z = self._sample(mode, params, spec, plan, batch_seeds, cond, uncond, pixels, masks,
                             width, height, step_cb, control)
            if hires:
                z = run_hires(self, z, params, spec, batch_seeds, cond, uncond, width, height,
                              lambda i, n, x, d, o=offset + plan.steps: callback and callback(o + i, total, x, d),
                              control)
            decoded, note = self._decode(z, tile=params.tile_vae,
                                         controlnets=[u.name or u.source or "unnamed" for u in control])
            if note:
                notes.append(note)
            batch_images = to_pil(decoded)
            first = len(images)
            owns = [dataclasses.replace(params, prompt=p) for p in prompts]
            batch_texts = [self.infotext(own, seed, mode, width, height) for own, seed in zip(owns, batch_seeds)]
            batch_records = [self.record(own, seed, mode, width, height, {**run, "index": first + k})
                             for k, (own, seed) in enumerate(zip(owns, batch_seeds))]
            images.extend(batch_images)
            seeds.extend(batch_seeds)
            if control:
                batch_texts = [control_infotext(text, control) for text in batch_texts]
                for record in batch_records:
                    record["control"] = control_record(control)
            infotexts.extend(batch_texts)
            records.extend(batch_records)
            if on_batch is not None:
                on_batch(GenerationResult(batch_images, list(batch_seeds), batch_texts, batch_records, params,
                                          list(notes)))
        return GenerationResult(images, seeds, infotexts, records, params, notes)

    def _sample(
        self,
        mode: Mode,
        params: GenerationParams,
        spec: SamplerSpec,
        plan: SigmaPlan,
        seeds: Sequence[int],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        pixels: torch.Tensor | None,
        masks: torch.Tensor | None,
        width: int,
        height: int,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None],
        control: Sequence[ControlUnit] | None = None,
        init_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batch: returns the latents to decode, (B, 4, h, w) float32 (scaled by scaling_factor).
        ``init_latents`` (img2img from latents, the hires fix's second pass): scaled z0 instead of encoding pixels."""
        dev, batch = self.device, len(seeds)
        f, lc = self.factor, self.config.vae.latent_channels
        shape = (1, lc, height // f, width // f)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        cfg = float(params.cfg_scale) > 1.0
        # cond / uncond: (1, T, D) for one prompt or (B, T, D) for one prompt per image
        context = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)]) if cfg else \
            cond.expand(batch, -1, -1)  # (2B or B, T, D)

        with torch.inference_mode():
            z0 = init_latents
            if pixels is not None and (mode == "img2img" or self.config.unet.in_channels == 4
                                       or params.strength < 1.0):
                # Posterior sample of the input image, one draw from each image's generator (diffusers'
                # prepare_latents / _encode_vae_image). The 9-channel inpaint model at strength 1 skips it.
                z0 = self._encode(pixels, gens, tile=params.tile_vae)  # (B, 4, h, w) float32, scaled
            noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
            if self.noise_hook is not None and mode == "txt2img":
                noise = self.noise_hook(noise)
            noise = noise.to(dev)
            if z0 is not None and not (mode == "inpaint" and params.strength == 1.0):
                x = z0 + float(plan.sigmas[0]) * noise  # x̃ = z0 + σ ε: every scheduler's add_noise in VE form
            else:
                x = plan.initial_latents(noise)  # (B, 4, h, w)

            extra: torch.Tensor | None = None  # inpainting model's extra input channels
            keep = None
            if mode == "inpaint":
                assert pixels is not None and masks is not None
                mask_lat = F.interpolate(masks, size=shape[-2:]).to(dev)  # nearest, as diffusers: (1, 1, h, w)
                masked = pixels * (masks < 0.5)  # (1, 3, H, W): the region to repaint set to 0 (grey)
                masked_lat = self._encode(masked, gens, tile=params.tile_vae) \
                    if self.config.unet.in_channels == 9 else None
                if masked_lat is None:
                    # diffusers encodes the masked image for 4-channel models too (and discards it): the same
                    # draws keep the generators in step for the stochastic samplers.
                    for g in gens:
                        torch.randn(shape, generator=g, dtype=torch.float32)
                    keep = 1.0 - mask_lat
                else:
                    m = mask_lat.expand(batch, -1, -1, -1).to(self.dtype)
                    ml = masked_lat.to(self.dtype)
                    extra = torch.cat([m, ml], dim=1)  # (B, 5, h, w): [mask, masked-image latents]
                    if cfg:
                        extra = torch.cat([extra, extra])

            options: dict[str, Any] = dict(plan.options)
            if spec.name == "ddim":
                options["eta"] = float(params.eta)
            run = None
            if control:
                from .control.guidance import ControlRun, count_evaluations

                run = ControlRun(control, latent_size=shape[-2:], batch=batch, guided=cfg, device=dev, dtype=self.dtype,
                                 evaluations=count_evaluations(spec.fn, plan.sigmas, options))
            # a guidance interval (cfg_start > 0): no guidance above this timestep
            t_guided = (1.0 - float(params.cfg_start)) * self.config.schedule.num_train_timesteps \
                if cfg and params.cfg_start > 0 else None
            model = self._guided_model(context, float(params.cfg_scale) if cfg else None, extra, run, t_guided)
            denoise = vp_denoiser(model, self.config.schedule.prediction_type, plan.timestep)
            if keep is not None:
                assert z0 is not None
                denoise = _blended_denoiser(denoise, z0, noise, mask_lat)
            x = spec.fn(denoise, x, plan.sigmas, generator=gens, callback=callback, **options)
            z = plan.final_latents(x)  # VP latents at the last level
            if keep is not None:
                assert z0 is not None
                z = keep * z0 + mask_lat * z  # paste the original back where the mask keeps it
        return z

    def _guided_model(
        self, context: torch.Tensor, scale: float | None, extra: torch.Tensor | None,
        control: Callable[[torch.Tensor, float, torch.Tensor], dict[str, Any]] | None = None,
        t_guided: float | None = None,
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """``model(x_t, t)``: one U-Net call on [uncond, cond] (or cond alone) and the CFG combination; above
        timestep ``t_guided`` (when given) the conditional output alone (a guidance interval)."""

        def model(x_t: torch.Tensor, t: float) -> torch.Tensor:
            unguided = scale is not None and t_guided is not None and float(t) > t_guided
            if unguided and control is None:  # the cond half alone: half the work
                batch = x_t.shape[0]
                inp = x_t.to(self.dtype)
                if extra is not None:
                    inp = torch.cat([inp, extra[batch:]], dim=1)
                return self.unet_forward(inp, t, context[batch:]).float()
            inp = torch.cat([x_t, x_t]) if scale is not None else x_t  # (2B or B, 4, h, w)
            inp = inp.to(self.dtype)
            residuals = control(inp, t, context) if control is not None else {}  # ControlNets see the 4 channels
            if extra is not None:
                inp = torch.cat([inp, extra], dim=1)  # (·, 9, h, w): [latents, mask, masked-image latents]
            # with residuals the U-Net runs eagerly (the CUDA graphs are recorded for three inputs)
            out = (self.unet(inp, t, context, **residuals) if residuals else self.unet_forward(inp, t, context)).float()
            if scale is None:
                return out
            out_u, out_c = out.chunk(2)
            if unguided:  # with ControlNets, whose residuals are laid out for both halves
                return out_c
            return out_u + scale * (out_c - out_u)  # Ho & Salimans 2022, eq. 6, on ε or v

        return model

    def _encode(self, pixels: torch.Tensor, gens: Sequence[torch.Generator], *, tile: bool = False) -> torch.Tensor:
        """z = scaling_factor · (μ + σ·ε) per image, ε drawn from that image's generator. (B, 4, h, w) float32.

        ε is drawn on the CPU in float32 whatever the VAE's dtype (diffusers draws it in the VAE's dtype: the same
        numbers in float32, other numbers in fp16/bf16 on some torch versions), so a seed gives the same image on
        every device and in every precision, up to rounding.
        """
        vae_dtype = next(self.vae.parameters()).dtype
        x = pixels.to(self.device, vae_dtype)
        posterior = tiled_encode(self.vae, x) if tile else self.vae.encode(x)  # one image: (1, 4, h, w) moments
        mean, std = posterior.mean.float(), posterior.std.float()
        parts = [mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float32).to(mean.device) for g in gens]
        return torch.cat(parts) * self.config.vae.scaling_factor

    def _decode(self, z: torch.Tensor, *, tile: bool = False,
                controlnets: Sequence[str] = ()) -> tuple[torch.Tensor, str | None]:
        """Images in [-1, 1] from scaled latents, with the fp32 retry of reduced-precision decodes; ``tile``:
        in blended tiles (:mod:`estable.tiled_vae`).

        Non-finite values that survive (a corrupt model, not a precision problem) are an error: they would
        otherwise become a black PNG. The message names the LoRAs and ``controlnets`` that took part."""
        loras = ", ".join(spec.name for spec in self.lora_stack.active)
        suspects = ["the model's weights"]
        if loras:
            suspects.append(f"a LoRA in use ({loras})")
        if controlnets:
            suspects.append(f"a ControlNet in use ({', '.join(controlnets)})")
        weights = " or ".join(suspects)
        if not bool(torch.isfinite(z).all()):
            hint = "" if self.dtype == torch.float32 else ", or run in fp32 (--dtype fp32)"
            raise EstableError(
                f"the U-Net produced NaN or infinite latents; {weights} may be corrupt "
                f"(check {self.model.source} with `estable info`){hint}"
            )
        vae_dtype = next(self.vae.parameters()).dtype
        note = None
        chunk = self.speed.decode_batch if self.speed is not None else None

        def decode(lat: torch.Tensor) -> torch.Tensor:
            if tile:
                return tiled_decode(self.vae, lat)
            if chunk:  # the compiled decoder keeps one batch shape (SpeedOptions.decode_batch)
                return torch.cat([self.vae.decode(part) for part in lat.split(chunk)])
            return self.vae.decode(lat)

        with torch.inference_mode():
            latents = z / self.config.vae.scaling_factor
            image = decode(latents.to(vae_dtype)).float()
            if vae_dtype in (torch.float16, torch.bfloat16) and _bad_decode(image, latents):
                note = (f"the VAE decode in {str(vae_dtype).removeprefix('torch.')} gave NaN/inf or a black image; "
                        "decoded again in float32")
                warnings.warn(note, RuntimeWarning, stacklevel=3)
                self.vae.float()
                try:
                    image = decode(latents.float()).float()
                finally:
                    self.vae.to(vae_dtype)
        if not bool(torch.isfinite(image).all()):
            vae = self.vae_info["path"] if self.vae_info else self.model.source
            raise EstableError(
                f"the VAE decoder produced NaN or infinite values from finite latents; "
                f"{'the VAE file' if self.vae_info else weights} may be corrupt (check {vae} with `estable info`)"
            )
        return image, note


# ------------------------------------------------------------------------------------------------- helpers


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` at (width, height): unchanged when it already is, else resized with Lanczos (as diffusers'
    image processor resizes)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _bad_decode(image: torch.Tensor, latents: torch.Tensor) -> bool:
    if not bool(torch.isfinite(image).all()):
        return True
    black = bool((image / 2 + 0.5 < 0.5 / 255).all())
    return black and bool(latents.abs().amax() > 0)


def _slice_plan(plan: SigmaPlan, t_start: int) -> SigmaPlan:
    """The plan entered at step ``t_start`` (diffusers: ``scheduler.timesteps[t_start:]`` + set_begin_index)."""
    options = dict(plan.options)
    if "timesteps" in options:
        options["timesteps"] = options["timesteps"][t_start:]
    return dataclasses.replace(plan, sigmas=plan.sigmas[t_start:], timesteps=plan.timesteps[t_start:],
                               options=options)


def _blended_denoiser(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    z0: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """Latent blending for inpainting with an ordinary U-Net (the RePaint-free variant of Lugmayr et al. 2022
    used by the LDM and diffusers inpaint scripts).

    diffusers replaces, after every scheduler step, the region to keep (``mask`` = 0) by the original latents
    z0 noised to the level the sample has just reached, with the run's initial noise ε: x̃ = z0 + σ ε in VE
    form. Every sampler here updates x elementwise from x and the denoiser's outputs, so the repainted region
    evolves exactly as in diffusers if the *network's input* is blended: before each call after the first
    (the first sees the initial latents, as diffusers' first step does) the kept region of x is replaced.
    The kept region of the sampler's own state differs, but it never reaches the repainted region other
    than through the network, and the caller pastes z0 over it after the last step.
    """
    keep = 1.0 - mask  # (1, 1, h, w)
    calls = 0

    def blended(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1:
            x = keep * (z0 + sigma * noise) + mask * x  # (B, 4, h, w)
        return denoise(x, sigma)

    return blended

