"""How much of a classification job's gain a linear head on the *base* model's features holds, and what writing
owners' bits into such a head costs.

A thief who resets every carrier (the norms' scales and the adapter's ΔW) keeps the trained head, which then reads
the base model's features. If a linear head on those features alone reaches the fine-tuned model's accuracy, the
reset costs the thief little, and only bits in the head itself could make it cost more. This measures both sides
on the job's data, without DP (an upper bound on what a head can do):

  - a logistic-regression head on the base model's pooled features (the baseline, measured in the same run);
  - the same head constrained by a hinge to carry n random sign bits, sign(u_jᵀ·h) = b_j, for several n: the
    head's dev accuracy, and how many bits it carries. One owner needs about 36 bits, all matched, for the head
    alone to give p ≤ 1e-9 after the verdict's Bonferroni factor; k owners need k times as many.

    python benchmarks/head_probe.py [JOB] [--train-examples 8000] [--bits 0,36,64,144,256,360]

JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from securefed.config import load_job
from securefed.models.registry import load_base, resolve
from securefed.tasks import task_kind

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def pooled_features(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """What the classifier head reads: the encoder's pooled output (the masked mean for sentence encoders)."""
    encoder = getattr(model, model.base_model_prefix)
    rows = []
    for start in range(0, len(texts), 256):
        batch = tokenizer(texts[start : start + 256], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        rows.append(encoder(**batch).pooler_output)
    return torch.cat(rows)


def fit_head(train: tuple[torch.Tensor, torch.Tensor], dev: tuple[torch.Tensor, torch.Tensor], bits: int,
             seed: int, steps: int = 1500) -> dict:
    """A two-class linear head by Adam on the logistic loss, plus a hinge holding `bits` secret projections of its
    direction past a margin of 0.05 with the given signs."""
    generator = torch.Generator().manual_seed(seed)
    x, y = train
    direction = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    projections = torch.randn(x.shape[1], max(bits, 1), generator=generator)
    projections /= projections.norm(dim=0)
    signs = torch.randint(0, 2, (max(bits, 1),), generator=generator).float() * 2 - 1
    optimizer = torch.optim.Adam([direction, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ direction + bias, y.float())
        if bits:
            loss = loss + 10 * torch.relu(0.05 - signs * (projections.T @ direction)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = ((dev[0] @ direction + bias > 0).long() == dev[1]).float().mean().item()
        carried = int(((projections.T @ direction).sign() == signs).sum()) if bits else 0
    return {"bits": bits, "dev_accuracy": round(accuracy, 4), "bits_carried": carried}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", type=Path, default=ROOT / "examples" / "sst2-lora-private.toml")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--bits", default="0,36,64,144,256,360")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()

    job = load_job(args.job)
    task = task_kind(job)
    if task.name != "classification":
        parser.error("a head on pooled features exists for classification jobs only")
    splits = task.load_splits()
    model, tokenizer = load_base(resolve(job.model.name), splits.label_names, task.name)
    model.eval()
    chosen = np.random.default_rng(0).choice(len(splits.train.texts), min(args.train_examples,
                                                                          len(splits.train.texts)), replace=False)
    labels = np.asarray(splits.train.labels)
    train = (pooled_features(model, tokenizer, [splits.train.texts[i] for i in chosen], job.data.max_length),
             torch.as_tensor(labels[chosen]).long())
    dev = (pooled_features(model, tokenizer, list(splits.dev.texts), job.data.max_length),
           torch.as_tensor(np.asarray(splits.dev.labels)).long())
    if int(train[1].max()) > 1:
        parser.error("the probe fits two classes")
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        fits = [fit_head(train, dev, bits, seed) for seed in range(args.seeds)]
        rows.append({"bits": bits, "dev_accuracy": [f["dev_accuracy"] for f in fits],
                     "bits_carried": [f["bits_carried"] for f in fits]})
    baseline = float(np.mean(rows[0]["dev_accuracy"])) if rows and rows[0]["bits"] == 0 else None
    for row in rows:
        if baseline is not None:
            row["cost_points"] = round(100 * (baseline - float(np.mean(row["dev_accuracy"]))), 2)
    print(json.dumps({"job": job.name, "model": job.model.name, "train_examples": len(chosen),
                      "features": int(train[0].shape[1]), "heads": rows}, indent=2))


if __name__ == "__main__":
    main()
