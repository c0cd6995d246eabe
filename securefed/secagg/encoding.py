"""Fixed-point encoding of float vectors into Z_2^32, with headroom for a sum over n parties.

Each entry is clipped to [−bound, bound], scaled, and rounded stochastically (unbiased: ⌊x + u⌋ with u
uniform in [0, 1)). The scale leaves room for `parties` encoded values to be added without wrapping
around, so the modular sum decodes to the true sum of the encoded values. The last few entries may
have bounds of their own (`tail`): a tight bound for the update's entries, a wide one for the weight n_k.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UpdateRefused

_HALF = 2**31


class FixedPoint:
    def __init__(self, bound: float, parties: int, tail: tuple[float, ...] = ()):
        bounds = np.array([bound, *tail], dtype=np.float64)
        if not (np.isfinite(bounds).all() and (bounds > 0).all()) or parties < 1:
            raise ValueError("every bound must be positive and finite, and parties at least 1")
        self.bound, self.tail = float(bound), bounds[1:]
        self.parties = parties
        # each |encoded entry| ≤ bound·scale + 1, so a sum of `parties` stays below 2^31
        self.scale = (_HALF - 1 - parties) / (parties * self.bound)
        self.tail_scale = (_HALF - 1 - parties) / (parties * self.tail)

    def encode(self, vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Entries beyond their bound are clipped (each party's pull on the sum is bounded); NaN and inf are
        refused."""
        values = np.array(vector, dtype=np.float64)  # a copy, worked on in place
        if not math.isfinite(values.sum()):  # NaN and inf survive a sum; finite float32s cannot overflow it
            raise UpdateRefused("the vector holds NaN or inf, which no fixed-point encoding carries")
        ends = values[values.size - self.tail.size :].copy() if self.tail.size else None
        np.clip(values, -self.bound, self.bound, out=values)
        values *= self.scale
        if ends is not None:
            values[values.size - self.tail.size :] = np.clip(ends, -self.tail, self.tail) * self.tail_scale
        values += rng.random(values.size)
        np.floor(values, out=values)
        return values.astype(np.int64).astype(np.uint32)  # two's complement mod 2^32

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float sum behind a modular sum of at most `parties` encoded vectors."""
        values = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64)
        values /= self.scale
        if self.tail.size:
            values[values.size - self.tail.size :] *= self.scale / self.tail_scale
        return values

    def error_bound(self, contributors: int) -> float:
        """The largest rounding error on an entry (not the tail) of a decoded sum of `contributors` vectors."""
        return contributors / self.scale
