"""Secure-sum cost per round, excluding training: SecAgg+ and CKKS against the plaintext sum, in one run.

Every party lives in this process and every message crosses the codec, as in the in-process
runtime. d = 74,499: the MiniLM LoRA r=8 trainable vector (74,498 values) plus the weight n_k.
CKKS runs at the full d up to --ckks-max clients; beyond that only its summation error is measured,
on one ciphertext chunk (4,096 values), since encrypting 1,000 full vectors takes minutes.

With Flower installed (the `flower` extra), Flower's own SecAgg+ runs the same round beside ours
(benchmarks/flower_secaggplus.py, up to --flower-max clients). Flower runs its key setup in every round;
ours runs it once per job, so both "per round" and "per round with our setup" are compared.

    python benchmarks/secagg.py [--clients 10 50 1000] [--dropout 0.3]     # prints JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from securefed.config import default_degree, default_threshold
from securefed.errors import ProtocolError
from securefed.protocol import PlainModel, decode, encode
from securefed.secagg.ckks import CkksClient, CkksServer, CkksSettings
from securefed.secagg.plaintext import PlainSumClient, PlainSumServer
from securefed.secagg.secaggplus import SecAggPlusClient, SecAggPlusServer, SecAggPlusSettings

SIZE = 74_499


class Wire:
    """Carries messages through the codec and counts bytes per client."""

    def __init__(self, clients):
        self.clients = clients
        self.up = dict.fromkeys(clients, 0)
        self.down = dict.fromkeys(clients, 0)

    def send(self, requests, gone=frozenset()):
        replies = {}
        for cid, request in requests.items():
            wire = encode(request)
            self.down[cid] += len(wire)
            if cid in gone:
                continue
            try:
                reply = encode(self.clients[cid].reply(decode(wire)))
            except ProtocolError:  # a refusing client is a dropout
                continue
            self.up[cid] += len(reply)
            replies[cid] = decode(reply)
        return replies

    def upload(self, number, vectors, gone=frozenset()):
        uploads = {}
        for cid, vector in vectors.items():
            if cid in gone:
                continue
            wire = encode(self.clients[cid].upload(number, vector))
            self.up[cid] += len(wire)
            uploads[cid] = decode(wire)
        return uploads

    def reset(self):
        self.up = dict.fromkeys(self.clients, 0)
        self.down = dict.fromkeys(self.clients, 0)

    def per_client(self):
        return {"bytes_up": float(np.mean(list(self.up.values()))),
                "bytes_down": float(np.mean(list(self.down.values())))}


def run_setup(server, wire: Wire, rounds: range) -> dict:
    """The secure sum's once-per-job setup: seconds, and bytes per client."""
    started = time.perf_counter()
    requests = server.setup(list(wire.clients), rounds)
    while requests:
        requests = server.setup_step(wire.send(requests))
    return {"seconds": time.perf_counter() - started, **wire.per_client()}


def one_round(server, wire, number, vectors, gone=frozenset()):
    wire.reset()
    started = time.perf_counter()
    server.open(number, sorted(wire.clients), SIZE)
    step = server.step(wire.upload(number, vectors, gone))
    while isinstance(step, dict):
        step = server.step(wire.send(step))
    return time.perf_counter() - started, step


def ckks_round(n: int, size: int, rng: np.random.Generator) -> dict:
    """One CKKS round: every client opens the model and uploads; the server sums; a client opens the sum."""
    settings = CkksSettings(job=bytes(32), clients=n)
    clients = {c: CkksClient(c, settings) for c in range(n)}
    server = CkksServer(settings)
    wire = Wire(clients)
    setup = run_setup(server, wire, range(1, 2))
    start = rng.normal(0, 1, size - 1).astype(np.float32)
    sizes = rng.integers(10, 1000, n)
    locals_ = {c: start + rng.normal(0, 0.01, size - 1).astype(np.float32) for c in range(n)}
    vectors = {}
    for c in range(n):
        clients[c].open_model(PlainModel(weights=start), size - 1)
        vectors[c] = np.append((locals_[c] - start) * np.float32(sizes[c]), np.float32(sizes[c])).astype(np.float32)
    wire.reset()
    started = time.perf_counter()
    server.open(1, range(n), size)
    result = server.step(wire.upload(1, vectors))
    sealed = encode(result.sealed)
    opened = clients[0].open_model(decode(sealed), size - 1)
    seconds = time.perf_counter() - started
    expected = np.average([locals_[c].astype(np.float64) for c in range(n)], axis=0, weights=sizes)
    return {"setup": setup, "seconds_per_round": seconds, **wire.per_client(), "bytes_down": len(sealed),
            "bytes_up_over_float32_payload": wire.per_client()["bytes_up"] / (4 * size),
            "max_error_of_the_average": float(np.abs(opened - expected).max())}


