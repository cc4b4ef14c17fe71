"""``estable train ti``: textual inversion (Gal et al. 2022, "An Image is Worth One Word", arXiv 2208.01618, sec. 3).

A frozen model (U-Net, VAE, text encoder) and a new word ``token``; the only trained numbers are ``num_vectors``
input vectors v (n, d) that stand in the text encoder's input wherever the word is written (eq. 2):

    v* = argmin_v  E_{z, y, ε, t} ‖ε − ε_θ(z_t, t, c_θ(y; v))‖²

The word's token ids are replaced, in every caption, by ids past the vocabulary that the text encoder maps to v
(:attr:`estable.models.text.TextEmbeddings.extra_tokens`, the mechanism generation uses for embedding files), so
the gradient reaches v through the frozen text encoder. The loss and its options are the U-Net trainer's
(:class:`~estable.training.objectives.UNetObjective`: ε or v after the base model, min-SNR-γ, offset noise).

What the generic Trainer sees as "the network" is :class:`TIEmbedding` (just v), so the EMA, checkpoints and
``--resume`` work as for the other trainers. ``RUN/<token>.safetensors`` (kohya's ``emb_params`` layout, read by
``--embeddings-dir``, A1111 and diffusers) is rewritten at every checkpoint.

Data: with ``data.source="shapes"`` the run renders a colour the shapes world does not have (``colour``) on single
objects and counts of every shape, captioned with ``token`` in place of a colour name; with ``cache_latents`` the
``data.shapes_length`` images are encoded by the VAE once, in memory, before training.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from estable.embeddings import save_embedding
from estable.errors import EstableError
from estable.training.builders import CachedLatents, build_datasets, load_base
from estable.training.config import TITrainConfig, TrainConfig
from estable.training.data import to_tensor
from estable.training.loop import expect_config
from estable.training.objectives import UNetObjective, empty_prompt_ids
from estable.training.unet_trainer import UNetTrainer

__all__ = ["NewColourShapes", "TIEmbedding", "TIObjective", "TITrainer", "TokenizerWithEmbedding"]

_PROXY = "red"  # the colour name a scene is laid out with before it is painted in the new colour


class NewColourShapes(torch.utils.data.Dataset):
    """Shapes-world scenes of one colour the world does not know: a single object (60 %) or a count of 2–4 (40 %)
    of a random shape, painted ``rgb``, with the caption the world would write and ``word`` as the colour."""

    def __init__(self, word: str, rgb: tuple[int, int, int], size: int, length: int, seed: int = 0) -> None:
        self.word, self.rgb, self.size, self.length, self.seed = word, tuple(rgb), size, length, seed

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int):  # -> shapes.Scene
        from estable.training import shapes as sw

        rng = np.random.default_rng([self.seed, index, 0x7E1])
        shape = sw.SHAPES[int(rng.integers(len(sw.SHAPES)))]
        if rng.random() < 0.6:
            size = sw.SIZES[int(rng.integers(3))] if rng.random() < 0.5 else None
            spec = sw.PromptSpec("single", (sw.ObjectSpec(shape, _PROXY, size),))
        else:
            count = int(rng.integers(2, 5))
            spec = sw.PromptSpec("count", (sw.ObjectSpec(shape, _PROXY, None),), count=count)
        return sw.scene_from_prompt(spec, rng)

    def sample(self, index: int) -> tuple[Image.Image, str]:
        from estable.training import shapes as sw

        scene = self.scene(index)
        img = sw._background_pixels(scene.background, self.size)
        for o in scene.objects:
            sw._paint(img, o.polygon() * self.size, np.asarray(self.rgb, dtype=np.float32), sw.SUPERSAMPLE)
        caption = sw.caption_for(scene).replace(_PROXY, self.word)
        return Image.fromarray(img, mode="RGB"), caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image, caption = self.sample(index)
        return {"pixel_values": to_tensor(image), "text": caption}


class TIEmbedding(nn.Module):
    """The trained vectors v, (n, d)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone().float())


