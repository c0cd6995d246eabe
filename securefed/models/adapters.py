"""Attach a PEFT method (LoRA, IA3, prompt or prefix tuning) to a sequence classifier."""

from __future__ import annotations

from collections.abc import Sequence

import peft

from ..config import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig
from ..errors import ModelError

_TASK = peft.TaskType.SEQ_CLS


def peft_config(config: PeftConfig, modules_to_save: Sequence[str] = ()) -> peft.PeftConfig:
    """peft's config for ours; `modules_to_save` are base modules trained whole (copied, saved with the adapter)."""
    extra = {"modules_to_save": list(modules_to_save)} if modules_to_save else {}
    match config:
        case LoraConfig():
            return peft.LoraConfig(task_type=_TASK, r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                   target_modules=config.target_modules, **extra)
        case IA3Config():
            return peft.IA3Config(task_type=_TASK, target_modules=config.target_modules,
                                  feedforward_modules=config.feedforward_modules, **extra)
        case PromptTuningConfig():
            return peft.PromptTuningConfig(task_type=_TASK, num_virtual_tokens=config.virtual_tokens, **extra)
        case PrefixTuningConfig():
            return peft.PrefixTuningConfig(task_type=_TASK, num_virtual_tokens=config.virtual_tokens, **extra)
    raise AssertionError(f"unhandled PEFT method {config!r}")


def attach(model, config: PeftConfig, modules_to_save: Sequence[str] = ()):
    try:
        return peft.get_peft_model(model, peft_config(config, modules_to_save))
    except (ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        raise ModelError(f"cannot attach {config.method} to {type(model).__name__}: {reason}") from None


def base_name(name: str) -> str:
    """A parameter's name in the base model, from its name inside a peft model (trained copies included)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
