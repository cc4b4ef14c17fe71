"""Estable's pixel watermark: the message, the settings recorded with each image, marking and reading.

The message is 64 bits, written with the DWT scheme of :mod:`estable.provenance.dwtdct` (readable by the
``invisible-watermark`` package's ``dwtDct`` decoder as 8 bytes):

* bits 0–31: the fixed Estable mark ``E5 7A B1 C0`` (16 ones, 16 zeros, so that a flat or saturated image,
  which reads as all zeros or all ones, never matches it);
* bits 32–63: a key tag, the first 4 bytes of SHA-256("estable-watermark-key\\0" + key) for a per-user key
  (SHA-256 of the same prefix with an empty key when none is given).

An image carries an Estable watermark when at least :data:`MIN_MARK_BITS` of the 32 mark bits read back; the
chance of that in an unmarked image whose bits are coin flips is the binomial tail reported as ``p_value``
(≈ 1e-5 at 28 of 32). The key tag tells *which* key made it; it identifies, it does not authenticate (anyone
can write any tag): signatures (:mod:`estable.provenance.records`) are the authentication.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from . import dwtdct

__all__ = [
    "MARK",
    "MIN_MARK_BITS",
    "WatermarkFinding",
    "WatermarkSettings",
    "detect_dwtdct",
    "key_tag",
    "mark_image",
    "message_bits",
    "message_bytes",
]

MARK = bytes.fromhex("e57ab1c0")
MESSAGE_BITS = 64
MIN_MARK_BITS = 28
METHOD = "dwtDct"


def key_tag(key: str | None) -> bytes:
    """The 4-byte tag of a per-user watermark key (of the empty key when ``key`` is None)."""
    return hashlib.sha256(b"estable-watermark-key\0" + (key or "").encode("utf-8")).digest()[:4]


def message_bytes(key: str | None = None) -> bytes:
    """The 8 bytes written into every image: the Estable mark and the key tag."""
    return MARK + key_tag(key)


def message_bits(key: str | None = None) -> np.ndarray:
    """:func:`message_bytes` as 64 bits, most significant bit of each byte first (uint8 0/1)."""
    return np.unpackbits(np.frombuffer(message_bytes(key), dtype=np.uint8))


@dataclass(frozen=True)
class WatermarkSettings:
    """What marks a generation carries; recorded with every image (``record["watermark"]``).

    ``dwtdct``: the pixel watermark (on by default). ``key``: a per-user key whose tag goes into the message
    (the key itself is never recorded, only its tag). ``tree_ring``: the Tree-Ring key in the initial noise
    (:mod:`estable.provenance.treering`, txt2img only)."""

    dwtdct: bool = True
    key: str | None = None
    tree_ring: bool = False

    def record(self) -> dict[str, Any]:
        """The ``watermark`` entry of the record (the key itself never appears, only its tag)."""
        out: dict[str, Any] = {"dwtdct": {"enabled": False}, "tree_ring": {"enabled": False}}
        if self.dwtdct:
            out["dwtdct"] = {"enabled": True, "method": METHOD, "scale": dwtdct.SCALE,
                             "message": message_bytes(self.key).hex(), "keyed": self.key is not None}
        if self.tree_ring:
            from .treering import settings_record

            out["tree_ring"] = {"enabled": True, **settings_record()}
        return out


@dataclass
class WatermarkFinding:
    """What the pixel-watermark reader found in one image."""

    found: bool
    mark_bits: int  # of the 32 Estable mark bits, how many read back
    p_value: float  # chance of ≥ mark_bits matches in an unmarked image (coin-flip bits)
    tag: str  # the key tag read (hex); meaningful only when found
    key_matches: bool | None  # the tag equals the given key's tag (None: no key given)
    message: str  # all 64 bits read, as hex
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mark_image(image: Image.Image, key: str | None = None, *, message: bytes | None = None
               ) -> tuple[Image.Image, str | None]:
    """``(marked image, None)``, or ``(image unchanged, reason)`` when the image is too small to hold the
    message once (fewer than 64 blocks of 8×8 pixels, e.g. under 64×64). ``message`` (8 bytes) replaces the
    one made from ``key``."""
    msg = message_bytes(key) if message is None else message
    if len(msg) * 8 != MESSAGE_BITS:
        raise ValueError(f"the watermark message must be {MESSAGE_BITS // 8} bytes, not {len(msg)}")
    try:
        return dwtdct.embed_bits(image, np.unpackbits(np.frombuffer(msg, dtype=np.uint8))), None
    except ValueError as exc:
        return image, str(exc)


def detect_dwtdct(image: Image.Image, key: str | None = None) -> WatermarkFinding:
    """Read the 64-bit message from ``image`` and decide whether it carries Estable's mark."""
    scores = dwtdct.bit_scores(image, MESSAGE_BITS)
    if np.isnan(scores).any():
        return WatermarkFinding(False, 0, 1.0, "", None, "",
                                note=f"the image ({image.width}x{image.height}) is too small to hold the message")
    bits = (scores * 255 > 127).astype(np.uint8)
    mark = np.unpackbits(np.frombuffer(MARK, dtype=np.uint8))
    matches = int((bits[:32] == mark).sum())
    message = np.packbits(bits).tobytes()
    found = matches >= MIN_MARK_BITS
    key_matches = None if key is None else bool(found and message[4:] == key_tag(key))
    return WatermarkFinding(found, matches, dwtdct.binomial_tail(matches, 32), message[4:].hex(), key_matches,
                            message.hex())
