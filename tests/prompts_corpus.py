"""A deterministic corpus of varied prompts for tokenizer parity tests.

``make_prompts(n, seed)`` returns the hand-written edge cases below followed by seeded random prompts that
mix ordinary Stable Diffusion vocabulary with the categories a tokenizer can get wrong: case, digits,
punctuation runs, accents in NFC and NFD form, CJK and other scripts, emoji (ZWJ sequences, skin tones,
flags, keycaps), whitespace runs (tabs, newlines, no-break and ideographic spaces, U+001C..U+001F which look
like whitespace to Python but are not), apostrophes and curly quotes, HTML entities, control and format
characters, A1111 weighting syntax, special-token literals, over-long prompts and random code points.
"""

from __future__ import annotations

import random
import unicodedata

SUBJECTS = [
    "a cat", "an astronaut riding a horse", "a red fox in the snow", "portrait of a woman", "a castle on a hill",
    "two dogs playing", "the Eiffel Tower", "a bowl of ramen", "a cyberpunk city street", "an old fisherman",
    "a dragon", "a lighthouse at dusk", "a robot reading a book", "Mount Fuji", "a bouquet of sunflowers",
]
MODIFIERS = [
    "highly detailed", "8k", "4K UHD", "trending on ArtStation", "by Greg Rutkowski", "oil painting",
    "Unreal Engine 5", "studio lighting", "bokeh", "f/1.8", "35mm", "HDR", "octane render", "masterpiece",
    "best quality", "ultra-realistic", "cinematic", "volumetric light", "sharp focus", "concept art",
    "1920x1080", "v1.5", "2girls", "3.14159", "1990s", "no. 7", "50% off", "$100", "#hashtag", "@user",
    "e-mail: a.b@c.de", "https://example.com/a?b=c&d=e", "C++", "x^2+y^2=r^2", "~~~", "...", "?!?", "--ar 16:9",
]
ACCENTED = [
    "café", "crème brûlée", "jalapeño", "über", "naïve", "façade", "Ångström", "smørrebrød", "São Paulo",
    "Zürich", "Dvořák", "Łódź", "Straße", "GROSSE STRAẞE", "Tiếng Việt", "İstanbul", "ıi", "ΟΔΟΣ ΣΑΣ",
    "Москва", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ภาษาไทย", "ქართული", "Ǆemal ǅ", "ﬁne ﬂower",
    "q\u0303", "x\u0301y", "a\u0308\u0304", "Å\u0301", "e\u0301\u0301", "\u0301lone mark",
]
CJK = [
    "漢字", "山水画", "猫が好き", "カタカナ", "ｶﾀｶﾅ", "ひらがな", "한국어", "서울", "ＡＢＣ１２３", "中文，标点。",
    "「引用」", "东京塔の夜景", "〇一二三", "𠀀𠀁 extension B", "々〆ヶ", "㈱", "①②③", "Ⅻ", "½ ¾", "²³",
]
EMOJI = [
    "😀", "🐱", "👍🏽", "👩🏿‍🚀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "1️⃣", "#️⃣", "❤️", "✨🔥", "🧑🏻‍🤝‍🧑🏾",
    "☕", "©®™", "🫠", "👁️‍🗨️", "🐈‍⬛",
]
WHITESPACE = [
    "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \t ", "\xa0", "\u3000", "\u2028", "\u2029", "\x0b", "\x0c", "\x85",
    "\u2003", "\u202f", "\u205f", "\u1680", "\x1c", "\x1d", "\x1e", "\x1f",
]
APOSTROPHES = [
    "dog's", "don't", "we're", "they've", "I'm", "we'll", "he'd", "DOG'S", "DON'T", "It'S", "'sun", "'tis",
    "rock'n'roll", "''s", "o'clock", "d'Artagnan", "the '90s", "dog’s", "don’t", "‘quoted’", "“double”",
    "\"straight\"", "`tick`", "''", "'", "x's's", "'re'", "'LL",
]
ENTITIES = ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&#x27;", "&nbsp;", "AT&T", "&"]
CONTROLS = [
    "\x00", "\x07", "\x1b[31m", "\x7f", "\u200b", "\u200d", "\ufeff", "\u00ad", "\u200e", "\u2060", "\ufffd",
    "\ue000", "\U000f0000", "\x08",
]
A1111 = [
    "(masterpiece:1.2)", "((best quality))", "[cat|dog]", "[blurry]", "(red:0.8) hair", "<lora:detail:0.7>",
    "{a|b|c}", "BREAK", "AND", "\\(escaped\\)", "(word)", "[[x]]", "(a cat:1.5), (dog:-0.5)", "embedding:foo",
]
SPECIALS = [
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>", "<|StartOfText|> x", "x<|endoftext|>'s",
    "<|endoftext|>>",
    "!<|endoftext|>", "<|endoftext|><|endoftext|>", "< |endoftext| >", "<|endoftext", "hello!", "!!!", "wow! ok!",
]

