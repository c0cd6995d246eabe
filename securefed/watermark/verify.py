"""Verification: a key's bits and triggers against a model, their p-values, and a verdict.

Under the hypothesis that the model never learned the key, each bit matches with probability 1/2 (W's
columns are symmetric, so the sign of a projection is a fair coin, and the bits come from a hash) and
each trigger with probability at most 1/classes (for a causal LM, 1 over the words its answers are drawn
from). The p-values are the binomial tails. The verdict rests on both
tests with a Bonferroni correction: p = min(1, 2·min(p_bits, p_triggers)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binom

from ..data import PadCollator
from ..errors import WatermarkError
from ..models.evaluation import predictions
from ..models.generation import greedy_answers
from .feature import matched_bits, scale_values
from .keys import WatermarkKey
from .trigger import ANSWER_TOKENS, trigger_set

DEFAULT_THRESHOLD = 1e-9
_TRIGGER_TOKENS = 128


@dataclass(frozen=True)
class Verdict:
    owner: str
    identity: str  # the fingerprint of the owner's public key
    bits: int
    matched_bits: int
    bits_p: float
    triggers: int
    matched_triggers: int | None  # None: the key has no triggers
    triggers_p: float | None
    p_value: float
    threshold: float

    @property
    def owned(self) -> bool:
        return self.p_value <= self.threshold

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": "owned" if self.owned else "not owned"}


def verify(model: torch.nn.Module, tokenizer, key: WatermarkKey, base: np.ndarray, *,
           threshold: float = DEFAULT_THRESHOLD, batch_size: int = 64) -> Verdict:
    """Check `key` against `model` (plain or peft), whose base model's carrier scales are `base`."""
    matched = matched_bits(key, scale_values(model, key.carrier), base)
    bits_p = float(binom.sf(matched - 1, key.bits, 0.5))
    hits = triggers_p = None
    p = bits_p
    if key.triggers:
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        family = type(base_model).__name__
        if family.endswith("ForSequenceClassification"):
            triggers = trigger_set(key, tokenizer, model.config.num_labels)
            data = triggers.encoded(tokenizer, _TRIGGER_TOKENS)
            predicted = np.empty(len(data), dtype=np.int64)
            for indices, logits, _ in predictions(model, data, PadCollator(tokenizer.pad_token_id), batch_size):
                predicted[indices] = logits.argmax(-1).numpy()
            hits = triggers.matched(predicted)
        elif family.endswith("ForCausalLM"):
            triggers = trigger_set(key, tokenizer, None)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            answers = greedy_answers(model, triggers.prompt_ids(tokenizer, _TRIGGER_TOKENS), pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id, max_new_tokens=ANSWER_TOKENS,
                                     batch_size=batch_size)
            hits = triggers.matched_answers(tokenizer.batch_decode(answers, skip_special_tokens=True))
        else:
            raise WatermarkError(f"key {key.owner!r} has a trigger set, which only a classifier or a causal LM "
                                 f"answers; {family} is neither")
        triggers_p = triggers.p_value(hits)
        p = min(1.0, 2 * min(bits_p, triggers_p))
    return Verdict(key.owner, key.fingerprint, key.bits, matched, bits_p, key.triggers, hits, triggers_p, p,
                   threshold)
