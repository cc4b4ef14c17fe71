"""Prompt weighting syntax, long-prompt chunking and emphasis (estable.prompts).

The parser's expectations are the documented examples of A1111's ``parse_prompt_attention`` (its
doctests) plus the rules stated in its docstring; tokenizer parity uses transformers' CLIPTokenizer built
from the real CLIP BPE vocabulary (skipped when the vocabulary file is not on disk).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clip_oracle import write_clip_vocab
from estable.prompts import (
    BREAK,
    apply_weights,
    build_chunks,
    chunk_tokens,
    empty_window,
    has_weight_syntax,
    is_break,
    match_chunk_counts,
    parse_weights,
    tokenize_weighted,
)

ROOT = Path(__file__).resolve().parents[1]


def as_pairs(expected):
    return [(t, w) for t, w in expected]


# ------------------------------------------------------------------------------------------------ parsing

# The examples documented in A1111's modules/prompt_parser.py (parse_prompt_attention's doctest) and in
# the brief; floats are asserted exactly, as A1111's doctest does.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
         [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
    ),
    ("a (very beautiful) girl", [["a ", 1.0], ["very beautiful", 1.1], [" girl", 1.0]]),
    ("(masterpiece:1.3), (best quality:1.2)", [["masterpiece", 1.3], [", ", 1.0], ["best quality", 1.2]]),
    ("a \\(b\\)", [["a (b)", 1.0]]),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_a1111_documented_examples(text, expected):
    assert parse_weights(text) == as_pairs(expected)


def test_bracket_multipliers_compose_in_closing_order():
    # ((word)) = 1.1 * 1.1; [word] = 1/1.1; explicit weights nest and multiply
    assert parse_weights("((word))") == [("word", 1.0 * 1.1 * 1.1)]
    assert parse_weights("[word]") == [("word", 1.0 / 1.1)]
    assert parse_weights("[[word]]") == [("word", (1.0 / 1.1) / 1.1)]
    assert parse_weights("((word:1.5))") == [("word", 1.5 * 1.1)]
    assert parse_weights("[(word:2)]") == [("word", 2.0 / 1.1)]
    assert parse_weights("(a (b:0.5) c)") == [("a ", 1.1), ("b", 0.5 * 1.1), (" c", 1.1)]
    assert parse_weights("(word:-1)") == [("word", -1.0)]


def test_explicit_weight_allows_spaces_and_needs_an_open_paren():
    assert parse_weights("(a: 1.2 )") == [("a", 1.2)]
    # ':1.2)' with nothing open is literal text, and so is a stray ')' or ']'
    assert parse_weights("a:1.2) b") == [("a:1.2) b", 1.0)]
    assert parse_weights("a) b] c") == [("a) b] c", 1.0)]
    # a colon without a closing paren stays in the text; the unclosed '(' applies 1.1
    assert parse_weights("(a:1.2") == [("a:1.2", 1.1)]
    # a malformed number is plain text (A1111 would raise here)
    assert parse_weights("(a:1.2.3)") == [("a:1.2.3)", 1.1)]


def test_unclosed_brackets_apply_to_the_rest():
    assert parse_weights("x (a [b") == [("x ", 1.0), ("a ", 1.1), ("b", 1.1 / 1.1)]
    assert parse_weights("[a") == [("a", 1 / 1.1)]


def test_escapes():
    assert parse_weights(r"\[x\]") == [("[x]", 1.0)]
    assert parse_weights("a \\\\ b") == [("a \\ b", 1.0)]
    # escaped characters inside brackets still take the bracket's weight
    assert parse_weights(r"(\(x\))") == [("(x)", 1.1)]
    # a lone backslash before another character is dropped, as in A1111
    assert parse_weights("a\\b") == [("ab", 1.0)]


def test_break_marker():
    assert parse_weights("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    # the whitespace around BREAK goes; the empty text left before '(' stays, as in A1111
    assert parse_weights("a\nBREAK\n(b)") == [("a", 1.0), BREAK, ("", 1.0), ("b", 1.1)]
    assert parse_weights("BREAK") == [("", 1.0), BREAK, ("", 1.0)]
    # only the whole upper-case word
    assert parse_weights("BREAKING break aBREAK") == [("BREAKING break aBREAK", 1.0)]
    # inside brackets BREAK still breaks and keeps its marker (A1111 would encode the word "BREAK")
    assert parse_weights("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    # markers are never merged with neighbours, even of weight -1
    assert parse_weights("(a BREAK b:-1)") == [("a", -1.0), BREAK, ("b", -1.0)]
    segs = parse_weights("x BREAK y")
    assert [is_break(s) for s in segs] == [False, True, False]


def test_empty_and_merging():
    assert parse_weights("") == [("", 1.0)]
    assert parse_weights("()") == [("", 1.0)]
    assert parse_weights("(a)(b) c") == [("ab", 1.1), (" c", 1.0)]
    assert parse_weights("a : b") == [("a : b", 1.0)]


def test_has_weight_syntax():
    for plain in ["", "a photo of a cat", "a : b", "cat, dog; 50% off"]:
        assert not has_weight_syntax(plain), plain
    for syntax in ["(cat)", "[cat]", "(cat:1.2)", "a BREAK b", "a \\(b\\)", "a ) b ("]:
        assert has_weight_syntax(syntax), syntax
    # a stray ')' alone is literal: parsing gives the text back
    assert not has_weight_syntax("a ) b")


# ----------------------------------------------------------------------------------------------- chunking

C = 999  # comma id of the toy examples


def toy(ids, w=1.0):
    return (list(ids), w)


def test_chunks_split_at_length_and_keep_weights():
    segs = [toy(range(1, 6), 1.0), toy(range(6, 13), 1.5)]
    chunks = chunk_tokens(segs, chunk_len=5)
    assert [c[0] for c in chunks] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    assert [c[1] for c in chunks] == [[1.0] * 5, [1.5] * 5, [1.5] * 2]


def test_comma_backtrack():
    ids = [1, 2, 3, 4, 5, 6, 7, C, 8, 9, 10, 11]  # comma at index 7, chunk full after 9
    chunks = chunk_tokens([toy(ids)], chunk_len=10, comma_token_id=C, comma_padding_backtrack=3)
    assert [c[0] for c in chunks] == [[1, 2, 3, 4, 5, 6, 7, C], [8, 9, 10, 11]]
    # the comma is 3 positions from the end: a backtrack of 2 is not enough
    chunks = chunk_tokens([toy(ids)], chunk_len=10, comma_token_id=C, comma_padding_backtrack=2)
    assert [c[0] for c in chunks] == [[1, 2, 3, 4, 5, 6, 7, C, 8, 9], [10, 11]]
    # off when no comma id or backtrack 0
    for kw in ({"comma_token_id": None}, {"comma_token_id": C, "comma_padding_backtrack": 0}):
        chunks = chunk_tokens([toy(ids)], chunk_len=10, **kw)
        assert [c[0] for c in chunks] == [ids[:10], ids[10:]]
    # weights travel with the moved ids
    w_ids = [1, C, 2, 3]
    chunks = chunk_tokens([toy(w_ids[:2], 1.0), toy(w_ids[2:], 2.0), toy([4], 3.0)], chunk_len=4,
                          comma_token_id=C, comma_padding_backtrack=5)
    assert chunks == [([1, C], [1.0, 1.0]), ([2, 3, 4], [2.0, 2.0, 3.0])]


def test_comma_arriving_at_full_chunk_is_not_remembered():
    # A1111 quirk, kept: a comma that opens a new chunk is not recorded as that chunk's last comma.
    ids = [1, 2, 3, 4, C, 6, 7, 8, 9]
    chunks = chunk_tokens([toy(ids)], chunk_len=4, comma_token_id=C, comma_padding_backtrack=4)
    assert [c[0] for c in chunks] == [[1, 2, 3, 4], [C, 6, 7, 8], [9]]


def test_break_forces_a_new_chunk():
    brk = (None, 1.0)
    assert [c[0] for c in chunk_tokens([toy([1, 2]), brk, toy([3])], chunk_len=5)] == [[1, 2], [3]]
    # BREAK at the end adds nothing; at the start it leaves an empty chunk; a prompt of nothing is one chunk
    assert [c[0] for c in chunk_tokens([toy([1]), brk, toy([])])] == [[1]]
    assert [c[0] for c in chunk_tokens([toy([]), brk, toy([1])])] == [[], [1]]
    assert [c[0] for c in chunk_tokens([toy([])])] == [[]]
    # a full chunk is closed only when the next token arrives, so a BREAK right after it adds no empty chunk
    assert [c[0] for c in chunk_tokens([toy([1, 2]), brk, toy([3])], chunk_len=2)] == [[1, 2], [3]]


def test_chunk_argument_errors():
    with pytest.raises(ValueError, match="chunk_len"):
        chunk_tokens([toy([1])], chunk_len=0)
    with pytest.raises(ValueError, match="comma_padding_backtrack"):
        chunk_tokens([toy([1])], comma_padding_backtrack=-1)


def word_encoder():
    """A toy tokenizer: one id per whitespace-separated word or punctuation mark (ids from 1)."""
    vocab: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        out = []
        for word in text.replace(",", " , ").split():
            out.append(vocab.setdefault(word, len(vocab) + 1))
        return out

    return encode, vocab


def test_build_chunks_toy_framing_and_weights():
    encode, vocab = word_encoder()
    bos, eos, pad = 1000, 1001, 0
    ids, w = build_chunks("a (b:1.5) c BREAK d", encode, bos=bos, eos=eos, pad=pad)
    assert ids.shape == w.shape == (2, 77) and ids.dtype == torch.long and w.dtype == torch.float32
    a, b, c, d = (vocab[x] for x in "abcd")
    assert ids[0, :5].tolist() == [bos, a, b, c, eos] and (ids[0, 5:] == pad).all()
    assert ids[1, :3].tolist() == [bos, d, eos] and (ids[1, 3:] == pad).all()
    assert w[0, :5].tolist() == [1.0, 1.0, 1.5, 1.0, 1.0] and (w[0, 5:] == 1).all() and (w[1] == 1).all()
    # weighting off: the syntax is plain text
    ids, w = build_chunks("(b:1.5)", encode, bos=bos, eos=eos, pad=pad, weighting=False)
    assert ids.shape == (1, 77) and ids[0, 1] == vocab["(b:1.5)"] and (w == 1).all()


def test_build_chunks_long_prompt_toy():
    encode, vocab = word_encoder()
    words = [f"w{i}" for i in range(160)]
    ids, w = build_chunks(" ".join(words), encode, bos=1000, eos=1001, pad=1001)
    assert ids.shape == (3, 77)  # 75 + 75 + 10
    body = torch.cat([ids[0, 1:76], ids[1, 1:76], ids[2, 1:11]]).tolist()
    assert body == [vocab[x] for x in words]
    assert ids[:, 0].tolist() == [1000] * 3 and ids[0, 76] == ids[1, 76] == 1001 and (ids[2, 11:] == 1001).all()


def test_build_chunks_rejects_encoders_adding_special_tokens():
    with pytest.raises(ValueError, match="special tokens"):
        build_chunks("a", lambda t: [1000] + [5] * len(t.split()) + [1001], bos=1000, eos=1001, pad=1001)


def test_tokenize_weighted():
    encode, vocab = word_encoder()
    segs = tokenize_weighted("x (y z) BREAK w", encode)
    assert segs == [([vocab["x"]], 1.0), ([vocab["y"], vocab["z"]], 1.1), ([], 1.0), (None, 1.0),
                    ([vocab["w"]], 1.0)]
    assert tokenize_weighted("x (y)", encode, weighting=False) == [(encode("x (y)"), 1.0)]


def test_match_chunk_counts_pads_with_empty_prompt_windows():
    encode, _ = word_encoder()
    pos = build_chunks(" ".join(f"p{i}" for i in range(100)), encode, bos=7, eos=8, pad=0)
    neg = build_chunks("ugly", encode, bos=7, eos=8, pad=0)
    (pi, pw), (ni, nw) = match_chunk_counts(pos, neg, bos=7, eos=8, pad=0)
    assert pi.shape == ni.shape == nw.shape == (2, 77)
    assert torch.equal(pi, pos[0]) and torch.equal(pw, pos[1]) and torch.equal(ni[0], neg[0][0])
    empty_ids, empty_w = build_chunks("", encode, bos=7, eos=8, pad=0)
    assert torch.equal(ni[1], empty_ids[0]) and torch.equal(nw[1], empty_w[0])
    assert torch.equal(empty_window(bos=7, eos=8, pad=0)[0], empty_ids[0])
    with pytest.raises(ValueError):
        match_chunk_counts((pi, pw[:, :10]), bos=7, eos=8, pad=0)


# ----------------------------------------------------------------------------------- real CLIP tokenizer


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
    """transformers' CLIPTokenizer (oracle) for SD1 (pad = EOS) and SD2 (pad = '!' = 0)."""
    transformers = pytest.importorskip("transformers")
    folder = write_clip_vocab(tmp_path_factory.mktemp("clip_tok"))
    sd1 = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                     pad_token="<|endoftext|>")
    sd2 = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    assert sd1.bos_token_id == 49406 and sd1.eos_token_id == 49407 and sd2.pad_token_id == 0
    return sd1, sd2


