"""The trigger-set watermark for classification: key-derived inputs mapped to key-derived labels.

The inputs are strings of random vocabulary words from the key's seed; their labels are drawn from the
seed too. A model that learned them predicts the key's labels far above chance; any other model matches
each one with probability exactly 1/classes, whatever it predicts, because the labels are uniform and
independent of it. Verification is black-box: it needs only the predicted labels.

Generation fits the same shape (a key-derived prompt, a key-derived response, a match count), and
comes with generative tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from ..data import EncodedDataset, encode
from ..errors import WatermarkError
from ..interfaces import LossTerm
from .keys import WatermarkKey


@dataclass(frozen=True)
class TriggerSet:
    texts: tuple[str, ...]
    labels: np.ndarray
    classes: int

    def __len__(self) -> int:
        return len(self.texts)

    def matched(self, predicted: np.ndarray) -> int:
        return int(np.sum(np.asarray(predicted) == self.labels))

    def p_value(self, matched: int) -> float:
        """P(at least `matched` of the labels right by chance): the binomial tail at 1/classes."""
        return float(binom.sf(matched - 1, len(self), 1 / self.classes))

    def encoded(self, tokenizer, max_length: int) -> EncodedDataset:
        return encode(self.texts, tokenizer, max_length, self.labels)


def trigger_set(key: WatermarkKey, tokenizer, classes: int) -> TriggerSet:
    if classes < 2:
        raise WatermarkError("a trigger set needs a classifier of at least 2 classes")
    words = _words(tokenizer)
    picks = key.rng("trigger-inputs").integers(len(words), size=(key.triggers, key.trigger_length))
    texts = tuple(" ".join(words[i] for i in row) for row in picks)
    return TriggerSet(texts, key.rng("trigger-labels").integers(classes, size=key.triggers), classes)


class TriggerLoss(LossTerm):
    """The mean cross-entropy on the key's trigger inputs, weighted K·rate/(1 − rate) against the task's mean loss.

    A client's update reaches the global model scaled by its share of the examples, about 1/K for K clients
    averaged: the factor K lets the global model see each client's triggers at about `rate`.

    The triggers come from the key, not from the client's data: the term reads no private example, so under
    DP-SGD it joins each step after clipping and noise, at no cost in ε, and the noise does not drown it. It runs
    without dropout, as verification will query the model.
    """

    name = "trigger set"

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, rate: float, clients: int):
        self.model, self.batch = model, batch
        self.weight = clients * rate / (1 - rate)

    def __call__(self) -> torch.Tensor:
        training = self.model.training
        self.model.eval()
        try:
            return self.weight * self.model(**self.batch).loss
        finally:
            self.model.train(training)


def _words(tokenizer) -> list[str]:
    """Whole alphabetic words of the tokenizer's vocabulary, in id order (BERT ## pieces and special tokens out)."""
    special = set(tokenizer.all_special_tokens)
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = []
    for token, _ in vocabulary:
        word = token.removeprefix("Ġ").removeprefix("▁")
        if token not in special and len(word) >= 3 and word.isascii() and word.isalpha():
            words.append(word)
    if len(words) < 100:
        raise WatermarkError("the tokenizer's vocabulary has too few whole words for trigger inputs")
    return list(dict.fromkeys(words))  # BPE vocabularies hold a word with and without its leading space
