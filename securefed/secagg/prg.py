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
    return Keystreams(size).expand(key).copy()


class Keystreams:
    """Keystreams of one size into one reused buffer: a round adds k+1 masks of 4·d bytes each, and allocating
    each anew cost about as much as making it."""

    def __init__(self, size: int):
        self._zeros = bytes(4 * size)
        self._out = np.empty(size + 4, dtype="<u4")  # update_into wants room for a block more than its input
        self._size = size

    def expand(self, key: bytes) -> np.ndarray:
        """The keystream under `key`, valid until the next call."""
        encryptor = Cipher(algorithms.AES256(key), modes.CTR(_ZERO_BLOCK)).encryptor()
        encryptor.update_into(self._zeros, memoryview(self._out).cast("B"))  # keystream XOR zeros
        return self._out[: self._size]
