"""Parity of estable.tokenizer.CLIPTokenizer with transformers' CLIPTokenizer (the oracle) on the real CLIP
vocabulary, plus loading, saving, errors and speed."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from estable.errors import EstableError
from estable.tokenizer import CLIPTokenizer, find_clip_vocab, normalize, pre_tokenize

sys.path.insert(0, str(Path(__file__).parent))
from clip_oracle import require_clip_vocab, write_clip_vocab
from prompts_corpus import make_prompts  # noqa: E402

transformers = pytest.importorskip("transformers")
HFTokenizer = transformers.CLIPTokenizer

REPO = Path(__file__).resolve().parents[1]
BOS, EOS = 49406, 49407
PROMPTS = make_prompts(1200, seed=0)


def _read_gz(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> Path:
    """vocab.json + merges.txt built from the .gz per the published recipe (the oracle's input)."""
    return write_clip_vocab(tmp_path_factory.mktemp("clip_files"), require_clip_vocab())


@pytest.fixture(scope="module")
def ours_sd1() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file(require_clip_vocab())


@pytest.fixture(scope="module")
def ours_sd2() -> CLIPTokenizer:
    return CLIPTokenizer.from_bpe_file(require_clip_vocab(), pad_token_id=0)


@pytest.fixture(scope="module")
def hf_sd1(clip_files):
    return HFTokenizer(str(clip_files / "vocab.json"), str(clip_files / "merges.txt"))


@pytest.fixture(scope="module")
def hf_sd2(clip_files):
    return HFTokenizer(str(clip_files / "vocab.json"), str(clip_files / "merges.txt"), pad_token="!")


def _hf_ids(hf, prompts: list[str]) -> list[list[int]]:
    return hf(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]


def _assert_same(ours: CLIPTokenizer, hf, prompts: list[str], label: str) -> None:
    mine = ours(prompts)
    assert mine.dtype == torch.long and mine.shape == (len(prompts), 77)
    theirs = _hf_ids(hf, prompts)
    bad = [(p, r, t) for p, r, t in zip(prompts, mine.tolist(), theirs) if r != t]
    n_long = sum(1 for p in prompts if len(ours.encode(p)) > 75)
    print(f"{label}: {len(prompts)} prompts compared ({n_long} truncated), {len(bad)} differ")
    assert not bad, "first differences:\n" + "\n".join(f"{p!r}\n ours {r}\n ref  {t}" for p, r, t in bad[:5])


# ---------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_matches_published_recipe(ours_sd1, clip_files):
    ref = json.loads((clip_files / "vocab.json").read_text(encoding="utf-8"))
    assert ours_sd1.vocab_size == 49408
    assert ours_sd1.encoder == ref
    assert (ours_sd1.bos_token_id, ours_sd1.eos_token_id, ours_sd1.pad_token_id) == (BOS, EOS, EOS)
    assert ours_sd1.max_length == 77
    assert len(ours_sd1.merges) == 48894


def test_corpus_is_varied_and_deterministic():
    assert len(PROMPTS) >= 1000
    assert make_prompts(1200, seed=0) == PROMPTS
    assert make_prompts(1200, seed=1) != PROMPTS
    joined = "".join(PROMPTS)
    for needle in ["\u0301", "\u200d", "\U0001f3fd", "\t", "\n", "\u3000", "\x1c", "&amp;", "’", "'s", "漢",
                   "(masterpiece:1.2)", "<|endoftext|>", "\x00", "İ", "Σ"]:
        assert needle in joined, needle
    assert "" in PROMPTS


# ---------------------------------------------------------------------------------------------- id parity
def test_parity_sd1_padding(ours_sd1, hf_sd1):
    _assert_same(ours_sd1, hf_sd1, PROMPTS, "SD1 (pad = eos 49407)")


def test_parity_sd2_padding(ours_sd2, hf_sd2):
    assert ours_sd2.pad_token_id == hf_sd2.pad_token_id == 0
    _assert_same(ours_sd2, hf_sd2, PROMPTS, "SD2 (pad = '!' 0)")
    # transformers treats the pad token "!" as a special token: a literal "!" in a prompt becomes id 0, not
    # "!</w>" (256). We follow the oracle; this pins the behaviour so that a change is noticed.
    assert ours_sd2.encode("wow!") == [ours_sd2.encoder["wow</w>"], 0]


def test_encode_untruncated_matches(ours_sd1, hf_sd1):
    theirs = hf_sd1(PROMPTS, add_special_tokens=False)["input_ids"]
    mine = [ours_sd1.encode(p) for p in PROMPTS]
    assert mine == theirs
    assert max(len(m) for m in mine) > 200  # long prompts really were compared in full


def test_decode_matches(ours_sd1, hf_sd1, ours_sd2, hf_sd2):
    for ours, hf in ((ours_sd1, hf_sd1), (ours_sd2, hf_sd2)):
        for p in PROMPTS:
            ids = hf(p)["input_ids"]
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), p
            assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), p


