"""The contrastive objective of CLIP (Radford et al. 2021, sec. 2.3 and fig. 3), with duplicate captions handled.

For a batch of B images and their B captions, the pair scores every image against every caption,
``logits_per_image[i, j] = exp(s) · cos(v_i, t_j)``. CLIP's loss is the mean of two cross-entropies: each image
must pick out its caption among the batch's B captions (rows of ``logits_per_image``), and each caption its image
(rows of ``logits_per_text``, the transpose):

    L = ½ · [ CE(logits_per_image, labels) + CE(logits_per_text, labels) ],   labels = 0..B−1     (fig. 3)

False negatives. The shapes world repeats captions ("a red circle" describes many different images) and
paraphrases them ("a red circle above a blue square" = "a blue square below a red circle"), so a batch often holds
several captions that describe an image equally well; with labels = arange(B) the loss treats all but one of them
as negatives. Here the targets are a (B, B) matrix M with M[i, j] = 1 when caption j is in the same group as
caption i (identical token ids by default, or an equal ``caption_key``), and each row's target distribution is
uniform over its positives (a multi-positive contrastive loss, the form of SupCon's L_out, Khosla et al. 2020, eq. 2):

    L = ½ · [ Σ_i CE(logits_per_image[i], M[i] / Σ_j M[i, j]) + Σ_j CE(logits_per_text[j], Mᵀ[j] / Σ_i M[i, j]) ] / B

Without duplicates M = I and this is exactly CLIP's loss. What it changes depends on the kind of duplicate:

* Identical captions (identical ids) get identical text embeddings, so their columns of ``logits_per_image`` are
  equal; then the plain loss and this one coincide exactly (value and gradient, for any weights: with k equal
  columns, −log softmax at any of them is the same number, and in the text→image direction the k equal rows
  sum the same k terms). The "push away from the duplicate" and the "pull towards the own caption" act on one
  vector and cancel. Both losses then have a floor of log k instead of 0. Grouping by ids matters only for
  the retrieval metrics (picking the duplicate is right).
* Different captions with the same meaning (paraphrases) have different embeddings, and there the plain loss
  pushes them apart. Grouping them needs a semantic key: :func:`shapes_caption_key` for the shapes world.

Retrieval accuracy counts a pick as right when it lands on any positive; ``acc_chance`` is the accuracy of a
uniformly random pick under the same rule (1/B without duplicates).

The loss is over the local batch; under data parallelism each rank contrasts only its own samples (CLIP gathers
features across workers for a larger effective batch; not done here).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from estable.models.clip import CLIPPair
from estable.tokenizer import CLIPTokenizer
from estable.training.shapes import INVERSE_RELATION, PromptSpec, caption_for, parse_caption


def clip_loss(logits_per_image: Tensor, logits_per_text: Tensor, targets: Tensor | None = None) -> Tensor:
    """Symmetric cross-entropy over the batch (Radford et al. 2021, fig. 3), a scalar in fp32.

    Args:
        logits_per_image: (B, B) image i against caption j.
        logits_per_text: (B, B) caption j against image i (the transpose).
        targets: optional (B, B) non-negative matrix, ``targets[i, j] > 0`` when caption j describes image i;
            rows and columns are normalised into target distributions (see the module docstring). None means
            the identity (CLIP's labels 0..B−1).
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"logits_per_image must be square (B, B), got {tuple(logits_per_image.shape)}")
    if logits_per_text.shape != logits_per_image.shape:
        raise ValueError(
            f"logits_per_text {tuple(logits_per_text.shape)} must have the shape of logits_per_image "
            f"{tuple(logits_per_image.shape)}"
        )
    li, lt = logits_per_image.float(), logits_per_text.float()  # softmax statistics in fp32
    if targets is None:
        labels = torch.arange(li.shape[0], device=li.device)  # (B,) image i ↔ caption i
        return 0.5 * (F.cross_entropy(li, labels) + F.cross_entropy(lt, labels))
    if targets.shape != li.shape:
        raise ValueError(f"targets must have shape {tuple(li.shape)}, got {tuple(targets.shape)}")
    m = targets.to(device=li.device, dtype=torch.float32)
    if (m < 0).any() or (m.sum(dim=1) <= 0).any() or (m.sum(dim=0) <= 0).any():
        raise ValueError("targets must be non-negative with at least one positive in every row and column")
    p_image = m / m.sum(dim=1, keepdim=True)  # (B, B) image i's distribution over captions
    p_text = m.T / m.T.sum(dim=1, keepdim=True)  # (B, B) caption j's distribution over images
    return 0.5 * (F.cross_entropy(li, p_image) + F.cross_entropy(lt, p_text))


def duplicate_targets(ids: Tensor) -> Tensor:
    """(B, B) float matrix, 1 where two rows of token ids (B, T) are identical (the diagonal always)."""
    return (ids[:, None, :] == ids[None, :, :]).all(dim=-1).float()  # (B, B)


def key_targets(keys: Sequence[Hashable], device: torch.device | str | None = None) -> Tensor:
    """(B, B) float matrix, 1 where two captions have equal keys."""
    index: dict[Hashable, int] = {}
    groups = torch.tensor([index.setdefault(k, len(index)) for k in keys], device=device)  # (B,) group ids
    return (groups[:, None] == groups[None, :]).float()


