"""The run's model folder: a peft adapter that loads with `PeftModel.from_pretrained` on its base.

Beside peft's own files it holds the tokenizer and a small card naming the base model
and the labels, so the folder is usable without the job that made it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .registry import load_base, resolve

CARD = "securefed.json"


def save_adapter(model, tokenizer, directory: Path, *, model_name: str, base_path: Path, labels: list[str],
                 spec: bytes) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    card = {"model": model_name, "base_model": str(base_path), "labels": labels, "spec": spec.hex()}
    (directory / CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def load_adapter(directory: Path):
    """Base model + adapter from a saved folder, through peft's public loader. Returns (model, tokenizer, card)."""
    from peft import PeftModel

    card_path = directory / CARD
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        name, labels = card["model"], list(card["labels"])
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a securefed model folder (no {CARD})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{card_path}: unreadable model card ({exc})") from None
    base, tokenizer = load_base(resolve(name), labels)
    try:
        model = PeftModel.from_pretrained(base, directory)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load the adapter in {directory}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer, card
