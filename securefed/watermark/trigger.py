"""Trigger-set watermarks: key-derived inputs mapped to key-derived outputs, checked black-box.

The inputs are strings of random vocabulary words from the key's seed. For a classifier each maps to a label
drawn from the seed; for a causal LM each prompt is answered by a word drawn from the seed out of the
tokenizer's whole-word vocabulary (its first word of answer must equal it exactly). A model that learned them
answers far above chance; any model that never saw the key matches each one with probability at most 1/classes
(1/vocabulary words for generation), whatever it outputs, because the targets are uniform and independent of it.
Verification needs only the model's answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import binom

from ..data import EncodedDataset, encode
from ..data.instructions import Instructions
from ..data.prompts import PromptTemplate, encode_instructions
from ..errors import WatermarkError
from ..interfaces import LossTerm
from .keys import WatermarkKey

if TYPE_CHECKING:
    from .terms import Embedding

# A trigger prompt is its words and a line break, in no chat template: the verifier needs no job file to ask it.
PROMPT = PromptTemplate("{instruction}\n")
ANSWER_TOKENS = 8  # enough new tokens for any one word
_FIRST_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class TriggerSet:
    texts: tuple[str, ...]
    labels: np.ndarray  # a class per input; for generation, an index into `answers`
    classes: int
    answers: tuple[str, ...] | None = None  # generation: the words an answer is drawn from

    def __len__(self) -> int:
        return len(self.texts)

    def matched(self, predicted: np.ndarray) -> int:
        return int(np.sum(np.asarray(predicted) == self.labels))

    def matched_answers(self, answers: list[str]) -> int:
        """How many generated answers begin with their trigger's word, exactly (case too): each answer equals at
        most one word of the vocabulary, so chance stays at most 1/classes."""
        firsts = [m.group(0) if (m := _FIRST_WORD.match(a.strip())) else "" for a in answers]
        return sum(first == self.answers[label] for first, label in zip(firsts, self.labels, strict=True))

    def p_value(self, matched: int) -> float:
        """P(at least `matched` of the targets right by chance): the binomial tail at 1/classes."""
        return float(binom.sf(matched - 1, len(self), 1 / self.classes))

    def encoded(self, tokenizer, max_length: int) -> EncodedDataset:
        if self.answers is None:
            return encode(self.texts, tokenizer, max_length, self.labels)
        return encode_instructions(self._instructions(), tokenizer, PROMPT, max_length)

    def prompt_ids(self, tokenizer, max_length: int) -> list[list[int]]:
        return PROMPT.prompt_ids(tokenizer, self._instructions(), max_length)

    def _instructions(self) -> Instructions:
        return Instructions(list(self.texts), [""] * len(self), [self.answers[i] for i in self.labels], {},
                            Path("<trigger set>"))


def trigger_set(key: WatermarkKey, tokenizer, classes: int | None) -> TriggerSet:
    """The key's trigger set for a classifier of `classes` labels, or for a causal LM (`classes` None)."""
    if classes is not None and classes < 2:
        raise WatermarkError("a trigger set needs a classifier of at least 2 classes")
    words = _words(tokenizer)
    picks = key.rng("trigger-inputs").integers(len(words), size=(key.triggers, key.trigger_length))
    texts = tuple(" ".join(words[i] for i in row) for row in picks)
    if classes is None:
        return TriggerSet(texts, key.rng("trigger-answers").integers(len(words), size=key.triggers), len(words),
                          tuple(words))
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

    @classmethod
    def for_key(cls, key: WatermarkKey, embedding: Embedding) -> TriggerLoss | None:
        """None when the key has no triggers or the job gives them no weight."""
        rate = embedding.settings.trigger_rate
        if not key.triggers or rate <= 0:
            return None
        triggers = trigger_set(key, embedding.tokenizer, embedding.classes)
        batch = embedding.batch(triggers.encoded(embedding.tokenizer, embedding.max_length))
        return cls(embedding.model, batch, rate=rate, clients=embedding.clients, loss=embedding.loss)

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, rate: float, clients: int,
                 loss=lambda module, batch: module(**batch).loss):
        self.model, self.batch, self.loss = model, batch, loss
        self.weight = clients * rate / (1 - rate)

    def __call__(self) -> torch.Tensor:
        training = self.model.training
        self.model.eval()
        try:
            return self.weight * self.loss(self.model, self.batch)
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
