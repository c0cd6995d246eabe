"""A lower bound on ε from one training run: canaries in, guesses out (Steinke, Nasr and Jagielski 2023).

Each of m canaries joins one client's data with probability 1/2, independently. After training, the
auditor scores every canary, guesses "included" for the highest scores and "excluded" for the lowest, and
counts its correct guesses. If training was (ε, δ)-DP, the count is dominated by a binomial with success
probability e^ε/(1+e^ε), plus a term in δ (the paper's Theorem 3.1); the largest ε that the count rules out
at the chosen confidence is the lower bound. A lower bound above the accountant's ε refutes the claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from ..data import EncodedDataset, PadCollator, encode
from ..models.evaluation import predictions

CANARY_TOKENS = 12  # random tokens drawn per canary


@dataclass(frozen=True)
class Canaries:
    data: EncodedDataset  # all m canaries, each with a random label
    included: np.ndarray  # bool per canary: did it join the client's data


def make_canaries(tokenizer, count: int, labels: int, max_length: int, rng: np.random.Generator) -> Canaries:
    """`count` texts of random ordinary tokens with random labels, half of them (in expectation) included.

    The texts are tokenized as the job's data is, so that each canary looks like any other example.
    """
    special = set(tokenizer.all_special_ids)
    ordinary = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    texts = [tokenizer.decode(rng.choice(ordinary, CANARY_TOKENS).tolist()) for _ in range(count)]
    data = encode(texts, tokenizer, max_length, rng.integers(0, labels, count))
    return Canaries(data, rng.random(count) < 0.5)


def label_margins(model: torch.nn.Module, data: EncodedDataset, collator: PadCollator,
                  batch_size: int = 64) -> np.ndarray:
    """Each example's log-odds of its own label, logit_y − logsumexp(other logits), in eval mode.

    The loss, log(1 + e^−margin) for two labels, flattens out once an example is fitted; the margin does not.
    """
    margins = np.empty(len(data))
    for indices, logits, labels in predictions(model, data, collator, batch_size):
        own = logits.gather(1, labels[:, None])[:, 0]
        others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
        margins[indices] = (own - others).numpy()
    return margins


def centered_by_label(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores less the median of their label's: training moves all canaries of a label alike, members or not."""
    out = scores.astype(np.float64).copy()
    for label in np.unique(labels):
        out[labels == label] -= np.median(scores[labels == label])
    return out


def count_correct(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Guess "included" for the top guesses/2 scores and "excluded" for the bottom ones; count the right guesses."""
    if not 2 <= guesses <= len(scores):
        raise ValueError(f"guesses must be between 2 and the number of canaries ({len(scores)}), not {guesses}")
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[: guesses // 2], order[len(order) - (guesses - guesses // 2):]
    return int(included[top].sum() + (~included[bottom]).sum())


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least `correct` right guesses] if the training was (ε, δ)-DP: Theorem 3.1 of arXiv 2305.08846."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = binom.sf(correct - 1, guesses, p)
    if correct == 0 or delta == 0:
        return min(1.0, tail)
    # α = max over i of P[correct − i ≤ Bin < correct] / i: the slack that δ may buy
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * canaries * delta * alpha)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that `correct` right guesses out of `guesses` refute at `confidence` (0 if none)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError("need 0 <= correct <= guesses <= canaries")
    beta = 1.0 - confidence
    if p_value(canaries, guesses, correct, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) < beta:
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(canaries, guesses, correct, mid, delta) < beta else (low, mid)
    return low
