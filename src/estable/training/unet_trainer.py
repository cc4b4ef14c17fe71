"""``estable train unet``: the latent-diffusion U-Net on frozen VAE latents and frozen text-encoder contexts.

Loss (Rombach et al. 2022, eq. 2): :class:`~estable.training.objectives.UNetObjective` (ε or v, min-SNR-γ, offset
noise, caption dropout). The VAE and the text encoder come from :mod:`estable.training.builders` (random and seeded,
a CLIP run's text tower, or any checkpoint); ``text.train`` trains the text encoder too (saved beside the U-Net);
``latents=cache`` encodes the training set once into the run folder. The only trainer with strategy=fsdp (see
:mod:`estable.training.loop`). The LoRA, ControlNet and textual-inversion trainers subclass it for its data,
tokenizer, draws and sample grid.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from estable.config import UNetConfig
from estable.errors import EstableError
from estable.images import to_pil
from estable.models.unet import UNet
from estable.nn.attention import split_geglu
from estable.training import distributed as D
from estable.training.builders import (
    CachedLatents,
    IndexedSubset,
    build_datasets,
    build_text_encoder,
    build_vae,
    collate,
    load_network,
)
from estable.training.config import TrainConfig, UNetTrainConfig
from estable.training.loop import Trainer
from estable.training.objectives import UNetObjective, empty_prompt_ids
from estable.training.runs import make_grid
from estable.training.shapes.captions import swap_pair_roles, swap_shape


def grown_config(model: UNetConfig, levels: tuple[int, ...]) -> UNetConfig:
    """``model`` with attention at ``levels`` too (``grow_attention``); each must be a level without it."""
    n = len(model.attention_levels)
    for level in levels:
        if level >= n:
            raise EstableError(f"grow_attention: the U-Net has levels 0–{n - 1}, not {level}")
        if model.attention_levels[level]:
            raise EstableError(f"grow_attention: level {level} already has attention")
    return model.replace(attention_levels=tuple(a or i in levels for i, a in enumerate(model.attention_levels)))


def load_grown(unet: UNet, weights: dict[str, torch.Tensor], levels: tuple[int, ...]) -> None:
    """Load a trained U-Net's ``weights`` into ``unet``, which has attention blocks at ``levels`` where they were not
    trained: those blocks keep their fresh initialisation, except each output projection, set to zero — a
    SpatialTransformer adds its output to its input, so the grown network computes what the loaded one did."""
    new = [f"down_blocks.{level}.attentions." for level in levels]
    new += [f"up_blocks.{len(unet.up_blocks) - 1 - level}.attentions." for level in levels]
    result = unet.load_state_dict(weights, strict=not levels)
    stray = [k for k in result.missing_keys if not k.startswith(tuple(new))] + list(result.unexpected_keys)
    if stray:
        raise EstableError(f"init_from does not match the U-Net (grow_attention={list(levels)}): "
                           f"{', '.join(stray[:5])}{' …' if len(stray) > 5 else ''}")
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.startswith(tuple(new)) and name.endswith(".proj_out"):
                module.weight.zero_()
                module.bias.zero_()


class UNetTrainer(Trainer):
    """Latent-diffusion U-Net on frozen VAE latents and frozen text-encoder contexts."""

    kind = "unet"
    supports_fsdp = True  # (the subclasses on a frozen base model turn it off)
    config: UNetTrainConfig
    train_text = False  # text.train: the text encoder learns too (subclasses with other configs leave it off)

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        assert isinstance(config, UNetTrainConfig)
        if config.init_from:
            model_cfg, self._init_weights = load_network("unet", config.init_from)
            config = config.replace(model=grown_config(model_cfg, config.grow_attention))
        return config

    def build(self) -> None:
        cfg = self.config
        unet = UNet(cfg.model)
        if cfg.init_from:
            load_grown(unet, self._init_weights, cfg.grow_attention)
            del self._init_weights
        self.text_encoder, self.tokenizer = build_text_encoder(cfg.text, cfg.seed)
        self.vae = build_vae(cfg.vae, cfg.seed)
        if self.vae.config.latent_channels != cfg.model.in_channels:
            raise EstableError(f"the VAE makes {self.vae.config.latent_channels}-channel latents but the U-Net takes "
                               f"{cfg.model.in_channels} channels")
        if self.text_encoder.config.width != cfg.model.context_dim:
            raise EstableError(f"the text encoder's width {self.text_encoder.config.width} differs from the U-Net's "
                               f"context_dim {cfg.model.context_dim}")
        f = self.vae.config.downsample_factor
        if cfg.data.size % f:
            raise EstableError(f"data.size {cfg.data.size} is not a multiple of the VAE's factor {f}")
        self.network = self.unet = unet
        self.clip_skip, self.schedule = cfg.text.clip_skip, cfg.schedule
        self.objective = UNetObjective(
            unet, self.vae, self.text_encoder, empty_prompt_ids(self.tokenizer), schedule=cfg.schedule,
            objective=cfg.objective, min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise,
            caption_dropout=cfg.caption_dropout, clip_skip=cfg.text.clip_skip, latent_size=cfg.data.size // f,
            train_text=cfg.text.train, late_timesteps=(cfg.timestep_bias.portion, cfg.timestep_bias.multiplier),
            role_contrast=(cfg.role_contrast.weight, cfg.role_contrast.margin, cfg.role_contrast.min_t))
        self.train_text = cfg.text.train
        if self.train_text:  # saved in every checkpoint beside the U-Net (assemble_model exports it)
            self.extra_networks["text_encoder"] = self.text_encoder
        self.train_data, self.val_items = build_datasets(cfg, self.dist.rank, self.dist.world_size)
        if cfg.latents == "cache":
            self.train_data = self.latent_cache(self.train_data)

    def latent_cache(self, dataset: Any) -> CachedLatents:
        """Encode the whole training set once into the run folder and train on the stored posteriors.

        Each rank encodes a contiguous share (``latents_cache.R-of-W.safetensors``; DataLoader workers render or
        read the images) under the run's autocast, stored as float16 (posterior μ and σ, and the captions); every
        rank then reads all shares. A share whose fingerprint (data, VAE, range) matches is reused on resume."""
        from estable.checkpoints.io import read_safetensors, read_safetensors_header, write_safetensors

        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise EstableError("latents=cache needs an indexable data source (shapes or an image folder), "
                               "not tar shards")
        cfg, info = self.config, self.dist
        n, world = len(dataset), info.world_size
        data = {k: v for k, v in cfg.data.to_dict().items() if k != "num_workers"}  # how many load it: not what
        base = {"data": data, "vae": cfg.vae.to_dict(), "n": n}
        shares = [(r * n // world, (r + 1) * n // world) for r in range(world)]
        paths = [self.run.root / f"latents_cache.{r}-of-{world}.safetensors" for r in range(world)]
        prints = [json.dumps({**base, "range": list(rng)}, sort_keys=True) for rng in shares]

        lo, hi = shares[info.rank]
        mine = paths[info.rank]
        if not (mine.is_file() and read_safetensors_header(mine)[1].get("fingerprint") == prints[info.rank]):
            vae = self.vae.to(self.device)
            loader = torch.utils.data.DataLoader(
                IndexedSubset(dataset, range(lo, hi)), batch_size=64, collate_fn=collate,
                num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
            means, stds, captions = [], [], []
            show = self.progress if self.progress is not None else sys.stderr.isatty()
            for batch in tqdm(loader, desc=f"caching latents {lo}-{hi}", disable=not (show and info.is_main)):
                with torch.no_grad(), self.autocast():
                    post = vae.encode(batch["pixel_values"].to(self.device, non_blocking=True))
                mean, std = post.mean.float(), post.std.float()
                if not (bool(torch.isfinite(mean).all()) and float(mean.abs().max()) < 6e4):
                    raise EstableError("the VAE gave non-finite or out-of-range latents while caching; check "
                                       f"vae.source ({cfg.vae.source})")
                means.append(mean.half().cpu())
                stds.append(std.half().cpu())
                captions += batch["text"]
            blob = torch.frombuffer(bytearray(json.dumps(captions).encode("utf-8")), dtype=torch.uint8)
            write_safetensors(mine, {"mean": torch.cat(means), "std": torch.cat(stds), "captions": blob},
                              {"fingerprint": prints[info.rank]})
        D.barrier()
        means, stds, captions = [], [], []
        for path, fingerprint in zip(paths, prints):
            tensors, meta = read_safetensors(path)
            if meta.get("fingerprint") != fingerprint:
                raise EstableError(f"{path} does not belong to this run's data and VAE; delete it and start again")
            means.append(tensors["mean"])
            stds.append(tensors["std"])
            captions += json.loads(bytes(tensors["captions"].numpy()).decode("utf-8"))
        return CachedLatents(torch.cat(means), torch.cat(stds), captions)

    def averaged_extras(self) -> list[str]:
        return ["text_encoder"] if self.train_text else []

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.train_text:
            return super().param_groups()
        text = [p for p in self.text_encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in text}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.params if id(p) not in ids]},
                                        {"params": text}]
        if self.config.text.lr is not None:
            groups[1]["base_lr"] = self.config.text.lr
        return groups

    def compile_network(self) -> None:
        if self.config.compile_scope == "blocks":
            from estable.speed import compile_blocks

            compile_blocks(self.network)  # in place: same module, same state-dict keys
        else:
            split_geglu(self.network)  # no concatenation in GEGLU's backward (nn/attention.py)
            # the original module stays self.network
            self.objective.unet = torch.compile(self.network, mode=self.config.compile_mode)

    def fsdp_blocks(self) -> list[nn.Module]:
        """FSDP units: each down block, the mid block and each up block (the U-Net itself is the root unit and
        keeps conv_in, the time embedding and the output head)."""
        u = self.network
        return [*u.down_blocks, u.mid_block, *u.up_blocks]

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out["input_ids"] = self.to_device(self.tokenizer(batch["text"]))  # (B, L)
        contrast = getattr(self.config, "role_contrast", None)
        if contrast and contrast.weight > 0:
            swap = swap_shape if contrast.kind == "shapes" else swap_pair_roles
            swapped = [swap(text) for text in batch["text"]]  # None where there is nothing to contrast
            out["swapped"] = torch.tensor([s is not None for s in swapped], device=self.device)  # (B,)
            out["swapped_ids"] = self.to_device(self.tokenizer([s or text for s, text in zip(swapped, batch["text"])]))
        return out

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective.draw(n, generator)

    def metadata(self) -> dict[str, str]:
        return {"config": self.config.model.to_json(), "schedule": self.config.schedule.to_json()}

    @torch.no_grad()
    def sample_image(self) -> Image.Image:
        """The fixed prompts through the configured sampler with classifier-free guidance, decoded by the VAE."""
        prompts = list(self.config.sample.prompts)
        unet = self.unet  # the uncompiled U-Net (LoRA: with its adapters)
        images = self.guided_samples(prompts, lambda inp, t, ctx: unet(inp, t, ctx))  # (n, 3, H, W)
        return make_grid(to_pil(images), columns=min(len(prompts), 4))

    @torch.no_grad()
    def guided_samples(self, texts: list[str],
                       forward: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``texts`` sampled with the configured sampler, steps, seed and classifier-free guidance, decoded:
        (n, 3, H, W) in [-1, 1]. ``forward(inp, t, ctx)`` is the network on the doubled batch (unconditional half
        first), run under the trainer's autocast."""
        from estable.sampling.samplers import get_sampler, make_sigmas, vp_denoiser

        s, dev, n = self.config.sample, self.device, len(texts)
        ids = self.tokenizer(texts).to(dev)
        empty = self.tokenizer([""] * n).to(dev)
        with self.autocast():
            cond = self.text_encoder.encode(ids, clip_skip=self.clip_skip)  # (n, L, d)
            uncond = self.text_encoder.encode(empty, clip_skip=self.clip_skip)
        spec = get_sampler(s.sampler)
        plan = make_sigmas(spec, self.schedule, s.steps)
        gen = torch.Generator().manual_seed(s.seed)
        c, h, w = self.objective.latent_shape
        x = plan.initial_latents(torch.randn((n, c, h, w), generator=gen)).to(dev)
        ctx, scale = torch.cat([uncond, cond]), s.cfg_scale

        def model(x_t: torch.Tensor, t: float) -> torch.Tensor:
            with self.autocast():
                out = forward(torch.cat([x_t, x_t]), t, ctx).float()  # (2n, C, h, w)
            u, c_ = out.chunk(2)
            return u + scale * (c_ - u)  # classifier-free guidance (Ho & Salimans 2022, eq. 6)

        denoise = vp_denoiser(model, self.schedule.prediction_type, plan.timestep)
        x = spec.fn(denoise, x, plan.sigmas, generator=gen, **plan.options)
        return self.vae.decode_latents(plan.final_latents(x).float())


__all__ = ["UNetTrainer"]
