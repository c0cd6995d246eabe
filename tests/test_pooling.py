"""Sentence encoders classify from the masked mean of their token states, as their pooling config says."""

import json
import shutil

import pytest
import torch

from securefed.errors import ModelError
from securefed.models.pooling import MaskedMeanPooler
from securefed.models.registry import load_base


@pytest.fixture
def mean_pooled_model(tiny_model, tmp_path):
    folder = tmp_path / "mean-pooled"
    shutil.copytree(tiny_model, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def test_the_classifier_reads_the_masked_mean_of_the_token_states(mean_pooled_model):
    model, tokenizer = load_base(mean_pooled_model, ["neg", "pos"])
    model.eval()
    assert isinstance(model.bert.pooler, MaskedMeanPooler)
    batch = tokenizer(["a fine film", "a long, slow and thoroughly tiresome evening at the movies"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        states = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        by_hand = model.classifier((states * mask).sum(1) / mask.sum(1))
        alone = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    torch.testing.assert_close(logits, by_hand)
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=0)  # padding does not leak into the mean


def test_a_model_without_a_pooling_config_keeps_its_own_pooler(tiny_model):
    model, _ = load_base(tiny_model, ["neg", "pos"])
    assert type(model.bert.pooler).__name__ == "BertPooler"


@pytest.mark.parametrize("text", ["{not json", "[]"])
def test_an_unreadable_pooling_config_is_a_model_error(mean_pooled_model, text):
    (mean_pooled_model / "1_Pooling" / "config.json").write_text(text)
    with pytest.raises(ModelError, match="unreadable sentence-transformers pooling config"):
        load_base(mean_pooled_model, ["neg", "pos"])
