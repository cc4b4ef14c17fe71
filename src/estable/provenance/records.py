"""Verifiable records: the pixels' SHA-256, the device class, and Ed25519 signatures over the Estable record.

An image's Estable record (the ``estable`` PNG chunk, :mod:`estable.provenance.infotext`) gains:

* ``pixels``: ``{"sha256": …, "format": "RGB8"}``, the SHA-256 of the image's 8-bit RGB samples, row by row
  (``Image.convert("RGB").tobytes()``), as written, watermark included. Any edit of the pixels changes it;
  re-saving the same pixels in another file does not.
* ``device``: the class of machine that computed it (``cpu`` or ``cuda`` with the GPU's name, the weights'
  dtype, the torch version). A seed reproduces an image bit for bit only on the same class.
* ``watermark``: the marks the image carries (:class:`~estable.provenance.watermark.WatermarkSettings`).
* with a signing key: ``signer`` (``{"algorithm": "ed25519", "public_key": <32 bytes, hex>}``) and
  ``signature`` (64 bytes, hex), an Ed25519 signature (RFC 8032) of the record's canonical JSON without the
  ``signature`` field: keys sorted, no spaces, UTF-8. The signature says that the holder of that key vouched
  for this record (and, through the hash, these pixels); it does not say who holds the key.

Signing uses the ``cryptography`` package (``pip install 'estable[provenance]'``), imported only when needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from PIL import Image

from estable.errors import EstableError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SIGN_KEY_ENV",
    "canonical_bytes",
    "device_class",
    "load_private_key",
    "new_keypair",
    "pixel_sha256",
    "sign_record",
    "verify_signature",
]

SIGN_KEY_ENV = "ESTABLE_SIGN_KEY"
PRIVATE_KEY_NAME = "estable_ed25519.pem"
PUBLIC_KEY_NAME = "estable_ed25519.pub.pem"
ALGORITHM = "ed25519"


def pixel_sha256(image: Image.Image) -> str:
    """SHA-256 (hex) of the image's 8-bit RGB samples in row order."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def device_class(device: Any, dtype: Any) -> dict[str, str]:
    """The machine class that computed an image: ``{"type", "name", "dtype", "torch"}``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.machine() or "unknown"
    return {"type": dev.type, "name": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__}


def canonical_bytes(record: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the record without ``signature``, as sorted compact UTF-8 JSON."""
    body = {k: v for k, v in record.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EstableError(
            "signing and checking signatures needs the 'cryptography' package: pip install 'estable[provenance]'"
        ) from None
    return ed25519, serialization, InvalidSignature


def new_keypair(out: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair into folder ``out``: the private key (PKCS#8 PEM, readable by the owner
    only) and the public key (SubjectPublicKeyInfo PEM). Returns (private path, public path, public hex)."""
    ed25519, serialization, _ = _crypto()
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EstableError(f"cannot create {folder}: {exc.strerror or exc}") from None
    private, public = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if not overwrite:
        for p in (private, public):
            if p.exists():
                raise EstableError(f"{p} already exists; pass --overwrite to replace the key pair")
    from ..outputs import check_writable_folder

    check_writable_folder(folder)  # tried with a probe file: a read-only folder or /proc fails here, before any key
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(private, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(private, 0o600)
        public.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        raise EstableError(f"cannot write the key pair into {folder}: {exc.strerror or exc}") from None
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public, raw.hex()


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from a PEM file (as written by :func:`new_keypair`)."""
    ed25519, serialization, _ = _crypto()
    p = Path(path)
    if not p.is_file():
        raise EstableError(f"signing key not found: {p} (make one with `estable keys new`)")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise EstableError(f"{p} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EstableError(f"{p} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_record(record: dict[str, Any], key) -> dict[str, Any]:
    """A copy of ``record`` with ``signer`` (the public key) and ``signature`` added."""
    _, serialization, _ = _crypto()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    out = {k: v for k, v in record.items() if k != "signature"}
    out["signer"] = {"algorithm": ALGORITHM, "public_key": raw.hex()}
    out["signature"] = key.sign(canonical_bytes(out)).hex()
    return out


def verify_signature(record: dict[str, Any]) -> tuple[bool | None, str]:
    """(True, public key hex) for a valid signature; (False, reason) for a bad one; (None, "unsigned")."""
    if "signature" not in record and "signer" not in record:
        return None, "unsigned"
    ed25519, _, invalid = _crypto()
    signer = record.get("signer")
    if not isinstance(signer, dict) or signer.get("algorithm") != ALGORITHM:
        return False, "the record's signer is missing or not ed25519"
    try:
        pub = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(signer.get("public_key"))))
        sig = bytes.fromhex(str(record.get("signature")))
    except ValueError:
        return False, "the public key or the signature is not valid hex of the right length"
    try:
        pub.verify(sig, canonical_bytes(record))
    except invalid:
        return False, "the signature does not match the record (the record was changed or signed by another key)"
    return True, signer["public_key"]
