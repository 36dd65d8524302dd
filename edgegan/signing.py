"""The server's signature on the models it publishes: Ed25519 over the SHA-256 digest of an envelope
without its signature keys (`wire.digest_of`, the same digest an update names in `trained_on`).

A key is a file: PEM (PKCS#8, as `openssl genpkey -algorithm ed25519` writes it) or the 32 raw bytes,
created with mode 0600. A public key travels as 32 raw bytes (`signer` in an envelope, the run
configuration's `server_key` in hex); `fingerprint` is what logs print. Transport-free: no MQTT here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgegan import wire

PUBLIC_KEY_BYTES = 32
KEY_FILE = "server-signing.key"  # in the run directory, unless --signing-key names another
# Why a model is refused: no signature at all, or one that the trusted key did not make.
UNSIGNED, WRONG_KEY, BAD_SIGNATURE = "unsigned", "wrong-key", "bad-signature"


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Writes the key as PEM, readable by its owner only (created 0600, never widened after)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)


def load_key(path: Path) -> Ed25519PrivateKey:
    """A PEM or raw 32-byte Ed25519 private key; ValueError naming the file otherwise."""
    data = path.read_bytes()
    if len(data) == PUBLIC_KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not an unencrypted Ed25519 key (PEM or 32 raw bytes): {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_update_key(path: Path) -> Ed25519PrivateKey:
    """A device's --update-key: `load_key`, with an unreadable file a ValueError naming the flag."""
    try:
        return load_key(path)
    except OSError as error:
        raise ValueError(f"--update-key {path}: {error.strerror or error}") from None


def load_or_create(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """(the key at `path`, whether it was created now): a run's first start makes it, a resume reuses it."""
    if path.exists():
        return load_key(path), False
    key = generate_key()
    save_key(key, path)
    return key, True


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: bytes) -> str:
    """A short name for a public key in logs: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def parse_public_key(text: str) -> bytes:
    """`--server-key PATH|HEX`: 64 hex digits, or a file holding them, a PEM public key or a PEM private
    key (whose public half is taken). ValueError says which form was expected."""
    candidate = text.strip()
    if len(candidate) == 2 * PUBLIC_KEY_BYTES:
        try:
            return bytes.fromhex(candidate)
        except ValueError:
            pass
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--server-key {text!r} is neither 64 hex digits nor a readable file")
    data = path.read_bytes()
    stripped = data.strip()
    if len(stripped) == 2 * PUBLIC_KEY_BYTES:
        try:
            return bytes.fromhex(stripped.decode())
        except (ValueError, UnicodeDecodeError):
            pass
    if b"PRIVATE KEY" in data:
        return public_bytes(load_key(path))
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as error:
        raise ValueError(f"--server-key {path} holds no Ed25519 public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"--server-key {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """Signs the envelopes a server publishes; `public_key` is what devices pin."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public_key = public_bytes(key)

    def sign(self, envelope: wire.Envelope) -> tuple[bytes, bytes]:
        """(the signed message's bytes, its digest: what an update trained on it names as `trained_on`)."""
        return wire.encode_signed(envelope, lambda digest: (self.public_key, self.key.sign(digest)))

    def secret(self, purpose: str) -> int:
        """64 bits only the key's holder can know, for `purpose` (central DP's noise seed): the same for
        the same key, so a resumed server draws what it would have drawn."""
        raw = self.key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return int.from_bytes(hashlib.sha256(b"edgegan:" + purpose.encode() + b":" + raw).digest()[:8], "big")


def verify(envelope: wire.Envelope, *, public_key: bytes) -> str | None:
    """None when `public_key` signed this envelope, else why not (UNSIGNED, WRONG_KEY, BAD_SIGNATURE)."""
    if envelope.sig is None:
        return UNSIGNED
    if envelope.signer != public_key:
        return WRONG_KEY
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(envelope.sig, envelope.digest)
    except (InvalidSignature, ValueError):
        return BAD_SIGNATURE
    return None


def digest(payload: bytes) -> bytes:
    """The digest of an encoded global, work or keyframe message (what its signature covers)."""
    return wire.decode(payload).digest
