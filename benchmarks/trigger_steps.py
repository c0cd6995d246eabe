"""How many steps a model needs to learn a key's trigger set, against how many a job gives each client.

A client learns its triggers through the trigger term, which joins each of its DP-SGD steps (docs/watermark.md).
This trains that term alone, weighted as a job weighs it, with no task loss, no DP noise and no averaging (an
upper bound on what a client's steps can do), with the job's optimizer and learning rate, from the job's initial
model, and verifies the key black-box after chosen numbers of steps. The baseline, measured in the same run: the
same model before any step, and a fresh key (never trained) at the end, both at chance.

    python benchmarks/trigger_steps.py [JOB] [--triggers 32] [--steps 3,9,18,27,40]

JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from securefed.config import load_job
from securefed.job import load_task, verify_key, watermark_terms
from securefed.watermark.keys import WatermarkKey

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", type=Path, default=ROOT / "examples" / "dolly-smollm2-private.toml")
    parser.add_argument("--triggers", type=int, default=32)
    parser.add_argument("--steps", default="3,9,18,27,40", help="verify after these numbers of steps")
    args = parser.parse_args()
    checkpoints = sorted({int(s) for s in args.steps.split(",")})

    job = load_job(args.job)
    fed = job.federation
    # the term runs without Opacus's hooks in a job; here there is no task step for them to serve
    task = load_task(job.model_copy(update={"privacy": None}))
    owner, fresh = (WatermarkKey.generate(name, task.carrier, bits=64, triggers=args.triggers)
                    for name in ("owner", "fresh"))
    term = watermark_terms(task, owner)[-1]
    params = task.bundle.view.parameters
    optimizer = (torch.optim.SGD(params, lr=fed.learning_rate, momentum=fed.momentum) if fed.optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=fed.learning_rate, weight_decay=fed.weight_decay))

    def check(step: int, loss: float | None) -> dict:
        verdict = verify_key(task, task.bundle.view.get(), owner)
        row = {"step": step, "loss": loss, "matched": verdict.matched_triggers, "p": verdict.triggers_p}
        print(f"step {step}: {row}", file=sys.stderr, flush=True)
        return row

    started = time.perf_counter()
    curve = [check(0, None)]
    for step in range(1, checkpoints[-1] + 1):
        task.bundle.model.train()
        loss = term()  # as a job adds it: weighted K·r/(1 − r)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in checkpoints:
            curve.append(check(step, round(loss.item(), 4)))
    after = verify_key(task, task.bundle.view.get(), fresh)
    print(json.dumps({
        "job": job.name, "model": job.model.name, "optimizer": fed.optimizer, "learning_rate": fed.learning_rate,
        "triggers": args.triggers,
        "steps_per_client_in_the_job": fed.rounds * fed.local_steps, "clients": fed.clients,
        "curve": curve, "fresh_key_at_the_end": {"matched": after.matched_triggers, "p": after.triggers_p},
        "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
