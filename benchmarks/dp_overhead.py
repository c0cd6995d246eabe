"""Cost of DP-SGD: one private step against the same non-private step, on the same batch.

    minilm   MiniLM + LoRA r=8 (query, value), SST-2, batch 32 at 64 tokens (the classification examples)
    smollm2  SmolLM2-135M + LoRA r=8 (q_proj, v_proj), Dolly, batch 4 at 256 tokens, the loss of each example
             the mean over its response tokens (the generation examples)

Time: both steps alternate in this process, on the same batch, after warm-up. The private step is the one
securefed takes: Opacus's per-example gradients (securefed.privacy.dpsgd.private_module), clipping and noise.
Peak memory: each kind of step runs alone in a child process, whose peak RSS is reset once the model, the batch
and the optimizer's state are in memory (Linux's clear_refs), so the peak is that of the steps.

    python benchmarks/dp_overhead.py [--model minilm|smollm2] [--steps 20]      # prints JSON on stdout
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from securefed.config import DataConfig, LoraConfig, ModelConfig, load_job
from securefed.data import PadCollator, encode, load_splits
from securefed.models import build_model
from securefed.privacy.dpsgd import private_module

ROOT = Path(__file__).resolve().parents[1]


def minilm():
    batch_size = 32
    splits = load_splits(DataConfig(dataset="sst2", max_length=64))
    bundle = build_model(ModelConfig(name="minilm"), LoraConfig(method="lora", r=8, target_modules=["query", "value"]),
                         splits.label_names, 0)
    data = encode(splits.train.texts[:batch_size], bundle.tokenizer, 64, splits.train.labels[:batch_size])
    batch = PadCollator(bundle.tokenizer.pad_token_id).batch(data, np.arange(batch_size))
    return bundle, batch, lambda module, b: module(**b).loss * len(b["input_ids"]), "minilm + lora r=8, batch 32 x 64"


def smollm2():
    from securefed.data.instructions import Instructions
    from securefed.tasks import task_kind

    batch_size, length = 4, 256
    job = load_job(ROOT / "examples" / "dolly-smollm2.toml")
    job = job.model_copy(update={"data": job.data.model_copy(update={"max_length": length})})
    kind = task_kind(job)
    bundle = build_model(job.model, job.peft, [], 0, kind="generation")
    train = kind.load_splits().train
    n = 400
    head = Instructions(train.instructions[:n], train.contexts[:n], train.responses[:n], {}, train.path)
    encoded = kind.encode(head, bundle.tokenizer)
    longest = np.argsort(-encoded.lengths, kind="stable")[:batch_size]  # a full batch: every row 256 tokens
    batch = kind.collator(bundle.tokenizer).batch(encoded, longest)
    width = batch["input_ids"].shape[1]
    return bundle, batch, lambda module, b: kind.loss(module, b) * len(b["input_ids"]), \
        f"smollm2-135m + lora r=8 (q, v), batch {batch_size} x {width}"


MODELS = {"minilm": minilm, "smollm2": smollm2}


def plain_step(bundle, batch, loss):
    optimizer = torch.optim.AdamW(bundle.view.parameters, lr=1e-3)
    examples = len(batch["input_ids"])

    def step():
        (loss(bundle.model, batch) / examples).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dp_step(bundle, batch, loss):
    from opacus.optimizers import DPOptimizer

    private = private_module(bundle.model, batch, loss)
    optimizer = DPOptimizer(torch.optim.AdamW(bundle.view.parameters, lr=1e-3), noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=len(batch["input_ids"]))

    def step():
        loss(private, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, private


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def peak_child(model: str, mode: str) -> dict:
    """Peak RSS of a child process over three steps of one kind, and its RSS before them (model, batch, optimizer
    state loaded): the load's own transient peak is left out."""
    out = subprocess.run([sys.executable, __file__, "--model", model, "--child", mode], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=["plain", "dp"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bundle, batch, loss, described = MODELS[args.model]()
    bundle.model.train()
    if args.child:
        step = plain_step(bundle, batch, loss) if args.child == "plain" else dp_step(bundle, batch, loss)[0]
        step()  # the optimizer's state exists from the first step on
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (Linux)
        before = _status_kb("VmRSS")
        for _ in range(3):
            step()
        print(json.dumps({"before": before, "peak": _status_kb("VmHWM")}))
        return 0
    plain = plain_step(bundle, batch, loss)
    dp, private = dp_step(bundle, batch, loss)
    times = {"plain": [], "dp": []}
    for i in range(args.steps + 3):
        for name, step in (("plain", plain), ("dp", dp)):
            if name == "plain":
                private.disable_hooks()  # no per-example gradients: a plain step
            else:
                private.enable_hooks()
            started = time.perf_counter()
            step()
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - started)
    plain_mem, dp_mem = peak_child(args.model, "plain"), peak_child(args.model, "dp")
    plain_s, dp_s = statistics.median(times["plain"]), statistics.median(times["dp"])
    print(json.dumps({
        "benchmark": "dp_overhead", "model": described, "steps": args.steps,
        "seconds_per_step": {"non_private": plain_s, "dp_sgd": dp_s}, "time_ratio": dp_s / plain_s,
        "peak_rss_kb": {"non_private": plain_mem, "dp_sgd": dp_mem},
        "peak_memory_ratio": dp_mem["peak"] / plain_mem["peak"],
        "step_memory_ratio": (dp_mem["peak"] - dp_mem["before"]) / max(plain_mem["peak"] - plain_mem["before"], 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
