"""Alignment on the real base models: what a thief's function-preserving moves do to the watermark, read as it is
(the baseline) and aligned.

For each model (MiniLM, SmolLM2), LoRA on the examples' targets and the carrier's scales are marked by the hinges
alone (no data: this measures reading, not training) for --owners keys of --bits bits, and merged. Then each attack
of securefed/watermark/attacks.py runs on a copy (a rotation only where the norms allow one): the largest change of
the logits on a few inputs (the function must stay), each owner's bits in both carriers read as they are and
aligned, what alignment undid, its time, and the most bits any of --fresh fresh keys matches after alignment.

    python benchmarks/alignment.py [--models minilm smollm2] [--owners 4] [--bits 64] [--fresh 100]

JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch

from securefed.config import LoraConfig
from securefed.models.adapters import attach
from securefed.models.norms import last_block_norms
from securefed.models.registry import GENERATION, load_base, resolve
from securefed.watermark import attacks
from securefed.watermark.delta import DeltaWatermark
from securefed.watermark.feature import FeatureWatermark, describe_carrier
from securefed.watermark.hinge import mark
from securefed.watermark.keys import WatermarkKey
from securefed.watermark.reference import Reference
from securefed.watermark.verify import readings, verify

MODELS = {"minilm": (["value"], "classification"), "smollm2": (["q_proj", "v_proj"], GENERATION)}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def marked(name: str, owners: int, bits: int, steps: int):
    targets, kind = MODELS[name]
    base, tokenizer = load_base(resolve(name), None, kind)
    base.eval()
    norms = last_block_norms(base, 2)
    adapted = attach(copy.deepcopy(base), LoraConfig(method="lora", r=8, alpha=16, target_modules=targets), norms,
                     kind)
    carrier = describe_carrier(name, adapted, 2, norms)
    reference = Reference.of(base, carrier, alignable=True)
    keys = [WatermarkKey.generate(f"owner {i}", carrier, bits=bits, triggers=0) for i in range(owners)]
    terms = [t for key in keys for t in (
        FeatureWatermark(key, adapted, reference.scales, weight=1.0, margin=0.05, clients=1),
        DeltaWatermark(key, adapted, weight=1.0, margin=0.05, clients=1))]
    mark(terms, [p for p in adapted.parameters() if p.requires_grad], steps=steps, lr=1e-3)
    return base, tokenizer, adapted.merge_and_unload().eval(), keys, reference


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits.float()


def read(model, keys, reference, fresh: int) -> dict:
    started = time.perf_counter()
    plain_reference = Reference(reference.carrier, reference.values)
    plain = [verify(model, None, key, plain_reference) for key in keys]
    prepared = readings(model, keys[0].carrier, reference)
    seconds = time.perf_counter() - started
    aligned = [verify(model, None, key, reference, prepared=prepared) for key in keys]
    strangers = [verify(model, None, WatermarkKey.generate("stranger", keys[0].carrier, bits=keys[0].bits,
                                                           triggers=0), reference, prepared=prepared)
                 for _ in range(fresh)]
    return {"as_it_is": [[v.matched_bits, v.adapter_bits] for v in plain],
            "verified": [[v.matched_bits, v.adapter_bits] for v in aligned],
            "worst_p": max(v.p_value for v in aligned), "owned": sum(v.owned for v in aligned),
            "aligned": aligned[0].aligned, "reading_seconds": round(seconds, 2),
            "fresh_keys_owned": sum(v.owned for v in strangers),
            "fresh_keys_most_bits": max(max(v.matched_bits, v.adapter_bits) for v in strangers) if strangers else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--owners", type=int, default=4)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps of the hinges alone")
    parser.add_argument("--fresh", type=int, default=100)
    args = parser.parse_args()
    out = {}
    for name in args.models:
        say(f"{name}: marking")
        base, tokenizer, model, keys, reference = marked(name, args.owners, args.bits, args.steps)
        inputs = torch.tensor([tokenizer("The federation trained this model on private text.")["input_ids"]])
        expected = logits(model, inputs)
        rows = {"marked": read(model, keys, reference, args.fresh), "base": read(base, keys, reference, 0)}
        rng = np.random.default_rng(0)
        suite = [("permute", ("permute",)), ("rescale", ("rescale",)), ("permute_rescale", ("rescale", "permute"))]
        if reference.anatomy.rotations:
            suite += [("rotate", ("rotate",)), ("rescale_rotate", ("rescale", "rotate"))]
        for attack, moves in suite:
            stolen = copy.deepcopy(model)
            for move in moves:
                getattr(attacks, move)(stolen, rng)
            change = float((logits(stolen, inputs) - expected).abs().max())
            rows[attack] = {"largest_logit_change": change, **read(stolen, keys, reference, args.fresh)}
            say(f"{name} {attack}: {rows[attack]}")
        out[name] = {"carrier": {"scales": keys[0].carrier.size, "adapted_weights": len(keys[0].carrier.weights)},
                     "owners": args.owners, "bits": args.bits, **rows}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
