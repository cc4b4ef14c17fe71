"""One model file from training runs: a U-Net run with the VAE and text encoder it was trained against.

A U-Net run's resolved ``config.json`` names its frozen VAE and text encoder (a VAE run, the text tower of a
CLIP run, any checkpoint the core loads, or seeded random networks for tests); the U-Net comes from the run's
latest checkpoint (its EMA weights when kept). The result is an Estable file (``estable.checkpoints``) that
``load_pipeline`` and every command load like any other model.
"""

from __future__ import annotations

from pathlib import Path

from estable.checkpoints.store import LoadedModel, save_model
from estable.config import ModelConfig, TokenizerConfig, UNetConfig
from estable.errors import EstableError
from estable.models.unet import UNet
from estable.training.builders import build_text_encoder, build_vae, load_network
from estable.training.config import UNetTrainConfig, load_config
from estable.training.runs import latest_checkpoint


def assemble_model(unet_run: str | Path, out: str | Path, *, dtype: str | None = "fp16",
                   overwrite: bool = False) -> Path:
    """Write the model of a U-Net training run (with its VAE, text encoder and tokenizer) to ``out``."""
    run = Path(unet_run)
    if not (run / "config.json").is_file():
        raise EstableError(f"{run} is not a training run folder (it has no config.json)")
    cfg = load_config("unet", run / "config.json")
    if not isinstance(cfg, UNetTrainConfig):
        raise EstableError(f"{run} is not a U-Net training run")
    if latest_checkpoint(run / "checkpoints") is None:  # else the folder would be taken for a diffusers model
        raise EstableError(f"{run} is a training run without checkpoints")
    unet_cfg, weights = load_network("unet", run)
    assert isinstance(unet_cfg, UNetConfig)
    unet = UNet(unet_cfg)
    unet.load_state_dict(weights, strict=True)
    vae = build_vae(cfg.vae, cfg.seed)  # the same frozen networks the run trained against
    text, tok = build_text_encoder(cfg.text, cfg.seed)
    if cfg.text.train:  # trained jointly: the run's own text encoder (its EMA when kept), not the starting one
        text.load_state_dict(_trained_text_encoder(run), strict=True)
    config = ModelConfig(
        family="estable",
        unet=unet_cfg,
        vae=vae.config,
        text=text.config,
        tokenizer=TokenizerConfig(max_length=tok.max_length, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        schedule=cfg.schedule,
        clip_skip=cfg.text.clip_skip,
    )
    model = LoadedModel(config=config, unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok,
                        source=run, format="estable")
    return save_model(model, out, to="estable", dtype=dtype, overwrite=overwrite)


def _trained_text_encoder(run: Path) -> dict:
    """The text-encoder weights in a U-Net run's latest checkpoint (text.train=true): EMA weights when kept."""
    from estable.checkpoints.io import read_safetensors

    found = latest_checkpoint(run / "checkpoints")
    if found is None:
        raise EstableError(f"{run} has no checkpoints")
    for name in ("text_encoder_ema.safetensors", "text_encoder.safetensors"):
        if (found / name).is_file():
            return read_safetensors(found / name)[0]
    raise EstableError(f"{found} holds no text encoder, but the run trained one (text.train=true)")
