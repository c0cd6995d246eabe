"""What federation buys on Dolly, and what DP costs: Rouge-L on test_80 for six ways of training SmolLM2.

Every run uses the same prompts, decoding (greedy, task.max_new_tokens) and test split, and the job's LoRA:

  base         the model zero-shot (the untrained adapter), the baseline measured in this invocation
  local-<i>    client i's shard alone, for the steps the federation gives it (rounds × local_steps, one round)
  federated    the non-private job as written (10 clients, SecAgg+)
  private      the private job (DP-SGD ε = 8 per client, SecAgg+, watermark bits)
  centralized  every shard in one client, for the federation's total steps (clients × rounds × local_steps)

    python benchmarks/generation.py [--job examples/dolly-smollm2.toml] [--private examples/dolly-smollm2-private.toml]
                                    [--only base,federated,...] [--out bench-generation]

JSON goes to stdout. Each finished run is kept in OUT/results.json with its job's fingerprint, and a second
invocation with the same OUT reuses those whose job has not changed instead of training again (runs take
minutes to an hour each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from securefed import job as jobs
from securefed.config import DataConfig, IidPartition, JobConfig, PlainSumConfig, load_job
from securefed.data.instructions import builtin_instruction_sources
from securefed.interfaces import Observer
from securefed.privacy.audit import audit_ledgers
from securefed.runtime.local import run

ROOT = Path(__file__).resolve().parents[1]
ALONE = PlainSumConfig(mode="none", insecure=True)  # one client: nothing to aggregate


class Progress(Observer):
    def __init__(self, name: str):
        self.name = name

    def round_finished(self, record) -> None:
        print(f"{self.name}: round {record['round']} loss {record['dev_loss']:.4f} "
              f"rouge_l {record['dev_rouge_l']:.4f}", file=sys.stderr, flush=True)

    def local_progress(self, client: int, step: int, steps: int) -> None:
        if step == steps or step % 20 == 0:
            print(f"{self.name}: client {client} step {step}/{steps}", file=sys.stderr, flush=True)


def one_client(job: JobConfig, name: str, data: DataConfig, steps: int) -> JobConfig:
    fed = job.federation.model_copy(update={"clients": 1, "rounds": 1, "local_steps": steps})
    return job.model_copy(update={"name": name, "data": data, "federation": fed, "secagg": ALONE,
                                  "partition": IidPartition(method="iid")})


def local_job(job: JobConfig, shard: int) -> JobConfig:
    dolly = builtin_instruction_sources()["dolly"]
    data = job.data.model_copy(update={"dataset": None, "format": "json", "train": dolly.train[shard],
                                       "dev": dolly.dev})
    fed = job.federation
    return one_client(job, f"{job.name}-local-{shard}", data, fed.rounds * fed.local_steps)


def centralized_job(job: JobConfig) -> JobConfig:
    fed = job.federation
    return one_client(job, f"{job.name}-centralized", job.data, fed.clients * fed.rounds * fed.local_steps)


def base_row(job: JobConfig) -> dict:
    started = time.perf_counter()
    task = jobs.load_task(job)
    scores = task.evaluate(task.bundle.view.get())
    return {"dev_loss": scores["loss"], "rouge_l": scores["rouge_l"], "seconds": round(time.perf_counter() - started)}


def trained_row(job: JobConfig, out: Path) -> dict:
    started = time.perf_counter()
    result = run(job, out=out, observer=Progress(job.name))
    last = result.records[-1]
    row = {"dev_loss": last["dev_loss"], "rouge_l": last["dev_rouge_l"],
           "per_round": [r["dev_rouge_l"] for r in result.records],
           "bytes_up_per_client_round": round(statistics.mean(r["bytes_up"] / r["cohort"] for r in result.records)),
           "seconds": round(time.perf_counter() - started)}
    if job.privacy is not None:
        audits = audit_ledgers(result.run.ledger_dir, job.job_id, job.federation.clients)
        row["epsilon_spent_max"] = round(max(a.epsilon_prv for a in audits), 3)
    if result.watermarks:
        row["watermarks"] = [f"{v['verdict']} {v['matched_bits']}/{v['bits']}" for v in result.watermarks]
    return row


def plans(job: JobConfig, private: JobConfig) -> dict[str, tuple[JobConfig, Callable[[JobConfig, Path], dict]]]:
    """Each run: the job it trains (its fingerprint decides whether a kept result still holds) and how."""
    todo = {"base": (job, lambda config, out: base_row(config)), "federated": (job, trained_row),
            "private": (private, trained_row)}
    for shard in range(job.federation.clients):
        todo[f"local-{shard}"] = (local_job(job, shard), trained_row)
    todo["centralized"] = (centralized_job(job), trained_row)
    return todo


def summary(rows: dict) -> dict:
    points = {name: round(100 * row["rouge_l"], 2) for name, row in rows.items()}
    out = {"rouge_l_points": points}
    locals_ = [p for name, p in points.items() if name.startswith("local-")]
    if locals_:
        out["local_mean"], out["local_best"] = round(statistics.mean(locals_), 2), max(locals_)
    if "base" in points and "federated" in points:
        out["federated_over_base"] = round(points["federated"] - points["base"], 2)
    if locals_ and "federated" in points:
        out["federated_over_local_mean"] = round(points["federated"] - out["local_mean"], 2)
    if "private" in points and "federated" in points:
        out["private_below_federated"] = round(points["federated"] - points["private"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=ROOT / "examples" / "dolly-smollm2.toml")
    parser.add_argument("--private", type=Path, default=ROOT / "examples" / "dolly-smollm2-private.toml")
    parser.add_argument("--only", help="comma-separated runs (base, local, local-3, federated, private, centralized)")
    parser.add_argument("--out", type=Path, default=Path("bench-generation"))
    args = parser.parse_args()
    job, private = load_job(args.job), load_job(args.private)
    everything = todo = plans(job, private)
    if args.only:
        wanted = args.only.split(",")
        todo = {name: f for name, f in todo.items() if name in wanted or name.split("-")[0] in wanted}
    args.out.mkdir(parents=True, exist_ok=True)
    kept = args.out / "results.json"
    rows = json.loads(kept.read_text()) if kept.exists() else {}
    torch.manual_seed(0)
    for name, (config, measure) in todo.items():
        if rows.get(name, {}).get("job") == config.fingerprint():
            print(f"{name}: kept from {kept}", file=sys.stderr)
            continue
        if name in rows:
            print(f"{name}: the kept result is of another job (or of no recorded job); training again",
                  file=sys.stderr)
        shutil.rmtree(args.out / name, ignore_errors=True)  # an interrupted run of this benchmark, or another job's
        rows[name] = {**measure(config, args.out / name), "job": config.fingerprint()}
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        kept.write_text(json.dumps(rows, indent=2))
    current = {name: row for name, row in rows.items()  # a kept row of a job since changed is left out
               if name in everything and row.get("job") == everything[name][0].fingerprint()}
    print(json.dumps({"job": str(args.job), "private": str(args.private), "runs": current, **summary(current)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
