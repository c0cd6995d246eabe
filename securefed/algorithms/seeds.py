"""FedKSeed's shared randomness: K candidate seeds, the perturbation z each one draws over the whole flat model,
and the replay of per-seed scalars onto a replica.

z is Rademacher (each value ±1 with equal chance), where FedKSeed draws it Gaussian: the two-point estimate is
unbiased either way (E[z zᵀ] = I), and ±1 comes from random bits by exact arithmetic, so every CPU draws the same z
(torch's and numpy's Gaussians may differ in the last bit between instruction sets) and a replay gives the same
float32 weights on every machine; it is also faster to draw. z is never stored: it is drawn again, a megabyte at a
time, whenever it is needed, so a step costs a few passes of the generator over the model and little memory
beside it. Adds happen in a fixed order (seeds ascending).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from ..seeding import stream_words

CHUNK = 1 << 20  # values drawn per generator: the memory z takes beside the model


class SeedPool:
    """K seeds derived from the job seed; seed j draws z_j in {−1, +1}^size over a flat vector of `size` values."""

    def __init__(self, job_seed: int, seeds: int, size: int):
        self.seeds = seeds
        self.size = size
        self._words = stream_words(job_seed, "fedkseed")
        self._chunk = np.empty(min(CHUNK, size), dtype=np.float32)

    def axpy(self, weights: torch.Tensor, seed: int, scale: float) -> None:
        """weights += scale · z_seed, in place."""
        if scale == 0.0:
            return
        for start in range(0, self.size, CHUNK):
            part = weights[start : start + CHUNK]
            n = part.numel()
            bits = np.random.Generator(np.random.PCG64([*self._words, seed, start // CHUNK])).bytes((n + 7) // 8)
            chunk = self._chunk[:n]
            np.multiply(np.unpackbits(np.frombuffer(bits, np.uint8), count=n), np.float32(2 * scale), out=chunk,
                        casting="unsafe")
            chunk -= np.float32(scale)  # exactly ±scale (in float32)
            part.add_(torch.from_numpy(chunk))

    def replay(self, weights: torch.Tensor, scalars: np.ndarray, learning_rate: float) -> None:
        """One round of the global model: weights −= η · Σ_j h_j z_j, over the seeds whose h_j is not zero."""
        for j in np.flatnonzero(scalars):
            self.axpy(weights, int(j), -learning_rate * float(scalars[j]))

    def probabilities(self, history: np.ndarray) -> np.ndarray:
        """FedKSeed-Pro: each seed's chance, by the mean magnitude of its past aggregated scalars (uniform before
        any, and never zero: a seed the past left out can still be drawn)."""
        if len(history) == 0 or not np.abs(history).any():
            return np.full(self.seeds, 1.0 / self.seeds)
        magnitude = np.abs(history).mean(axis=0)
        score = magnitude / magnitude.max()
        weights = np.exp(score - score.max()) + 1e-12
        return weights / weights.sum()


def genesis(spec: bytes, seeds: int) -> bytes:
    """The head of the chain before round 1: binds it to the model spec and the pool."""
    return hashlib.sha256(b"securefed fedkseed" + spec + struct.pack("<Q", seeds)).digest()


def extend(head: bytes, round: int, scalars: np.ndarray) -> bytes:
    """The chain's head once round `round`'s aggregated scalars are applied: a replica is named by its head."""
    data = np.ascontiguousarray(scalars, dtype="<f4").tobytes()
    return hashlib.sha256(head + struct.pack("<Q", round) + data).digest()
