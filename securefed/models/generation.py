"""A causal LM's loss on response tokens, its greedy answers, and their Rouge-L against references."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.tokenize import IGNORE, left_padded
from .evaluation import in_inference


def response_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean cross-entropy over its own target tokens: an example weighs the same whatever its length,
    so DP-SGD's per-example clipping clips examples, not tokens. Token t is predicted from position t − 1."""
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE,
                                                  reduction="none")
    counted = (targets != IGNORE).to(per_token.dtype)
    return (per_token * counted).sum(1) / counted.sum(1).clamp(min=1.0)


def greedy_answers(model, prompts: Sequence[list[int]], *, pad_token_id: int, eos_token_id: int,
                   max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The tokens each prompt is answered with, greedily, up to the end-of-sequence token (left out). Prompts of
    similar length are batched together, padded on the left."""
    answers: list[list[int]] = [[] for _ in prompts]
    for rows in in_inference(model, np.array([len(p) for p in prompts]), batch_size):
        batch = left_padded([prompts[i] for i in rows], pad_token_id)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id)
        for row, tokens in zip(rows, out[:, batch["input_ids"].shape[1]:].tolist()):
            answers[row] = tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens
    return answers


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F-measure (rouge-score, Porter stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure
              for prediction, reference in zip(predictions, references, strict=True)]
    return float(np.mean(scores)) if scores else 0.0
