"""``estable train clip``: a contrastive text–image pair (Radford et al. 2021) on the generic Trainer.

One step: a batch of (image, caption) pairs → :class:`~estable.training.clip_objective.CLIPObjective` (symmetric
cross-entropy over the in-batch similarity matrix, paraphrase-aware targets for the shapes world) → AdamW →
``clamp_logit_scale_()`` (the log inverse temperature kept in [0, log 100], as OpenCLIP does after each step).
Logged: loss, in-batch retrieval accuracy image→text and text→image, its chance level and the logit scale exp(s);
validation runs the same on the fixed held-out batch (``data.val_size`` items). The pair draws no random numbers,
so resume exactness rests on the weights, the optimizer and the data position alone.

Tokenizer (``tokenizer``): "learn" learns a byte-level BPE vocabulary (:func:`estable.training.bpe.learn_tokenizer`,
at most ``vocab_size`` entries) from ``tokenizer_sample`` captions: for the shapes world from its scene
descriptions (no rendering), for a folder from ``metadata.jsonl`` (validation items excluded), for tar shards from
the first samples of the stream. The shapes grammar yields only ~140 merges, so the text tower's embedding is sized
from the learned vocabulary, never from the cap. "clip" uses CLIP's own vocabulary (49,408 entries; see
``estable.tokenizer.find_clip_vocab``); a folder path loads vocab.json + merges.txt. The tokenizer is saved to
``RUN/tokenizer/`` and reloaded from there on resume.

Exports, rewritten after every checkpoint (EMA weights when the run keeps an EMA), in the run folder:
``clip.safetensors`` (the pair) and ``text_encoder.safetensors`` (its text tower, which the U-Net trainer takes
as ``text.source``); their formats and readers are in :mod:`estable.training.clip_exports`.

Samples: a CLIP run makes no images. With ``sample_every`` > 0 it saves a picture of the validation batch's
retrieval matrix: the held-out images down the left, one cell per (image, caption) coloured by cosine similarity
(black −1 … white +1), the image's own caption (the diagonal) framed green, each row's pick framed red when wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from estable.checkpoints.store import tokenizer_metadata
from estable.errors import EstableError
from estable.models.clip import CLIPPair, CLIPPairConfig, ImageEncoderConfig
from estable.tokenizer import CLIPTokenizer
from estable.training.builders import build_datasets, collate
from estable.training.clip_exports import CLIP_FILE, TEXT_ENCODER_FILE, save_clip_pair, save_text_encoder
from estable.training.clip_objective import CLIPObjective, shapes_caption_key
from estable.training.config import CLIPTrainConfig, TrainConfig
from estable.training.loop import Trainer, expect_config
from estable.training.runs import latest_checkpoint

TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def caption_sample(cfg: TrainConfig, count: int) -> list[str]:
    """Up to ``count`` training captions of ``cfg.data`` (the material a vocabulary is learned from)."""
    data = cfg.data
    if data.source == "shapes":
        from estable.training.shapes import ShapesWorld, caption_for

        world = ShapesWorld("train", data.shapes_seed, size=data.size)
        return [caption_for(world.scene(i)) for i in range(min(count, data.shapes_length))]
    path = Path(data.source)
    if path.is_dir():
        from estable.training.data import read_metadata

        records, _ = read_metadata(path, data.caption_column)
        records = records[: max(0, len(records) - data.val_size)]  # the validation items are held out
        out: list[str] = []
        for r in records[:count]:
            text = r[data.caption_column]
            out.extend([text] if isinstance(text, str) else list(text))
        return out
    if ".tar" in data.source:
        from estable.training.data import TarShards

        out = []
        for item in TarShards(data.source, data.size, rank=0, world_size=1):
            if len(out) >= count:
                break
            out.append(item["text"])
        return out
    raise EstableError(f"data source {data.source!r} is not 'shapes', a folder with metadata.jsonl, or a .tar "
                       "shard pattern")


def make_tokenizer(cfg: CLIPTrainConfig) -> CLIPTokenizer:
    """The tokenizer ``cfg.tokenizer`` asks for (learned, CLIP's, or from a folder), padding to ``max_length``."""
    if cfg.tokenizer == "learn":
        from estable.training.bpe import learn_tokenizer

        captions = caption_sample(cfg, cfg.tokenizer_sample)
        if not captions:
            raise EstableError(f"no captions found in {cfg.data.source!r} to learn a vocabulary from")
        return learn_tokenizer(captions, cfg.vocab_size, max_length=cfg.max_length)
    if cfg.tokenizer == "clip":
        from estable.tokenizer import find_clip_vocab

        return CLIPTokenizer.from_bpe_file(find_clip_vocab(), max_length=cfg.max_length)
    if Path(cfg.tokenizer).is_dir():
        return CLIPTokenizer.from_folder(cfg.tokenizer, max_length=cfg.max_length)
    raise EstableError(f"tokenizer {cfg.tokenizer!r} is not 'learn', 'clip' or a folder with vocab.json + merges.txt")



# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------


class CLIPTrainObjective(nn.Module):
    """``forward(batch, draws) -> (loss, metrics)`` around a :class:`CLIPObjective` (the Trainer's interface;
    DDP wraps this module). ``draws`` is empty: the contrastive loss draws no random numbers."""

    def __init__(self, pair: CLIPPair, objective: CLIPObjective) -> None:
        super().__init__()
        self.pair = pair
        self.fn = objective

    def forward(self, batch: dict[str, Any], draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return self.fn(self.pair, batch)


def pair_config(cfg: CLIPTrainConfig, tokenizer: CLIPTokenizer) -> CLIPPairConfig:
    """The CLIPPairConfig of a training config, sized for ``tokenizer``."""
    m = cfg.model
    image = ImageEncoderConfig(stage_channels=m.image.stage_channels, blocks_per_stage=m.image.blocks_per_stage,
                               stem_stride=m.image.stem_stride, norm_groups=m.image.norm_groups,
                               image_size=cfg.data.size)
    return CLIPPairConfig(text=m.text, image=image, embed_dim=m.embed_dim, init_logit_scale=m.init_logit_scale,
                          max_logit_scale=m.max_logit_scale).with_vocabulary(tokenizer.vocab_size,
                                                                             tokenizer.eos_token_id)


class CLIPTrainer(Trainer):
    """Contrastive pre-training of a :class:`CLIPPair`; exports the pair and its text tower."""

    kind = "clip"
    no_fsdp_reason = "the CLIP pair's logit-scale clamp and exports work on whole weights"
    config: CLIPTrainConfig
    network: CLIPPair

    def __init__(self, config: TrainConfig, run_dir: str | Path, **kwargs: Any) -> None:
        self._run_dir = Path(run_dir)
        super().__init__(config, run_dir, **kwargs)

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        config = expect_config(config, CLIPTrainConfig, "CLIP")
        saved = self._run_dir / TOKENIZER_DIR
        if saved.is_dir() and latest_checkpoint(self._run_dir / "checkpoints") is not None:
            tok = CLIPTokenizer.from_folder(saved, max_length=config.max_length)  # a resumed run keeps its ids
        else:
            tok = make_tokenizer(config)
        self.tokenizer = tok
        try:
            self.pair_config = pair_config(config, tok)
        except ValueError as exc:
            raise EstableError(f"model: {exc}") from None
        text = config.model.text.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
        return config.replace(model=config.model.replace(text=text))

    def build(self) -> None:
        cfg = self.config
        self.network = CLIPPair(self.pair_config)
        fn = CLIPObjective(self.tokenizer, duplicates=cfg.duplicates, caption_key=shapes_caption_key)
        self.objective = CLIPTrainObjective(self.network, fn)
        self.train_data, self.val_items = build_datasets(cfg, self.dist.rank, self.dist.world_size)
        self._tokenizer_meta = tokenizer_metadata(self.tokenizer)
        if self.dist.is_main:
            self.tokenizer.save(self.run.root / TOKENIZER_DIR)

    def compile_network(self) -> None:
        self.objective.pair = torch.compile(self.network, mode=self.config.compile_mode)  # type: ignore[assignment]

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"pixel_values": batch["pixel_values"].to(self.device, non_blocking=True), "text": list(batch["text"])}

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def after_optimizer_step(self) -> None:
        self.network.clamp_logit_scale_()

    def metadata(self) -> dict[str, str]:
        return {"config": self.pair_config.to_json()}

    # -- exports -----------------------------------------------------------------------------------------------
    def export(self) -> tuple[Path, Path]:
        """Write clip.safetensors and text_encoder.safetensors into the run folder (EMA weights if kept)."""
        sd = {k: v.detach().float().cpu() for k, v in self.network.state_dict().items()}
        if self.ema is not None:
            sd.update({k: v.cpu() for k, v in self.ema.state_dict().items()})
        root = self.run.root
        pair_path = save_clip_pair(root / CLIP_FILE, self.network, self._tokenizer_meta, state_dict=sd)
        text_sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
        text_path = save_text_encoder(root / TEXT_ENCODER_FILE, self.network.text, self._tokenizer_meta,
                                      state_dict=text_sd)
        return pair_path, text_path

    def save(self) -> Path | None:
        path = super().save()
        if self.dist.is_main:
            self.export()
        return path

    # -- the "sample": a retrieval matrix --------------------------------------------------------------------
    @torch.no_grad()
    def sample_image(self) -> Image.Image | None:
        items = self.val_items[:16]
        if not items:
            return None
        batch = self.prepare(collate(items))
        ids = self.objective.fn.tokenize(batch["text"], self.device)  # (B, T)
        with self.autocast():
            v = self.network.encode_image(batch["pixel_values"])  # (B, D) unit norm
            t = self.network.encode_text(ids)  # (B, D)
        sim = (v.float() @ t.float().T).cpu().numpy()  # (B, B) cosine similarities
        return retrieval_picture(batch["pixel_values"].cpu(), sim)


def retrieval_picture(pixels: torch.Tensor, sim: np.ndarray, cell: int = 32) -> Image.Image:
    """Images (B, 3, H, W) in [-1, 1] down the left, then a B×B grid of similarity cells (black −1, white +1);
    the diagonal framed green, a row's wrong pick framed red."""
    from estable.images import to_pil

    b = sim.shape[0]
    canvas = Image.new("RGB", ((b + 1) * cell, b * cell), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(to_pil(pixels)):
        canvas.paste(im.resize((cell, cell), Image.Resampling.BILINEAR), (0, i * cell))
    level = np.clip((sim + 1) * 127.5, 0, 255).round().astype(int)  # (B, B)
    picks = sim.argmax(axis=1)
    for i in range(b):
        for j in range(b):
            x0, y0 = (j + 1) * cell, i * cell
            g = int(level[i, j])
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(g, g, g))
            if i == j:
                draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), outline=(0, 200, 0), width=2)
            elif picks[i] == j:
                draw.rectangle((x0 + 2, y0 + 2, x0 + cell - 3, y0 + cell - 3), outline=(220, 0, 0), width=2)
    return canvas


__all__ = [
    "CLIPTrainObjective",
    "CLIPTrainer",
    "TOKENIZER_DIR",
    "caption_sample",
    "make_tokenizer",
    "pair_config",
    "retrieval_picture",
]
