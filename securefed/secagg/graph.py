"""The neighbour graph of SecAgg+ (Bell et al. 2020): a k-regular ring graph over a random order.

Each client masks with and shares its secrets among its k neighbours only, so the work per
client grows with k = O(log n) instead of n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def neighbour_graph(members: Sequence[int], degree: int, rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
    """Each member's neighbours: the complete graph if degree ≥ n−1, else a Harary ring over a shuffled order."""
    members = sorted(members)
    n = len(members)
    if degree >= n - 1:
        return {m: tuple(o for o in members if o != m) for m in members}
    if degree % 2:
        raise ValueError(f"a ring graph needs an even degree, got {degree}")
    order = [members[i] for i in rng.permutation(n)]
    edges: dict[int, set[int]] = {m: set() for m in members}
    for i, m in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = order[(i + step) % n]
            edges[m].add(other)
            edges[other].add(m)
    return {m: tuple(sorted(edges[m])) for m in members}
