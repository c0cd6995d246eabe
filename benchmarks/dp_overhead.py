"""Cost of DP-SGD: one private step against the same non-private step (MiniLM + LoRA r=8, batch 32).

Time: both steps alternate in this process, on the same batch, after warm-up.
Peak memory: each kind of step runs alone in a child process (peak RSS is per process), and the peak is
compared with a child that only loads the model and the batch.

    python benchmarks/dp_overhead.py [--steps 20]      # prints JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from securefed.config import DataConfig, LoraConfig, ModelConfig
from securefed.data import PadCollator, encode, load_splits
from securefed.models import build_model

BATCH = 32


def setup():
    splits = load_splits(DataConfig(dataset="sst2", max_length=64))
    bundle = build_model(ModelConfig(name="minilm"), LoraConfig(method="lora", r=8, target_modules=["query", "value"]),
                         splits.label_names, 0)
    data = encode(splits.train.texts[:BATCH], bundle.tokenizer, 64, splits.train.labels[:BATCH])
    batch = PadCollator(bundle.tokenizer.pad_token_id).batch(data, np.arange(BATCH))
    bundle.model.train()
    return bundle, batch


def steppers(bundle, batch):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    plain_opt = torch.optim.AdamW(bundle.view.parameters, lr=1e-3)
    private = GradSampleModule(bundle.model)
    dp_opt = DPOptimizer(torch.optim.AdamW(bundle.view.parameters, lr=1e-3), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=BATCH)

    def plain():
        bundle.model(**batch).loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def dp():
        private(**batch).loss.backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return plain, dp, private


def peak_child(mode: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=["none", "plain", "dp"])
    args = parser.parse_args(argv)
    bundle, batch = setup()
    if args.child:
        plain, dp, private = steppers(bundle, batch)
        if args.child == "plain":
            private.disable_hooks()  # no per-example gradients: a plain step
        for _ in range(3):
            {"none": lambda: None, "plain": plain, "dp": dp}[args.child]()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return 0
    plain, dp, private = steppers(bundle, batch)
    times = {"plain": [], "dp": []}
    for i in range(args.steps + 3):
        for name, step in (("plain", plain), ("dp", dp)):
            if name == "plain":
                private.disable_hooks()
            else:
                private.enable_hooks()
            started = time.perf_counter()
            step()
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - started)
    base, plain_peak, dp_peak = peak_child("none"), peak_child("plain"), peak_child("dp")
    plain_s, dp_s = statistics.median(times["plain"]), statistics.median(times["dp"])
    print(json.dumps({
        "benchmark": "dp_overhead", "model": "minilm + lora r=8", "batch": BATCH, "steps": args.steps,
        "seconds_per_step": {"non_private": plain_s, "dp_sgd": dp_s}, "time_ratio": dp_s / plain_s,
        "peak_rss_kb": {"model_and_batch": base, "non_private": plain_peak, "dp_sgd": dp_peak},
        "peak_memory_ratio": dp_peak / plain_peak,
        "step_memory_ratio": (dp_peak - base) / max(plain_peak - base, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
