"""Per-round cost of a federated job, and its accuracy against centralized training, in one run.

The baseline is non-private, centralized training of the same model on the same data,
seeing the same number of examples (rounds x clients per round x local steps x batch),
with the same optimizer and learning-rate schedule.

    python benchmarks/round.py [JOB.toml]      # prints JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from securefed.config import IidPartition, PlainSumConfig, load_job
from securefed.runtime.local import run

ROOT = Path(__file__).resolve().parents[1]


def centralized(job):
    """One client holding all the training data, taking every step the federation took, round by round.

    Rounds, learning-rate schedule and optimizer resets stay as in the federated job, so the only
    difference is where the data sits.
    """
    fed = job.federation
    return job.model_copy(update={
        "name": f"{job.name}-centralized",
        "partition": IidPartition(method="iid"),
        "secagg": PlainSumConfig(mode="none", insecure=True),  # one client: nothing to hide its update among
        "federation": fed.model_copy(update={"clients": 1, "clients_per_round": None,
                                              "local_steps": fed.cohort_size * fed.local_steps}),
    })


def summarize(records: list[dict]) -> dict:
    seconds = {key: [r["seconds"][key] for r in records] for key in records[0]["seconds"]}
    return {
        "rounds": len(records),
        "final_dev_accuracy": records[-1]["dev_accuracy"],
        "per_round_median": {
            "seconds": {key: statistics.median(values) for key, values in seconds.items()},
            "bytes_down": statistics.median(r["bytes_down"] for r in records),
            "bytes_up": statistics.median(r["bytes_up"] for r in records),
        },
        "per_round": [{"round": r["round"], "dev_accuracy": r["dev_accuracy"], "seconds": r["seconds"],
                       "bytes_down": r["bytes_down"], "bytes_up": r["bytes_up"]} for r in records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default=ROOT / "examples" / "quickstart.toml", type=Path)
    args = parser.parse_args()
    job = load_job(args.job)
    with tempfile.TemporaryDirectory() as tmp:
        federated = run(job, out=Path(tmp) / "federated")
        baseline = run(centralized(job), out=Path(tmp) / "centralized")
    fed = job.federation
    payload_bytes = federated.weights.nbytes
    report = {
        "benchmark": "round",
        "job": str(args.job),
        "trainable_parameters": int(federated.weights.size),
        "float32_payload_bytes": payload_bytes,
        "examples_seen": fed.rounds * fed.cohort_size * fed.local_steps * fed.batch_size,
        "federated": summarize(federated.records),
        "centralized_baseline": {"dev_accuracy": baseline.records[-1]["dev_accuracy"],
                                 "dev_accuracy_per_round": [r["dev_accuracy"] for r in baseline.records],
                                 "train_seconds": sum(r["seconds"]["train"] for r in baseline.records)},
    }
    report["accuracy_gap_to_centralized"] = (report["centralized_baseline"]["dev_accuracy"]
                                             - report["federated"]["final_dev_accuracy"])
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
