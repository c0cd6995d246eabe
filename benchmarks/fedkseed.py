"""FedKSeed against federated LoRA at equal wall time, and FedKSeed's memory against inference.

    python benchmarks/fedkseed.py arms --job examples/fedkseed-sst2.toml --lora examples/sst2-lora-private.toml \
        --minutes 20 [--pro] [--out DIR]
    python benchmarks/fedkseed.py memory --job examples/fedkseed-sst2.toml [--steps 3]

`arms` runs each job in this process, round after round, until its wall time passes --minutes (the round in
flight finishes), then reports the last round's dev metric, the base model's (the job's initial weights), and the
bytes per client and round from metrics.jsonl, the secure sum's setup and any catch-up apart. Each job runs as it
is, minus any watermark (FedKSeed writes none) and without DP (a private job's noise depends on the rounds it
plans, which a run cut by time does not know), so the arms share data, partition and clients. --pro adds a
FedKSeed-Pro arm.

`memory` runs, in child processes, the job's model doing inference on a batch (two forward passes without
gradients, which is what a zeroth-order step computes) and doing FedKSeed steps; each reports its peak RSS over
the steps alone (Linux's clear_refs resets it once the model and the batch are loaded), and the peak of its
loading before.

Both print JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from securefed import job as jobs
from securefed.config import load_job
from securefed.interfaces import Observer
from securefed.runtime.local import execute, prepare

ROUNDS = 100  # an arm stops on time, not on its round count (SecAgg+'s setup serves every planned round)


class _OutOfTime(Exception):
    pass


class _Clock(Observer):
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def round_finished(self, record) -> None:
        print(f"  round {record['round']}: {json.dumps({k: v for k, v in record.items() if k.startswith('dev_')})}",
              file=sys.stderr)
        if time.monotonic() > self.deadline:
            raise _OutOfTime


def run_arm(config, minutes: float, folder: Path) -> dict:
    config = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": ROUNDS}),
                                       "watermark": None, "privacy": None})
    prepared = prepare(config, out=folder)
    task = prepared.task
    base = task.evaluate(task.bundle.view.get()).metrics
    started = time.monotonic()
    try:
        execute(prepared, observer=_Clock(minutes * 60))
    except _OutOfTime:
        pass
    seconds = time.monotonic() - started
    records = prepared.run_dir.records()
    clients = config.federation.clients
    metric = task.kind.headline
    return {
        "rounds": len(records),
        "seconds": round(seconds, 1),
        f"base_{metric}": base[metric],
        f"dev_{metric}": records[-1][f"dev_{metric}"],
        "epsilon": records[-1].get("epsilon"),
        "bytes_per_client_round": {
            "down": float(np.mean([r["bytes_down"] / clients for r in records[1:] or records])),
            "up": float(np.mean([r["bytes_up"] / clients for r in records])),
        },
        "setup_bytes": records[0].get("setup"),
        "catch_up_bytes": sum(r.get("catch_up", {}).get("bytes_down", 0) for r in records),
    }


def arms(args) -> dict:
    fedkseed, lora = load_job(args.job), load_job(args.lora)
    chosen = {"lora-fedavg": lora, "fedkseed": fedkseed}
    if args.pro:
        chosen["fedkseed-pro"] = fedkseed.model_copy(
            update={"algorithm": fedkseed.algorithm.model_copy(update={"pro": True})})
    out = Path(args.out or tempfile.mkdtemp(prefix="fedkseed-bench-"))
    result = {"minutes": args.minutes, "out": str(out)}
    for name, config in chosen.items():
        print(f"{name}:", file=sys.stderr)
        result[name] = run_arm(config, args.minutes, out / name)
    return result


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(job: Path, mode: str, steps: int) -> dict:
    config = load_job(job)
    config = config.model_copy(update={"privacy": None,  # the steps alone: no ledger to keep
                                       "federation": config.federation.model_copy(update={"local_steps": 1})})
    task = jobs.load_task(config)
    data = jobs.client_datasets(task)[0]
    client = jobs.make_client(task, 0, data)
    batch = task.collator.batch(data, np.arange(min(config.federation.batch_size, len(data))))
    model = task.bundle.model
    model.eval()

    def inference():
        with torch.no_grad():
            task.kind.example_losses(model, batch)
            task.kind.example_losses(model, batch)

    def fedkseed():
        client._train_locally(1)

    step = inference if mode == "inference" else fedkseed
    step()  # warm-up
    loading = _status_kb("VmHWM")  # the whole process so far: loading, building the view, the warm-up step
    Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (Linux)
    before = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    return {"loading_peak_kb": loading, "before_kb": before, "peak_kb": _status_kb("VmHWM")}


def memory(args) -> dict:
    result = {}
    for mode in ("inference", "fedkseed"):
        out = subprocess.run([sys.executable, __file__, "memory", "--job", str(args.job), "--steps", str(args.steps),
                              "--child", mode], capture_output=True, text=True, check=True)
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_ratio"] = result["fedkseed"]["peak_kb"] / result["inference"]["peak_kb"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("arms")
    a.add_argument("--job", type=Path, required=True)
    a.add_argument("--lora", type=Path, required=True)
    a.add_argument("--minutes", type=float, default=20.0)
    a.add_argument("--pro", action="store_true")
    a.add_argument("--out")
    m = sub.add_parser("memory")
    m.add_argument("--job", type=Path, required=True)
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--child", choices=("inference", "fedkseed"))
    args = parser.parse_args()
    if args.command == "memory" and args.child:
        print(json.dumps(memory_child(args.job, args.child, args.steps)))
        return 0
    print(json.dumps(arms(args) if args.command == "arms" else memory(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
