"""``estable train lora``: low-rank adapters (Hu et al. 2021) on a frozen base model, with the U-Net's diffusion loss.

The base is any checkpoint :func:`estable.checkpoints.store.load_model` reads (SD single file, diffusers folder,
Estable file). :func:`estable.nn.lora.inject_lora` wraps the target layers of its U-Net (and, with
``lora.targets=unet+text``, of its text encoder) so that each computes ``W x + (α/r) · B A x`` with W frozen,
A Kaiming-uniform and B = 0 (the adapted model starts as the base model). Everything else is frozen.

The loss is :class:`~estable.training.objectives.UNetObjective`'s (ε or v after the base model's prediction type,
min-SNR-γ, offset noise, caption dropout); when the text encoder carries adapters its context is computed with
gradients and its adapters train too (their learning rate: ``lora.text_lr``).

What the generic Trainer sees as "the network" is :class:`LoRAAdapters`, a module that holds only the adapters'
A and B (shared with the injected layers, not copies) under kohya's names. So the EMA averages the adapters only,
and every checkpoint's ``model.safetensors`` holds just the LoRA tensors (``lora_unet_….lora_down.weight`` …), with
the optimizer and the rest in ``state.pt``. Resume rebuilds the base, re-injects (same seed, same A init) and loads
them. After each checkpoint ``RUN/lora.safetensors`` is rewritten with :func:`~estable.checkpoints.lora_format.
save_lora` (kohya/A1111 naming with α; EMA weights when the run keeps an EMA; dtype ``lora.save_precision``): the
file to share, and what ``apply_lora`` loads onto a fresh copy of the base model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from estable.checkpoints.lora_format import kohya_name, save_lora
from estable.errors import EstableError
from estable.nn.lora import TEXT_TARGETS, UNET_TARGETS, LoRALayer, inject_lora, lora_parameters
from estable.training.builders import build_datasets, load_base, require_base
from estable.training.config import LoRATrainConfig, TrainConfig
from estable.training.loop import expect_config
from estable.training.objectives import UNetObjective, empty_prompt_ids
from estable.training.unet_trainer import UNetTrainer

LORA_FILE = "lora.safetensors"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoRAAdapters(nn.Module):
    """The trained parameters of a LoRA run: each adapter's ``lora_down`` (A) and ``lora_up`` (B), registered
    under its kohya name (``lora_unet_<path>`` / ``lora_te_<path>``), so that the state-dict keys are the LoRA file's.

    The modules are the injected layers' own (shared), so loading a state dict here sets the adapters in the model.
    ``gradient_checkpointing`` reaches through to the adapted networks.
    """

    def __init__(self, layers: dict[str, dict[str, LoRALayer]], networks: list[nn.Module]) -> None:
        super().__init__()
        for component, by_path in layers.items():
            for path, layer in by_path.items():
                holder = nn.Module()
                holder.lora_down = layer.lora_down
                holder.lora_up = layer.lora_up
                self.add_module(kohya_name(component, path), holder)  # type: ignore[arg-type]
        self._networks = tuple(networks)  # a tuple: not registered as submodules (no base weights in here)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(getattr(n, "gradient_checkpointing", False) for n in self._networks)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for n in self._networks:
            if hasattr(n, "gradient_checkpointing"):
                n.gradient_checkpointing = value


class LoRAObjective(UNetObjective):
    """:class:`UNetObjective` whose text encoder may carry trainable adapters (then its context keeps gradients
    and it runs in training mode, so that LoRA dropout acts)."""

    def __init__(self, *args: Any, train_text: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # freezes the VAE and the text encoder
        self.train_text = train_text
        if train_text:
            for p in lora_parameters(self.text_encoder):
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> LoRAObjective:
        super().train(mode)
        if self.train_text:
            self.text_encoder.train(mode)
        return self

    def context(self, input_ids: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if not self.train_text:
            return super().context(input_ids, drop)
        if drop is not None:
            dropped = (drop < self.caption_dropout).view(-1, 1)  # (B, 1)
            input_ids = torch.where(dropped, self.empty_ids.expand_as(input_ids), input_ids)
        return self.text_encoder.encode(input_ids, clip_skip=self.clip_skip)  # (B, L, d), with gradients


class LoRATrainer(UNetTrainer):
    """LoRA fine-tuning of a loaded model; reuses the U-Net trainer's data, draws and sample grid."""

    kind = "lora"
    supports_fsdp = False
    no_fsdp_reason = "a LoRA run trains small adapters on a frozen base, so sharding them saves next to nothing"
    config: LoRATrainConfig  # type: ignore[assignment]
    network: LoRAAdapters

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        config = expect_config(config, LoRATrainConfig, "LoRA")
        require_base(config.base, "LoRA")
        return config

    def build(self) -> None:
        cfg, lc = self.config, self.config.lora
        base = load_base(cfg.base)
        self.base_config = base.config
        unet, vae, text = base.unet, base.vae, base.text_encoder
        self.tokenizer = base.require_tokenizer()
        train_text = lc.targets == "unet+text"
        try:
            layers = {"unet": inject_lora(unet, rank=lc.rank, alpha=lc.alpha, targets=lc.unet_modules or UNET_TARGETS,
                                          dropout=lc.dropout)}
            if train_text:
                layers["text_encoder"] = inject_lora(text, rank=lc.rank, alpha=lc.alpha,
                                                     targets=lc.text_modules or TEXT_TARGETS, dropout=lc.dropout)
        except ValueError as exc:  # a pattern that selects nothing or the wrong kind of layer
            raise EstableError(f"lora: {exc}") from None
        self.unet, self.text_encoder, self.vae = unet, text, vae
        self.layers = layers
        self.network = LoRAAdapters(layers, [unet, text] if train_text else [unet])
        f = vae.config.downsample_factor
        if cfg.data.size % f:
            raise EstableError(f"data.size {cfg.data.size} is not a multiple of the VAE's factor {f}")
        schedule = base.config.schedule
        self.clip_skip = cfg.clip_skip if cfg.clip_skip is not None else base.config.clip_skip
        self.schedule = schedule
        objective = "v" if schedule.prediction_type == "v_prediction" else "eps"
        self.objective = LoRAObjective(
            unet, vae, text, empty_prompt_ids(self.tokenizer), schedule=schedule, objective=objective,
            min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise, caption_dropout=cfg.caption_dropout,
            clip_skip=self.clip_skip, latent_size=cfg.data.size // f, train_text=train_text)
        self.train_data, self.val_items = build_datasets(cfg, self.dist.rank, self.dist.world_size)

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": lora_parameters(self.unet)}]
        if "text_encoder" in self.layers:
            group: dict[str, Any] = {"params": lora_parameters(self.text_encoder)}
            if self.config.lora.text_lr is not None:
                group["base_lr"] = self.config.lora.text_lr
            groups.append(group)
        return groups

    def compile_network(self) -> None:
        # the adapters stay shared with the original module
        self.objective.unet = torch.compile(self.unet, mode=self.config.compile_mode)

    def metadata(self) -> dict[str, str]:
        return {"base": str(self.config.base), "base_config": self.base_config.to_json(),
                "lora": self.config.lora.to_json()}

    def export(self) -> Path:
        """Write ``RUN/lora.safetensors`` (kohya naming; EMA weights when the run keeps an EMA)."""
        cfg = self.config
        path = self.run.root / LORA_FILE
        info = {"base": str(cfg.base), "step": self.step, "targets": cfg.lora.targets,
                "ema": self.ema is not None}
        swap = self.ema.swapped(self.network) if self.ema is not None else contextlib.nullcontext()
        with swap:
            save_lora(path, self.unet, self.text_encoder if "text_encoder" in self.layers else None,
                      dtype=_DTYPES[cfg.lora.save_precision], info=info)
        return path

    def save(self) -> Path | None:
        path = super().save()
        if self.dist.is_main:
            self.export()
        return path


__all__ = ["LORA_FILE", "LoRAAdapters", "LoRAObjective", "LoRATrainer"]
