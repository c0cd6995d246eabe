"""DP noise that only the clients can predict: standard normals from AES-256-CTR under a key derived (HKDF) from
the clients' 256-bit DP secret for one client and round, by the Box–Muller transform.

A seeded library generator is not enough. torch's CPU generator keeps 32 bits of its seed, so whoever sees one
client's release could try every seed, subtract each candidate noise and find the one that leaves a clipped
gradient. The keystream is as hard to guess as the key, and a (key, counter) pair is never used twice: a round's
draws continue one stream, and every round and client has its own key.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_UNIT = 2.0**-53  # a 53-bit integer times this is a double in [0, 1)


class GaussianNoise:
    """The noise stream of one client in one round; each call continues it."""

    def __init__(self, key: bytes, purpose: str, round: int, client: int):
        if len(key) != KEY_BYTES:
            raise ValueError(f"the DP secret is {len(key)} bytes, not {KEY_BYTES}")
        info = b"securefed/" + purpose.encode() + struct.pack("<qq", round, client)
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
        self._keystream = Cipher(algorithms.AES256(derived), modes.CTR(bytes(16))).encryptor()

    def normal(self, size: int) -> np.ndarray:
        """`size` independent N(0, 1) draws (float64)."""
        pairs = (size + 1) // 2
        words = np.frombuffer(self._keystream.update(bytes(16 * pairs)), dtype="<u8").reshape(pairs, 2)
        uniform = ((words >> np.uint64(11)).astype(np.float64) + 1.0) * _UNIT  # in (0, 1]: the log is finite
        radius = np.sqrt(-2.0 * np.log(uniform[:, 0]))
        angle = 2.0 * np.pi * uniform[:, 1]
        draws = np.empty((pairs, 2))
        draws[:, 0] = radius * np.cos(angle)
        draws[:, 1] = radius * np.sin(angle)
        return draws.reshape(-1)[:size]