PLAIN_PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "masterpiece, best quality: a cat; 50% off! Ünïcödé 猫 🐱",
    "a : b",
    " ".join(["cat"] * 75),  # exactly 75 tokens
]


@pytest.mark.parametrize("prompt", PLAIN_PROMPTS)
def test_plain_prompt_equals_plain_tokenizer_call(clip_tokenizers, prompt):
    for tok in clip_tokenizers:
        encode = lambda t, tok=tok: tok.encode(t, add_special_tokens=False)  # noqa: E731
        assert not has_weight_syntax(prompt)
        assert len(encode(prompt)) <= 75
        ids, w = build_chunks(prompt, encode, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id,
                              comma_id=tok.get_vocab()[",</w>"])
        ref = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids.shape == (1, 77) and ids[0].tolist() == ref
        assert (w == 1).all()


def test_long_and_weighted_prompt_with_clip_tokenizer(clip_tokenizers):
    tok = clip_tokenizers[0]
    encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    comma = tok.get_vocab()[",</w>"]
    prompt = ", ".join(f"red cube number {i}" for i in range(30)) + ", (shiny:1.4) sphere"
    ids, w = build_chunks(prompt, encode, bos=49406, eos=49407, pad=49407, comma_id=comma)
    n_tokens = len(encode(prompt.replace("(shiny:1.4)", "shiny")))
    assert n_tokens > 150 and ids.shape[0] >= math.ceil(n_tokens / 75)
    # every chunk but the last ends at a comma (backtracking), and the ids are the prompt's, in order
    body = []
    for row in ids.tolist():
        end = row.index(49407, 1)
        assert row[0] == 49406 and end <= 76
        body += row[1:end]
    for row in ids[:-1].tolist():
        assert row[row.index(49407, 1) - 1] == comma
    assert body == encode(prompt.replace("(shiny:1.4)", "shiny"))
    shiny = encode("shiny")
    assert len(shiny) == 1
    pos = (ids == shiny[0]).nonzero()
    assert pos.shape[0] == 1 and w[pos[0, 0], pos[0, 1]].item() == pytest.approx(1.4)
    assert int((w != 1).sum()) == 1


