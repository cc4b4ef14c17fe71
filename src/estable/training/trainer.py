"""The training loop (one, generic) and the U-Net and VAE trainers built on it.

One optimizer step (``Trainer.train``):

    lr ← schedule(step)                                   linear warm-up, then constant or cosine
    repeat grad_accum times:                              (gradients synchronised on the last one only)
        batch ← this rank's slice of the next global micro-batch (seeded order, resumable position)
        draws ← every random number of the global micro-batch from ONE seeded CPU generator; keep this rank's rows
        loss  ← objective(batch, draws) under autocast; backward(loss · scale / grad_accum)
    unscale, clip the gradient norm, AdamW step (skipped by the GradScaler on inf/NaN), EMA update
    log / validate / sample / checkpoint on their schedules (rank 0 writes)

Exact resume: the checkpoint holds the weights, EMA, optimizer, GradScaler, the draw generator, the global RNG
states and the data position, so N steps in one go and N/2 + resume + N/2 give identical weights on the CPU.
The draws come from one generator for the whole global batch, so K processes × batch b and 1 process ×
batch K·b see the same data and the same noise (gradients then agree up to float summation order).

strategy=fsdp (U-Net trainer; see training/distributed.py): the U-Net is sharded with FSDP2 (each down block, the
mid block and each up block is a unit, the U-Net the root); the frozen VAE and text encoder stay whole on every
rank. AdamW steps on the shards. The EMA shadows are DTensors sharded like the parameters (fp32, so 4 bytes ×
params / world per rank). Checkpoints gather everything to full tensors on rank 0, so the files have the
single-process layout and load anywhere (DDP, one process, or FSDP with another world size); resume cuts them back
into shards. Validation and sample grids run on every rank (each sharded forward needs all ranks); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from estable.config import UNetConfig, VAEConfig
from estable.errors import CheckpointError, EstableError
from estable.images import to_pil
from estable.models.text import TextEncoder
from estable.models.unet import UNet
from estable.models.vae import AutoencoderKL
from estable.tokenizer import CLIPTokenizer, bytes_to_unicode
from estable.training import distributed as D
from estable.training.config import (
    OptimConfig,
    TextSource,
    TrainConfig,
    UNetTrainConfig,
    VAESource,
    VAETrainConfig,
)
from estable.training.data import ImageCaptionFolder, ShapesDataset, TarShards
from estable.training.ema import EMA
from estable.training.objectives import PatchDiscriminator, UNetObjective, VAEObjective, empty_prompt_ids
from estable.training.runs import (
    Checkpoint,
    Run,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    make_grid,
    restore_rng_state,
    save_checkpoint,
)
from estable.training.shapes import ShapesWorld, caption_for

# Trainer kinds that implement strategy=fsdp, and why the others refuse it.
FSDP_KINDS = ("unet",)
_NO_FSDP_REASON = {
    "lora": "a LoRA run trains small adapters on a frozen base, so sharding them saves next to nothing",
    "clip": "the CLIP pair's logit-scale clamp and exports work on whole weights",
    "vae": "the VAE runs through encode/decode rather than forward, which FSDP does not hook, and its "
           "discriminator is a second trained network",
}

# Offsets that give each seeded stream of a run its own seed (model init, frozen random networks, draws, …).
_SEED_INIT, _SEED_TEXT, _SEED_VAE, _SEED_DRAWS, _SEED_VAL, _SEED_VAL_DATA, _SEED_GLOBAL = 0, 1, 2, 3, 4, 5, 6


def _seeded(seed: int, stream: int) -> int:
    return (seed * 1_000_003 + stream * 7_919) % (2**63)


# ---------------------------------------------------------------------------------------------------------
# Learning rate, data order
# ---------------------------------------------------------------------------------------------------------


def lr_factor(optim: OptimConfig, step: int, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for the optimizer step with 0-based index ``step``.

    Warm-up: (step + 1) / warmup_steps for the first warmup_steps steps; then 1 (constant) or the cosine
    half-wave from 1 to min_lr_ratio over the remaining steps (Loshchilov & Hutter 2017, eq. 5, one cycle).
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless per-rank batches over a seeded global order of ``n`` items.

    The global order is a fresh permutation per epoch, a pure function of (seed, epoch). Global micro-batch k
    is positions [k·B, (k + 1)·B) of the concatenated epochs, B = batch_size · world_size; rank r takes the
    contiguous slice [r·b, (r + 1)·b). ``start`` is the global position to begin at (samples consumed by all
    ranks), which is what a checkpoint records.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start: int = 0) -> None:
        if n < 1:
            raise EstableError("the dataset is empty")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        self._epoch_cache = (epoch, order)
        return order

    def global_indices(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            epoch, i = divmod(p, self.n)
            out.append(int(self.order(epoch)[i]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        b, world = self.batch_size, self.world_size
        position = self.start
        while True:
            yield self.global_indices(position + self.rank * b, b)
            position += b * world

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return sys.maxsize


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list everything else (captions)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset: torch.utils.data.Dataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


class CachedLatents(torch.utils.data.Dataset):
    """Precomputed VAE posteriors (mean, std) and captions, indexed like the dataset they came from."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str]) -> None:
        self.mean, self.std, self.captions = mean, std, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latent_mean": self.mean[i], "latent_std": self.std[i], "text": self.captions[i]}


