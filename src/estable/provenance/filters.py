"""The prompt filter: word lists, matched after undoing the usual obfuscations.

A blocklist file holds one term per line (a word or a phrase; ``#`` starts a comment). A prompt is refused
when one of its words, after normalisation, *is* a blocked term (or its plural), so that ordinary words that
merely contain a blocked word's letters pass ("class", "Scunthorpe", "assess"). Normalisation, applied to the
prompt and to the list alike:

1. Unicode NFKC (full-width and mathematical letters become plain ones), zero-width and other invisible
   format characters (category Cf: ZWSP, ZWJ, BOM, soft hyphen, …) removed, case folded;
2. diacritics stripped (NFKD, combining marks dropped): "nüde" → "nude";
3. homoglyphs folded: Cyrillic and Greek letters that look Latin ("а", "е", "о", "ο", "ν" …) become Latin;
4. leetspeak folded: 0→o, 1→i, 3→e, 4→a, 5→s, 7→t, 8→b, 9→g, @→a, $→s, !→i, |→l, +→t, €→e; and "l" and "i"
   compared as one letter ("1" and "!" stand for either);
5. words are split at spaces and punctuation, and compared also with punctuation inside a word removed
   ("k.i.l.l", "ki-ll"); in runs of one- and two-letter words, every stretch of them is joined and looked up
   ("k i l l", "nu de", and so "k i l l i n g" too); letters stretched three times or more match ("kiiill").

What it does not do: understand meaning (a paraphrase or another language passes), or catch a term split
into longer pieces ("nu dity"). It applies to the prompt, not the negative prompt (which legitimately names
what to avoid). Each refusal is logged on the ``estable.filters`` logger with the matched term.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from estable.errors import EstableError

__all__ = ["Blocklist", "PromptRefused", "check_prompt", "load_blocklist", "normalize"]

log = logging.getLogger("estable.filters")

# Cyrillic and Greek letters (lower case, after casefold) that render like Latin ones
_HOMOGLYPHS = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "һ": "h",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ω": "w", "ѵ": "v", "ӏ": "l", "ʟ": "l", "ɪ": "i", "ᴀ": "a", "ᴇ": "e", "ᴏ": "o",
}
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s",
         "!": "i", "|": "i", "+": "t", "€": "e"}
_FOLD = str.maketrans({**_HOMOGLYPHS, **_LEET, "l": "i"})  # l and i compared as one letter (see 4.)
_SPLIT = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w]|_", re.UNICODE)
_STRETCH = re.compile(r"(.)\1{2,}")
_SHORT = 2  # words of at most this many letters are joined with their neighbours


def normalize(text: str) -> str:
    """The folded form of ``text`` (steps 1–4 of the module docstring); spaces and punctuation kept."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = text.casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text.translate(_FOLD)


def _words(text: str) -> tuple[list[str], list[str]]:
    """(words split at punctuation, words with inner punctuation removed) of normalised text."""
    split: list[str] = []
    joined: list[str] = []
    for chunk in _SPLIT.split(text):
        parts = [p for p in _PUNCT.split(chunk) if p]
        split.extend(parts)
        whole = "".join(parts)
        if whole:
            joined.append(whole)
    return split, joined


def _squash(word: str) -> str:
    return re.sub(r"(.)\1+", r"\1", word)


@dataclass(frozen=True, eq=False)
class Blocklist:
    """Normalised blocked terms: single words, and phrases as tuples of words."""

    words: dict[str, str]  # normalised word → the term as the list writes it
    phrases: dict[tuple[str, ...], str]
    source: str = ""

    @classmethod
    def from_terms(cls, terms: list[str], source: str = "") -> Blocklist:
        words: dict[str, str] = {}
        phrases: dict[tuple[str, ...], str] = {}
        for term in terms:
            parts = _words(normalize(term))[0]
            if len(parts) == 1:
                words[parts[0]] = term
            elif parts:
                phrases[tuple(parts)] = term
                words["".join(parts)] = term  # the phrase written without spaces
        return cls(words, phrases, source)

    def _word_hit(self, word: str) -> str | None:
        if word in self.words:
            return self.words[word]
        for suffix in ("s", "es"):
            if word.endswith(suffix) and word[: -len(suffix)] in self.words:
                return self.words[word[: -len(suffix)]]
        if _STRETCH.search(word):
            sq = _squash(word)
            for w, term in self.words.items():
                if _squash(w) == sq:
                    return term
        return None

    def match(self, prompt: str) -> str | None:
        """The blocked term (as the list writes it) that ``prompt`` contains, or None."""
        split, joined = _words(normalize(prompt))
        for seq in (split, joined):
            for word in seq:
                hit = self._word_hit(word)
                if hit:
                    return hit
            # runs of short words joined: "k i l l", "nu de"
            i = 0
            while i < len(seq):
                if len(seq[i]) > _SHORT:
                    i += 1
                    continue
                j = i
                while j < len(seq) and len(seq[j]) <= _SHORT:
                    j += 1
                run = seq[i:j]
                for a in range(len(run)):
                    for b in range(a + 2, len(run) + 1):
                        hit = self._word_hit("".join(run[a:b]))
                        if hit:
                            return hit
                i = j
            for phrase, term in self.phrases.items():
                n = len(phrase)
                for k in range(len(seq) - n + 1):
                    if tuple(seq[k : k + n]) == phrase:
                        return term
        return None


def load_blocklist(path: str | os.PathLike) -> Blocklist:
    """Read a word list: one term per line, ``#`` comments and blank lines ignored (UTF-8)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EstableError(f"blocklist not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EstableError(f"cannot read the blocklist {p}: {exc}") from None
    terms = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    terms = [t for t in terms if t]
    if not terms:
        raise EstableError(f"the blocklist {p} holds no terms")
    return Blocklist.from_terms(terms, source=str(p))


class PromptRefused(EstableError):
    """A prompt matched the blocklist."""


def check_prompt(prompt: str, blocklists: list[Blocklist] | Blocklist | None) -> None:
    """Raise :class:`PromptRefused` (and log it) when ``prompt`` contains a blocked term; the one function
    the CLI and the server both call."""
    if blocklists is None:
        return
    for bl in [blocklists] if isinstance(blocklists, Blocklist) else blocklists:
        hit = bl.match(prompt)
        if hit:
            where = f" ({bl.source})" if bl.source else ""
            log.warning("prompt refused: blocked term %r%s", hit, where)
            raise PromptRefused(f"the prompt was refused: it contains the blocked term {hit!r}{where}")