class TokenizerWithEmbedding:
    """The model's tokenizer, with the word's token sequence replaced by ids ``vocab_size … vocab_size + n − 1``
    (what :class:`~estable.embeddings.EmbeddingSession` does at generation time). Callable like the tokenizer."""

    def __init__(self, tokenizer: Any, word: str, vocab_size: int, n: int) -> None:
        self.tokenizer, self.vocab_size, self.n = tokenizer, vocab_size, n
        self.word_ids = list(tokenizer.encode(word))
        if not self.word_ids:
            raise EstableError(f"the token {word!r} tokenizes to nothing")

    def encode(self, text: str) -> list[int]:
        ids, w, out, i = list(self.tokenizer.encode(text)), self.word_ids, [], 0
        while i < len(ids):
            if ids[i:i + len(w)] == w:
                out.extend(range(self.vocab_size, self.vocab_size + self.n))
                i += len(w)
            else:
                out.append(ids[i])
                i += 1
        return out

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, L) framed ids: BOS, the ids (cut to L − 2), EOS, padding."""
        tok = self.tokenizer
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = tok.max_length
        out = torch.full((len(texts), length), tok.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [tok.bos_token_id, *self.encode(text)[: length - 2], tok.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


class TIObjective(UNetObjective):
    """:class:`UNetObjective` whose context keeps gradients, to reach the embedding through the frozen text
    encoder; holds the :class:`TIEmbedding` so that its vector is the objective's one trainable parameter."""

    def __init__(self, *args: Any, embedding: TIEmbedding, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # freezes the VAE and the text encoder
        self.unet.requires_grad_(False)
        self.embedding = embedding
        # Not registered in the text encoder (its state dict stays the model's): a plain attribute it reads.
        object.__setattr__(self.text_encoder.text_model.embeddings, "extra_tokens", embedding.vectors)

    def train(self, mode: bool = True) -> TIObjective:
        super().train(mode)
        self.unet.eval()  # frozen: no dropout
        return self

    def context(self, input_ids: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        return self.text_encoder.encode(input_ids, clip_skip=self.clip_skip)  # (B, L, d), with gradients


class TITrainer(UNetTrainer):
    """Textual inversion on a loaded model; reuses the U-Net trainer's draws and sample grid."""

    kind = "ti"
    supports_fsdp = False
    config: TITrainConfig  # type: ignore[assignment]
    network: TIEmbedding

    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        return expect_config(config, TITrainConfig, "textual-inversion")

    def build(self) -> None:
        from estable.pipeline import DEFAULT_MODEL, default_model_path

        cfg = self.config
        base = load_base(default_model_path() if cfg.base == DEFAULT_MODEL else cfg.base, name=cfg.base)
        self.base_config = base.config
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        raw = base.require_tokenizer()
        vocab = base.config.text.vocab_size
        self.tokenizer = TokenizerWithEmbedding(raw, cfg.token, vocab, cfg.num_vectors)  # type: ignore[assignment]
        table = self.text_encoder.text_model.embeddings.token_embedding.weight.detach()  # (V, d)
        if cfg.init_word:
            ids = list(raw.encode(cfg.init_word))
            if not ids:
                raise EstableError(f"init_word {cfg.init_word!r} tokenizes to nothing")
            init = table[ids].mean(0)
        else:
            init = table.mean(0)
        self.network = TIEmbedding(init.expand(cfg.num_vectors, -1))
        f = self.vae.config.downsample_factor
        if cfg.data.size % f:
            raise EstableError(f"data.size {cfg.data.size} is not a multiple of the VAE's factor {f}")
        self.schedule = base.config.schedule
        self.clip_skip = cfg.clip_skip if cfg.clip_skip is not None else base.config.clip_skip
        objective = "v" if self.schedule.prediction_type == "v_prediction" else "eps"
        self.objective = TIObjective(
            self.unet, self.vae, self.text_encoder, empty_prompt_ids(raw), schedule=self.schedule,
            objective=objective, min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise,
            clip_skip=self.clip_skip, latent_size=cfg.data.size // f, embedding=self.network)
        if cfg.data.source == "shapes":
            d = cfg.data
            self.train_data = NewColourShapes(cfg.token, cfg.colour, d.size, d.shapes_length, d.shapes_seed)
            val = NewColourShapes(cfg.token, cfg.colour, d.size, max(1, d.val_size), d.shapes_seed + 1_000_003)
            self.val_items = [val[i] for i in range(d.val_size)]
            if cfg.cache_latents:
                self.train_data = self._cached(self.train_data)
        else:
            self.train_data, self.val_items = build_datasets(cfg, self.dist.rank, self.dist.world_size)

    @torch.no_grad()
    def _cached(self, data: NewColourShapes) -> CachedLatents:
        """The VAE posteriors (mean, std) of every image, computed once: the frozen VAE then costs nothing per step."""
        vae = self.vae.to(self.device)
        means, stds, captions = [], [], []
        for lo in range(0, len(data), 16):
            items = [data[i] for i in range(lo, min(lo + 16, len(data)))]
            post = vae.encode(torch.stack([it["pixel_values"] for it in items]).to(self.device))
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
            captions += [it["text"] for it in items]
        return CachedLatents(torch.cat(means), torch.cat(stds), captions)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.network.vectors]}]

    def compile_network(self) -> None:
        raise EstableError("compile is not available for the textual-inversion trainer")

    def metadata(self) -> dict[str, str]:
        return {"base": str(self.config.base), "token": self.config.token}

    @property
    def embedding_path(self) -> Path:
        return self.run.root / f"{self.config.token}.safetensors"

    def export(self) -> Path:
        """Write ``RUN/<token>.safetensors`` (EMA vectors when the run keeps an EMA)."""
        swap = self.ema.swapped(self.network) if self.ema is not None else contextlib.nullcontext()
        with swap:
            return save_embedding(self.embedding_path, self.network.vectors,
                                  metadata={"token": self.config.token, "base": str(self.config.base),
                                            "step": str(self.step)})

    def save(self) -> Path | None:
        path = super().save()
        if self.dist.is_main:
            self.export()
        return path
