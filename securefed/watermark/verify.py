"""Verification: a key's bits (in the norms' scales and in the adapter's ΔW) and triggers against a model, their
p-values, and a verdict.

First alignment (align.py) undoes any function-preserving reparameterization of the model relative to the base.
Then, under the hypothesis that the model never learned the key, each bit matches with probability 1/2 (the
projections are symmetric, so the sign of each is a fair coin, and the bits come from a hash) and each trigger with
probability at most 1/classes (for a causal LM, 1 over the words its answers are drawn from). Alignment reads the
base model and the suspect, never the key, so it leaves those chances as they are. The p-values are the binomial
tails. The verdict rests on every test the key has, with a Bonferroni correction: p = min(1, k·min(p_i)).
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
from .align import Alignment, align, needed
from .delta import matched_delta_bits
from .feature import matched_bits
from .keys import Carrier, WatermarkKey
from .reference import Reference, carrier_names, read, scale_vector
from .trigger import ANSWER_TOKENS, trigger_set

DEFAULT_THRESHOLD = 1e-9
_TRIGGER_TOKENS = 128


@dataclass(frozen=True)
class Verdict:
    owner: str
    identity: str  # the fingerprint of the owner's public key
    bits: int
    matched_bits: int  # in the norms' scales
    bits_p: float
    adapter_bits: int | None  # in the adapter's ΔW; None: the key marks no adapted weights
    adapter_p: float | None
    triggers: int
    matched_triggers: int | None  # None: the key has no triggers
    triggers_p: float | None
    p_value: float
    threshold: float
    aligned: str | None = None  # what alignment undid; None: not aligned (the job's own model, or no anatomy)

    @property
    def owned(self) -> bool:
        return self.p_value <= self.threshold

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": "owned" if self.owned else "not owned"}


@dataclass(frozen=True)
class Reading:
    """A model's carriers in the base's coordinates: the scales, the adapted weights' changes, and the alignment
    that produced them (None: read as they are)."""

    scales: np.ndarray
    deltas: list[np.ndarray]
    alignment: Alignment | None = None


def readings(model: torch.nn.Module, carrier: Carrier, reference: Reference) -> list[Reading]:
    """The carriers read as they are and, when `reference` holds what alignment reads, aligned. Alignment never
    reads a key: every key of this carrier may share these."""
    found = [_read(model, carrier, reference, aligned=False)]
    if reference.anatomy is not None:
        found.append(_read(model, carrier, reference, aligned=True))
    return found


def verify(model: torch.nn.Module, tokenizer, key: WatermarkKey, reference: Reference, *,
           threshold: float = DEFAULT_THRESHOLD, batch_size: int = 64,
           prepared: list[Reading] | None = None) -> Verdict:
    """Check `key` against `model` (plain or peft). With several readings (as it is, aligned), the better one counts
    at its p-value times their number (Bonferroni): alignment undoes a thief's reparameterization, and the plain
    reading stays exact where a model's own fine-tuning blurs what alignment fits. `prepared`: the model's readings,
    if already made for this carrier."""
    read = prepared if prepared is not None else readings(model, key.carrier, reference)
    projection = key.projection(), key.delta_projection() if key.carrier.weights else None  # once for all readings
    counts = [_bits(key, reference, r, projection) for r in read]
    best = min(range(len(read)), key=lambda i: min(p for p in counts[i][1::2] if p is not None))
    matched, bits_p, adapter, adapter_p = counts[best]
    tests = [len(read) * p for p in counts[best][1::2] if p is not None]
    alignment = read[best].alignment
    aligned = None if len(read) == 1 else alignment.describe() if alignment else "not needed (read as it is)"
    hits = triggers_p = None
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
        tests.append(triggers_p)
    p = min(1.0, len(tests) * min(tests))
    return Verdict(key.owner, key.fingerprint, key.bits, matched, bits_p, adapter, adapter_p, key.triggers, hits,
                   triggers_p, p, threshold, aligned)


def _bits(key: WatermarkKey, reference: Reference, reading: Reading,
          projection: tuple) -> tuple[int, float, int | None, float | None]:
    """Matched scale bits and their p; matched adapter bits and their p (None without adapted weights).
    `projection`: the key's scale projection and its adapter projections (None without adapted weights)."""
    scales, pairs = projection
    matched = matched_bits(key, reading.scales, reference.scales, scales)
    adapter = matched_delta_bits(key, reading.deltas, pairs) if pairs is not None else None
    return (matched, float(binom.sf(matched - 1, key.bits, 0.5)), adapter,
            None if adapter is None else float(binom.sf(adapter - 1, key.bits, 0.5)))


def _read(model: torch.nn.Module, carrier: Carrier, reference: Reference, *, aligned: bool) -> Reading:
    weights = [name for name, _, _ in carrier.weights]
    norms = [name.removesuffix(".weight") for name, _ in carrier.parameters]
    if not aligned:
        values = read(model, carrier_names(carrier))
        for name, value in values.items():
            if value.shape != reference.values[name].shape:
                raise WatermarkError(f"the key was made for another model ({carrier.model}): its {name} is "
                                     f"{reference.values[name].shape}, this model's {value.shape}")
        return Reading(scale_vector(values, carrier), [values[w] - reference.values[w] for w in weights])
    body = reference.anatomy
    values = read(model, set(carrier_names(carrier)) | set(needed(body, norms, weights)))
    alignment = align(body, values, reference.values, norms, weights)
    scales = np.concatenate([alignment.scale(norm, values[f"{norm}.weight"], reference.values[f"{norm}.weight"])
                             for norm in norms])
    deltas = [alignment.weight(w, body.group_of_reader(w), values[w]) - reference.values[w] for w in weights]
    return Reading(scales, deltas, alignment)