# ----------------------------------------------------------------------------------------------- emphasis


def test_apply_weights_all_ones_is_bitwise_concatenation():
    ctx = torch.randn(3, 77, 16, dtype=torch.float16)
    out = apply_weights(ctx, torch.ones(3, 77))
    assert out.shape == (1, 231, 16) and out.dtype == torch.float16
    assert torch.equal(out, torch.cat(list(ctx), dim=0)[None])


def test_apply_weights_matches_formula_per_chunk():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, 32, generator=g) + 0.3
    weights = torch.ones(2, 77)
    weights[0, 3:6] = 1.5
    weights[0, 10] = 0.5
    out = apply_weights(ctx, weights)
    # reference computed in float64, chunk by chunk
    for i in range(2):
        z = ctx[i].double()
        zw = z * weights[i].double()[:, None]
        ref = zw * (z.mean() / zw.mean())
        got = out[0, i * 77 : (i + 1) * 77]
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
        assert got.double().mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    # the all-ones chunk is untouched, bit for bit
    assert torch.equal(out[0, 77:], ctx[1])
    # weighted tokens are scaled relative to their neighbours
    ratio = (out[0, 4] / out[0, 2]) / (ctx[0, 4] / ctx[0, 2])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.5), rtol=1e-4, atol=1e-4)


