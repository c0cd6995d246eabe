"""Instruction data for generation jobs: (instruction, context, response) records, built in or from user files."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from .loaders import Table, column, load_table

SHARD_FIELD = "shard"  # added to a built-in training set made of several files: which file a record came from


@dataclass(frozen=True)
class InstructionSource:
    train: tuple[Path, ...]
    dev: Path
    format: str | None
    instruction_field: str
    context_field: str | None
    response_field: str
    context_required: bool = True  # a file without the default context field simply has no context


def _builtin(folder: str, train: list[str], dev: str, **fields) -> InstructionSource:
    root = Path(str(resources.files(__package__) / "builtin" / folder))
    return InstructionSource(train=tuple(root / name for name in train), dev=root / dev, format="json", **fields)


def builtin_instruction_sources() -> dict[str, InstructionSource]:
    return {
        # FedIT's split: ten clients by category (the shard field says which), and the 80-record global test
        "dolly": _builtin("dolly", [f"client_{i}.json" for i in range(10)], "test_80.json",
                          instruction_field="instruction", context_field="context", response_field="response"),
        # original Alpaca answers to train on; GPT-4's answers to other Alpaca instructions to score against
        "alpaca": _builtin("alpaca", ["alpaca_original_2k.json"], "alpaca_gpt4_1k.json",
                           instruction_field="instruction", context_field="input", response_field="output"),
    }


def instruction_source(config: DataConfig) -> InstructionSource:
    if config.dataset is not None:
        return builtin_instruction_sources()[config.dataset]
    assert config.train is not None and config.dev is not None  # guaranteed by DataConfig
    return InstructionSource(train=(config.train,), dev=config.dev, format=config.format,
                             instruction_field=config.instruction_field, context_field=config.context_field,
                             response_field=config.response_field,
                             context_required="context_field" in config.model_fields_set)


@dataclass(frozen=True)
class Instructions:
    """One split: what each record asks, its context ("" when none), the reference response, and the whole table
    for partitioning by other fields."""

    instructions: list[str]
    contexts: list[str]
    responses: list[str]
    table: Table
    path: Path

    def __len__(self) -> int:
        return len(self.responses)


def load_instructions(source: InstructionSource, paths: tuple[Path, ...], setting: str) -> Instructions:
    """The records of one or more files (a shard field numbers the files when there are several)."""
    tables = [load_table(path, source.format) for path in paths]  # type: ignore[arg-type]
    table: Table = {}
    for shard, part in enumerate(tables):
        if not part or not next(iter(part.values())):
            raise DataError(f"{paths[shard]}: no records (data.{setting})")
        if shard == 0:
            table = {name: [] for name in part}
        if part.keys() != table.keys():
            raise DataError(f"{paths[shard]}: fields {sorted(part)} differ from {paths[0]}'s {sorted(table)}")
        for name, values in part.items():
            table[name] += values
    if len(paths) > 1:
        table[SHARD_FIELD] = [shard for shard, part in enumerate(tables) for _ in next(iter(part.values()))]
    path = paths[0]
    instructions = _texts(table, source.instruction_field, path, "data.instruction_field", empty_ok=False)
    responses = _texts(table, source.response_field, path, "data.response_field", empty_ok=False)
    has_context = source.context_field and (source.context_required or source.context_field in table)
    contexts = (_texts(table, source.context_field, path, "data.context_field", empty_ok=True)
                if has_context else [""] * len(responses))
    return Instructions(instructions, contexts, responses, table, path)


def _texts(table: Table, field: str, path: Path, setting: str, *, empty_ok: bool) -> list[str]:
    """The field's values as text; where empty is fine (a context), null is empty too."""
    values = [("" if value is None and empty_ok else value) for value in column(table, field, path, setting)]
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"{path}: record {row + 1}: {field!r} is not text ({setting})")
        if not empty_ok and not value.strip():
            raise DataError(f"{path}: record {row + 1}: {field!r} is empty ({setting})")
    return values


def load_instruction_splits(config: DataConfig) -> tuple[Instructions, Instructions]:
    source = instruction_source(config)
    return load_instructions(source, source.train, "train"), load_instructions(source, (source.dev,), "dev")


def load_prompts(source: InstructionSource, path: Path) -> tuple[list[str], list[str]]:
    """Instructions and contexts to answer, from a JSONL file with the job's fields (the context is optional)."""
    table = load_table(path, "jsonl")
    instructions = _texts(table, source.instruction_field, path, "the job's data.instruction_field", empty_ok=False)
    context = source.context_field
    contexts = (_texts(table, context, path, "the job's data.context_field", empty_ok=True)
                if context and context in table else [""] * len(instructions))
    return instructions, contexts
