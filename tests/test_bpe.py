"""Learning a CLIP-style byte-level BPE vocabulary (estable.training.bpe) and tokenizing with it."""

from __future__ import annotations

import random
import time

import pytest

from estable.tokenizer import BOS_TOKEN, EOS_TOKEN, WORD_SUFFIX, CLIPTokenizer, bytes_to_unicode, normalize
from estable.training.bpe import MIN_VOCAB_SIZE, learn_bpe, learn_tokenizer, word_counts
from estable.training.shapes import ShapesWorld, caption_for
from prompts_corpus import make_prompts

VOCAB = 640  # 126 merges: every non-plural word of the shapes world becomes one token


def shapes_captions(n: int, seed: int = 0) -> list[str]:
    world = ShapesWorld("train", seed)
    return [caption_for(world.scene(i)) for i in range(n)]  # scenes only, no rendering


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return shapes_captions(2000)


@pytest.fixture(scope="module")
def learned(captions: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    return learn_bpe(captions, VOCAB)


def replay(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Reference BPE learning trace of one word: apply every merge in order, each to all its occurrences."""
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += WORD_SUFFIX
    for a, b in merges:
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def test_vocabulary_layout(learned: tuple[dict[str, int], list[tuple[str, str]]]) -> None:
    encoder, merges = learned
    n = len(encoder)
    assert n == MIN_VOCAB_SIZE + len(merges) == VOCAB
    # CLIP's order: 256 byte symbols, the same with </w>, the merges in order, then bos and eos (the last two ids).
    symbols = list(bytes_to_unicode().values())
    assert [t for t, i in sorted(encoder.items(), key=lambda kv: kv[1])][:512] == symbols + [
        s + WORD_SUFFIX for s in symbols
    ]
    for k, (a, b) in enumerate(merges):
        assert encoder[a + b] == 512 + k
    assert encoder[BOS_TOKEN] == n - 2 and encoder[EOS_TOKEN] == n - 1
    assert sorted(encoder.values()) == list(range(n))

    tok = CLIPTokenizer.from_vocab(encoder, merges)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n - 2, n - 1, n - 1)


def test_round_trip_and_whole_words(
    captions: list[str], learned: tuple[dict[str, int], list[tuple[str, str]]]
) -> None:
    encoder, merges = learned
    tok = CLIPTokenizer.from_vocab(encoder, merges)
    unseen = shapes_captions(300, seed=1)  # another seed: captions the learner did not see
    for caption in unseen + ["A Red  Circle ABOVE a blue square."]:
        ids = tok([caption])[0]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids) == " ".join(normalize(caption).replace(".", " .").split())
    # The frequent words (all but the plurals: ≥ 100 occurrences in 2,000 captions) are single tokens.
    frequent = [w for w, n in word_counts(captions).items() if n >= 100]
    assert len(frequent) >= 35 and {"circle", "square", "red", "above", "background"} <= set(frequent)
    for word in frequent:
        assert tok.tokenize(word) == [word + WORD_SUFFIX], word
    assert tok.tokenize("a red circle above a blue square") == [
        w + WORD_SUFFIX for w in ["a", "red", "circle", "above", "a", "blue", "square"]
    ]


def test_deterministic_and_order_independent(
    captions: list[str], learned: tuple[dict[str, int], list[tuple[str, str]]]
) -> None:
    again = learn_bpe(iter(captions), VOCAB)  # a one-shot iterator is enough
    assert again == learned
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    assert learn_bpe(shuffled, VOCAB) == learned


def test_hand_example_and_tie_break() -> None:
    # Words "ab" ×3 and "ac" ×1: pairs (a, b</w>) = 3, (a, c</w>) = 1.
    encoder, merges = learn_bpe(["ab ab ab ac"], 1000)
    assert merges == [("a", "b</w>")]  # (a, c</w>) occurs once < min_frequency = 2
    assert len(encoder) == MIN_VOCAB_SIZE + 1
    _, merges = learn_bpe(["ab ab ab ac"], 1000, min_frequency=1)
    assert merges == [("a", "b</w>"), ("a", "c</w>")]
    # A tie (both pairs once) goes to the lexicographically smaller pair; the vocab size caps the merges.
    assert learn_bpe(["xy uv"], MIN_VOCAB_SIZE + 1, min_frequency=1)[1] == [("u", "v</w>")]
    # Counts are weighted by word frequency and updated after each merge:
    # "abc" ×2, "xbc" ×3, "abd" ×3 → (a,b)=5 ties (b,c</w>)=5 → (a,b) first; then (ab,d</w>)=3,
    # (b,c</w>)=3, (x,b)=3 tie → lexicographic; (ab,c</w>)=2 comes last.
    _, merges = learn_bpe(["abc abc xbc xbc xbc abd abd abd"], 1000)
    assert merges == [("a", "b"), ("ab", "d</w>"), ("b", "c</w>"), ("x", "bc</w>"), ("ab", "c</w>")]


def test_tokenizer_reproduces_learned_segmentation() -> None:
    # On a varied corpus (punctuation, digits, accents, CJK, emoji...), the tokenizer's rank-greedy BPE gives every
    # training word exactly the segmentation the learner produced by replaying its merges.
    prompts = make_prompts(600, 0)
    encoder, merges = learn_bpe(prompts, 1500)
    assert len(merges) >= 900
    tok = CLIPTokenizer.from_vocab(encoder, merges)
    words = word_counts(prompts)
    assert len(words) > 500
    for word in words:
        assert tok.tokenize(word) == replay(word, merges), word


def test_special_literals_are_not_learned() -> None:
    encoder, merges = learn_bpe([f"{BOS_TOKEN}red{EOS_TOKEN}"] * 5, 1000)
    assert all("startoftext" not in a + b and "endoftext" not in a + b for a, b in merges)
    assert replay("red", merges) == ["red</w>"]


def test_save_and_load(tmp_path, captions: list[str]) -> None:
    tok = learn_tokenizer(captions, VOCAB, max_length=32)
    tok.save(tmp_path / "tokenizer")
    for loaded in (
        CLIPTokenizer.from_folder(tmp_path / "tokenizer"),
        CLIPTokenizer.from_folder(tmp_path),  # a pipeline folder holding tokenizer/
        CLIPTokenizer.from_files(tmp_path / "tokenizer" / "vocab.json", tmp_path / "tokenizer" / "merges.txt"),
    ):
        assert loaded.encoder == tok.encoder and loaded.merges == tok.merges
        assert loaded.max_length == 32 and loaded.pad_token_id == tok.pad_token_id
        assert loaded(captions[:50]).tolist() == tok(captions[:50]).tolist()


def test_transformers_reads_the_saved_vocabulary(tmp_path, captions: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    tok = learn_tokenizer(captions, VOCAB)
    tok.save(tmp_path)
    oracle = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    sample = captions[:100] + shapes_captions(50, seed=2)
    expected = oracle(sample, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok(sample).tolist() == expected


def test_speed_two_thousand_merges() -> None:
    # ~100k texts, 2,000 merges. Captions of the shapes world run out of pairs after ~140 merges (their whole
    # vocabulary is ~50 words), so the corpus is the varied prompt corpus, repeated.
    corpus = make_prompts(3000, 0) * 33
    t0 = time.perf_counter()
    _, merges = learn_bpe(corpus, MIN_VOCAB_SIZE + 2000)
    elapsed = time.perf_counter() - t0
    assert len(merges) == 2000
    assert elapsed < 30.0, f"learning took {elapsed:.1f} s"  # ~1 s on an idle core; generous for shared CI


def test_small_corpus_gives_smaller_vocabulary(captions: list[str]) -> None:
    encoder, merges = learn_bpe(captions, 5000)
    assert len(encoder) < 5000 and len(encoder) == MIN_VOCAB_SIZE + len(merges)
    # Learning stopped because no pair occurs twice: every word seen at least twice is then one token.
    tok = CLIPTokenizer.from_vocab(encoder, merges)
    counts = word_counts(captions)
    assert all(tok.tokenize(w) == [w + WORD_SUFFIX] for w, n in counts.items() if n >= 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 514"):
        learn_bpe(["a b"], 513)
    with pytest.raises(ValueError, match="min_frequency"):
        learn_bpe(["a b"], 600, min_frequency=0)
    with pytest.raises(TypeError, match="strings"):
        learn_bpe([b"bytes"], 600)  # type: ignore[list-item]