def build_datasets(cfg: TrainConfig, rank: int, world_size: int) -> tuple[Any, list[dict[str, Any]]]:
    """(training dataset, validation items) for ``cfg.data``: shapes world, image folder or tar shards."""
    data = cfg.data
    src = data.source
    if src == "shapes":
        world = ShapesWorld("train", data.shapes_seed, size=data.size, kind_weights=data.shapes_kinds)
        train = ShapesDataset(world, data.size, data.shapes_length)
        val_world = ShapesWorld("train", _seeded(data.shapes_seed, _SEED_VAL_DATA) % (2**31), size=data.size)
        val = [ShapesDataset(val_world, data.size, max(1, data.val_size))[i] for i in range(data.val_size)]
        return train, val
    path = Path(src)
    if path.is_dir():
        full = ImageCaptionFolder(path, data.size, center_crop=data.center_crop, random_flip=data.random_flip,
                                  caption_column=data.caption_column)
        n = len(full)
        if n <= data.val_size:
            raise EstableError(f"{path} has {n} images; need more than data.val_size={data.val_size}")
        train = _Subset(full, range(n - data.val_size))
        return train, [full[i] for i in range(n - data.val_size, n)]
    if ".tar" in src:
        shards = TarShards(src, data.size, center_crop=data.center_crop, random_flip=data.random_flip, shuffle=True,
                           seed=cfg.seed, rank=rank, world_size=world_size)
        val_stream = TarShards(src, data.size, center_crop=data.center_crop, rank=0, world_size=1)
        val = []
        for item in val_stream:
            if len(val) >= data.val_size:
                break
            val.append(item)
        return shards, val
    raise EstableError(f"data source {src!r} is not 'shapes', a folder with metadata.jsonl, or a .tar shard pattern")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, frozen networks, initial weights
# ---------------------------------------------------------------------------------------------------------