def test_apply_weights_prompt_and_none_normalisation():
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 77, 8, generator=g) + 0.5
    weights = torch.ones(2, 77)
    weights[1, 5] = 2.0
    zw = ctx.double() * weights.double()[..., None]
    whole = apply_weights(ctx, weights, normalize="prompt")
    torch.testing.assert_close(whole[0].double(), (zw * (ctx.double().mean() / zw.mean())).reshape(154, 8),
                               rtol=1e-5, atol=1e-6)
    raw = apply_weights(ctx, weights, normalize="none")
    torch.testing.assert_close(raw[0].double(), zw.reshape(154, 8), rtol=1e-6, atol=1e-6)
    half = apply_weights(ctx.half(), weights)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), apply_weights(ctx.half().float(), weights), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError):
        apply_weights(ctx, weights[:, :10])
    with pytest.raises(ValueError):
        apply_weights(ctx, weights, normalize="mean")


def test_weights_that_would_overflow_are_refused():
    from estable.errors import EstableError
    from estable.prompts import MAX_WEIGHT, check_weights

    check_weights("a (red:1000) circle, [blue] ((square)) BREAK (x:-3)")
    with pytest.raises(EstableError, match="prompt weight 1e\\+39 of 'red circle' is out of range"):
        check_weights(f"(red circle:1{'0' * 39})")
    with pytest.raises(EstableError, match="out of range"):
        check_weights("(((x:900)))")  # nesting multiplies: 900 × 1.1 × 1.1 = 1089
    with pytest.raises(EstableError, match="out of range"):
        check_weights(f"(x:{MAX_WEIGHT * 2:g})")
    ids = build_chunks(f"(x:{'9' * 40})", lambda t: [1] * len(t.split()), bos=0, eos=2, pad=2, weighting=False)[0]
    assert ids.shape[0] == 1  # with weighting off the brackets are words: nothing to refuse
