"""Pairwise authenticated encryption between clients: AES-256-GCM under a key from HKDF over X25519.

The associated data binds the job, the stage, the sender and the recipient, so a ciphertext
cannot be replayed into another job, stage or pair.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ProtocolError

NONCE_BYTES = 12


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def shared_secret(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 agreement; refuses a malformed or low-order peer key with a ProtocolError."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(f"unusable X25519 public key: {exc}") from None


def check_public_key(key: bytes) -> None:
    """Refuse, with a ProtocolError, a peer key that is malformed or of low order, before it is relied on."""
    shared_secret(X25519PrivateKey.generate(), key)


def channel_key(private: X25519PrivateKey, peer_public: bytes, *, job: bytes, a: int, b: int) -> bytes:
    """The AEAD key shared by clients a and b (order does not matter)."""
    low, high = sorted((a, b))
    info = b"securefed/channel" + struct.pack("<qq", low, high)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=job, info=info).derive(shared_secret(private, peer_public))


def _aad(job: bytes, stage: str, sender: int, recipient: int) -> bytes:
    return job + stage.encode() + struct.pack("<qq", sender, recipient)


def seal(key: bytes, plaintext: bytes, *, job: bytes, stage: str, sender: int, recipient: int) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(job, stage, sender, recipient))


def unseal(key: bytes, blob: bytes, *, job: bytes, stage: str, sender: int, recipient: int) -> bytes:
    """Decrypt and authenticate; any tampering, or a blob from another job, stage or pair, is a ProtocolError."""
    if len(blob) < NONCE_BYTES + 16:
        raise ProtocolError(f"ciphertext from client {sender} is too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(job, stage, sender, recipient))
    except InvalidTag:
        raise ProtocolError(f"ciphertext from client {sender} failed authentication") from None
