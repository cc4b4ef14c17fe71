"""CLIP byte-level BPE tokenizer, id-for-id the same as ``transformers.CLIPTokenizer`` (v5).

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", §2.4)
tokenizes lower-cased text with byte-level BPE (Sennrich et al. 2016; the byte-to-unicode trick of GPT-2,
Radford et al. 2019) over a 49,408-entry vocabulary, brackets each prompt with ``<|startoftext|>`` and
``<|endoftext|>`` and caps it at 77 tokens.

The pipeline, step by step (this is what transformers 5.x' tokenizers-backed CLIPTokenizer does; diffusers
pipelines use it, so its ids are the ones the text encoders were fine-tuned against; ftfy and the old
``BasicTokenizer`` clean-up are no longer part of it):

1. **Special tokens in the text.** Literal occurrences of the special tokens (bos, eos, unk, pad: for SD 2.x
   folders that includes the pad token ``"!"``) are cut out first and mapped straight to their ids. A token
   flagged ``normalized=False`` is matched on the raw text; one flagged ``normalized=True`` is matched on the
   text after step 2 (so ``<|ENDOFTEXT|>`` matches it). Matching is leftmost-longest.
2. **Normalization** of every remaining stretch of text, in this order:
   a. Unicode NFC composition (``e`` + U+0301 becomes ``é``; compatibility forms such as ``ﬁ`` stay).
   b. Every run of whitespace becomes one space. "Whitespace" is the Unicode ``White_Space`` property
      (tab, LF, VT, FF, CR, space, U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F,
      U+205F, U+3000). Python's ``str.isspace`` also accepts U+001C..U+001F; those are *not* whitespace
      here and are kept as symbols, like the other control characters (NUL, ESC, ZWSP U+200B, ...).
   c. Lower-casing character by character with the full (unconditional) Unicode mappings: ``İ`` becomes
      ``i`` + U+0307 and ``ß`` stays ``ß``. There is no context-sensitive final sigma: ``Σ`` always becomes ``σ``,
      never ``ς`` (Python's ``str.lower`` would produce ``ς`` at the end of a word).
   Accents are kept (no stripping), HTML entities such as ``&amp;`` are left as they are, CJK characters are
   not spaced out.
3. **Pre-tokenization** into words, scanning left to right and taking at each position the first of:
   the literals ``<|startoftext|>`` / ``<|endoftext|>`` (then split into ``<|``, the name, ``|>``), one of the
   contractions ``'s 't 're 've 'm 'll 'd``, a run of letters (Unicode category L*), a single number
   character (category N*: digits are tokenized one at a time), or a run of anything else that is neither
   whitespace, letter nor number (punctuation, symbols, marks, emoji with their ZWJ and skin-tone modifiers,
   control characters). Whitespace only separates words and is dropped. This is CLIP's split pattern
    ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   written as a small scanner over ``unicodedata.category`` (the stdlib ``re`` has no ``\\p{..}`` classes).
4. **Byte-level BPE** on each word: its UTF-8 bytes are mapped to printable characters (GPT-2's
   bytes→unicode table), ``</w>`` is appended to the last symbol, then the ranked merges are applied, lowest
   rank first, until none applies. Results are cached per word.

Characters that Python's ``unicodedata`` does not know yet (unassigned in its Unicode version: 14.0 for
Python 3.11) count as symbols here; the ``tokenizers`` library, built on a newer Unicode, may see letters or
numbers in them. Every character assigned in Python's database behaves identically.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .errors import EstableError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 48894  # 49408 entries = 256 bytes + 256 bytes</w> + 48894 merges + 2 special tokens
WORD_SUFFIX = "</w>"
#: CLIP's vocabulary as shipped inside the package (the same file open_clip and OpenAI's CLIP distribute).
PACKAGED_CLIP_VOCAB = Path(__file__).resolve().parent / "assets" / CLIP_VOCAB_FILENAME

VOCAB_HINT = (
    "reinstall estable (its package ships the file in estable/assets/), or "
    "pip download --no-deps open-clip-torch==3.3.0 and take open_clip/bpe_simple_vocab_16e6.txt.gz out of the "
    "wheel, or point ESTABLE_CLIP_VOCAB at it, or use a diffusers folder's tokenizer/ (vocab.json + merges.txt)"
)

# Unicode White_Space (PropList.txt). Not str.isspace(): that also accepts U+001C..U+001F.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_RUN = re.compile("[" + re.escape("".join(sorted(_WHITESPACE))) + "]+")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # order of CLIP's pattern
_LITERALS = (BOS_TOKEN, EOS_TOKEN)

# Character classes of the pre-tokenizer.
_SPACE, _LETTER, _NUMBER, _OTHER = 0, 1, 2, 3
_class_cache: dict[str, int] = {}


def _char_class(c: str) -> int:
    k = _class_cache.get(c)
    if k is None:
        if c in _WHITESPACE:
            k = _SPACE
        else:
            major = unicodedata.category(c)[0]
            k = _LETTER if major == "L" else _NUMBER if major == "N" else _OTHER
        _class_cache[c] = k
    return k


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the other 68 bytes
    (controls, space, soft hyphen, ...) map, in increasing byte order, to U+0100, U+0101, ... so that no BPE
    symbol is whitespace or a control character. Insertion order is the vocabulary order of CLIP's first 256
    entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def check_unicode(text: str, what: str = "the text") -> None:
    """EstableError when ``text`` cannot be written as UTF-8: a byte that was not valid UTF-8 (kept by Python as a
    surrogate escape, e.g. from a command-line argument in another encoding) or a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        code = ord(bad)
        found = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise EstableError(f"{what} is not valid UTF-8 text: {found} at character {exc.start + 1}; write it in "
                           "UTF-8 (e.g. café, not a Latin-1 byte)") from None


