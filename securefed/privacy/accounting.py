"""Privacy accounting for DP-SGD with Poisson sampling: PRV is the guarantee, RDP a cross-check.

Each entry of a schedule is (q, σ, steps): `steps` DP-SGD steps at sampling rate q and noise
multiplier σ. GDP is never used: it under-reports ε on schedules like ours.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.integrate import IntegrationWarning

# RDP orders: Opacus's defaults stop at 63, too low for small σ·q; these reach 1024.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 512, 1024]
PRV_ERROR = 0.002  # the PRV accountant's bound on its own error in ε: within 1% of ε even at ε = 0.2


@dataclass(frozen=True)
class Spend:
    q: float  # Poisson sampling rate: expected batch size / examples
    sigma: float  # noise multiplier
    steps: int


def _history(schedule: Sequence[Spend]) -> list[tuple[float, float, int]]:
    """(σ, q, steps) with the steps of equal (σ, q) added up: composition does not depend on the order, and the
    PRV accountant's cost grows with the number of distinct entries."""
    steps: dict[tuple[float, float], int] = {}
    for s in schedule:
        steps[(s.sigma, s.q)] = steps.get((s.sigma, s.q), 0) + s.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def epsilon_prv(schedule: Sequence[Spend], delta: float) -> float:
    """ε by the PRV accountant (Gopi et al. 2021): the guarantee we report."""
    if not schedule:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = _history(schedule)
    # log(1 − q) at q = 1 (a client smaller than its batch) is a harmless −inf. SciPy's quadrature may warn that a
    # moment of the PRV converges slowly, and the RDP bound that sizes the PRV's domain that its best order is the
    # largest; the result still agrees with PLD (tests/test_privacy.py).
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrationWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta, eps_error=PRV_ERROR))


def epsilon_rdp(schedule: Sequence[Spend], delta: float) -> float:
    """ε by the RDP accountant: looser, reported beside PRV as a cross-check."""
    if not schedule:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = _history(schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the bound still holds
        return float(accountant.get_epsilon(delta, alphas=RDP_ORDERS))


def calibrate(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest σ (to within 1%) at which `steps` steps at rate q stay within `target_epsilon` by PRV."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                           steps=steps, accountant="prv", epsilon_tolerance=0.01))
    # get_noise_multiplier stops within a tolerance that may sit just above the target: step up until under it
    while epsilon_prv([Spend(q, sigma, steps)], delta) > target_epsilon:
        sigma *= 1.01
    return sigma