def flower_baseline(n: int, ours: dict) -> dict:
    """Flower's SecAgg+ on the same n and d, and how ours compares; empty without Flower."""
    try:
        from flower_secaggplus import flower_secaggplus_round
    except ImportError:
        return {}
    flower = flower_secaggplus_round(n, SIZE)
    with_setup = ours["seconds_per_round"] + ours["setup"]["seconds"]
    return {"flower_secaggplus": flower,
            "flower_over_ours_time": flower["seconds_per_round"] / ours["seconds_per_round"],
            "flower_over_ours_time_with_our_setup": flower["seconds_per_round"] / with_setup}


def bench(n: int, dropout: float, ckks_max: int, flower_max: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vectors = {c: rng.normal(0, 1, SIZE).astype(np.float32) for c in range(n)}
    exact = sum(v.astype(np.float64) for v in vectors.values())

    plain = Wire({c: PlainSumClient() for c in range(n)})
    plain_seconds, plain_result = one_round(PlainSumServer(), plain, 1, vectors)
    plain_bytes = plain.per_client()

    degree = default_degree(n)
    settings = SecAggPlusSettings(job=bytes(32), clients=n, rounds=2, degree=degree,
                                  threshold=default_threshold(degree), clip=64.0, seed=seed)
    clients = {c: SecAggPlusClient(c, settings) for c in range(n)}
    server = SecAggPlusServer(settings)
    wire = Wire(clients)
    setup = run_setup(server, wire, range(1, 3))

    full_seconds, full = one_round(server, wire, 1, vectors)
    full_bytes = wire.per_client()
    gone = frozenset(int(c) for c in rng.choice(n, int(dropout * n), replace=False))
    drop_seconds, dropped = one_round(server, wire, 2, vectors, gone)
    survivors_sum = sum(vectors[c].astype(np.float64) for c in range(n) if c not in gone)
    payload = 4 * SIZE
    return {
        "clients": n,
        "neighbours": degree,
        "threshold": settings.threshold,
        "vector_entries": SIZE,
        "plaintext": {"seconds_per_round": plain_seconds, **plain_bytes,
                      "max_error": float(np.abs(plain_result.total - exact).max())},
        "secaggplus": {
            "setup": setup,
            "seconds_per_round": full_seconds,
            **full_bytes,
            "bytes_up_over_float32_payload": full_bytes["bytes_up"] / payload,
            "max_error": float(np.abs(full.total - exact).max()),
            f"seconds_per_round_with_{int(dropout * 100)}pct_dropout": drop_seconds,
            "dropout_over_full_time": drop_seconds / full_seconds,
            "dropout_contributors": len(dropped.contributors),
            "dropout_max_error": float(np.abs(dropped.total - survivors_sum).max()),
        },
        "secaggplus_over_plaintext_time": full_seconds / plain_seconds,
        **(flower_baseline(n, {"seconds_per_round": full_seconds, "setup": setup}) if n <= flower_max else {}),
        "ckks": (ckks_round(n, SIZE, rng) if n <= ckks_max
                 else {"one_chunk_of_4096": ckks_round(n, 4096, rng)}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 1000])
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--ckks-max", type=int, default=1000, help="largest n for CKKS at the full vector size")
    parser.add_argument("--flower-max", type=int, default=50, help="largest n for Flower's SecAgg+ beside ours")
    args = parser.parse_args(argv)
    results = []
    for n in args.clients:
        results.append(bench(n, args.dropout, args.ckks_max, args.flower_max))
        print(f"n={n} done", file=sys.stderr)
    print(json.dumps({"benchmark": "secagg", "note": "seconds cover every party of the round run in one process, "
                      "training excluded", "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
