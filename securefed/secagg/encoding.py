"""Fixed-point encoding of float vectors into Z_2^32, with headroom for a sum over n parties.

Each entry i is clipped to [−bound_i, bound_i], scaled, and rounded stochastically (unbiased). The
scale leaves room for `parties` encoded values to be added without wrapping around, so the modular
sum decodes to the true sum of the encoded values. Bounds may differ per entry: a tight bound for the
update's entries, a wide one for the weight n_k.
"""

from __future__ import annotations

import numpy as np

from ..errors import UpdateRefused

_HALF = 2**31


class FixedPoint:
    def __init__(self, bounds: float | np.ndarray, parties: int):
        bounds = np.asarray(bounds, dtype=np.float64)
        if not (np.isfinite(bounds).all() and (bounds > 0).all()) or parties < 1:
            raise ValueError("every bound must be positive and finite, and parties at least 1")
        self.bounds = bounds
        self.parties = parties
        # each |encoded entry| ≤ bound·scale + 1, so a sum of `parties` stays below 2^31
        self.scale = (_HALF - 1 - parties) / (parties * bounds)

    def encode(self, vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Entries beyond their bound are clipped (each party's pull on the sum is bounded); NaN and inf are
        refused."""
        if not np.isfinite(vector).all():
            raise UpdateRefused("the vector holds NaN or inf, which no fixed-point encoding carries")
        scaled = np.clip(np.asarray(vector, dtype=np.float64), -self.bounds, self.bounds) * self.scale
        low = np.floor(scaled)
        rounded = low + (rng.random(scaled.shape) < scaled - low)
        return rounded.astype(np.int64).astype(np.uint32)  # two's complement mod 2^32

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float sum behind a modular sum of at most `parties` encoded vectors."""
        return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / self.scale

    def error_bound(self, contributors: int) -> np.ndarray:
        """The largest rounding error per entry of a decoded sum of `contributors` vectors: one step each."""
        return contributors / self.scale
