"""DP-ZO (Tang et al. 2024; Zhang et al.'s DPZero): differential privacy for zeroth-order steps.

A zeroth-order step releases one number: the two-point scalar along a perturbation every party can draw. Each
example's scalar is clipped to [−C, C], the batch's sum gets Gaussian noise of standard deviation σ·C, and the
result is divided by the expected batch size. Batches are Poisson samples, so a step is the same subsampled
Gaussian mechanism as a DP-SGD step in one dimension: σ, the PRV accountant, the ledger, the replay after a crash
and `securefed audit` are DP-SGD's (dpsgd.py), with no per-example gradients to compute.
"""

from __future__ import annotations

import torch

from .dpsgd import DPSGD
from .noise import GaussianNoise


class DPZO(DPSGD):
    @classmethod
    def prepare(cls, model, probe, loss) -> None:
        return None  # no gradients at all: nothing to check on the model

    def noisy_mean(self, scalars: torch.Tensor, noise: GaussianNoise) -> float:
        """The clipped per-example scalars, summed, noised and divided by the expected batch size."""
        bound = self.settings.max_grad_norm
        total = float(scalars.clamp(-bound, bound).sum()) + float(noise.normal(1)[0]) * self.sigma * bound
        return total / self.settings.batch_size

    def wrap(self, model, optimizer, round: int):
        raise NotImplementedError("DP-ZO takes no gradient steps")

    def empty_step(self, optimizer) -> None:
        raise NotImplementedError("DP-ZO takes no gradient steps")
