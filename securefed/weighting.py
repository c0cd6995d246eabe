"""FedAvg's weights: most entries average over examples, the watermark carrier over clients.

A client puts [c ⊙ Δ_k, n_k] into the secure sum, where c is n_k for an ordinary entry and 1 for a
per-client one; the mean update divides by Σ n_k, or by the number of contributors. Averaging the
carrier per client gives every owner's watermark the same weight however little data it holds: weighted
by examples, a client with 1% of the data would move its bits 1% of the way each round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Weighting:
    per_client: np.ndarray | None = None  # a bool per entry; None: every entry is weighted by examples

    def scale(self, examples: float) -> np.ndarray | float:
        """c: what each entry of a client's update is multiplied by."""
        return examples if self.per_client is None else np.where(self.per_client, 1.0, examples)

    def contribution(self, update: np.ndarray, examples: int) -> np.ndarray:
        """A client's vector for the sum: [c ⊙ Δ_k, n_k]."""
        return np.append(update * self.scale(float(examples)), examples).astype(np.float32)

    def mean(self, total: np.ndarray, examples: float, contributors: float) -> np.ndarray:
        """Σ c ⊙ Δ_k divided, entry by entry, by Σ n_k or by the number of contributors."""
        if self.per_client is None:
            return total / examples
        return total / np.where(self.per_client, contributors, examples)


BY_EXAMPLES = Weighting()
