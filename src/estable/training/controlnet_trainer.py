"""``estable train controlnet``: a ControlNet (Zhang, Rao & Agrawala 2023) on a frozen base model.

The base is any checkpoint :func:`estable.checkpoints.store.load_model` reads. The trained network is
:meth:`ControlNet.from_unet <estable.models.controlnet.ControlNet.from_unet>` of the base U-Net: its encoder and mid
block copied, the hint encoder's last convolution and every output ("zero") convolution at zero, so training starts
from exactly the base model (sec. 3.2). The loss is the base's diffusion loss (:class:`UNetObjective`: ε or v after
the base's prediction type, min-SNR-γ, offset noise) with the frozen U-Net reading the ControlNet's residuals:

    ε_θ(z_t, t, c_text, c_img) = U(z_t, t, c_text; residuals = ControlNet(z_t, t, c_text, c_img))       (eq. 5)

Prompts are replaced by the empty prompt with probability ``caption_dropout`` (0.5, sec. 3.3), so that the
ControlNet learns to see the structure in the control image itself. Control images are made from each training
image by ``control`` in the DataLoader's workers (:class:`WithControl`); gradients reach the ControlNet through the
frozen U-Net. Everything else (DDP under torchrun, exact resume, EMA, checkpoints) is the generic trainer's. After
every checkpoint ``RUN/controlnet.safetensors`` (Estable's ControlNet file, EMA weights when the run keeps an EMA)
is rewritten: what ``--controlnet`` loads.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from estable.config import ControlNetConfig
from estable.errors import EstableError
from estable.images import to_pil
from estable.models.controlnet import ControlNet
from estable.training.builders import build_datasets, load_base, require_base
from estable.training.config import ControlNetTrainConfig, TrainConfig
from estable.training.loop import expect_config
from estable.training.objectives import UNetObjective, empty_prompt_ids, min_snr_weights, noisy_latents_and_target
from estable.training.runs import make_grid
from estable.training.unet_trainer import UNetTrainer

CONTROLNET_FILE = "controlnet.safetensors"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD_HINT_CHANNELS = (16, 32, 96, 256)


def control_maker(cfg: ControlNetTrainConfig):
    """``make(pil) -> pil`` for the configured control type (picklable: a module-level function and plain data)."""
    options: dict[str, float] = {}
    if cfg.control in ("canny", "scribble"):
        options = {"low": cfg.control_low, "high": cfg.control_high, "sigma": cfg.control_sigma}
    return _Maker(cfg.control, options)


class _Maker:
    def __init__(self, kind: str, options: dict[str, float]) -> None:
        self.kind, self.options = kind, options

    def __call__(self, image: Image.Image) -> Image.Image:
        from estable.control.preprocess import make_control_image

        return make_control_image(self.kind, image, **self.options)


def control_from_pixels(pixels: torch.Tensor, make: Any) -> torch.Tensor:
    """(3, H, W) image in [-1, 1] → (3, H, W) control image in [0, 1] (as the pipeline feeds it)."""
    import numpy as np

    image = to_pil(pixels[None])[0]
    arr = np.asarray(make(image).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


class WithControl(torch.utils.data.Dataset):
    """Adds ``control`` (the control image of ``pixel_values``) to every item of a map-style dataset."""

    def __init__(self, dataset: Any, make: Any) -> None:
        self.dataset, self.make = dataset, make

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item["control"] = control_from_pixels(item["pixel_values"], self.make)
        return item


class WithControlStream(torch.utils.data.IterableDataset):
    """The same for a stream (tar shards); ``set_epoch`` is passed through."""

    def __init__(self, dataset: Any, make: Any) -> None:
        self.dataset, self.make = dataset, make

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        for item in self.dataset:
            yield {**item, "control": control_from_pixels(item["pixel_values"], self.make)}


class ControlNetObjective(UNetObjective):
    """:class:`UNetObjective` with a trainable ControlNet feeding the frozen U-Net; batch gains ``control``
    (B, 3, H, W) in [0, 1]."""

    def __init__(self, controlnet: ControlNet, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.controlnet = controlnet
        self.unet.requires_grad_(False)

    def train(self, mode: bool = True) -> ControlNetObjective:
        super().train(mode)
        self.unet.eval()  # frozen (no dropout in it anyway)
        return self

    def forward(self, batch: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z0 = self.clean_latents(batch, draws["posterior"])  # (B, C, h, w)
        ctx = self.context(batch["input_ids"], draws.get("drop"))  # (B, L, d)
        t = draws["t"]
        ab = self.alpha_bar(t)  # (B,) float64
        z_t, target = noisy_latents_and_target(z0, self.noise(draws), ab, self.objective)
        down, mid = self.controlnet(z_t, t, ctx, batch["control"])
        pred = self.unet(z_t, t, ctx, down, mid).float()  # (B, C, h, w)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        weights = min_snr_weights(ab, self.min_snr_gamma, self.objective).to(per_sample.device)
        return (weights * per_sample).mean(), {"mse": per_sample.detach().mean()}


class ControlNetTrainer(UNetTrainer):
    """ControlNet training on a loaded base model; reuses the U-Net trainer's data, draws and tokenizer."""

    kind = "controlnet"
    supports_fsdp = False
    config: ControlNetTrainConfig  # type: ignore[assignment]
    network: ControlNet

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        config = expect_config(config, ControlNetTrainConfig, "ControlNet")
        require_base(config.base, "ControlNet")
        if getattr(config, "latents", "pixels") == "cache":
            raise EstableError("latents=cache is not available for ControlNet training (the control images are "
                               "made from the pixels)")
        return config

    def build(self) -> None:
        cfg = self.config
        base = load_base(cfg.base)
        self.base_config = base.config
        unet, vae, text = base.unet, base.vae, base.text_encoder
        self.tokenizer = base.require_tokenizer()
        f = vae.config.downsample_factor
        if cfg.data.size % f:
            raise EstableError(f"data.size {cfg.data.size} is not a multiple of the VAE's factor {f}")
        stages = int(round(math.log2(f))) + 1
        hint = cfg.hint_channels or SD_HINT_CHANNELS[:stages]
        if len(hint) != stages:
            raise EstableError(f"hint_channels needs {stages} entries (the VAE downsamples by {f}), got {list(hint)}")
        try:
            net_cfg = ControlNetConfig(unet=unet.config, hint_channels=tuple(hint))
        except ValueError as exc:
            raise EstableError(f"ControlNet config: {exc}") from None
        self.network = ControlNet.from_unet(unet, net_cfg)
        if cfg.gradient_checkpointing:
            unet.gradient_checkpointing = True  # the frozen U-Net's activations are needed for the backward too
        self.unet, self.text_encoder, self.vae = unet, text, vae
        schedule = base.config.schedule
        self.schedule = schedule
        self.clip_skip = cfg.clip_skip if cfg.clip_skip is not None else base.config.clip_skip
        objective = "v" if schedule.prediction_type == "v_prediction" else "eps"
        self.objective = ControlNetObjective(
            self.network, unet, vae, text, empty_prompt_ids(self.tokenizer), schedule=schedule, objective=objective,
            min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise, caption_dropout=cfg.caption_dropout,
            clip_skip=self.clip_skip, latent_size=cfg.data.size // f)
        train, val = build_datasets(cfg, self.dist.rank, self.dist.world_size)
        make = control_maker(cfg)
        wrap = WithControlStream if isinstance(train, torch.utils.data.IterableDataset) else WithControl
        self.train_data = wrap(train, make)
        self.val_items = [{**it, "control": control_from_pixels(it["pixel_values"], make)} for it in val]

    def compile_network(self) -> None:
        self.objective.controlnet = torch.compile(self.network, mode=self.config.compile_mode)

    def metadata(self) -> dict[str, str]:
        return {"base": str(self.config.base), "base_config": self.base_config.to_json(),
                "controlnet_config": self.network.config.to_json(), "control": self.config.control}

    @torch.no_grad()
    def sample_image(self) -> Image.Image | None:
        """Validation images' control maps (top), the controlled samples for their captions (middle) and the
        images themselves (bottom), sampled with classifier-free guidance."""
        items = self.val_items[:4]
        if not items:
            return None
        n, net, unet = len(items), self.network, self.unet
        control = torch.stack([it["control"] for it in items]).to(self.device)
        hint = torch.cat([control, control])

        def forward(inp: torch.Tensor, t: float, ctx: torch.Tensor) -> torch.Tensor:
            down, mid = net(inp, t, ctx, hint)
            return unet(inp, t, ctx, down, mid)

        images = self.guided_samples([it["text"] for it in items], forward)
        controls = to_pil(control * 2 - 1)
        originals = to_pil(torch.stack([it["pixel_values"] for it in items]))
        return make_grid(controls + to_pil(images) + originals, columns=n)

    def export(self) -> Path:
        """Write ``RUN/controlnet.safetensors`` (EMA weights when the run keeps an EMA)."""
        from estable.checkpoints.controlnet_format import save_controlnet

        path = self.run.root / CONTROLNET_FILE
        swap = self.ema.swapped(self.network) if self.ema is not None else contextlib.nullcontext()
        with swap:
            save_controlnet(self.network, path, dtype=_DTYPES[self.config.save_precision])
        return path

    def save(self) -> Path | None:
        path = super().save()
        if self.dist.is_main:
            self.export()
        return path



__all__ = ["CONTROLNET_FILE", "ControlNetObjective", "ControlNetTrainer", "WithControl", "control_from_pixels"]
