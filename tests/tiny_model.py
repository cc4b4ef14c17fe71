"""A tiny Estable model file built in code (no CLIP vocabulary needed): the tiny-unet training preset's networks
with seeded random weights and its shapes-world tokenizer; VAE factor 4, native size 32 px."""

from __future__ import annotations

from pathlib import Path

import torch

from estable.checkpoints.store import LoadedModel, save_model
from estable.config import ModelConfig, TokenizerConfig
from estable.models.unet import UNet
from estable.training.builders import build_text_encoder, build_vae
from estable.training.config import load_config


def tiny_model_file(folder: Path, *, seed: int = 0) -> Path:
    cfg = load_config("unet", "tiny-unet", [])
    vae = build_vae(cfg.vae, seed)
    text, tok = build_text_encoder(cfg.text, seed)
    torch.manual_seed(seed)
    unet = UNet(cfg.model)
    config = ModelConfig(
        family="estable", unet=cfg.model, vae=vae.config, text=text.config,
        tokenizer=TokenizerConfig(max_length=tok.max_length, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        schedule=cfg.schedule,
    )
    model = LoadedModel(config=config, unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok,
                        source=Path("tiny"), format="estable")
    folder.mkdir(parents=True, exist_ok=True)
    return save_model(model, folder / "tiny.safetensors", to="estable", dtype="fp32")
