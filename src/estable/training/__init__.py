"""Training: one loop, one module per trainer (``estable train KIND``).

    loop.py              Trainer: the loop, checkpoints and exact resume, EMA, DDP/FSDP, mixed precision
    builders.py          what several trainers use: datasets and batches, tokenizers, frozen networks, initial weights
    seeding.py           the seeded random streams of a run
    registry.py          kind → trainer class (the CLI and ``make_trainer``); imports a trainer on first use
    unet_trainer.py      the latent-diffusion U-Net; lora_trainer.py, controlnet_trainer.py and ti_trainer.py
                         subclass it (frozen base model, trained adapters / ControlNet / word vectors)
    vae_trainer.py       the KL autoencoder
    clip_trainer.py      the contrastive text–image pair; clip_exports.py: the files it writes and their readers
    config/              one config dataclass per trainer, presets, JSON files and key=value overrides
    objectives.py        the diffusion and autoencoder losses; clip_objective.py: the contrastive loss
    data.py, shapes/     image folders, tar shards and the procedural shapes world (a package)
    runs.py, ema.py      run folders, logs and checkpoints; the weights' moving average
    distributed.py       torchrun, DDP and FSDP helpers
    bpe.py, assemble.py  learning a BPE vocabulary; one model file from a U-Net run
"""
