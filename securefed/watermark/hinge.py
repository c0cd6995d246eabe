"""The hinge that writes a client's bits into a carrier: α·Σ_j ReLU(t_j − b_j·p_j), p_j the carrier's j-th secret
projection.

A carrier averaged over the K clients passes on a client's own move of a bit divided by K; one averaged over
examples (the adapter's) passes it on times the client's share w of the examples. The target therefore aims at
the global model: from the round's starting projection s_j, t_j = s_j + f·(m − s_j) with f = K, or 1/w, so that
after averaging the bit stands at the margin m. A bit already past the margin is held at the margin only.

The term reads no example, only the carrier and the key: under DP-SGD its gradient joins the step after clipping
and noise (see client.py), costs no privacy, and no clipping dilutes it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from ..interfaces import LossTerm
from .keys import WatermarkKey


class Hinge(LossTerm):
    def __init__(self, key: WatermarkKey, *, weight: float, margin: float, clients: int):
        self.message = torch.from_numpy(key.message())
        self.weight, self.margin, self.clients = weight, margin, clients
        self.target = torch.full_like(self.message, margin)
        self.factor = float(clients)

    @abstractmethod
    def projected(self) -> torch.Tensor:
        """p: the carrier's B secret projections, differentiable."""

    def reach(self, share: float | None) -> float:
        """f: how much farther than the global model's move a client moves its own bits (K: averaged per client)."""
        return self.clients

    def _signed(self) -> torch.Tensor:
        return self.message * self.projected()

    def begin_round(self, share: float | None = None) -> None:
        with torch.no_grad():
            start = self._signed()
        # past the margin, only the margin is defended: defending each round's start would ratchet the bits
        # up on every round's noise
        self.factor = self.reach(share)
        self.target = torch.where(start < self.margin, start + self.factor * (self.margin - start), self.margin)

    def __call__(self) -> torch.Tensor:
        return self.weight * torch.relu(self.target - self._signed()).sum()


def mark(terms: Sequence[Hinge], parameters: Sequence[torch.nn.Parameter], *, steps: int, lr: float,
         steps_per_round: int = 25, share: float | None = None) -> None:
    """Write the terms' bits with the hinges alone, no data, by Adam on `parameters`: what the benchmarks and tests
    of reading (alignment, attacks) start from. `share`: the client's share of the examples, if known."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(steps):
        if step % steps_per_round == 0:
            for term in terms:
                term.begin_round(share)
        loss = sum(term() for term in terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