def normalize(text: str) -> str:
    """Step 2 of the module docstring: NFC, whitespace runs to one space, per-character lower case."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    # str.lower() applies the context-dependent Final_Sigma rule (Σ → ς at a word's end); the reference lower-cases
    # each character on its own (Σ → σ). Python has no other context-dependent lower-case mapping.
    return text.replace("Σ", "σ").lower()


def _scan(text: str, literals: bool) -> list[str]:
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if literals and c == "<":
            lit = next((s for s in _LITERALS if text.startswith(s, i)), None)
            if lit is not None:
                # The byte-level pre-tokenizer that follows in the reference splits the literal once more
                # (GPT-2's pattern): "<|", the letters, "|>".
                words.extend(_scan(lit, literals=False))
                i += len(lit)
                continue
        if c == "'":
            con = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if con is not None:
                words.append(con)
                i += len(con)
                continue
        k = _char_class(c)
        if k == _SPACE:
            i += 1
            continue
        j = i + 1
        if k != _NUMBER:  # numbers are single characters; letters and "other" extend to a run of their class
            while j < n and _char_class(text[j]) == k:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def pre_tokenize(text: str) -> list[str]:
    """Step 3 of the module docstring: split normalized text into words (whitespace dropped)."""
    return _scan(text, literals=True)


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise EstableError(f"cannot read tokenizer file {path}: {e}") from e


def _parse_merges(lines: Iterable[str], source: Path | str) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip() or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise EstableError(f"{source}, line {line_no}: a merge line holds two symbols, found {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def clip_encoder(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The CLIP vocabulary order: bytes, bytes + ``</w>``, one entry per merge, then bos and eos."""
    symbols = list(_BYTE_ENCODER.values())
    vocab = symbols + [s + WORD_SUFFIX for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != len(vocab):
        raise EstableError("the BPE merges produce a token twice; the file is not a CLIP-style merges list")
    return encoder


def find_clip_vocab() -> Path:
    """Locate CLIP's ``bpe_simple_vocab_16e6.txt.gz``.

    Looks, in order, at ``$ESTABLE_CLIP_VOCAB`` (an override), the copy shipped inside this package
    (``estable/assets/``, MIT-licensed, see ``CLIP_VOCAB_LICENSE.txt`` beside it), ``~/.cache/estable/``, and the
    data folder of an installed ``open_clip`` package (found by its import spec; the package is not imported).
    The last two matter only for an install whose packaged copy was stripped out.
    """
    tried: list[str] = []
    env = os.environ.get("ESTABLE_CLIP_VOCAB")
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        tried.append(f"$ESTABLE_CLIP_VOCAB={env} (no such file)")
    # Read the module attribute at call time, so that a test (or a packager) can point it elsewhere.
    packaged = Path(PACKAGED_CLIP_VOCAB)
    if packaged.is_file():
        return packaged
    tried.append(str(packaged))
    cache = Path.home() / ".cache" / "estable" / CLIP_VOCAB_FILENAME
    if cache.is_file():
        return cache
    tried.append(str(cache))
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin:
            folders.append(str(Path(spec.origin).parent))
        for folder in folders:
            p = Path(folder) / CLIP_VOCAB_FILENAME
            if p.is_file():
                return p
            tried.append(str(p))
    else:
        tried.append("open_clip package (not installed)")
    raise EstableError(f"CLIP vocabulary {CLIP_VOCAB_FILENAME} not found (looked at: {'; '.join(tried)}). {VOCAB_HINT}")


def _token_spec(value: object) -> tuple[str, bool] | None:
    """(content, normalized) of a special-token entry of tokenizer_config.json / special_tokens_map.json."""
    if isinstance(value, str):
        return value, False  # transformers adds a special token given as a plain string with normalized=False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", False))
    return None


_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class CLIPTokenizer:
    """Byte-level BPE tokenizer with CLIP's clean-up and split (see the module docstring).

    Build it with :meth:`from_bpe_file` (open_clip's ``.txt.gz``), :meth:`from_folder` / :meth:`from_files`
    (a diffusers ``tokenizer/`` folder) or :meth:`from_vocab` (a vocabulary built in code). Any vocabulary
    works that uses the ``</w>`` end-of-word convention and holds the bos / eos tokens.

    Args:
        encoder: token string → id.
        merges: BPE merges, highest priority first.
        max_length: sequence length of :meth:`__call__` (bos and eos included).
        bos_token, eos_token, unk_token, pad_token: the special tokens' strings (unk and pad default to eos).
        normalized: special-token string → whether it is matched after normalization (see step 1).
        extra_special_tokens: further named special tokens (``sep_token``, ``cls_token``, ``mask_token`` → string),
            cut out of the text as single tokens like the others.
    """

    def __init__(
        self,
        encoder: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = 77,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str | None = None,
        pad_token: str | None = None,
        normalized: Mapping[str, bool] | None = None,
        extra_special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (bos + eos), got {max_length}")
        self.encoder: dict[str, int] = dict(encoder)
        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        if len(self.decoder) != len(self.encoder):
            raise EstableError("the vocabulary maps two tokens to the same id")
        self.merges: list[tuple[str, str]] = [tuple(m) for m in merges]  # type: ignore[misc]
        self._ranks = {m: r for r, m in reversed(list(enumerate(self.merges)))}  # first occurrence wins
        self._max_length = int(max_length)
        unk_token = eos_token if unk_token is None else unk_token
        pad_token = eos_token if pad_token is None else pad_token
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.extra_special_tokens: dict[str, str] = dict(extra_special_tokens or {})
        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
                 **self.extra_special_tokens}
        for name, tok in named.items():
            if tok not in self.encoder:
                raise EstableError(f"the {name} {tok!r} is not in the vocabulary")
        flags = dict(normalized or {})
        self.normalized: dict[str, bool] = {t: bool(flags.get(t, False)) for t in named.values()}
        self._raw_special = self._alternation([t for t, norm in self.normalized.items() if not norm])
        norm_contents = {normalize(t): t for t, norm in self.normalized.items() if norm}
        self._norm_special_map = norm_contents
        self._norm_special = self._alternation(list(norm_contents))
        self._cache: dict[str, list[int]] = {}

    @staticmethod
    def _alternation(tokens: list[str]) -> re.Pattern[str] | None:
        if not tokens:
            return None
        # Longest first, so that at one position the longest special token wins (leftmost-longest matching).
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_vocab(
        cls,
        encoder: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = 77,
        pad_token_id: int | None = None,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
    ) -> CLIPTokenizer:
        """A tokenizer over a vocabulary built in code (pad defaults to eos)."""
        pad_token = None
        if pad_token_id is not None:
            pad_token = {i: t for t, i in encoder.items()}.get(pad_token_id)
            if pad_token is None:
                raise ValueError(f"pad_token_id {pad_token_id} is not an id of the vocabulary")
        return cls(encoder, merges, max_length=max_length, bos_token=bos_token, eos_token=eos_token,
                   pad_token=pad_token)

    @classmethod
    def from_bpe_file(
        cls, path: str | os.PathLike[str], *, max_length: int = 77, pad_token_id: int = 49407
    ) -> CLIPTokenizer:
        """From open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (or the same file unpacked to ``.txt``).

        SD 1.x pads with eos (49407, the default); SD 2.x pads with ``"!"`` (``pad_token_id=0``).
        """
        path = Path(path)
        if not path.is_file():
            raise EstableError(f"BPE vocabulary file {path} not found. {VOCAB_HINT}")
        lines = _read_text(path).split("\n")
        # Line 0 is a version header; CLIP uses merges 1..48894 of the file and ignores the rest.
        merges = _parse_merges(lines[1 : CLIP_NUM_MERGES + 1], path)
        return cls.from_vocab(clip_encoder(merges), merges, max_length=max_length, pad_token_id=pad_token_id)

    @classmethod
    def from_files(
        cls,
        vocab_json: str | os.PathLike[str],
        merges_txt: str | os.PathLike[str],
        *,
        max_length: int | None = None,
        pad_token_id: int | None = None,
    ) -> CLIPTokenizer:
        """From a diffusers/transformers ``vocab.json`` + ``merges.txt``.

        ``tokenizer_config.json`` and ``special_tokens_map.json`` next to ``vocab.json`` are read when present,
        for the special tokens (SD 2.x folders pad with ``"!"``, id 0), their ``normalized`` flags and
        ``model_max_length``. Explicit ``max_length`` / ``pad_token_id`` arguments win over the files.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        for p in (vocab_json, merges_txt):
            if not p.is_file():
                raise EstableError(f"tokenizer file {p} not found. {VOCAB_HINT}")
        encoder = cls._read_json(vocab_json, required=True)
        merges = _parse_merges(_read_text(merges_txt).split("\n"), merges_txt)
        return cls._from_parts(encoder, merges, vocab_json.parent, None, max_length, pad_token_id, vocab_json)

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike[str], *, max_length: int | None = None, pad_token_id: int | None = None
    ) -> CLIPTokenizer:
        """From a diffusers ``tokenizer/`` folder, or a pipeline folder that holds one.

        Reads ``vocab.json`` + ``merges.txt`` (the layout of the published SD folders) or, failing those, the
        ``tokenizer.json`` that transformers 5 writes, with ``tokenizer_config.json`` beside them.
        """
        folder = Path(path)
        names = ("vocab.json", "tokenizer.json")
        if not any((folder / n).is_file() for n in names) and any((folder / "tokenizer" / n).is_file() for n in names):
            folder = folder / "tokenizer"
        if (folder / "vocab.json").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt", max_length=max_length,
                                  pad_token_id=pad_token_id)
        if not (folder / "tokenizer.json").is_file():
            raise EstableError(f"{path} holds no tokenizer (vocab.json + merges.txt, or tokenizer.json). {VOCAB_HINT}")
        source = folder / "tokenizer.json"
        data = cls._read_json(source, required=True)
        model = data.get("model") or {}
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != WORD_SUFFIX:
            raise EstableError(f"{source} is not a CLIP-style BPE tokenizer (BPE model with '</w>' word ends)")
        encoder = model.get("vocab")
        if not isinstance(encoder, dict):
            raise EstableError(f"{source} has no BPE vocabulary")
        # Merges are stored as [a, b] pairs (tokenizers >= 0.20) or as "a b" strings (older files).
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model.get("merges", [])]
        if any(len(m) != 2 for m in merges):
            raise EstableError(f"{source}: a merge must hold two symbols")
        added = {t["content"]: bool(t.get("normalized", False)) for t in data.get("added_tokens", [])
                 if isinstance(t, dict) and isinstance(t.get("content"), str)}
        return cls._from_parts(encoder, merges, folder, added, max_length, pad_token_id, source)  # type: ignore[arg-type]

    @classmethod
    def _from_parts(
        cls,
        encoder: dict[str, int],
        merges: list[tuple[str, str]],
        folder: Path,
        added_flags: dict[str, bool] | None,
        max_length: int | None,
        pad_token_id: int | None,
        source: Path,
    ) -> CLIPTokenizer:
        config = cls._read_json(folder / "tokenizer_config.json")
        tokens, normalized = cls._special_tokens_from_config(config, folder, added_flags)
        if max_length is None:
            # transformers writes a huge sentinel when no length is known; fall back to CLIP's 77 then.
            length = config.get("model_max_length")
            max_length = int(length) if isinstance(length, int) and 2 <= length <= 1_000_000 else 77
        pad = tokens.get("pad_token")
        if pad_token_id is not None:
            pad = {i: t for t, i in encoder.items()}.get(pad_token_id)
            if pad is None:
                raise ValueError(f"pad_token_id {pad_token_id} is not an id of {source}")
        named = {"bos_token", "eos_token", "unk_token", "pad_token"}
        extra = {name: t for name, t in tokens.items() if name not in named}
        return cls(
            encoder, merges, max_length=max_length,
            bos_token=tokens.get("bos_token", BOS_TOKEN), eos_token=tokens.get("eos_token", EOS_TOKEN),
            unk_token=tokens.get("unk_token"), pad_token=pad, normalized=normalized, extra_special_tokens=extra,
        )

    @staticmethod
    def _read_json(path: Path, required: bool = False) -> dict:
        if not path.is_file() and not required:
            return {}
        try:
            data = json.loads(_read_text(path))
        except (ValueError, RecursionError) as e:  # also a 5000-digit number, or nesting too deep
            raise EstableError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            if required:
                raise EstableError(f"{path} must hold a JSON object")
            return {}
        return data

    @classmethod
    def _special_tokens_from_config(
        cls, config: dict, folder: Path, added_flags: dict[str, bool] | None = None
    ) -> tuple[dict[str, str], dict[str, bool]]:
        """Special tokens and their ``normalized`` flags, resolved the way transformers 5 resolves them.

        Names come from ``tokenizer_config.json``, overridden by ``special_tokens_map.json`` unless the config
        carries an ``added_tokens_decoder``. A token's flag comes from the added-token records (that
        ``added_tokens_decoder``, or ``tokenizer.json``'s ``added_tokens``) when they list it; otherwise from
        the named entry (a plain string means ``normalized=False``), and when several names share a string the
        last one in bos, eos, unk, sep, pad, cls, mask order wins (a plain-string pad ``<|endoftext|>`` thus
        makes eos match on the raw text only, as in the SD 1.x folders).
        """
        values: dict[str, object] = {k: config[k] for k in _TOKEN_NAMES if config.get(k) is not None}
        record_flags: dict[str, bool] = dict(added_flags or {})
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in decoder.values():
                spec = _token_spec(entry)
                if spec is not None:
                    record_flags[spec[0]] = spec[1]
        else:
            smap = cls._read_json(folder / "special_tokens_map.json")
            values.update({k: smap[k] for k in _TOKEN_NAMES if smap.get(k) is not None})
        tokens: dict[str, str] = {}
        normalized: dict[str, bool] = {}
        for name in _TOKEN_NAMES:
            spec = _token_spec(values.get(name))
            if spec is None:
                continue
            content, flag = spec
            tokens[name] = content
            normalized[content] = record_flags.get(content, flag)
        return tokens, normalized

    # ------------------------------------------------------------------ properties
    @property
    def bos_token_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def unk_token_id(self) -> int:
        return self.encoder[self.unk_token]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def special_token_ids(self) -> set[int]:
        return {self.encoder[t] for t in self.normalized}

    # ------------------------------------------------------------------ encoding
    def _bpe(self, word: str) -> list[int]:
        """Byte-level BPE of one pre-tokenized word, as ids (cached)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = [_BYTE_ENCODER[b] for b in word.encode("utf-8")]
        symbols[-1] += WORD_SUFFIX
        ranks = self._ranks
        while len(symbols) > 1:
            # The adjacent pair with the lowest merge rank; merge all its occurrences, left to right.
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.unk_token_id
        ids = [self.encoder.get(s, unk) for s in symbols]
        if len(self._cache) > 200_000:  # bound the memory of a long-running server
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _encode_normalized(self, text: str, out: list[int]) -> None:
        for word in pre_tokenize(text):
            out.extend(self._bpe(word))

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``: no bos / eos, no truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text)
        out: list[int] = []
        for segment, special in self._split(text, self._raw_special, None):
            if special:
                out.append(self.encoder[segment])
                continue
            for part, special2 in self._split(normalize(segment), self._norm_special, self._norm_special_map):
                if special2:
                    out.append(self.encoder[part])
                else:
                    self._encode_normalized(part, out)
        return out

    @staticmethod
    def _split(
        text: str, pattern: re.Pattern[str] | None, mapping: dict[str, str] | None
    ) -> list[tuple[str, bool]]:
        """Cut special tokens out of ``text``: [(piece, is_special)], special pieces as token strings."""
        if pattern is None:
            return [(text, False)]
        parts: list[tuple[str, bool]] = []
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                parts.append((text[start : m.start()], False))
            parts.append((mapping[m.group()] if mapping else m.group(), True))
            start = m.end()
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (for inspection; ``</w>`` marks a word's end)."""
        return [self.decoder[i] for i in self.encode(text)]

    def __call__(self, texts: str | Sequence[str], *, padding: bool = True, truncation: bool = True) -> torch.Tensor:
        """Token ids (B, L), int64: bos + ids + eos per text.

        truncation: keep the first ``max_length - 2`` ids, so that eos stays last.
        padding: pad with ``pad_token_id`` to ``max_length`` (to the longest sequence if that is longer, i.e.
        with ``truncation=False``). Without padding all sequences must have the same length.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows: list[list[int]] = []
        for text in texts:
            ids = self.encode(text)
            if truncation:
                ids = ids[: self._max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        if not rows:
            return torch.zeros((0, self._max_length), dtype=torch.long)
        if padding:
            width = max(self._max_length, *(len(r) for r in rows))
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        elif len({len(r) for r in rows}) != 1:
            raise ValueError("texts of different token lengths need padding=True (or call encode() per text)")
        return torch.tensor(rows, dtype=torch.long)  # (B, L)

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: bytes joined and decoded as UTF-8 (invalid bytes become U+FFFD), ``</w>`` read as
        a space, outer spaces stripped. The text comes back normalized (lower case, single spaces)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        specials = self.special_token_ids
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in specials:
                continue
            tok = self.decoder.get(i)
            if tok is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            pieces.append(tok)
        text = "".join(pieces)
        data = bytes(_BYTE_DECODER.get(c, ord("?")) for c in text)
        return data.decode("utf-8", errors="replace").replace(WORD_SUFFIX, " ").strip()

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in
        the diffusers ``tokenizer/`` layout (``transformers.CLIPTokenizer.from_pretrained`` loads it with the
        same ids, pad token included)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.encoder, f, ensure_ascii=False)
        with open(folder / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in self.merges)

        def token(content: str) -> dict[str, object]:
            return {"content": content, "lstrip": False, "normalized": self.normalized[content], "rstrip": False,
                    "single_word": False}

        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token, **self.extra_special_tokens}
        special_map = {name: token(t) for name, t in names.items()}
        config: dict[str, object] = {name: {"__type": "AddedToken", **token(t)} for name, t in names.items()}
        config.update({
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": self._max_length,
            "tokenizer_class": "CLIPTokenizer",
        })
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(folder / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(special_map, f, indent=2, ensure_ascii=False)
        return folder

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"pad_token={self.pad_token!r})")
