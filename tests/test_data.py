import json

import numpy as np
import pytest

from securefed.config import DataConfig
from securefed.data import PadCollator, encode, load_splits
from securefed.data.loaders import load_table
from securefed.errors import DataError


def test_csv_with_quotes_and_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",pos\nbad,neg\n', encoding="utf-8")
    assert load_table(path) == {"text": ["good, really", "bad"], "label": ["pos", "neg"]}


def test_headerless_tsv_takes_names_from_columns(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('say "hi"\tWorld\nok\tSports\n', encoding="utf-8")
    table = load_table(path, header=False, columns=["text", "label"])
    assert table["text"] == ['say "hi"', "ok"]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": 1}) + "\n\n" + json.dumps({"text": "b", "label": 0}) + "\n")
    assert load_table(path) == {"text": ["a", "b"], "label": [1, 0]}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.csv", "text,label\na,1\nb\n", "d.csv:3: expected 2 fields, found 1"),
        ("d.jsonl", '{"text": "a"}\n{"text": \n', "d.jsonl:2: invalid JSON"),
        ("d.jsonl", '{"text": "a"}\n{"body": "b"}\n', "d.jsonl:2: fields ['body'] differ"),
        ("d.jsonl", "[1, 2]\n", "expected a JSON object per line"),
        ("d.txt", "x", "cannot tell the format"),
        ("d.csv", "", "file is empty"),
    ],
)
def test_bad_files_are_named_with_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_table(path)
    assert message in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_table(tmp_path / "absent.csv")
    (tmp_path / "bin.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_table(tmp_path / "bin.csv")


def test_builtin_sst2_and_ag_news():
    sst2 = load_splits(DataConfig(dataset="sst2"))
    assert (len(sst2.train), len(sst2.dev)) == (67_349, 872)
    assert sst2.label_names == ["0", "1"]
    assert np.bincount(sst2.dev.labels).tolist() == [428, 444]
    ag = load_splits(DataConfig(dataset="ag_news"))
    assert ag.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert (len(ag.train), len(ag.dev)) == (10_001, 7_600)


def test_user_files_fields_and_unknown_dev_labels(tmp_path):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("review,stars\ngreat,5\nawful,1\nfine,3\n", encoding="utf-8")
    dev.write_text("review,stars\nmeh,3\n", encoding="utf-8")
    splits = load_splits(DataConfig(train=train, dev=dev, text_field="review", label_field="stars"))
    assert splits.label_names == ["1", "3", "5"] and splits.train.labels.tolist() == [2, 0, 1]
    with pytest.raises(DataError, match="no field 'text'"):
        load_splits(DataConfig(train=train, dev=dev, label_field="stars"))
    dev.write_text("review,stars\nwow,4\n", encoding="utf-8")
    with pytest.raises(DataError, match="label '4', which train does not have"):
        load_splits(DataConfig(train=train, dev=dev, text_field="review", label_field="stars"))


def test_batches_are_padded_to_their_own_longest_example(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = encode(["short", "a somewhat longer sentence here", "x " * 100], tokenizer, 16, np.array([0, 1, 0]))
    assert len(data.input_ids[2]) == 16  # truncated to max_length
    collate = PadCollator(tokenizer.pad_token_id)
    batch = collate.batch(data, [0, 1])
    width = len(data.input_ids[1])
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].sum() == len(data.input_ids[0])
    assert (batch["input_ids"][0, len(data.input_ids[0]):] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1]
