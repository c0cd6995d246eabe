"""A thief's moves against a watermark, for the benchmark and the tests: each knows where the carriers live (our
docs say so) and changes a merged model in place (`refactor`: a model with its LoRA layers).

The reparameterizations keep the model's function: a permutation of the residual stream's channels (with the MLP's
channels and the attention heads' value dimensions); a sign and scale moved between every norm and the layers
that read it; for RMSNorm models, a rotation of the residual stream once the norms' scales are folded away. They are
written per family, apart from the anatomy alignment uses, so that a test checks alignment against an independent
account of the model (and checks the function is kept).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import WatermarkError
from ..models.adapters import lora_layers
from .keys import Carrier


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=True))


def _columns(tensor: torch.Tensor, order) -> None:
    tensor.copy_(tensor[:, order])


def _rows(tensor: torch.Tensor, order) -> None:
    tensor.copy_(tensor[order])


def _head(model: torch.nn.Module) -> str | None:
    """The head's weight that reads the last norm's output, when it is not the tied embedding."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        return None
    pooler = getattr(getattr(model, "bert", None), "pooler", None)
    if pooler is not None and hasattr(pooler, "dense"):
        return "bert.pooler.dense.weight"
    return "classifier.weight" if hasattr(model, "classifier") else "lm_head.weight"


@torch.no_grad()
def permute(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """A random permutation of the residual stream, of every block's MLP channels, and of the attention heads'
    value dimensions."""
    family = model.config.model_type
    w = _weights(model)
    hidden = model.config.hidden_size
    p = torch.from_numpy(rng.permutation(hidden))
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    head_dim = hidden // heads
    if family == "bert":
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            _columns(w[f"bert.embeddings.{name}.weight"], p)
        for part in ("weight", "bias"):
            _rows(w[f"bert.embeddings.LayerNorm.{part}"], p)
        for i in range(layers):
            block = f"bert.encoder.layer.{i}"
            for m in ("query", "key", "value"):
                _columns(w[f"{block}.attention.self.{m}.weight"], p)
            _columns(w[f"{block}.intermediate.dense.weight"], p)
            for m in ("attention.output", "output"):
                _rows(w[f"{block}.{m}.dense.weight"], p)
                for part in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
                    _rows(w[f"{block}.{m}.{part}"], p)
            inner = torch.from_numpy(rng.permutation(model.config.intermediate_size))
            _rows(w[f"{block}.intermediate.dense.weight"], inner)
            _rows(w[f"{block}.intermediate.dense.bias"], inner)
            _columns(w[f"{block}.output.dense.weight"], inner)
            order = rng.permutation(heads)  # one order of heads; within a head, queries and keys share an order of
            value, query = _head_order(rng, order, head_dim), _head_order(rng, order, head_dim)  # dimensions
            for part in ("weight", "bias"):
                _rows(w[f"{block}.attention.self.value.{part}"], value)
            _columns(w[f"{block}.attention.output.dense.weight"], value)
            for m in ("query", "key"):
                for part in ("weight", "bias"):
                    _rows(w[f"{block}.attention.self.{m}.{part}"], query)
    elif family in ("llama", "mistral", "qwen2"):
        _columns(w["model.embed_tokens.weight"], p)
        _rows(w["model.norm.weight"], p)
        kv_heads = model.config.num_key_value_heads
        for i in range(layers):
            block = f"model.layers.{i}"
            for m in ("q", "k", "v"):
                _columns(w[f"{block}.self_attn.{m}_proj.weight"], p)
            for m in ("gate", "up"):
                _columns(w[f"{block}.mlp.{m}_proj.weight"], p)
            _rows(w[f"{block}.self_attn.o_proj.weight"], p)
            _rows(w[f"{block}.mlp.down_proj.weight"], p)
            for m in ("input_layernorm", "post_attention_layernorm"):
                _rows(w[f"{block}.{m}.weight"], p)
            inner = torch.from_numpy(rng.permutation(model.config.intermediate_size))
            for m in ("gate", "up"):
                _rows(w[f"{block}.mlp.{m}_proj.weight"], inner)
            _columns(w[f"{block}.mlp.down_proj.weight"], inner)
            # value dimensions, the same within every kv head, and the output projection's columns of every
            # query head that reads them
            within = rng.permutation(head_dim)
            _rows(w[f"{block}.self_attn.v_proj.weight"],
                  torch.from_numpy(np.concatenate([g * head_dim + within for g in range(kv_heads)])))
            _columns(w[f"{block}.self_attn.o_proj.weight"],
                     torch.from_numpy(np.concatenate([h * head_dim + within for h in range(heads)])))
    else:
        raise WatermarkError(f"no permutation attack for {family}")
    head = _head(model)
    if head is not None:
        _columns(w[head], p)


def _head_order(rng: np.random.Generator, heads: np.ndarray, head_dim: int) -> torch.Tensor:
    """Heads in the given order, each head's dimensions in a random order."""
    return torch.from_numpy(np.concatenate([h * head_dim + rng.permutation(head_dim) for h in heads]))


def _factor(rng: np.random.Generator, size: int | None = None):
    """A random sign and a scale between 1/2 and 2."""
    magnitude = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size))
    return torch.as_tensor(magnitude * rng.choice([-1.0, 1.0], size), dtype=torch.float32)


