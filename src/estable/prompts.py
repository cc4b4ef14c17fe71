"""Prompt weighting syntax and long prompts, as the AUTOMATIC1111 web UI defines them.

Many users write prompts for the A1111 web UI; this module reads that syntax so that the same prompt gives
the same conditioning here:

    (word)        weight × 1.1                ((word)) × 1.21, and so on
    [word]        weight ÷ 1.1
    (word:1.3)    weight × 1.3                nests: ((word:1.3)) = 1.3 × 1.1
    \\( \\) \\[ \\] \\\\   the literal characters ( ) [ ] \\
    BREAK         start a new 75-token chunk

Unbalanced brackets follow A1111: an unclosed ``(`` or ``[`` applies its multiplier to everything after
it, a stray ``)`` or ``]`` is literal text, a lone backslash is dropped. ``(a:bad)`` is plain text.

Long prompts (A1111's "infinite prompt length"): the weighted token ids are cut into chunks of at most 75
ids; each chunk is framed as BOS + ids + EOS + padding = 77 tokens and encoded by the text encoder
separately; the encoder outputs are concatenated along the sequence axis, (1, N·77, D), which the U-Net's
cross-attention accepts at any length. A chunk preferably ends right after a comma (if one lies within
the last ``comma_padding_backtrack`` ids), so a phrase is not cut in half.

Emphasis (A1111's "Original" emphasis): after the text encoder, each token's output vector is multiplied
by its weight and the chunk is rescaled so that its mean is what it was (see :func:`apply_weights`).

Glossary: *segment* = a run of text (or of token ids) with one weight; *chunk* = at most 75 token ids
with their weights; *window* = a chunk framed to 77 tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import torch

__all__ = [
    "BREAK",
    "CHUNK_LEN",
    "apply_weights",
    "check_weights",
    "build_chunks",
    "chunk_tokens",
    "empty_window",
    "has_weight_syntax",
    "is_break",
    "match_chunk_counts",
    "parse_weights",
    "tokenize_weighted",
]

#: Token ids per chunk, not counting BOS and EOS (CLIP's context is 77 = 1 + 75 + 1).
CHUNK_LEN: Final = 75

#: How ``parse_weights`` reports the BREAK keyword; the same pair A1111's parser emits.
BREAK: Final = ("BREAK", -1.0)

_ROUND_MULTIPLIER: Final = 1.1
_SQUARE_MULTIPLIER: Final = 1 / 1.1

# One alternative per lexical element of the syntax. Order matters: escapes before the bare backslash,
# the weighted close `:1.3)` before the bare colon.
_LEXER = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])                   # \( \) \[ \] \\ : the second character, literally
    | (?P<backslash>\\)                         # any other backslash is dropped
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)          # ':1.3)' closes a '(' with an explicit weight
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+)                   # plain text
    | (?P<colon>:)
    """,
    re.VERBOSE,
)

# BREAK as a whole word, eating the whitespace around it.
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass
class _Segment:
    text: str
    weight: float
    is_break: bool = False


