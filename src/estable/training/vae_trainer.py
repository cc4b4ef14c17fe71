"""``estable train vae``: the KL autoencoder (Rombach et al. 2022, sec. 3.1): L1 + KL + SSIM, and an optional
PatchGAN discriminator after a warm-up (trained beside it, saved as an extra network). Each checkpoint records the
latent ``scaling_factor`` measured on the validation images. With ``train_encoder=false`` only the decoder is
trained (from ``init_from``): the encoder, its latents and their scaling factor stay as they were. ``outlier_weight``
and ``anchor_weight`` fine-tune a whole VAE against latent spikes while holding its other latents in place;
``droplet_weight`` penalises the decoder's internal peaks (its normalisation droplet), ``worst_weight`` the error of
each image's worst pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from estable.images import to_pil
from estable.models.vae import AutoencoderKL
from estable.training.builders import build_datasets, load_network
from estable.training.config import TrainConfig, VAETrainConfig
from estable.training.loop import Trainer
from estable.training.objectives import PatchDiscriminator, VAEObjective
from estable.training.runs import make_grid


class VAETrainer(Trainer):
    """KL autoencoder: L1 + KL + SSIM, optional PatchGAN after a warm-up."""

    kind = "vae"
    no_fsdp_reason = ("the VAE runs through encode/decode rather than forward, which FSDP does not hook, and its "
                      "discriminator is a second trained network")
    config: VAETrainConfig

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        assert isinstance(config, VAETrainConfig)
        if config.init_from:
            model_cfg, self._init_weights = load_network("vae", config.init_from)
            config = config.replace(model=model_cfg)
        return config

    def build(self) -> None:
        cfg = self.config
        vae = AutoencoderKL(cfg.model)
        if cfg.init_from:
            vae.load_state_dict(self._init_weights, strict=True)
            del self._init_weights
        elif cfg.init_logvar is not None:
            with torch.no_grad():
                vae.quant_conv.bias[cfg.model.latent_channels:].fill_(cfg.init_logvar)  # moments = [μ, log σ²]
        if not cfg.train_encoder:
            for module in (vae.encoder, vae.quant_conv):
                module.requires_grad_(False)
        disc = None
        if cfg.disc.enabled:
            disc = PatchDiscriminator(cfg.model.in_channels, cfg.disc.channels, cfg.disc.layers)
            self.extra_networks["discriminator"] = disc
        self.network = vae
        self.objective = VAEObjective(vae, l1_weight=cfg.l1_weight, kl_weight=cfg.kl_weight,
                                      ssim_weight=cfg.ssim_weight, discriminator=disc, disc_start=cfg.disc.start,
                                      disc_weight=cfg.disc.weight, train_encoder=cfg.train_encoder,
                                      outlier_weight=cfg.outlier_weight, outlier_ratio=cfg.outlier_ratio,
                                      anchor_weight=cfg.anchor_weight,  # anchor: a copy of the init_from encoder
                                      droplet_weight=cfg.droplet_weight, droplet_ratio=cfg.droplet_ratio,
                                      worst_weight=cfg.worst_weight, worst_fraction=cfg.worst_fraction)
        self.train_data, self.val_items = build_datasets(cfg, self.dist.rank, self.dist.world_size)

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        disc = self.extra_networks.get("discriminator")
        if disc is not None:
            lr = self.config.disc.lr or self.config.optim.lr
            groups.append({"params": list(disc.parameters()), "base_lr": lr, "weight_decay": 0.0})
        return groups

    def compile_network(self) -> None:
        # The objective calls encode() and decode(), which a compiled wrapper of the whole VAE would pass through
        # uncompiled (it compiles forward only): compile the encoder and the decoder in place.
        for part in (self.network.encoder, self.network.decoder):
            part.compile(mode=self.config.compile_mode)

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch["pixel_values"].to(self.device, non_blocking=True)}

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective.draw(n, generator, self.config.data.size)

    def call(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch, draws, self.step)

    def metadata(self) -> dict[str, str]:
        """The VAE config, its ``scaling_factor`` measured on the validation images (when there are any; the
        starting VAE's when the encoder is frozen)."""
        cfg = self.config.model
        factor = self.latent_scaling_factor() if self.config.train_encoder else None
        return {"config": (cfg.replace(scaling_factor=factor) if factor is not None else cfg).to_json()}

    @torch.no_grad()
    def latent_scaling_factor(self) -> float | None:
        """1 / std of posterior samples of the validation images, so that the diffusion model sees latents of
        roughly unit variance (Rombach et al. 2022, sec. 4.3.2; SD's 0.18215 was found this way). The noise comes
        from a local generator, so saving a checkpoint does not disturb the run's random state."""
        items = self.val_items
        if not items:
            return None
        gen = torch.Generator().manual_seed(0)
        x = torch.stack([it["pixel_values"] for it in items]).to(self.device)
        posterior = self.network.encode(x)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x.device)
        return float(1.0 / z.float().std())

    @torch.no_grad()
    def sample_image(self) -> Image.Image | None:
        """Originals (top row) over reconstructions from the posterior mean (bottom row)."""
        items = self.val_items[: self.config.sample_count]
        if not items:
            return None
        x = torch.stack([it["pixel_values"] for it in items]).to(self.device)
        with self.autocast():
            x_hat = self.network.decode(self.network.encode(x).mean).float()
        return make_grid(to_pil(x) + to_pil(x_hat), columns=len(items))


__all__ = ["VAETrainer"]