@torch.no_grad()
def rescale(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """A random sign and scale moved out of every norm into what reads it: one per LayerNorm (its output is the
    residual stream), one per channel for RMSNorm."""
    family = model.config.model_type
    w = _weights(model)
    layers = model.config.num_hidden_layers
    if family == "bert":
        # a LayerNorm fed an input c times larger normalizes it alike, up to c's sign, which its scale takes back
        feeding, incoming = "bert.embeddings.LayerNorm", 1.0
        for i in range(layers + 1):
            c = _factor(rng)
            w[f"{feeding}.weight"].mul_(c * incoming)
            w[f"{feeding}.bias"].mul_(c)
            if i == layers:
                w[_head(model)].div_(c)
                break
            block = f"bert.encoder.layer.{i}"
            for m in ("query", "key", "value"):
                w[f"{block}.attention.self.{m}.weight"].div_(c)
            for part in ("weight", "bias"):  # the sublayer's output joins a residual c times larger
                w[f"{block}.attention.output.dense.{part}"].mul_(c)
            d = _factor(rng)
            w[f"{block}.attention.output.LayerNorm.weight"].mul_(d * torch.sign(c))
            w[f"{block}.attention.output.LayerNorm.bias"].mul_(d)
            for part in ("weight", "bias"):
                w[f"{block}.output.dense.{part}"].mul_(d)
            w[f"{block}.intermediate.dense.weight"].div_(d)
            feeding, incoming = f"{block}.output.LayerNorm", torch.sign(d)
    elif family in ("llama", "mistral", "qwen2"):
        hidden = model.config.hidden_size
        for i in range(layers):
            block = f"model.layers.{i}"
            for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
                s = _factor(rng, hidden)
                w[f"{block}.{norm}.weight"].mul_(s)
                for reader in readers:
                    w[f"{block}.{reader}.weight"].div_(s)
    else:
        raise WatermarkError(f"no rescaling attack for {family}")


@torch.no_grad()
def rotate(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """SliceGPT's move on an RMSNorm model: fold every norm's scale into the layers that read it (the head too, untied
    from the embedding), then turn the whole residual stream by a random rotation."""
    if model.config.model_type not in ("llama", "mistral", "qwen2"):
        raise WatermarkError(f"no rotation attack for {model.config.model_type}: its norms do not commute with one")
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    w = _weights(model)
    hidden = model.config.hidden_size
    q = torch.from_numpy(np.linalg.qr(rng.standard_normal((hidden, hidden)))[0]).float()
    folds = [("model.norm", ("lm_head",))]
    for i in range(model.config.num_hidden_layers):
        block = f"model.layers.{i}"
        folds += [(f"{block}.input_layernorm", tuple(f"{block}.self_attn.{m}_proj" for m in "qkv")),
                  (f"{block}.post_attention_layernorm", (f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"))]
        for writer in (f"{block}.self_attn.o_proj", f"{block}.mlp.down_proj"):
            w[f"{writer}.weight"].copy_(q.T @ w[f"{writer}.weight"])
    for norm, readers in folds:
        scale = w[f"{norm}.weight"]
        for reader in readers:
            w[f"{reader}.weight"].copy_((w[f"{reader}.weight"] * scale) @ q)
        scale.fill_(1.0)
    w["model.embed_tokens.weight"].copy_(w["model.embed_tokens.weight"] @ q)


@torch.no_grad()
def reset(model: torch.nn.Module, base: torch.nn.Module, carrier: Carrier) -> None:
    """Copy the base model's values back into every carrier: the norms' scales and the adapted weights."""
    w, b = _weights(model), _weights(base)
    for name, _ in carrier.parameters:
        w[name].copy_(b[name])
    for name, _, _ in carrier.weights:
        w[name].copy_(b[name])


@torch.no_grad()
def refactor(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """Every LoRA layer's B·A rewritten as (B·R)(R⁻¹·A) with a random invertible R: the same ΔW, other factors."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise WatermarkError("no LoRA layer to refactor: the model is merged or has another adapter")
    for module in layers:
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        r = torch.from_numpy(rng.standard_normal((a.shape[0], a.shape[0])))
        b.copy_((b.double() @ r).to(b.dtype))
        a.copy_((torch.linalg.inv(r) @ a.double()).to(a.dtype))
