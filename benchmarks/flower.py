"""Seconds per round on Flower against the in-process runtime, for the same job, in one run.

Flower here is real: a SuperLink and one SuperNode per client on 127.0.0.1, with TLS and node
authentication; each node's `flower join` answers its messages in its own process (the executor, which keeps
the model loaded), with its share of the cores. Both runs share the job seed, the
DP secret and the watermark keys, so their final adapters agree up to the order of float sums, which depends on
the thread count: `OMP_NUM_THREADS=1` gives both one thread, and the same bits. The JSON says by how much.

    python benchmarks/flower.py [JOB.toml] [--rounds 3] [--keep DIR]     # prints JSON on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from securefed.config import load_job
from securefed.report import dev_metrics
from securefed.runtime.deployment import Loopback, node_threads
from securefed.runtime.local import execute, prepare

ROOT = Path(__file__).resolve().parents[1]


def seconds(records: list[dict]) -> list[float]:
    return [round(sum(r["seconds"].values()), 2) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default=ROOT / "examples" / "sst2-lora-private.toml", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (the nodes' logs are in "
                        "KEEP/flower/logs) instead of a temporary one")
    args = parser.parse_args()
    config = load_job(args.job)
    config = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": args.rounds})})
    clients = config.federation.clients
    if args.keep is not None:
        args.keep.mkdir(parents=True)  # a new folder: never mix two runs' logs
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="securefed-flower-bench-")) as tmp:
        root = Path(tmp)
        job = root / "job.toml"
        job.write_text(config.to_toml(), encoding="utf-8")

        started = time.perf_counter()
        prepared = prepare(config, out=root / "local")
        local = execute(prepared)
        local_wall = time.perf_counter() - started
        secret_file = prepared.run_dir.path / "secrets" / "dp"  # the nodes get the in-process clients' DP secret
        secret = secret_file.read_text(encoding="ascii").strip() if secret_file.exists() else None
        print(f"in-process: {local_wall:.0f} s", file=sys.stderr)

        keys = {cid: path for cid in range(clients)
                if (path := prepared.run_dir.keys_dir / f"client-{cid}.wmkey").exists()}
        del prepared  # the in-process model: the nodes and the server load their own
        gc.collect()
        deployment = Loopback(root / "flower")
        started = time.perf_counter()
        try:
            run_dir = deployment.run_job(job, args.timeout, secrets={"dp": secret}, watermark_keys=keys,
                                         on_line=lambda line: print(f"flower: {line}", file=sys.stderr, flush=True))
        finally:
            deployment.stop_all()
        flower_wall = time.perf_counter() - started  # with the SuperLink's and the nodes' start
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = load_file(str(run_dir / "checkpoints" / f"round-{args.rounds:05d}.safetensors"))["weights"]

    local_rounds, flower_rounds = seconds(local.records), seconds(records)
    print(json.dumps({
        "job": str(args.job), "clients": clients, "rounds": args.rounds,
        "in_process": {"threads": torch.get_num_threads(), "seconds_per_round": local_rounds,
                       "setup_seconds": local.records[0].get("setup", {}).get("seconds"),
                       "wall_seconds": round(local_wall, 1),
                       "dev": dev_metrics(local.records[-1])},
        "flower": {"threads_per_node": node_threads(clients), "seconds_per_round": flower_rounds,
                   "setup_seconds": records[0].get("setup", {}).get("seconds"),
                   "wall_seconds": round(flower_wall, 1), "dev": dev_metrics(records[-1]),
                   "bytes_per_round": [r["bytes_down"] + r["bytes_up"] for r in records]},
        "flower_over_in_process": round(statistics.mean(flower_rounds) / statistics.mean(local_rounds), 2),
        "final_adapter_max_abs_difference": float(np.max(np.abs(final - local.weights))),
    }, indent=1))


if __name__ == "__main__":
    main()