def shapes_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A small CLIP-style BPE vocabulary that spells every word of the shapes world's captions as one token.

    Vocabulary: the 256 byte symbols, the same with ``</w>``, one merge chain per word (longest words first, so a
    word's own chain outranks the merges of its sub-words), then bos and eos. Any other text still tokenizes
    (into byte symbols).
    """
    from estable.training.shapes import BACKGROUND_KINDS, COLOURS, COUNT_WORDS, PLURALS, RELATION_PHRASES, SIZES

    world = ShapesWorld("train", 0)
    words: set[str] = {"a", "an", "and", "on", "against", "background", "textured", "gradient"}
    for text in [caption_for(world.scene(i)) for i in range(300)]:
        words.update(text.split())
    words.update(COLOURS, PLURALS, PLURALS.values(), SIZES, BACKGROUND_KINDS, COUNT_WORDS.values(),
                 *(p.split() for p in RELATION_PHRASES.values()))
    table = bytes_to_unicode()
    byte_symbols = list(table.values())

    def chain(word: str) -> list[tuple[str, str]]:  # ((w0, w1), (w0w1, w2), …) ending in "</w>"
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        out, cur = [], symbols[0]
        for sym in symbols[1:]:
            out.append((cur, sym))
            cur += sym
        return out

    ordered = sorted(words, key=lambda w: (-len(w), w))
    # A merge of one word can pre-empt another word's chain (BPE applies the lowest-ranked pair first); move
    # the chains of words that do not come out whole to the front until every word is one token.
    for _ in range(len(ordered)):
        merges = list(dict.fromkeys(m for w in ordered for m in chain(w)))
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + list(dict.fromkeys(a + b for a, b in merges))
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        tok = CLIPTokenizer.from_vocab({t: i for i, t in enumerate(vocab)}, merges, max_length=max_length)
        split = [w for w in ordered if len(tok.encode(w)) > 1]
        if not split:
            break
        ordered = split + [w for w in ordered if w not in split]
    return tok


def build_tokenizer(src: TextSource) -> CLIPTokenizer:
    if src.tokenizer == "shapes":
        return shapes_tokenizer(src.max_length)
    if src.tokenizer == "clip":
        from estable.tokenizer import find_clip_vocab

        return CLIPTokenizer.from_bpe_file(find_clip_vocab(), max_length=src.max_length)
    if Path(src.tokenizer).is_dir():
        return CLIPTokenizer.from_folder(src.tokenizer)
    raise EstableError(f"text.tokenizer {src.tokenizer!r} is not 'clip', 'shapes' or a tokenizer folder")


def build_text_encoder(src: TextSource, seed: int) -> tuple[TextEncoder, CLIPTokenizer]:
    """The frozen text encoder and its tokenizer: random (seeded) from ``src.config``, the text tower exported by
    a CLIP run (``text_encoder.safetensors`` or the run folder; its own tokenizer unless ``src.tokenizer`` is a
    folder), or the text encoder of any checkpoint the core loads."""
    if src.source == "random":
        tok = build_tokenizer(src)
        cfg = src.config.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                                 max_positions=max(src.config.max_positions, tok.max_length))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seeded(seed, _SEED_TEXT))
            return TextEncoder(cfg), tok
    from estable.training.clip_trainer import find_text_encoder_export, load_text_encoder

    export = find_text_encoder_export(src.source)
    if export is not None:  # the text tower of an Estable CLIP run (file or run folder)
        encoder, own = load_text_encoder(export, max_length=src.max_length)
        return encoder, own if src.tokenizer in ("clip", "shapes") else build_tokenizer(src)
    from estable.checkpoints.store import load_model

    model = load_model(src.source, dtype="fp32")  # frozen in fp32 (an fp16 file too); autocast computes in bf16/fp16
    tok = model.require_tokenizer() if src.tokenizer in ("clip", "shapes") else build_tokenizer(src)
    return model.text_encoder, tok


def load_network(kind: str, source: str | Path) -> tuple[UNetConfig | VAEConfig, dict[str, torch.Tensor]]:
    """(config, weights) of a U-Net or VAE from an Estable training run / checkpoint folder (EMA weights when
    present) or from any checkpoint the core loads (SD file, diffusers folder, Estable file)."""
    cls = UNetConfig if kind == "unet" else VAEConfig
    path = Path(source)
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path} is a training run without checkpoints")
        path = found
    if path.is_dir() and (path / "model.safetensors").is_file():
        from estable.checkpoints.io import read_safetensors

        file = path / "ema.safetensors" if (path / "ema.safetensors").is_file() else path / "model.safetensors"
        tensors, meta = read_safetensors(file)
        if meta.get("kind") != kind:
            raise CheckpointError(f"{path} holds a {meta.get('kind')!r} network, not a {kind}")
        return cls.from_dict(json.loads(meta["config"])), tensors
    from estable.checkpoints.store import load_model

    model = load_model(source)
    net = model.unet if kind == "unet" else model.vae
    return net.config, net.state_dict()


def build_vae(src: VAESource, seed: int) -> AutoencoderKL:
    if src.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seeded(seed, _SEED_VAE))
            return AutoencoderKL(src.config)
    cfg, sd = load_network("vae", src.source)
    vae = AutoencoderKL(cfg)  # type: ignore[arg-type]
    vae.load_state_dict(sd, strict=True)
    return vae


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the CPU one, and CUDA's through torch.manual_seed)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)


def resolve_device(spec: str, info: D.DistInfo) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise EstableError(f"device {spec!r} requested but CUDA is not available")
    if spec == "cuda":
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(spec)


# ---------------------------------------------------------------------------------------------------------
# The generic trainer
# ---------------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the loop; subclasses build the networks and say how to draw, forward and sample.

    Subclass hooks: ``build()`` sets ``network`` (the trained nn.Module: EMA, checkpoints), ``objective``
    (nn.Module whose forward returns (loss, metrics); DDP wraps it), ``extra_networks`` (saved beside the model),
    ``train_data`` and ``val_items``; plus ``prepare``, ``draw``, ``call``, ``sample_image``, ``metadata``,
    ``param_groups`` and ``after_optimizer_step``.
    """

    kind = "base"

    def __init__(self, config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool | None = None) -> None:
        self.dist = D.init_distributed()
        if config.strategy == "fsdp" and self.kind not in FSDP_KINDS:
            why = _NO_FSDP_REASON.get(self.kind, "it has no FSDP support")
            raise EstableError(f"strategy=fsdp is not available for the {self.kind} trainer ({why}); use "
                               "strategy=ddp")
        if config.strategy == "fsdp" and not D.fsdp_available():
            raise EstableError(f"strategy=fsdp needs torch >= 2.6 with torch.distributed (this is {torch.__version__});"
                               " use strategy=ddp")
        # FSDP shards only when there are several ranks; a single process trains as usual.
        self.sharded = config.strategy == "fsdp" and self.dist.enabled
        self.device = resolve_device(config.device, self.dist)
        self.config = self.resolve_config(config)
        cfg = self.config
        if resume and not Path(run_dir).is_dir():  # before Run() creates it: a typo must not start a fresh run
            raise EstableError(f"cannot resume: the run folder {run_dir} does not exist")
        self.run = Run(run_dir, is_main=self.dist.is_main, tensorboard=cfg.tensorboard)
        found = self.run.latest_checkpoint()
        if found is not None and not resume:
            raise EstableError(f"{self.run.root} already holds checkpoints; pass --resume to continue that run "
                               "or choose another --run-dir")
        self.progress = progress
        self.extra_networks: dict[str, nn.Module] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seeded(cfg.seed, _SEED_INIT))
            self.build()
        self.objective.to(self.device)
        if cfg.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if cfg.gradient_checkpointing:
            if not hasattr(self.network, "gradient_checkpointing"):
                raise EstableError(f"gradient_checkpointing is not available for the {self.kind} network")
            self.network.gradient_checkpointing = True
        if self.sharded:
            # Shard before the EMA and the optimizer are made, so that both hold shards (DTensors).
            D.shard_fsdp(self.network, self.fsdp_blocks(), self.device)
        self.ema = EMA(self.network, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay is not None else None
        # extra networks that are trained too get an EMA of their own (saved as NAME_ema)
        self.extra_emas = {name: EMA(self.extra_networks[name], cfg.ema_decay, warmup=cfg.ema_warmup)
                           for name in self.averaged_extras()} if cfg.ema_decay is not None else {}
        if cfg.compile:
            self.compile_network()
        self.model = self.objective if self.sharded else D.wrap_ddp(self.objective, self.device)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        if self.sharded and (self.extra_networks or not all(D.is_sharded(p) for p in self.params)):
            # Their gradients would never be synchronised between ranks (no DDP here).
            raise EstableError(f"strategy=fsdp: the {self.kind} trainer has trainable parameters outside the "
                               "sharded network; use strategy=ddp")
        self.optimizer = self.make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.generator = torch.Generator().manual_seed(_seeded(cfg.seed, _SEED_DRAWS))
        self.step = 0
        self.position = 0  # global samples consumed (all ranks)
        self.last_log: dict[str, Any] = {}
        # The global RNGs (dropout such as LoRA's, random flips, a caption picked from a list) start from the seed,
        # one stream per rank, so that a run is a function of its config; a resume restores them instead.
        seed_global_rngs(_seeded(cfg.seed, _SEED_GLOBAL) + self.dist.rank)
        if resume and found is not None:
            self.load_state(load_checkpoint(found))
            self.run.truncate_log(self.step)
        self.run.write_config(cfg.to_dict())

    # -- hooks -------------------------------------------------------------------------------------------------
    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        return config

    def build(self) -> None:
        raise NotImplementedError

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def call(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch, draws)

    def sample_image(self) -> Image.Image | None:
        return None

    def metadata(self) -> dict[str, str]:
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.params}]

    def compile_network(self) -> None:
        raise EstableError(f"compile is not available for the {self.kind} trainer")

    def averaged_extras(self) -> list[str]:
        """Names of ``extra_networks`` that are trained and kept with an EMA like ``network``."""
        return []

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step, before the EMA update (e.g. to clamp a parameter)."""

    def fsdp_blocks(self) -> list[nn.Module]:
        """Submodules of ``network`` that FSDP shards as separate units (strategy=fsdp)."""
        raise EstableError(f"strategy=fsdp is not available for the {self.kind} trainer; use strategy=ddp")

    # -- pieces ------------------------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        groups = self.param_groups()
        for g in groups:
            g.setdefault("base_lr", o.lr)
        kwargs: dict[str, Any] = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        if self.device.type == "cuda" and o.fused:
            try:
                return torch.optim.AdamW(groups, fused=True, **kwargs)
            except (RuntimeError, TypeError):  # fused kernels unsupported for these params / this build
                pass
        return torch.optim.AdamW(groups, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _slice(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b, r = self.config.batch_size, self.dist.rank
        return {k: v[r * b:(r + 1) * b].to(self.device) for k, v in draws.items()}

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's prepared micro-batches from the current data position on (endless)."""
        cfg, info = self.config, self.dist
        data = self.train_data
        common = {"collate_fn": collate, "num_workers": cfg.data.num_workers,
                  "pin_memory": self.device.type == "cuda", "generator": torch.Generator(),
                  "persistent_workers": cfg.data.num_workers > 0}
        if isinstance(data, torch.utils.data.IterableDataset):
            # A stream cannot seek: skip the micro-batches this rank consumed before the checkpoint.
            skip = self.position // (cfg.batch_size * info.world_size)
            epoch = 0
            while True:
                data.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, drop_last=True, **common)
                got = False
                for batch in loader:
                    got = True
                    if skip:
                        skip -= 1
                        continue
                    yield self.prepare(batch)
                if not got:
                    raise EstableError(f"data source {cfg.data.source!r} yielded no complete batch")
                epoch += 1
        sampler = ResumableBatchSampler(len(data), cfg.batch_size, rank=info.rank, world_size=info.world_size,
                                        seed=cfg.seed, start=self.position)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, **common)
        for batch in loader:
            yield self.prepare(batch)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lr_schedule": {"name": self.config.optim.schedule, "factor": lr_factor(
                self.config.optim, self.step, self.config.max_steps)},
            "rng": capture_rng_state(),
            "generator": self.generator.get_state(),
            "data": {"position": self.position},
            "config": self.config.to_json(),
        }

    def load_state(self, ckpt: Checkpoint) -> None:
        st = ckpt.state
        if st.get("kind") != self.kind:
            raise CheckpointError(f"{ckpt.path} is a {st.get('kind')!r} checkpoint, not {self.kind}")
        model_sd = ckpt.tensors["model"]
        if self.sharded:  # full tensors from the file → this rank's shards
            model_sd = D.shard_like(model_sd, self.network.state_dict())
        try:
            self.network.load_state_dict(model_sd, strict=True)
            for name, module in self.extra_networks.items():
                module.load_state_dict(ckpt.tensors[name], strict=True)
        except (RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise CheckpointError(f"{ckpt.path} does not fit the configured {self.kind} (was the model config or "
                                  f"the discriminator switch changed since the run started?): {first}") from None
        if self.ema is not None:
            if "ema" not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path} has no EMA weights but this run uses ema_decay")
            ema_sd = D.shard_like(ckpt.tensors["ema"], self.ema.shadow) if self.sharded else ckpt.tensors["ema"]
            self.ema.load_state_dict(ema_sd)
        for name, ema in self.extra_emas.items():
            if f"{name}_ema" not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path} has no EMA weights of the {name}")
            ema.load_state_dict(ckpt.tensors[f"{name}_ema"])
        optim_sd = D.shard_optimizer_state(self.optimizer, st["optimizer"]) if self.sharded else st["optimizer"]
        self.optimizer.load_state_dict(optim_sd)
        self.scaler.load_state_dict(st["scaler"])
        self.generator.set_state(st["generator"])
        restore_rng_state(st["rng"])
        self.position = int(st["data"]["position"])
        self.step = ckpt.step

    def save(self) -> Path | None:
        D.barrier()
        path = None
        # Under FSDP every rank takes part in gathering the shards into full tensors (collectives).
        if self.dist.is_main or self.sharded:
            tensors = {"model": self.network.state_dict()}
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            tensors.update({k: m.state_dict() for k, m in self.extra_networks.items()})
            tensors.update({f"{k}_ema": e.state_dict() for k, e in self.extra_emas.items()})
            state = self.state_dict()
            if self.sharded:  # full CPU tensors on rank 0 (None elsewhere), one all-gather per DTensor
                tensors = D.gather_full(tensors, keep=self.dist.is_main)
                state["optimizer"] = D.gather_full(state["optimizer"], keep=self.dist.is_main)
            if self.dist.is_main:
                meta = {"kind": self.kind, "train_config": self.config.to_json(), **self.metadata()}
                path = save_checkpoint(self.run.checkpoints_dir, self.step, tensors, state, meta,
                                       keep=self.config.keep_checkpoints)
        D.barrier()
        return path

    # -- periodic work -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Loss on the fixed held-out batch with fixed draws (rank 0; under FSDP every rank computes it, since the
        sharded forward needs all ranks, and rank 0 logs it)."""
        if not (self.dist.is_main or self.sharded) or not self.val_items:
            return None
        batch = self.prepare(collate(self.val_items))
        gen = torch.Generator().manual_seed(_seeded(self.config.seed, _SEED_VAL))
        draws = {k: v.to(self.device) for k, v in self.draw(len(self.val_items), gen).items()}
        self.objective.eval()
        with self.autocast():
            loss, metrics = self.call(self.objective, batch, draws)
        self.objective.train()
        record = {"type": "val", "step": self.step, "loss": float(loss),
                  **{k: float(v) for k, v in metrics.items()}}
        self.run.log(record)
        return record

    @torch.no_grad()
    def sample(self) -> Path | None:
        if not (self.dist.is_main or self.sharded):  # FSDP: every rank runs the sampler, rank 0 writes
            return None
        self.objective.eval()
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.swapped(self.network))
            for name, ema in self.extra_emas.items():
                stack.enter_context(ema.swapped(self.extra_networks[name]))
            image = self.sample_image()
        self.objective.train()
        if image is None or not self.dist.is_main:
            return None
        path = self.run.save_image(image, self.step)
        self.run.log({"type": "sample", "step": self.step, "path": str(path.relative_to(self.run.root))})
        return path

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict[str, Any]:
        """Run until ``max_steps`` (or stop early at step ``until``, saving a checkpoint there, as a preempted
        job would); returns the last training log record."""
        cfg, info = self.config, self.dist
        stop = cfg.max_steps if until is None else min(until, cfg.max_steps)
        b, accum, world = cfg.batch_size, cfg.grad_accum, info.world_size
        show = self.progress if self.progress is not None else (info.is_main and sys.stderr.isatty())
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not show or not info.is_main, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
        data = self.batches()
        sums: dict[str, torch.Tensor] = {}
        count, window_steps, t0 = 0, 0, time.perf_counter()
        deadline = None if cfg.max_minutes is None else time.monotonic() + 60.0 * cfg.max_minutes
        self.objective.train()
        try:
            while self.step < stop:
                factor = lr_factor(cfg.optim, self.step, cfg.max_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                for micro in range(accum):
                    batch = next(data)
                    self.position += b * world
                    draws = self._slice(self.draw(b * world, self.generator))
                    # backward inside the block: FSDP decides on gradient communication during backward
                    with D.no_sync(self.model, micro < accum - 1):
                        with self.autocast():
                            loss, metrics = self.call(self.model, batch, draws)
                        self.scaler.scale(loss / accum).backward()
                    for k, v in {"loss": loss.detach(), **metrics}.items():
                        sums[k] = sums.get(k, 0) + v.detach().float()
                    count += 1
                self.scaler.unscale_(self.optimizer)
                # FSDP: the norm over all shards (clip_grad_norm_ reduces DTensor norms); full_value makes it plain
                grad_norm = D.full_value(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.after_optimizer_step()
                self.step += 1
                window_steps += 1
                if self.ema is not None:
                    self.ema.update(self.network, self.step)
                for name, ema in self.extra_emas.items():
                    ema.update(self.extra_networks[name], self.step)
                bar.update(1)
                if deadline is not None and self.step % cfg.log_every == 0:
                    # every rank must stop at the same step: stop when any rank is out of time
                    late = torch.tensor(float(time.monotonic() > deadline), device=self.device)
                    if float(D.all_reduce_mean(late)) > 0:
                        stop = self.step
                if self.step % cfg.log_every == 0 or self.step == stop:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    means = {k: float(D.all_reduce_mean(v / count)) for k, v in sums.items()}
                    rate = window_steps / elapsed
                    record = {"type": "train", "step": self.step, **means, "lr": cfg.optim.lr * factor,
                              "grad_norm": float(grad_norm), "steps_per_s": rate,
                              "images_per_s": rate * b * accum * world, "samples_seen": self.position}
                    if self.scaler.is_enabled():
                        record["loss_scale"] = float(self.scaler.get_scale())
                    self.run.log(record)
                    self.last_log = record
                    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    sums, count, window_steps, t0 = {}, 0, 0, time.perf_counter()
                if cfg.val_every and self.step % cfg.val_every == 0:
                    self.validate()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample()
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == stop:
                    self.save()
        finally:
            bar.close()
        D.barrier()
        self.run.close()
        return self.last_log

    def close(self) -> None:
        """Release the DDP wrapper before the process group goes away (gloo's worker threads may otherwise still
        hold work items when the interpreter shuts down, which aborts the process)."""
        import gc

        self.model = self.objective
        gc.collect()


# ---------------------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------------------


class UNetTrainer(Trainer):
    """Latent-diffusion U-Net on frozen VAE latents and frozen text-encoder contexts."""

    kind = "unet"
    config: UNetTrainConfig
    train_text = False  # text.train: the text encoder learns too (subclasses with other configs leave it off)

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        assert isinstance(config, UNetTrainConfig)
        if config.init_from:
            model_cfg, self._init_weights = load_network("unet", config.init_from)
            config = config.replace(model=model_cfg)
        return config

    def build(self) -> None:
        cfg = self.config
        unet = UNet(cfg.model)
        if cfg.init_from:
            unet.load_state_dict(self._init_weights, strict=True)
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
            train_text=cfg.text.train)
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
        base = {"data": cfg.data.to_dict(), "vae": cfg.vae.to_dict(), "n": n}
        shares = [(r * n // world, (r + 1) * n // world) for r in range(world)]
        paths = [self.run.root / f"latents_cache.{r}-of-{world}.safetensors" for r in range(world)]
        prints = [json.dumps({**base, "range": list(rng)}, sort_keys=True) for rng in shares]

        lo, hi = shares[info.rank]
        mine = paths[info.rank]
        if not (mine.is_file() and read_safetensors_header(mine)[1].get("fingerprint") == prints[info.rank]):
            vae = self.vae.to(self.device)
            loader = torch.utils.data.DataLoader(
                _Subset(dataset, range(lo, hi)), batch_size=64, collate_fn=collate, num_workers=cfg.data.num_workers,
                pin_memory=self.device.type == "cuda")
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
            self.objective.unet = torch.compile(self.network)  # the original module stays self.network

    def fsdp_blocks(self) -> list[nn.Module]:
        """FSDP units: each down block, the mid block and each up block (the U-Net itself is the root unit and
        keeps conv_in, the time embedding and the output head)."""
        u = self.network
        return [*u.down_blocks, u.mid_block, *u.up_blocks]

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out["input_ids"] = self.tokenizer(batch["text"]).to(self.device)  # (B, L)
        return out

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective.draw(n, generator)

    def metadata(self) -> dict[str, str]:
        return {"config": self.config.model.to_json(), "schedule": self.config.schedule.to_json()}

    @torch.no_grad()
    def sample_image(self) -> Image.Image:
        """The fixed prompts through the configured sampler with classifier-free guidance, decoded by the VAE."""
        from estable.sampling.samplers import get_sampler, make_sigmas, vp_denoiser

        s = self.config.sample
        prompts = list(s.prompts)
        n = len(prompts)
        dev = self.device
        ids = self.tokenizer(prompts).to(dev)
        empty = self.tokenizer([""] * n).to(dev)
        with self.autocast():
            cond = self.text_encoder.encode(ids, clip_skip=self.clip_skip)  # (n, L, d)
            uncond = self.text_encoder.encode(empty, clip_skip=self.clip_skip)
        spec = get_sampler(s.sampler)
        plan = make_sigmas(spec, self.schedule, s.steps)
        gen = torch.Generator().manual_seed(s.seed)
        c, h, w = self.objective.latent_shape
        x = plan.initial_latents(torch.randn((n, c, h, w), generator=gen)).to(dev)
        unet, scale = self.unet, s.cfg_scale  # the uncompiled U-Net (LoRA: with its adapters)

        def model(x_t: torch.Tensor, t: float) -> torch.Tensor:
            with self.autocast():
                out = unet(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).float()  # (2n, C, h, w)
            u, c_ = out.chunk(2)
            return u + scale * (c_ - u)  # classifier-free guidance (Ho & Salimans 2022, eq. 6)

        denoise = vp_denoiser(model, self.schedule.prediction_type, plan.timestep)
        x = spec.fn(denoise, x, plan.sigmas, generator=gen, **plan.options)
        images = self.vae.decode_latents(plan.final_latents(x).float())  # (n, 3, H, W)
        return make_grid(to_pil(images), columns=min(n, 4))


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


class VAETrainer(Trainer):
    """KL autoencoder: L1 + KL + SSIM, optional PatchGAN after a warm-up."""

    kind = "vae"
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
        disc = None
        if cfg.disc.enabled:
            disc = PatchDiscriminator(cfg.model.in_channels, cfg.disc.channels, cfg.disc.layers)
            self.extra_networks["discriminator"] = disc
        self.network = vae
        self.objective = VAEObjective(vae, l1_weight=cfg.l1_weight, kl_weight=cfg.kl_weight,
                                      ssim_weight=cfg.ssim_weight, discriminator=disc, disc_start=cfg.disc.start,
                                      disc_weight=cfg.disc.weight)
        self.train_data, self.val_items = build_datasets(cfg, self.dist.rank, self.dist.world_size)

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        disc = self.extra_networks.get("discriminator")
        if disc is not None:
            lr = self.config.disc.lr or self.config.optim.lr
            groups.append({"params": list(disc.parameters()), "base_lr": lr, "weight_decay": 0.0})
        return groups

    def compile_network(self) -> None:
        self.objective.vae = torch.compile(self.network)  # type: ignore[assignment]

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch["pixel_values"].to(self.device, non_blocking=True)}

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective.draw(n, generator, self.config.data.size)

    def call(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch, draws, self.step)

    def metadata(self) -> dict[str, str]:
        """The VAE config, its ``scaling_factor`` measured on the validation images (when there are any)."""
        cfg = self.config.model
        factor = self.latent_scaling_factor()
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


TRAINERS: dict[str, type[Trainer]] = {"unet": UNetTrainer, "vae": VAETrainer}
TRAINER_KINDS = ("unet", "vae", "clip", "lora", "controlnet", "ti")


def trainer_class(kind: str) -> type[Trainer]:
    """The Trainer subclass for ``kind``; the CLIP and LoRA trainers live in their own modules (they import this
    one) and are imported on first use."""
    if kind == "clip":
        from estable.training.clip_trainer import CLIPTrainer

        return CLIPTrainer
    if kind == "lora":
        from estable.training.lora_trainer import LoRATrainer

        return LoRATrainer
    if kind == "controlnet":
        from estable.training.controlnet_trainer import ControlNetTrainer

        return ControlNetTrainer
    if kind == "ti":
        from estable.training.ti_trainer import TITrainer

        return TITrainer
    if kind not in TRAINERS:
        raise EstableError(f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}")
    return TRAINERS[kind]


def make_trainer(kind: str, config: TrainConfig, run_dir: str | Path, **kwargs: Any) -> Trainer:
    """The trainer for ``kind`` ("unet", "vae", "clip" or "lora")."""
    return trainer_class(kind)(config, run_dir, **kwargs)


__all__ = [
    "CachedLatents",
    "ResumableBatchSampler",
    "TRAINERS",
    "TRAINER_KINDS",
    "Trainer",
    "UNetTrainer",
    "VAETrainer",
    "build_datasets",
    "build_text_encoder",
    "build_tokenizer",
    "build_vae",
    "collate",
    "load_network",
    "lr_factor",
    "make_trainer",
    "shapes_tokenizer",
    "trainer_class",
]