def test_nfc_nfd_and_case_give_same_ids(ours_sd1):
    text = "Crème brûlée, jalapeño, über, 한국어"
    assert ours_sd1.encode(unicodedata.normalize("NFD", text)) == ours_sd1.encode(text)
    assert ours_sd1.encode(text.upper()) == ours_sd1.encode(text.lower())


def test_unicode_tables_match_reference_for_every_assigned_code_point(hf_sd1):
    """Normalization and pre-tokenization against the oracle's own normalizer and pre-tokenizer, for every code
    point Python's unicodedata assigns (planes 15-16 private use left out: it is all one category)."""
    from estable.tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()
    backend = hf_sd1.backend_tokenizer
    chars = [chr(cp) for cp in range(0xF0000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    assert len(chars) > 140_000
    checked = 0
    for start in range(0, len(chars), 20_000):
        # Each character alone, after a letter, doubled (numbers split, letters join) and after a symbol.
        text = " ".join(f"{c} a{c} {c}{c} !{c}'s" for c in chars[start : start + 20_000])
        assert normalize(text) == backend.normalizer.normalize_str(text)
        ref = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        mine = ["".join(enc[b] for b in w.encode("utf-8")) for w in pre_tokenize(text)]
        assert mine == ref
        checked += len(chars[start : start + 20_000])
    print(f"unicode tables: {checked} code points agree")


# ---------------------------------------------------------------------------------------------- folders
def _added(content: str, legacy: bool) -> dict:
    d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if legacy else d


def _hub_style_folder(folder: Path, clip_files: Path, pad: str) -> Path:
    """A tokenizer folder laid out like the published SD 1.5 / SD 2.1 ones: special tokens as AddedToken dicts
    with normalized=true, the pad token as a plain string."""
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((clip_files / name).read_bytes())
    config = {"add_prefix_space": False, "bos_token": _added("<|startoftext|>", True), "do_lower_case": True,
              "eos_token": _added("<|endoftext|>", True), "errors": "replace", "model_max_length": 77,
              "pad_token": pad, "special_tokens_map_file": "./special_tokens_map.json",
              "tokenizer_class": "CLIPTokenizer", "unk_token": _added("<|endoftext|>", True)}
    smap = {"bos_token": _added("<|startoftext|>", False), "eos_token": _added("<|endoftext|>", False),
            "pad_token": pad, "unk_token": _added("<|endoftext|>", False)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    return folder


@pytest.mark.parametrize("pad, pad_id", [("<|endoftext|>", EOS), ("!", 0)])
def test_hub_style_folders(tmp_path, clip_files, pad, pad_id):
    folder = _hub_style_folder(tmp_path / "tokenizer", clip_files, pad)
    hf = HFTokenizer.from_pretrained(str(folder))
    ours = CLIPTokenizer.from_folder(tmp_path)  # the pipeline root: finds tokenizer/
    assert ours.pad_token_id == hf.pad_token_id == pad_id
    assert ours.max_length == 77
    extra = ["<|STARTOFTEXT|> a", "<|EndOfText|> b", "x <|endoftext|> y", "hello!"]
    _assert_same(ours, hf, PROMPTS + extra, f"hub-style folder, pad {pad!r}")
    # transformers 5 writes tokenizer.json (no vocab.json) on save; that layout loads too.
    hf.save_pretrained(str(tmp_path / "resaved"))
    assert not (tmp_path / "resaved" / "vocab.json").exists()
    _assert_same(CLIPTokenizer.from_folder(tmp_path / "resaved"), hf, PROMPTS + extra, "transformers-saved folder")


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_save_round_trip(tmp_path, ours_sd1, ours_sd2, pad_id):
    ours = ours_sd1 if pad_id == EOS else ours_sd2
    folder = ours.save(tmp_path / "tokenizer")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file(), name
    hf = HFTokenizer.from_pretrained(str(folder))
    assert hf.pad_token_id == pad_id and hf.model_max_length == 77
    _assert_same(ours, hf, PROMPTS, f"saved folder vs transformers, pad {pad_id}")
    again = CLIPTokenizer.from_folder(folder)
    assert again.encoder == ours.encoder and again.merges == ours.merges
    assert again.pad_token_id == pad_id and again.max_length == 77
    assert torch.equal(again(PROMPTS), ours(PROMPTS))
    loaded = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token_id=EOS)
    assert loaded.pad_token_id == EOS  # an explicit argument wins over the folder's config


def test_from_vocab_generic_small_vocabulary(tmp_path, ours_sd1):
    """A small in-code vocabulary (ids in a different order than CLIP's) behaves like transformers on it."""
    symbols = list(ours_sd1.encoder)[:512]
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"), ("e", "r")]
    tokens = ["<|endoftext|>", "<|startoftext|>", *reversed(symbols), *("".join(m) for m in merges)]
    encoder = {t: i for i, t in enumerate(tokens)}
    ours = CLIPTokenizer.from_vocab(encoder, merges, max_length=16)
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (1, 0, 2 + 512 + len(merges))
    assert ours.tokenize("The cat") == ["the</w>", "cat</w>"]
    hf = HFTokenizer.from_pretrained(str(ours.save(tmp_path / "small")))
    theirs = hf(PROMPTS, padding="max_length", max_length=16, truncation=True)["input_ids"]
    assert ours(PROMPTS).tolist() == theirs


# ---------------------------------------------------------------------------------------------- call semantics
def test_call_truncates_pads_and_keeps_eos_last(ours_sd1, ours_sd2):
    long = ", ".join(["a red fox in the snow"] * 40)
    out = ours_sd2([long, "a cat"])
    assert out.shape == (2, 77)
    assert out[0, 0] == BOS and out[0, -1] == EOS and (out[0] != 0).all()
    assert out[0, 1:-1].tolist() == ours_sd2.encode(long)[:75]
    assert out[1, :4].tolist() == [BOS, ours_sd2.encoder["a</w>"], ours_sd2.encoder["cat</w>"], EOS]
    assert (out[1, 4:] == 0).all()
    assert ours_sd1("a cat", padding=False).shape == (1, 4)
    untruncated = ours_sd1([long], truncation=False)
    assert untruncated.shape[1] == len(ours_sd1.encode(long)) + 2 > 77
    with pytest.raises(ValueError, match="padding"):
        ours_sd1(["a cat", "a big dog"], padding=False)


def test_speed_thousand_prompts():
    tok = CLIPTokenizer.from_bpe_file(require_clip_vocab())  # fresh: an empty word cache
    prompts = PROMPTS[:1000]
    t0 = time.perf_counter()
    tok(prompts)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok(prompts)
    warm = time.perf_counter() - t0
    print(f"1000 prompts: {cold * 1000:.0f} ms cold cache, {warm * 1000:.0f} ms warm")
    assert cold < 2.0


# ---------------------------------------------------------------------------------------------- finding the file
def _no_vocab_anywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("ESTABLE_CLIP_VOCAB", str(tmp_path / "missing.txt.gz"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("estable.tokenizer.PACKAGED_CLIP_VOCAB", tmp_path / "stripped" / "bpe_simple_vocab_16e6.txt.gz")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "open_clip").is_dir()])


def test_missing_vocabulary_error_says_where_to_get_it(monkeypatch, tmp_path):
    _no_vocab_anywhere(monkeypatch, tmp_path)
    with pytest.raises(EstableError) as info:
        find_clip_vocab()
    msg = str(info.value)
    assert "pip download --no-deps open-clip-torch==3.3.0" in msg
    assert "open_clip/bpe_simple_vocab_16e6.txt.gz" in msg
    assert "ESTABLE_CLIP_VOCAB" in msg and "vocab.json + merges.txt" in msg
    assert "missing.txt.gz" in msg  # says what it tried
    with pytest.raises(EstableError, match="open-clip-torch"):
        CLIPTokenizer.from_bpe_file(tmp_path / "nope.txt.gz")
    with pytest.raises(EstableError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_find_clip_vocab_search_order(monkeypatch, tmp_path):
    real = require_clip_vocab()
    _no_vocab_anywhere(monkeypatch, tmp_path)
    # 1. an installed open_clip package, found by its import spec, never imported
    pkg = tmp_path / "site" / "open_clip"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "bpe_simple_vocab_16e6.txt.gz").write_bytes(real.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_clip_vocab() == pkg / "bpe_simple_vocab_16e6.txt.gz"
    assert "open_clip" not in sys.modules
    # 2. the user cache wins over the package
    cache = tmp_path / "home" / ".cache" / "estable"
    cache.mkdir(parents=True)
    (cache / "bpe_simple_vocab_16e6.txt.gz").write_bytes(real.read_bytes())
    assert find_clip_vocab() == cache / "bpe_simple_vocab_16e6.txt.gz"
    # 3. the copy shipped in estable/assets/ wins over both
    shipped = tmp_path / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    shipped.parent.mkdir()
    shipped.write_bytes(real.read_bytes())
    monkeypatch.setattr("estable.tokenizer.PACKAGED_CLIP_VOCAB", shipped)
    assert find_clip_vocab() == shipped
    # 4. the environment variable wins over everything
    monkeypatch.setenv("ESTABLE_CLIP_VOCAB", str(real))
    assert find_clip_vocab() == real


def test_vocabulary_ships_in_the_package():
    """The packaged file is CLIP's (49,408 entries, the ids transformers' CLIPTokenizer gives), with its licence."""
    from estable.tokenizer import PACKAGED_CLIP_VOCAB

    assert PACKAGED_CLIP_VOCAB.is_file()
    assert hashlib.sha256(PACKAGED_CLIP_VOCAB.read_bytes()).hexdigest() == (
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")
    licence = (PACKAGED_CLIP_VOCAB.parent / "CLIP_VOCAB_LICENSE.txt").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence
    tok = CLIPTokenizer.from_bpe_file(PACKAGED_CLIP_VOCAB)
    assert tok.vocab_size == 49408
    # pyproject's package-data must carry it into wheels
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"**/*.gz"' in pyproject and '"**/*.txt"' in pyproject


def test_fresh_install_finds_the_packaged_vocabulary(tmp_path):
    """A new user's machine: no $ESTABLE_CLIP_VOCAB, an empty HOME, no open_clip. A fresh interpreter finds the
    vocabulary inside the package and tokenizes as transformers' CLIPTokenizer does."""
    folder = write_clip_vocab(tmp_path / "ref", require_clip_vocab())
    ref = HFTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    prompt = "a photo of an astronaut riding a horse on mars"
    env = {k: v for k, v in os.environ.items() if k != "ESTABLE_CLIP_VOCAB"}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    code = (
        "import importlib.util, json, sys\n"
        "assert importlib.util.find_spec('open_clip') is None\n"
        "from estable.tokenizer import CLIPTokenizer, find_clip_vocab\n"
        "p = find_clip_vocab()\n"
        f"print(json.dumps([str(p), CLIPTokenizer.from_bpe_file(p)({prompt!r})[0].tolist()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path, ids = json.loads(out.stdout)
    assert Path(path) == Path(__file__).resolve().parents[1] / "src" / "estable" / "assets" / (
        "bpe_simple_vocab_16e6.txt.gz")
    assert ids == ref(prompt, padding="max_length", max_length=77)["input_ids"]


def test_plain_text_vocabulary_file(tmp_path, ours_sd1):
    plain = tmp_path / "bpe_simple_vocab_16e6.txt"
    plain.write_text(_read_gz(require_clip_vocab()), encoding="utf-8")
    tok = CLIPTokenizer.from_bpe_file(plain)
    assert tok.encoder == ours_sd1.encoder and tok.merges == ours_sd1.merges
