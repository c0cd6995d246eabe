"""Instruction tuning of a causal LM: loss on response tokens, greedy answers scored with Rouge-L."""

from __future__ import annotations

from pathlib import Path

from ..data import EncodedDataset, Splits
from ..data.instructions import Instructions, instruction_source, load_instruction_splits, load_instructions
from ..data.prompts import PromptTemplate, encode_instructions
from ..data.tokenize import CausalCollator
from ..errors import ConfigError
from ..models import Evaluation
from ..models.evaluation import in_inference
from ..models.generation import greedy_answers, response_losses, rouge_l
from .base import TaskKind

_BATCH_TOKENS = 4096  # an evaluation batch pads to at most this many tokens: logits take rows × width × vocab


class Generation(TaskKind):
    name = "generation"
    metrics = ("loss", "rouge_l")

    def __init__(self, config):
        super().__init__(config)
        self.template = PromptTemplate(config.task.template)

    def load_splits(self) -> Splits:
        train, dev = load_instruction_splits(self.config.data)
        return Splits(train, dev, [])

    def check_partition(self, path: Path) -> int:
        return len(self.party_splits([], path).train)

    def party_splits(self, labels: list[str], partition: Path | None = None) -> Splits:
        source = instruction_source(self.config.data)
        if partition is not None:
            return Splits(load_instructions(source, (partition,), "partition"), _empty(source.dev), [])
        return Splits(_empty(source.dev), load_instructions(source, (source.dev,), "dev"), [])

    def check(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {self.config.model.name} has no end-of-sequence token: a generation "
                              "job needs one to end each response")
        self.template.check(tokenizer, self.config.model.name)

    def encode(self, split: Instructions, tokenizer) -> EncodedDataset:
        return encode_instructions(split, tokenizer, self.template, self.config.data.max_length)

    def collator(self, tokenizer) -> CausalCollator:
        return CausalCollator(tokenizer.pad_token_id)

    def loss(self, module, batch):
        return self.example_losses(module, batch).mean()

    def example_losses(self, module, batch):
        labels = batch["labels"]
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # prompt tuning puts its virtual tokens first: the last positions are the input's
        return response_losses(logits[:, -labels.shape[1]:], labels)

    def evaluate(self, model, tokenizer, split: Instructions, encoded: EncodedDataset) -> Evaluation:
        loss = self._mean_loss(model, encoded, self.collator(tokenizer))
        max_length = self.config.data.max_length
        prompts = self.template.prompt_ids(tokenizer, split, max_length)
        answers = greedy_answers(model, prompts, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, max_new_tokens=self.config.task.max_new_tokens,
                                 batch_size=self._rows(max_length + self.config.task.max_new_tokens))
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        return Evaluation({"loss": loss, "rouge_l": rouge_l(texts, split.responses)}, examples=len(split))

    def _rows(self, width: int) -> int:
        return max(1, min(self.config.data.eval_batch_size, _BATCH_TOKENS // max(width, 1)))

    def _mean_loss(self, model, encoded: EncodedDataset, collator: CausalCollator) -> float:
        if not len(encoded):
            return float("nan")
        total = 0.0
        for rows in in_inference(model, encoded.lengths, self._rows(int(encoded.lengths.max()))):
            total += float(self.loss(model, collator.batch(encoded, rows))) * len(rows)
        return total / len(encoded)


def _empty(path: Path) -> Instructions:
    return Instructions([], [], [], {}, path)
