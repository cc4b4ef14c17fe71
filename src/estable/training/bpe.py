"""Learning a byte-level BPE vocabulary in CLIP's conventions from a corpus of captions.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units",
algorithm 1) starts from single symbols and repeatedly merges the most frequent adjacent pair of symbols into a
new symbol. CLIP (Radford et al. 2021, sec. 2.4) runs it at the byte level (GPT-2's byte→unicode table, Radford et
al. 2019, sec. 2.2) over lower-cased words that end in ``</w>``. This module learns such a vocabulary so that
:class:`estable.tokenizer.CLIPTokenizer` tokenizes with it unchanged:

1. every text goes through the tokenizer's own :func:`~estable.tokenizer.normalize` and
   :func:`~estable.tokenizer.pre_tokenize` (so training words are exactly the words the tokenizer will see);
   literal ``<|startoftext|>`` / ``<|endoftext|>`` are cut out first, as the tokenizer maps them to their ids;
2. each word becomes its UTF-8 bytes mapped through :func:`~estable.tokenizer.bytes_to_unicode`, with ``</w>``
   appended to the last symbol, and is counted once per occurrence (a word-frequency table);
3. merge step k picks the adjacent pair (a, b) with the highest count, summed over the table weighted by word
   frequency; ties go to the lexicographically smallest (a, b), so learning is deterministic. Every occurrence in
   every word is merged, left to right, exactly as the tokenizer applies a merge;
4. the vocabulary is laid out as CLIP's: the 256 byte symbols, the same with ``</w>``, one entry per merge in
   merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (bos = size − 2, eos = size − 1).

Pair counts are kept incrementally (only the words that contain the merged pair are recounted) and the best pair
is found through a heap with lazy deletion, so learning costs O(total work of the merges), not O(merges × corpus).

A merge whose result is already a token (``ab`` + ``c`` after ``a`` + ``bc``) is never learned: CLIP's vocabulary
needs one entry per merge with distinct strings (``estable.tokenizer.clip_encoder`` refuses duplicates).

Learning stops at ``vocab_size`` entries or when the best pair occurs fewer than ``min_frequency`` times; on a
small corpus the vocabulary can therefore come out smaller than asked. Size the text encoder's embedding from
``len(encoder)``, not from the request.

Saving and loading go through the tokenizer: ``learn_tokenizer(...).save(folder)`` writes ``vocab.json`` +
``merges.txt`` (+ the special-token files) and ``CLIPTokenizer.from_folder(folder)`` reads them back.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

from estable.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    WORD_SUFFIX,
    CLIPTokenizer,
    bytes_to_unicode,
    clip_encoder,
    normalize,
    pre_tokenize,
)

Pair = tuple[str, str]

NUM_BASE_TOKENS = 2 * 256  # byte symbols, with and without </w>
NUM_SPECIAL_TOKENS = 2  # <|startoftext|>, <|endoftext|>
MIN_VOCAB_SIZE = NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS  # 514: no merges at all


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each pre-tokenized word occurs in ``texts`` (after the tokenizer's normalisation).

    Identical texts are normalised and split once (captions of a procedural world repeat a lot).
    """
    text_counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"learn_bpe needs strings, got {type(text).__name__}")
        text_counts[text] += 1
    words: Counter[str] = Counter()
    for text, n in text_counts.items():
        # The tokenizer maps literal special tokens to their ids before normalising: they are not text.
        for special in (BOS_TOKEN, EOS_TOKEN):
            text = text.replace(special, " ")
        for word in pre_tokenize(normalize(text)):
            words[word] += n
    return words


def _symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    """A word as its initial BPE symbols: mapped UTF-8 bytes, ``</w>`` on the last one."""
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += WORD_SUFFIX
    return symbols


def _merge_word(symbols: list[str], a: str, b: str) -> list[str]:
    """Merge every occurrence of (a, b) left to right (as ``CLIPTokenizer._bpe`` does)."""
    out: list[str] = []
    i, n = 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> tuple[dict[str, int], list[Pair]]:
    """Learn a CLIP-style byte-level BPE vocabulary from ``texts``.

    Args:
        texts: the corpus (captions); any iterable of strings, read once.
        vocab_size: the largest vocabulary wanted, special tokens included (at least 514 = 2·256 + 2); it
            allows ``vocab_size - 514`` merges.
        min_frequency: a pair must occur at least this often (counting word frequency) to be merged.

    Returns:
        ``(encoder, merges)``: token string → id in CLIP's order (see the module docstring) and the merges in
        rank order; ``CLIPTokenizer.from_vocab(encoder, merges)`` tokenizes with them. ``len(encoder)`` may be
        below ``vocab_size`` when the corpus runs out of pairs of ``min_frequency``.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer of at least {MIN_VOCAB_SIZE} (256 bytes, 256 bytes + </w>, "
            f"2 special tokens), got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    max_merges = vocab_size - MIN_VOCAB_SIZE

    byte_encoder = bytes_to_unicode()
    counts = word_counts(texts)
    # Sorted so that word indices (and so everything downstream) do not depend on the corpus order.
    vocab_words = sorted(counts)
    words: list[list[str]] = [_symbols(w, byte_encoder) for w in vocab_words]
    freqs: list[int] = [counts[w] for w in vocab_words]

    # pair → weighted count over the table, and pair → indices of the words that contain it.
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for idx, (symbols, f) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += f
            where[pair].add(idx)

    # Max-heap on (count, then the smallest pair) via (−count, pair). Entries go stale when a count changes; a
    # fresh entry is pushed for every changed pair and stale ones are skipped when popped.
    heap: list[tuple[int, Pair]] = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    tokens = set(byte_encoder.values()) | {s + WORD_SUFFIX for s in byte_encoder.values()}
    merges: list[Pair] = []
    while len(merges) < max_merges and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if -neg != count or count == 0:
            continue  # stale entry
        if count < min_frequency:
            break  # the heap's best is current, so no pair is frequent enough any more
        a, b = pair
        if a + b in tokens:
            continue  # would duplicate a token; drop the pair for good (its entry is not pushed again)
        merges.append(pair)
        tokens.add(a + b)
        changed: set[Pair] = set()
        for idx in sorted(where.pop(pair, ())):
            old, f = words[idx], freqs[idx]
            new = _merge_word(old, a, b)
            # Recount this word: remove all its old pairs, add its new ones.
            for p in zip(old, old[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += f
                changed.add(p)
            old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
            for p in old_pairs - new_pairs:
                if p != pair:
                    where[p].discard(idx)
            for p in new_pairs - old_pairs:
                where[p].add(idx)
            words[idx] = new
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
            elif c <= 0:
                pair_counts.pop(p, None)
                where.pop(p, None)
    return clip_encoder(merges), merges


def learn_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, max_length: int = 77
) -> CLIPTokenizer:
    """:func:`learn_bpe`, wrapped in a :class:`CLIPTokenizer` (padding with eos, as SD 1.x).

    Save it with ``tokenizer.save(folder)``; ``CLIPTokenizer.from_folder(folder)`` loads the same ids.
    """
    encoder, merges = learn_bpe(texts, vocab_size, min_frequency=min_frequency)
    return CLIPTokenizer.from_vocab(encoder, merges, max_length=max_length)


__all__ = ["MIN_VOCAB_SIZE", "learn_bpe", "learn_tokenizer", "word_counts"]
