"""What privacy costs in accuracy: the same federated job at several budgets ε, and without DP (ε = ∞).

Every run is the private example's job with 10 clients (Dirichlet α = 0.5) under SecAgg+, changed only in
[privacy].epsilon; ε = ∞ drops [privacy] and trains without clipping or noise, with the same batches,
steps and learning rates. The ε = ∞ run is the baseline, measured in the same invocation.

    python benchmarks/utility.py [JOB.toml] [--epsilons 1,3,8,inf] [--workers 2] [--plot utility.png]

JSON goes to stdout. With --workers N, N runs go at once, each on cores/N threads: the runs are independent,
and a small model uses two threads poorly.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from securefed.config import load_job
from securefed.interfaces import Observer
from securefed.privacy.audit import audit_ledgers
from securefed.runtime.local import run

ROOT = Path(__file__).resolve().parents[1]


def variant(job, epsilon: float, overrides: dict):
    fed = job.federation.model_copy(update=overrides)
    privacy = None if math.isinf(epsilon) else job.privacy.model_copy(update={"epsilon": epsilon})
    return job.model_copy(update={"name": f"{job.name}-eps-{epsilon:g}", "federation": fed, "privacy": privacy})


class RoundPrinter(Observer):
    """Each round's accuracy on stderr as it lands: a run takes many minutes."""

    def __init__(self, name: str):
        self.name = name

    def round_finished(self, record) -> None:
        print(f"{self.name}: round {record['round']} dev accuracy {record['dev_accuracy']:.4f}", file=sys.stderr,
              flush=True)


def one_run(job, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    result = run(job, out=out, observer=RoundPrinter(job.name))
    row = {"dev_accuracy": result.records[-1]["dev_accuracy"],
           "per_round": [r["dev_accuracy"] for r in result.records],
           "seconds": round(time.perf_counter() - started, 1)}
    if job.privacy is not None:
        audits = audit_ledgers(result.run.ledger_dir, job.job_id, job.federation.clients)
        row["epsilon_spent_max"] = round(max(a.epsilon_prv for a in audits), 4)
        row["sigma"] = [round(a.sigma, 3) for a in audits]
    print(f"{job.name}: {row}", file=sys.stderr, flush=True)
    return row


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in rows.items():
        name = "∞" if label == "inf" else label
        ax.plot(range(1, len(row["per_round"]) + 1), row["per_round"], marker="o", label=f"ε = {name}")
    ax.set_xlabel("round")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("Accuracy under DP-SGD, 10 clients, SecAgg+")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default=ROOT / "examples" / "sst2-lora-private.toml", type=Path)
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--workers", type=int, default=1, help="runs at once (each gets cores/workers threads)")
    parser.add_argument("--plot", type=Path, default=Path("utility.png"))
    args = parser.parse_args()
    job = load_job(args.job)
    if job.privacy is None:
        parser.error(f"{args.job} has no [privacy] section to vary")
    overrides = {"clients": args.clients}
    for key in ("rounds", "local_steps", "batch_size", "learning_rate"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {f"{e:g}": pool.submit(one_run, variant(job, e, overrides), Path(tmp) / f"eps-{e:g}", threads)
                   for e in epsilons}
        rows = {label: future.result() for label, future in futures.items()}
    plot(rows, args.plot)
    report = {"job": str(args.job), "overrides": overrides, "results": rows, "plot": str(args.plot)}
    if "inf" in rows:
        base = rows["inf"]["dev_accuracy"]
        report["points_below_non_private"] = {k: round(100 * (base - r["dev_accuracy"]), 2)
                                             for k, r in rows.items() if k != "inf"}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