def shapes_caption_key(text: str) -> Hashable:
    """A shapes-world caption's meaning, for ``CLIPObjective(caption_key=...)``: paraphrases share a key.

    "a red circle above a blue square" = "a blue square below a red circle", "a red square and a blue circle" =
    "a blue circle and a red square", "on" = "against" a background. Text outside the grammar keys as itself.
    """
    try:
        spec = parse_caption(text)
    except ValueError:
        return ("text", text)
    if spec.kind == "pair":
        a, b = spec.objects
        assert spec.relation is not None  # PromptSpec validates it
        inverse = PromptSpec("pair", (b, a), relation=INVERSE_RELATION[spec.relation], background=spec.background)
        return ("spec", min(caption_for(spec), caption_for(inverse)))
    if spec.kind == "colour_binding":
        a, b = spec.objects
        swapped = PromptSpec("colour_binding", (b, a), background=spec.background)
        return ("spec", min(caption_for(spec), caption_for(swapped)))
    return ("spec", caption_for(spec))  # canonical wording ("on" for the background)


def retrieval_accuracy(logits_per_image: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In-batch retrieval accuracy (image→text, text→image) and its chance level, as 0-dim float tensors.

    A pick (the row's argmax) is correct when it is a positive of ``targets``; chance is the mean fraction of
    positives per row (over both directions).
    """
    pos = targets > 0  # (B, B)
    rows = torch.arange(pos.shape[0], device=pos.device)
    acc_i2t = pos[rows, logits_per_image.argmax(dim=1)].float().mean()  # image i picks a caption
    acc_t2i = pos[logits_per_image.argmax(dim=0), rows].float().mean()  # caption j picks an image
    chance = 0.5 * (pos.float().mean(dim=1).mean() + pos.float().mean(dim=0).mean())
    return acc_i2t, acc_t2i, chance


def _unwrap(model: nn.Module) -> nn.Module:
    """The CLIPPair inside DistributedDataParallel (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while not isinstance(model, CLIPPair):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"CLIPObjective needs a CLIPPair (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


class CLIPObjective:
    """Callable ``objective(model, batch) -> (loss, metrics)`` for training a :class:`CLIPPair`.

    ``batch`` is a dataset batch of ``estable.training.data``: ``{"pixel_values": (B, 3, S, S) in [-1, 1],
    "text": list of B captions}``. Captions are tokenized here and moved to the pixels' device.

    Args:
        tokenizer: the tokenizer whose ids the text tower was built for (its eos must be the config's).
        duplicates: "soft" treats captions of one group as positives of each other (module docstring);
            "none" is CLIP's plain identity targets.
        caption_key: groups captions by ``caption_key(text)``; use :func:`shapes_caption_key` for the shapes
            world, whose paraphrases are the false negatives that change the loss. None groups by identical
            token ids, which leaves the loss as CLIP's and makes the retrieval metrics count duplicates right.
        trim_padding: cut the padded ids after the longest row's first eos. The text tower is causal and pools at
            the first eos, so the embeddings are unchanged, and short captions cost ~10 positions instead of 77.

    Returns ``(loss, metrics)``: ``loss`` a scalar with gradient; ``metrics`` detached 0-dim tensors ``loss``,
    ``acc_i2t``, ``acc_t2i``, ``acc_chance`` and ``logit_scale`` (exp(s), the inverse temperature); call
    ``.item()`` only when logging, to avoid a device sync every step.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        *,
        duplicates: Literal["soft", "none"] = "soft",
        caption_key: Callable[[str], Hashable] | None = None,
        trim_padding: bool = True,
    ) -> None:
        if duplicates not in ("soft", "none"):
            raise ValueError(f"duplicates must be 'soft' or 'none', not {duplicates!r}")
        self.tokenizer = tokenizer
        self.duplicates = duplicates
        self.caption_key = caption_key
        self.trim_padding = trim_padding

    def tokenize(self, texts: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Token ids (B, T) of ``texts``, T trimmed to the longest caption when ``trim_padding``."""
        ids = self.tokenizer(list(texts))  # (B, max_length)
        if self.trim_padding and ids.shape[0] > 0:
            first_eos = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)  # (B,)
            ids = ids[:, : int(first_eos.max()) + 1]  # (B, T ≤ max_length)
        return ids.to(device) if device is not None else ids

    def targets(self, texts: Sequence[str], ids: Tensor) -> Tensor:
        """The (B, B) positives matrix for this batch (see ``duplicates`` and ``caption_key``)."""
        if self.duplicates == "none":
            return torch.eye(ids.shape[0], device=ids.device)
        if self.caption_key is not None:
            return key_targets([self.caption_key(t) for t in texts], device=ids.device)
        return duplicate_targets(ids)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        try:
            pixels, texts = batch["pixel_values"], batch["text"]
        except KeyError as e:
            raise ValueError(f"a CLIP batch needs 'pixel_values' and 'text', missing {e}") from None
        if isinstance(texts, str):
            texts = [texts]
        if pixels.shape[0] != len(texts):
            raise ValueError(f"the batch has {pixels.shape[0]} images but {len(texts)} captions")
        ids = self.tokenize(texts, pixels.device)  # (B, T)
        logits_per_image, logits_per_text = model(pixels, ids)  # (B, B) each
        targets = self.targets(texts, ids)  # (B, B)
        loss = clip_loss(logits_per_image, logits_per_text, targets)
        with torch.no_grad():
            acc_i2t, acc_t2i, chance = retrieval_accuracy(logits_per_image.detach(), targets)
            metrics = {
                "loss": loss.detach(),
                "acc_i2t": acc_i2t,
                "acc_t2i": acc_t2i,
                "acc_chance": chance,
                "logit_scale": _unwrap(model).logit_scale_value().detach(),
            }
        return loss, metrics


__all__ = [
    "CLIPObjective",
    "clip_loss",
    "duplicate_targets",
    "key_targets",
    "retrieval_accuracy",
    "shapes_caption_key",
]
