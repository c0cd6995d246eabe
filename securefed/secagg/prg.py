"""Mask expansion: per-round keys from HKDF, and AES-256-CTR as the pseudo-random generator.

Every key is derived for one purpose, one round and named parties, so no (key, nonce) pair
is ever used twice and the all-zero counter block is safe.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_ZERO_BLOCK = bytes(16)


def derive_key(secret: bytes, *, job: bytes, purpose: str, round: int, parties: tuple[int, ...]) -> bytes:
    """A 32-byte key for `purpose` in `round` between `parties`, bound to the job."""
    info = b"securefed/" + purpose.encode() + struct.pack(f"<q{len(parties)}q", round, *parties)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=job, info=info).derive(secret)


def expand(key: bytes, size: int) -> np.ndarray:
    """`size` pseudo-random uint32 values: the AES-256-CTR keystream under `key`."""
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(_ZERO_BLOCK)).encryptor()
    stream = encryptor.update(bytes(4 * size))  # keystream XOR zeros
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)
