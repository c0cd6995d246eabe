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
from scipy.stats import binom

from ..data import EncodedDataset, encode
from ..errors import WatermarkError
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


def mix(data: EncodedDataset, triggers: EncodedDataset, rate: float) -> EncodedDataset:
    """The client's data with the triggers repeated to make up about `rate` of it: batches drawn from it (shuffled
    or Poisson-sampled) then hold triggers at that rate."""
    if not len(triggers) or rate <= 0:
        return data
    repeats = max(1, round(rate * len(data) / ((1 - rate) * len(triggers))))
    return data.extended(triggers.subset(np.tile(np.arange(len(triggers)), repeats)))


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