def _parse(text: str) -> list[_Segment]:
    """The parser proper; keeps BREAK as a flag so that no text can be mistaken for it."""
    segments: list[_Segment] = []
    open_round: list[int] = []  # index of the first segment after each unclosed '('
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # A bracket multiplies every segment written since it opened. Weights are multiplied in the order
        # the brackets close, as A1111 does, so that the floats come out bit-identical to its output.
        for seg in segments[start:]:
            if not seg.is_break:
                seg.weight *= factor

    def add_plain(piece: str) -> None:
        for i, part in enumerate(_BREAK_RE.split(piece)):
            if i > 0:
                segments.append(_Segment("BREAK", -1.0, is_break=True))
            segments.append(_Segment(part, 1.0))

    for m in _LEXER.finditer(text):
        kind = m.lastgroup
        if kind == "escaped":
            segments.append(_Segment(m.group(0)[1], 1.0))
        elif kind == "backslash":
            segments.append(_Segment("", 1.0))
        elif kind == "open_round":
            open_round.append(len(segments))
        elif kind == "open_square":
            open_square.append(len(segments))
        elif kind == "weight" and open_round and _is_float(m.group("weight")):
            scale_from(open_round.pop(), float(m.group("weight")))
        elif kind == "close_round" and open_round:
            scale_from(open_round.pop(), _ROUND_MULTIPLIER)
        elif kind == "close_square" and open_square:
            scale_from(open_square.pop(), _SQUARE_MULTIPLIER)
        else:  # text, ':', or a closing bracket / weight with nothing open: literal
            add_plain(m.group(0))

    # Unclosed brackets still apply to the rest of the prompt: all '(' first, then all '['.
    for start in open_round:
        scale_from(start, _ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, _SQUARE_MULTIPLIER)

    if not segments:
        return [_Segment("", 1.0)]

    # Merge neighbours of exactly equal weight (never across a BREAK).
    merged = [segments[0]]
    for seg in segments[1:]:
        last = merged[-1]
        if not seg.is_break and not last.is_break and seg.weight == last.weight:
            last.text += seg.text
        else:
            merged.append(seg)
    return merged


def _is_float(s: str) -> bool:
    # The lexer accepts '.', '1.2.3', ...; A1111 would crash on those, we read the group as plain text.
    try:
        float(s)
    except ValueError:
        return False
    return True


MAX_WEIGHT = 1000.0  # the largest |weight| a prompt may give: beyond, fp16/fp32 embeddings overflow to inf/NaN


