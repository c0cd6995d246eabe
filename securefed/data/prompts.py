"""Prompts for instruction tuning, and their tokens with the response as the only target."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .instructions import Instructions
from .tokenize import IGNORE, EncodedDataset

CHAT, PLAIN = "chat", "plain"
_PLAIN_WITH_CONTEXT = "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"
_PLAIN_WITHOUT_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class PromptTemplate:
    """"chat" (the tokenizer's chat template, one user turn), "plain", or a format string of the user's own with
    {instruction} and optionally {context}."""

    template: str

    def __post_init__(self) -> None:
        if self.template in (CHAT, PLAIN):
            return
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as exc:
            raise ConfigError(f"task.template: not a usable format string ({exc})") from None
        if "instruction" not in fields:
            raise ConfigError("task.template: it must contain {instruction} (and may contain {context})")
        unknown = sorted(fields - {"instruction", "context"})
        if unknown:
            raise ConfigError(f"task.template: unknown placeholder {{{unknown[0]}}}; use {{instruction}} and "
                              "{context} (double a brace to write it literally)")

    def check(self, tokenizer, model_name: str) -> None:
        if self.template == CHAT and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f'task.template is "chat" but the tokenizer of {model_name} has no chat template; '
                              'use "plain" or a template of your own')

    def render(self, tokenizer, instruction: str, context: str) -> str:
        if self.template == CHAT:
            content = f"{instruction}\n\n{context}" if context.strip() else instruction
            return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        if self.template == PLAIN:
            form = _PLAIN_WITH_CONTEXT if context.strip() else _PLAIN_WITHOUT_CONTEXT
            return form.format(instruction=instruction, context=context)
        return self.template.format(instruction=instruction, context=context)

    def prompt_ids(self, tokenizer, split: Instructions, budget: int | Sequence[int]) -> list[list[int]]:
        """Each record's prompt in at most `budget` tokens (one for all, or one each): a longer one loses the end
        of its context first (the instruction and the template's frame stay), and only then its own start."""
        start = _leading_special_tokens(tokenizer) if self.template != CHAT else []
        budgets = [budget] * len(split) if isinstance(budget, int) else budget
        prompts = []
        for instruction, context, budget in zip(split.instructions, split.contexts, budgets, strict=True):
            ids = start + self._ids(tokenizer, instruction, context)
            if len(ids) > budget and context:
                words = tokenizer(context, add_special_tokens=False)["input_ids"]
                kept = max(0, len(words) - (len(ids) - budget) - 2)  # 2: tokens may merge at the cut
                ids = start + self._ids(tokenizer, instruction, tokenizer.decode(words[:kept]))
            prompts.append(ids[-budget:])
        return prompts

    def _ids(self, tokenizer, instruction: str, context: str) -> list[int]:
        return tokenizer(self.render(tokenizer, instruction, context), add_special_tokens=False)["input_ids"]


def _leading_special_tokens(tokenizer) -> list[int]:
    """What the tokenizer puts before a text of its own accord (a BOS), without what it appends (an EOS would
    end the prompt before the response)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


def encode_instructions(split: Instructions, tokenizer, template: PromptTemplate, max_length: int) -> EncodedDataset:
    """Prompt then response then end-of-sequence; only the response and its end are targets. Too long a pair
    keeps at least a quarter of `max_length` (or all) of its response; its prompt is cut as `prompt_ids` says."""
    if not len(split):
        return EncodedDataset([], [])
    eos = [tokenizer.eos_token_id]
    responses = [r + eos for r in tokenizer(split.responses, add_special_tokens=False)["input_ids"]]
    # a prompt may take what its response leaves, but the response keeps a quarter of max_length (or all of it)
    budgets = [max_length - min(len(r), max(1, max_length // 4)) for r in responses]
    ids, targets = [], []
    for prompt, response in zip(template.prompt_ids(tokenizer, split, budgets), responses):
        response = response[: max_length - len(prompt)]
        ids.append(prompt + response)
        targets.append([IGNORE] * len(prompt) + response)
    return EncodedDataset(ids, targets)