HAND_WRITTEN = [
    "",
    " ",
    "\t\n",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a\tphoto\nof  a   cat",
    "café cafe\u0301",  # NFC and NFD spellings must tokenize the same
    unicodedata.normalize("NFD", "Crème brûlée, jalapeño, über"),
    "한국어 " + unicodedata.normalize("NFD", "한국어"),  # Hangul syllables recomposed from jamo by NFC
    "ΣΑΣ ΟΔΟΣ Σ.",  # final sigma is not applied
    "İIıi",
    "a\x1cb\x1dc\x1ed\x1ff",
    "👨‍👩‍👧 family, 👍🏽 ok, 🏳️‍🌈",
    "(masterpiece:1.2), ((best quality)), [cat|dog], <lora:x:0.8>",
    "It's a dog's life, isn't it? We're fine; they'll see. I'd've",
    "&amp; &lt; &gt; &quot;",
    "x" * 300,
    "1234567890" * 5,
    "!" * 40,
    ", ".join(SUBJECTS + MODIFIERS),  # far longer than 77 tokens
    "<|startoftext|>a<|endoftext|>b<|ENDOFTEXT|>c",
]

_CATEGORIES = [SUBJECTS, MODIFIERS, ACCENTED, CJK, EMOJI, APOSTROPHES, ENTITIES, CONTROLS, A1111, SPECIALS]


def _random_char(rng: random.Random) -> str:
    """A random assigned code point (any plane), not a surrogate; unassigned ones depend on the Unicode version."""
    while True:
        cp = rng.choice([rng.randrange(0x20, 0x250), rng.randrange(0x250, 0x3000), rng.randrange(0x3000, 0x10000),
                         rng.randrange(0x10000, 0x110000)])
        c = chr(cp)
        if unicodedata.category(c) not in ("Cn", "Cs"):
            return c


def _mangle_case(rng: random.Random, text: str) -> str:
    mode = rng.randrange(5)
    if mode == 0:
        return text.upper()
    if mode == 1:
        return text.title()
    if mode == 2:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return text


def _join(rng: random.Random, parts: list[str]) -> str:
    out = parts[0]
    for p in parts[1:]:
        sep = rng.choice([", ", " ", ",", " , ", "; ", ". ", " | ", "", rng.choice(WHITESPACE), "\n", ":: "])
        out += sep + p
    return out


def _random_prompt(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:  # long prompts, past the 77-token window
        parts = [rng.choice(SUBJECTS)] + [rng.choice(MODIFIERS) for _ in range(rng.randrange(15, 40))]
    elif kind == 1:  # random code points mixed with words
        parts = ["".join(_random_char(rng) for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 8))]
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(SUBJECTS))
    elif kind == 2:  # NFD forms
        parts = [unicodedata.normalize("NFD", rng.choice(ACCENTED)) for _ in range(rng.randrange(1, 5))]
        parts.append(rng.choice(SUBJECTS))
    else:  # a subject plus a few items of random categories
        parts = [rng.choice(SUBJECTS)]
        for _ in range(rng.randrange(1, 7)):
            parts.append(rng.choice(rng.choice(_CATEGORIES)))
        rng.shuffle(parts)
    parts = [_mangle_case(rng, p) for p in parts]
    text = _join(rng, parts)
    if rng.random() < 0.2:  # glue a category item inside a word, with no separator
        pos = rng.randrange(len(text) + 1)
        text = text[:pos] + rng.choice(rng.choice(_CATEGORIES + [WHITESPACE])) + text[pos:]
    if rng.random() < 0.15:
        text = rng.choice(WHITESPACE) + text + rng.choice(WHITESPACE)
    return text


def make_prompts(n: int = 1200, seed: int = 0) -> list[str]:
    """At least ``n`` prompts: every hand-written case and category item first, then seeded random prompts."""
    prompts = list(HAND_WRITTEN)
    for category in _CATEGORIES + [WHITESPACE]:
        prompts.extend(category)
    prompts.extend(f"a{w}b" for w in WHITESPACE)  # whitespace between letters
    rng = random.Random(seed)
    while len(prompts) < n:
        prompts.append(_random_prompt(rng))
    return prompts


if __name__ == "__main__":
    for p in make_prompts(40):
        print(repr(p))