def check_weights(text: str) -> None:
    """Refuse (EstableError) a prompt whose weights, nesting included, exceed ``MAX_WEIGHT`` in size — such as
    ``(word:`` followed by a 40-digit number, which would turn its embeddings into infinities and the image into
    NaN."""
    from .errors import EstableError

    for seg in _parse(text):
        if not seg.is_break and not abs(seg.weight) <= MAX_WEIGHT:
            raise EstableError(f"the prompt weight {seg.weight:g} of {seg.text.strip()[:40]!r} is out of range: at "
                               f"most {MAX_WEIGHT:g} in size")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` segments following A1111's ``parse_prompt_attention``.

    A BREAK keyword appears as the pair :data:`BREAK` ``("BREAK", -1.0)``. Unlike A1111, a BREAK inside
    brackets still breaks (A1111 multiplies its marker weight there and then encodes the word "BREAK").

    >>> parse_weights("a (very beautiful) girl")
    [('a ', 1.0), ('very beautiful', 1.1), (' girl', 1.0)]
    """
    return [(s.text, s.weight) for s in _parse(text)]


def is_break(segment: tuple[str, float]) -> bool:
    """True for the BREAK marker in the output of :func:`parse_weights`."""
    return tuple(segment) == BREAK


def has_weight_syntax(text: str) -> bool:
    """True if the weighting syntax changes anything: parsing does not give the text back at weight 1."""
    return parse_weights(text) != [(text, 1.0)]


# --------------------------------------------------------------------------------------------------- tokens

def tokenize_weighted(
    text: str, encode: Callable[[str], list[int]], *, weighting: bool = True
) -> list[tuple[list[int] | None, float]]:
    """Parse ``text`` and tokenize each segment separately, as A1111 does.

    ``encode`` maps text to token ids WITHOUT BOS/EOS (e.g. ``tokenizer.encode(t, add_special_tokens=False)``).
    A BREAK is returned as ``(None, 1.0)``. With ``weighting=False`` the syntax is ignored: the whole
    text is one segment at weight 1 (A1111's emphasis "None").
    """
    if not weighting:
        return [(list(encode(text)), 1.0)]
    out: list[tuple[list[int] | None, float]] = []
    for seg in _parse(text):
        out.append((None, 1.0) if seg.is_break else (list(encode(seg.text)), seg.weight))
    return out


def chunk_tokens(
    segments: Sequence[tuple[list[int] | None, float]],
    chunk_len: int = CHUNK_LEN,
    comma_token_id: int | None = None,
    comma_padding_backtrack: int = 20,
) -> list[tuple[list[int], list[float]]]:
    """Cut weighted token segments into chunks of at most ``chunk_len`` ids (A1111's ``tokenize_line``).

    Rules, in A1111's order, for each token in turn:
      * a BREAK segment (``ids is None``) closes the current chunk, even an empty one;
      * a comma token is remembered as the last comma of the chunk;
      * if the chunk is full, the token is not a comma, and the chunk's last comma lies within the last
        ``comma_padding_backtrack`` positions, the ids after that comma move to the next chunk;
      * if the chunk is still full it is closed; the token then goes into the current chunk.
    At the end a non-empty chunk is closed; a prompt with no tokens gives one empty chunk.
    ``comma_padding_backtrack=0`` or ``comma_token_id=None`` turns the comma rule off.
    Returns ``[(ids, weights)]`` with ``len(ids) <= chunk_len``; framing is :func:`build_chunks`' job.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be at least 1, got {chunk_len}")
    if comma_padding_backtrack < 0:
        raise ValueError(f"comma_padding_backtrack must be >= 0, got {comma_padding_backtrack}")

    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position of the last comma in the current chunk, -1 if none

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for seg_ids, weight in segments:
        if seg_ids is None:
            close()
            continue
        for tok in seg_ids:
            if comma_token_id is not None and tok == comma_token_id:
                last_comma = len(ids)
            elif (
                comma_padding_backtrack
                and len(ids) == chunk_len
                and last_comma != -1
                and len(ids) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1
                moved_ids, moved_w = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_w
            if len(ids) == chunk_len:
                close()
            ids.append(tok)
            weights.append(float(weight))

    if ids or not chunks:
        close()
    return chunks


def empty_window(*, bos: int, eos: int, pad: int, chunk_len: int = CHUNK_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of an empty prompt: BOS, EOS, then padding; all weights 1. Shapes (chunk_len+2,)."""
    ids = torch.full((chunk_len + 2,), pad, dtype=torch.long)
    ids[0], ids[1] = bos, eos
    return ids, torch.ones(chunk_len + 2, dtype=torch.float32)


def build_chunks(
    text: str,
    encode: Callable[[str], list[int]],
    *,
    bos: int,
    eos: int,
    pad: int,
    weighting: bool = True,
    max_chunk: int = CHUNK_LEN,
    comma_id: int | None = None,
    comma_padding_backtrack: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows for a prompt: ``ids`` (N, max_chunk+2) long and ``weights`` (N, max_chunk+2) float32.

    Each window is BOS + chunk ids + EOS + ``pad`` up to the window length; BOS, EOS and padding have
    weight 1. For a prompt without syntax and at most ``max_chunk`` tokens this is exactly what a plain
    tokenizer call with ``padding="max_length", max_length=77`` gives (SD1 pads with EOS, SD2 with 0).
    """
    if list(encode("")):
        # An encoder that adds BOS/EOS itself would put them inside every segment.
        raise ValueError(
            "encode('') returned tokens; pass a function that encodes without special tokens "
            "(e.g. tokenizer.encode(text, add_special_tokens=False))"
        )
    if weighting:
        check_weights(text)
    segments = tokenize_weighted(text, encode, weighting=weighting)
    chunks = chunk_tokens(segments, max_chunk, comma_id, comma_padding_backtrack)

    window = max_chunk + 2
    ids = torch.full((len(chunks), window), pad, dtype=torch.long)  # (N, 77)
    weights = torch.ones((len(chunks), window), dtype=torch.float32)  # (N, 77)
    for i, (chunk_ids, chunk_w) in enumerate(chunks):
        n = len(chunk_ids)
        ids[i, 0] = bos
        ids[i, 1 : n + 1] = torch.tensor(chunk_ids, dtype=torch.long)
        ids[i, n + 1] = eos
        weights[i, 1 : n + 1] = torch.tensor(chunk_w, dtype=torch.float32)
    return ids, weights


def match_chunk_counts(
    *windows: tuple[torch.Tensor, torch.Tensor], bos: int, eos: int, pad: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pad several prompts' windows (e.g. positive and negative) to the same number of chunks.

    Each ``(ids, weights)`` pair is (N_i, 77); shorter ones get empty-prompt windows (BOS, EOS, padding,
    weight 1) appended, as A1111 does, so that the encoded conditionings have one length and CFG can batch
    them. Returns the pairs in the same order, each (max N_i, 77).
    """
    if not windows:
        return []
    width = windows[0][0].shape[1]
    for ids, w in windows:
        if ids.ndim != 2 or ids.shape != w.shape or ids.shape[1] != width:
            raise ValueError(f"expected (N, {width}) ids and weights of one shape, got {tuple(ids.shape)} "
                             f"and {tuple(w.shape)}")
    n_max = max(ids.shape[0] for ids, _ in windows)
    e_ids, e_w = empty_window(bos=bos, eos=eos, pad=pad, chunk_len=width - 2)
    out = []
    for ids, w in windows:
        extra = n_max - ids.shape[0]
        if extra:
            ids = torch.cat([ids, e_ids.to(ids.device).expand(extra, width)])  # (n_max, 77)
            w = torch.cat([w, e_w.to(device=w.device, dtype=w.dtype).expand(extra, width)])
        out.append((ids, w))
    return out


# ------------------------------------------------------------------------------------------------- emphasis


def apply_weights(
    context: torch.Tensor,
    weights: torch.Tensor,
    *,
    normalize: Literal["chunk", "prompt", "none"] = "chunk",
) -> torch.Tensor:
    """Apply token weights to text-encoder outputs and concatenate the chunks: (N, 77, D) → (1, N·77, D).

    A1111's "Original" emphasis. For the tokens z_t (D-vectors) of one window with weights w_t:

        z'_t = w_t · z_t,      z''_t = z'_t · mean(z) / mean(z')

    where mean() is over all 77·D numbers of the window: the weights change the relative size of tokens
    but not the window's mean. A1111 normalises each 77-token window on its own (``normalize="chunk"``);
    ``"prompt"`` takes the means over the whole prompt, ``"none"`` skips the rescale (A1111 "No norm").
    Means and products are taken in float32, the result has ``context``'s dtype. When every weight is 1
    the concatenation is returned unchanged, bit for bit.
    """
    if context.ndim != 3 or weights.shape != context.shape[:2]:
        raise ValueError(f"expected context (N, T, D) and weights (N, T); got {tuple(context.shape)} "
                         f"and {tuple(weights.shape)}")
    if normalize not in ("chunk", "prompt", "none"):
        raise ValueError(f"normalize must be 'chunk', 'prompt' or 'none', got {normalize!r}")
    n, t, d = context.shape
    if bool((weights == 1).all()):
        return context.reshape(1, n * t, d)

    z = context.float()  # (N, T, D)
    zw = z * weights.to(device=z.device, dtype=torch.float32)[..., None]  # (N, T, D)
    if normalize != "none":
        dims = (1, 2) if normalize == "chunk" else (0, 1, 2)
        old_mean = z.mean(dim=dims, keepdim=True)  # (N, 1, 1) or (1, 1, 1)
        new_mean = zw.mean(dim=dims, keepdim=True)
        # A window whose weighted mean is exactly 0 cannot be rescaled; leave it as weighted.
        scale = torch.where(new_mean == 0, torch.ones_like(new_mean), old_mean / new_mean)
        zw = zw * scale
    return zw.to(context.dtype).reshape(1, n * t, d)  # (1, N·T, D)
