import numpy as np
import pytest
import torch

from securefed.config import IA3Config, LoraConfig, ModelConfig, PrefixTuningConfig, PromptTuningConfig
from securefed.errors import ModelError
from securefed.models import build_model

METHODS = [LoraConfig(method="lora", r=4), IA3Config(method="ia3"),
           PromptTuningConfig(method="prompt", virtual_tokens=4), PrefixTuningConfig(method="prefix", virtual_tokens=4)]


@pytest.fixture(scope="module", params=METHODS, ids=lambda m: m.method)
def bundle(request, tiny_model):
    return build_model(ModelConfig(name=str(tiny_model)), request.param, ["neg", "pos"], init_seed=1)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_view_covers_exactly_the_trainable_parameters(bundle):
    params = trainable(bundle.model)
    assert bundle.view.size == sum(p.numel() for p in params.values())
    assert [name for name, _ in bundle.view.spec.entries] == list(params)
    flat = np.concatenate([p.reshape(-1).numpy() for p in params.values()])
    assert np.array_equal(bundle.view.get(), flat)


def test_set_writes_through_to_the_model_and_get_returns_a_copy(bundle):
    frozen = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if not p.requires_grad}
    vector = np.random.default_rng(0).standard_normal(bundle.view.size).astype(np.float32)
    bundle.view.set(vector)
    got = bundle.view.get()
    assert np.array_equal(got, vector)
    got[:] = 0  # a copy: changing it leaves the model alone
    params = trainable(bundle.model)
    assert np.array_equal(np.concatenate([p.reshape(-1).numpy() for p in params.values()]), vector)
    for name, p in bundle.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"{name} (frozen) changed"


def test_optimizer_steps_land_in_the_view(bundle):
    before = bundle.view.get()
    batch = {"input_ids": torch.tensor([[101, 2204, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([1])}
    optimizer = torch.optim.SGD(bundle.view.parameters, lr=1.0)
    bundle.model.train()
    bundle.model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert not np.array_equal(bundle.view.get(), before)


def test_wrong_vectors_are_refused(bundle):
    with pytest.raises(ModelError, match="does not fit"):
        bundle.view.set(np.zeros(bundle.view.size + 1, dtype=np.float32))
    with pytest.raises(ModelError, match="does not fit"):
        bundle.view.set(np.zeros(bundle.view.size, dtype=np.float64))


def test_spec_digest_separates_methods_and_settings(tiny_model):
    model = ModelConfig(name=str(tiny_model))
    variants = [LoraConfig(method="lora", r=4), LoraConfig(method="lora", r=4, alpha=8), LoraConfig(method="lora", r=2)]
    digests = {build_model(model, m, ["a", "b"], 1).view.spec.digest for m in variants}
    assert len(digests) == 3
    again = build_model(model, LoraConfig(method="lora", r=4), ["a", "b"], 1)
    assert again.view.spec.digest in digests


def test_same_seed_builds_the_same_initial_vector(tiny_model):
    model = ModelConfig(name=str(tiny_model))
    a, b, c = (build_model(model, LoraConfig(method="lora", r=4), ["a", "b"], seed).view.get() for seed in (5, 5, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
