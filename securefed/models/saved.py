"""The run's model folder: a peft adapter that loads with `PeftModel.from_pretrained` on its base, or (every
parameter trained, FedKSeed) a whole model that loads with `from_pretrained`.

Beside peft's own files it holds the tokenizer and a small card naming the base model
and the labels, so the folder is usable without the job that made it. It can be merged into
a plain model folder, which loads with `from_pretrained` alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ModelError
from .adapters import expose_past_key_values
from .pooling import POOLING_CONFIG
from .registry import CLASSIFICATION, GENERATION, load_base, resolve

CARD = "securefed.json"


def save_adapter(model, tokenizer, directory: Path, *, model_name: str, base_path: Path, labels: list[str],
                 spec: bytes, kind: str = CLASSIFICATION) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if not hasattr(model, "peft_config"):  # every parameter trained (FedKSeed): a whole model, pooled as its base
        _copy_pooling(base_path, directory)
    card = {"model": model_name, "base_model": str(base_path), "task": kind, "labels": labels, "spec": spec.hex()}
    (directory / CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def load_adapter(directory: Path):
    """Base model + adapter from a saved folder, through peft's public loader. Returns (model, tokenizer, card)."""
    from peft import PeftModel

    card_path = directory / CARD
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        name, labels, kind = card["model"], list(card["labels"]), str(card.get("task", CLASSIFICATION))
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a securefed model folder (no {CARD})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{card_path}: unreadable model card ({exc})") from None
    if kind not in (CLASSIFICATION, GENERATION):
        raise ModelError(f"{card_path}: unknown task {kind!r}")
    if not (directory / "adapter_config.json").is_file():  # a whole model (FedKSeed)
        model, tokenizer = load_base(directory, labels, kind)
        return model, tokenizer, card
    base, tokenizer = load_base(resolve(name), labels, kind)
    expose_past_key_values(base)
    try:
        model = PeftModel.from_pretrained(base, directory)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load the adapter in {directory}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer, card


def load_merged(directory: Path):
    """A model folder as one plain model: an adapter folder is loaded on its base and merged in memory; a merged
    folder loads as it is. Returns (model, tokenizer)."""
    if (directory / "adapter_config.json").is_file():
        model, tokenizer, _ = load_adapter(directory)
        return model.merge_and_unload(), tokenizer
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: neither a peft adapter folder nor a model folder")
    card = directory / CARD
    kind = json.loads(card.read_text(encoding="utf-8")).get("task", CLASSIFICATION) if card.is_file() else None
    return load_base(directory, None, GENERATION if kind == GENERATION else CLASSIFICATION)


def merge_adapter(directory: Path, out: Path) -> None:
    """Merge an adapter folder into its base and save the whole model (with the base's pooling config) to `out`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not empty")
    model, tokenizer, card = load_adapter(directory)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _copy_pooling(resolve(card["model"]), out)
    card = {**card, "merged_from": str(directory.resolve())}
    card.pop("spec", None)  # a merged model no longer has the adapter's trainable vector
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def _copy_pooling(base: Path, out: Path) -> None:
    """A sentence encoder's pooling config, which a whole saved model needs to pool as its base did."""
    pooling = base / POOLING_CONFIG
    if pooling.is_file():
        (out / POOLING_CONFIG).parent.mkdir(exist_ok=True)
        shutil.copyfile(pooling, out / POOLING_CONFIG)
