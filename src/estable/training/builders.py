"""What the trainers share: datasets and batching, the tokenizer, the frozen networks and initial weights.

Each builder is a function of a config section and the run's seed (random networks come from their own seeded
stream, :mod:`estable.training.seeding`), so that every trainer builds the same data and the same frozen networks
from the same config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from estable.config import UNetConfig, VAEConfig
from estable.errors import CheckpointError, EstableError
from estable.models.text import TextEncoder
from estable.models.vae import AutoencoderKL
from estable.tokenizer import CLIPTokenizer, bytes_to_unicode
from estable.training.clip_exports import find_text_encoder_export, load_text_encoder
from estable.training.config import TextSource, TrainConfig, VAESource
from estable.training.data import ImageCaptionFolder, ShapesDataset, TarShards
from estable.training.runs import latest_checkpoint
from estable.training.seeding import SEED_TEXT, SEED_VAE, SEED_VAL_DATA, seeded
from estable.training.shapes import ShapesWorld, caption_for

if TYPE_CHECKING:
    from estable.checkpoints.store import LoadedModel

# ---------------------------------------------------------------------------------------------------------
# Datasets, batches
# ---------------------------------------------------------------------------------------------------------


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list everything else (captions)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class IndexedSubset(torch.utils.data.Dataset):
    """The items of ``dataset`` at ``indices``, in that order (a map-style view; nothing is copied)."""

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
        world = ShapesWorld("train", data.shapes_seed, size=data.size, kind_weights=data.shapes_kinds,
                            named_background_kinds=data.shapes_named_backgrounds, grey_named_p=data.shapes_grey_named,
                            relation_axis_ratio=data.shapes_relation_axis_ratio, contact_p=data.shapes_contact)
        train = ShapesDataset(world, data.size, data.shapes_length)
        val_world = ShapesWorld("train", seeded(data.shapes_seed, SEED_VAL_DATA) % (2**31), size=data.size)
        val = [ShapesDataset(val_world, data.size, max(1, data.val_size))[i] for i in range(data.val_size)]
        return train, val
    path = Path(src)
    if path.is_dir():
        full = ImageCaptionFolder(path, data.size, center_crop=data.center_crop, random_flip=data.random_flip,
                                  caption_column=data.caption_column)
        n = len(full)
        if n <= data.val_size:
            raise EstableError(f"{path} has {n} images; need more than data.val_size={data.val_size}")
        train = IndexedSubset(full, range(n - data.val_size))
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
            torch.manual_seed(seeded(seed, SEED_TEXT))
            return TextEncoder(cfg), tok
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


def require_base(base: str, trainer: str) -> None:
    """The check of a trainer on a frozen base model (LoRA, ControlNet) that ``base`` names one."""
    if not base:
        raise EstableError(f"the {trainer} trainer needs a base model: base=PATH (SD file, diffusers folder or "
                           "Estable file)")


def load_base(source: str | Path, name: str | None = None) -> LoadedModel:
    """The frozen base model of a LoRA, ControlNet or TI run, in fp32 (an fp16 file too; autocast computes in
    bf16/fp16). ``name``: the base as the config spells it, for the message (default: ``source``)."""
    from estable.checkpoints.store import load_model

    if not Path(source).exists():
        raise EstableError(f"base model {name if name is not None else str(source)!r} does not exist")
    return load_model(source, dtype="fp32")


def build_vae(src: VAESource, seed: int) -> AutoencoderKL:
    if src.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded(seed, SEED_VAE))
            return AutoencoderKL(src.config)
    cfg, sd = load_network("vae", src.source)
    vae = AutoencoderKL(cfg)  # type: ignore[arg-type]
    vae.load_state_dict(sd, strict=True)
    return vae


__all__ = [
    "CachedLatents",
    "IndexedSubset",
    "build_datasets",
    "build_text_encoder",
    "build_tokenizer",
    "build_vae",
    "collate",
    "load_base",
    "load_network",
    "require_base",
    "shapes_tokenizer",
]
