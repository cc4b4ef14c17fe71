"""Text from files, made safe to print on a terminal.

A PNG's text chunks are whatever its author put there: escape sequences (ESC [ 2 J clears the screen, OSC sequences
retitle the window or write to the clipboard on some terminals), bidirectional overrides that reorder what is
shown, or megabytes of text. :func:`printable` shows such characters as visible escapes and caps the length.
"""

from __future__ import annotations

__all__ = ["MAX_PRINTED", "printable"]

MAX_PRINTED = 20_000  # characters of one field printed by default
_KEEP = {"\n", "\t"}
# Unicode's bidirectional embeddings, overrides and isolates (a "Trojan Source" reorders text with them).
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int | None = MAX_PRINTED) -> str:
    """``text`` with control characters (C0 but newline and tab, DEL, C1) and bidi controls written as ``\\xNN`` /
    ``\\uNNNN``, cut to ``limit`` characters with a note of how many were left out (``None``: no limit)."""
    more = 0
    if limit is not None and len(text) > limit:
        more = len(text) - limit
        text = text[:limit]
    out = "".join(_escape(c) if (c not in _KEEP and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)) or c in _BIDI
                  else c for c in text)
    if more:
        out += f"\n… ({more:,} more characters not shown; --full prints everything)"
    return out
