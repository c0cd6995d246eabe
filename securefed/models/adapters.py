"""Attach a PEFT method (LoRA, IA3, prompt or prefix tuning) to a sequence classifier or a causal LM."""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence

import peft
import torch

from ..config import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig
from ..errors import ModelError

PEFT_TASKS = {"classification": peft.TaskType.SEQ_CLS, "generation": peft.TaskType.CAUSAL_LM}


def peft_config(config: PeftConfig, modules_to_save: Sequence[str] = (),
                kind: str = "classification") -> peft.PeftConfig:
    """peft's config for ours; `modules_to_save` are base modules trained whole (copied, saved with the adapter)."""
    extra = {"modules_to_save": list(modules_to_save)} if modules_to_save else {}
    task = PEFT_TASKS[kind]
    match config:
        case LoraConfig():
            return peft.LoraConfig(task_type=task, r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                   target_modules=config.target_modules, **extra)
        case IA3Config():
            return peft.IA3Config(task_type=task, target_modules=config.target_modules,
                                  feedforward_modules=config.feedforward_modules, **extra)
        case PromptTuningConfig():
            return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=config.virtual_tokens, **extra)
        case PrefixTuningConfig():
            return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=config.virtual_tokens, **extra)
    raise AssertionError(f"unhandled PEFT method {config!r}")


def attach(model, config: PeftConfig, modules_to_save: Sequence[str] = (), kind: str = "classification"):
    """The peft model; a method the model cannot take is a ModelError here, before any training."""
    expose_past_key_values(model)
    try:
        peft_model = peft.get_peft_model(model, peft_config(config, modules_to_save, kind))
        if isinstance(config, PrefixTuningConfig):
            _probe(peft_model)  # peft checks prefix support only in forward
    except (ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0]
        source = getattr(model.config, "_name_or_path", "") or model.config.model_type
        raise ModelError(f"cannot attach {config.method} to {type(model).__name__} ({source}): {reason}") from None
    return peft_model


def expose_past_key_values(model) -> None:
    """Prefix tuning hands its prefix to the model as `past_key_values`, and peft 0.21 finds out whether a model
    takes it from the forward signatures. transformers 5.24 renamed that parameter `cache` (the old name still
    works through a deprecation shim), so an encoder such as BERT looks as if it took none. Give this one model a
    forward that names the parameter again and passes it on under the new name; other methods never pass it."""
    backbone = getattr(model, model.base_model_prefix, model)
    if any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
        return
    if "cache" not in inspect.signature(backbone.forward).parameters:
        return  # the model takes no prefix at all: the probe says so

    def forward(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return type(self).forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)  # bound, so a deep copy binds to the copy


def _probe(peft_model) -> None:
    """One forward pass of two tokens, without gradients or dropout."""
    training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            tokens = torch.ones((1, 2), dtype=torch.long)
            peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens))
    finally:
        peft_model.train(training)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's LoRA layers by their weight's name in the base model."""
    return {base_name(name) + ".weight": module for name, module in model.named_modules()
            if "default" in getattr(module, "lora_A", {})}


def base_name(name: str) -> str:
    """A parameter's name in the base model, from its name inside a peft model (trained copies included)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
