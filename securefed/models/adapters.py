"""Attach a PEFT method (LoRA, IA3, prompt or prefix tuning) to a sequence classifier."""

from __future__ import annotations

import peft

from ..config import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig
from ..errors import ModelError

_TASK = peft.TaskType.SEQ_CLS


def peft_config(config: PeftConfig) -> peft.PeftConfig:
    match config:
        case LoraConfig():
            return peft.LoraConfig(task_type=_TASK, r=config.r, lora_alpha=config.alpha,
                                   lora_dropout=config.dropout, target_modules=config.target_modules)
        case IA3Config():
            return peft.IA3Config(task_type=_TASK, target_modules=config.target_modules,
                                  feedforward_modules=config.feedforward_modules)
        case PromptTuningConfig():
            return peft.PromptTuningConfig(task_type=_TASK, num_virtual_tokens=config.virtual_tokens)
        case PrefixTuningConfig():
            return peft.PrefixTuningConfig(task_type=_TASK, num_virtual_tokens=config.virtual_tokens)
    raise AssertionError(f"unhandled PEFT method {config!r}")


def attach(model, config: PeftConfig):
    try:
        return peft.get_peft_model(model, peft_config(config))
    except (ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        raise ModelError(f"cannot attach {config.method} to {type(model).__name__}: {reason}") from None
