"""Watermark strength, robustness, false positives and cost, against the same job without watermarks.

The job is the private example's (MiniLM + LoRA, SST-2, Dirichlet α = 0.5, DP-SGD at ε = 8, SecAgg+) with 10
clients, each embedding 64 bits (and, with --triggers, a trigger set) with a key made into the run. The baseline,
run in the same invocation, is that job without [watermark].

Accuracy cost: each of --seeds pairs runs the watermarked job and the baseline with the same job seed and the
same DP secret, so both draw the same batches and the same noise; the pair's difference is then the watermark's
doing, not the noise's (unpaired, two runs of one job differed by 1.1 points). Then, on the first pair's
watermarked model:

  - every client's verdict after training, and after each attack by a third party holding the model:
      finetune  1 epoch of full fine-tuning on AG News (the shipped 10,000-example subset; a new 4-class head,
                AdamW at 5e-5, batch 32); and the same at 5e-4, ten times BERT's usual rate
      prune     50% magnitude pruning of each LoRA matrix and of the carrier's shift from the base scales
      int8      every float tensor of the merged model rounded to int8 (per tensor, symmetric) and back
      merge     the adapter merged into the base, saved and loaded again
      permute, rescale, permute_rescale
                function-preserving reparameterizations (securefed/watermark/attacks.py), undone by alignment
      reset_scales, reset_all
                the norms' scales, then also the adapted weights, copied back from the base model; the
                dev accuracy then says what the reset cost the thief
  - the false-positive rate of 1,000 fresh keys on the watermarked model and on the baseline's.

    python benchmarks/watermark.py [--clients 10] [--bits 64] [--blocks 2] [--triggers 0] [--trigger-rate R]
                                   [--seeds 1] [--fresh-keys 1000] [--workers 2]

JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from securefed.config import WatermarkConfig, load_job
from securefed.data import PadCollator, encode, load_splits
from securefed.models import evaluate
from securefed.models.saved import load_adapter, load_merged, merge_adapter
from securefed.runtime.local import execute, prepare
from securefed.watermark import attacks
from securefed.watermark.feature import scale_parameters
from securefed.watermark.keys import WatermarkKey
from securefed.watermark.reference import Reference
from securefed.watermark.verify import readings, verify

ROOT = Path(__file__).resolve().parents[1]
TARGET_OWNER_P, TARGET_NON_OWNER_P = 1e-12, 1e-3


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train(job, out: Path, threads: int, dp_secret: str) -> dict:
    """Run `job` with the given DP secret (sampling and noise) in place of a fresh one."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    prepared = prepare(job, out=out)
    (out / "secrets").mkdir(mode=0o700, exist_ok=True)
    (out / "secrets" / "dp").write_text(dp_secret + "\n", encoding="ascii")
    result = execute(prepared)
    row = {"dev_accuracy": result.records[-1]["dev_accuracy"], "seconds": round(time.perf_counter() - started, 1),
           "seed": job.federation.seed}
    if result.watermarks:
        row["worst_p"] = max(v["p_value"] for v in result.watermarks)
        row["triggers_matched"] = [v["matched_triggers"] for v in result.watermarks]
    say(f"{job.name}: {row}")
    return row


def dev_accuracy(model, tokenizer, splits) -> float:
    dev = encode(splits.dev.texts, tokenizer, 64, splits.dev.labels)
    return round(evaluate(model, dev, PadCollator(tokenizer.pad_token_id), 64)["accuracy"], 4)


def verdicts(model, tokenizer, keys, reference) -> list[dict]:
    rows = []
    for key in keys:
        v = verify(model, tokenizer, key, reference)
        rows.append({"bits": v.matched_bits, "bits_p": v.bits_p, "adapter_bits": v.adapter_bits,
                     "adapter_p": v.adapter_p, "aligned": v.aligned, "triggers": v.matched_triggers,
                     "triggers_p": v.triggers_p, "p": v.p_value, "owned": v.owned})
    return rows


def summary(rows: list[dict]) -> dict:
    return {"clients": rows, "worst_p": max(r["p"] for r in rows), "worst_bits_p": max(r["bits_p"] for r in rows),
            "owned": sum(r["owned"] for r in rows),
            "meets_target": all(r["p"] <= TARGET_OWNER_P for r in rows)}


def overwrite(model, tokenizer, job, splits, keys, steps: int) -> None:
    """The thief's own watermark, embedded as an owner embeds its: LoRA on the job's targets and the carrier's scales,
    SGD at the job's rate, on SST-2 batches of the job's size plus the hinges of one fresh key (one party: nothing
    averages its move), for as many local steps as each owner trained; then merged back into `model`."""
    from securefed.config import LoraConfig
    from securefed.models.adapters import attach
    from securefed.models.norms import last_block_norms
    from securefed.watermark.delta import DeltaWatermark
    from securefed.watermark.feature import FeatureWatermark, describe_carrier

    norms = last_block_norms(model, keys[0].carrier.blocks)
    lora = LoraConfig(method="lora", r=job.peft.r, alpha=job.peft.alpha, target_modules=job.peft.target_modules)
    thief = attach(model, lora, norms)
    carrier = describe_carrier("stolen", thief, keys[0].carrier.blocks, norms)
    key = WatermarkKey.generate("thief", carrier, bits=keys[0].bits, triggers=0)
    stolen = Reference.of(thief, carrier)  # the thief's bits are read against the model he stole
    terms = [FeatureWatermark(key, thief, stolen.scales, weight=1.0, margin=0.05, clients=1),
             DeltaWatermark(key, thief, weight=1.0, margin=0.05, clients=1)]
    train = encode(splits.train.texts, tokenizer, job.data.max_length, splits.train.labels)
    collator = PadCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.SGD([p for p in thief.parameters() if p.requires_grad], lr=job.federation.learning_rate)
    rng = np.random.default_rng(1)
    thief.train()
    for step in range(steps):
        if step % job.federation.local_steps == 0:
            for term in terms:
                term.begin_round()
        batch = collator.batch(train, rng.choice(len(train), job.federation.batch_size, replace=False))
        loss = thief(**batch).loss + sum(term() for term in terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    thief.eval()
    thief.merge_and_unload()
    say(f"overwrite: the thief's own key against the stolen model: {verify(model, tokenizer, key, stolen).as_dict()}")


def finetune_on_ag_news(model, tokenizer, learning_rate: float) -> float:
    """A thief's 1 epoch of full fine-tuning on AG News with a new head; returns its AG News test accuracy."""
    from securefed.config import DataConfig

    splits = load_splits(DataConfig(dataset="ag_news"))
    model.classifier = torch.nn.Linear(model.classifier.in_features, 4)
    model.config.num_labels = 4
    model.num_labels = 4
    for p in model.parameters():
        p.requires_grad_(True)
    train_set = encode(splits.train.texts, tokenizer, 64, splits.train.labels)
    collator = PadCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order = np.random.default_rng(0).permutation(len(train_set))
    model.train()
    for step, start in enumerate(range(0, len(order), 32)):
        loss = model(**collator.batch(train_set, order[start : start + 32])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            say(f"finetune at {learning_rate:g}: step {step}, loss {loss.item():.3f}")
    test = encode(splits.dev.texts[:2000], tokenizer, 64, splits.dev.labels[:2000])
    return round(evaluate(model, test, collator, 64)["accuracy"], 4)


def prune_half(model_dir: Path, carrier, base: np.ndarray):
    """50% magnitude pruning of each LoRA matrix and of the carrier's shift; returns the merged model."""
    model, tokenizer, _ = load_adapter(model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p[p.abs() <= p.abs().flatten().median()] = 0.0
        offset = 0
        for p in scale_parameters(model, carrier):
            n = p.numel()
            b = torch.from_numpy(base[offset : offset + n]).reshape(p.shape)
            shift = p - b
            p.copy_(torch.where(shift.abs() <= shift.abs().flatten().median(), b, p))
            offset += n
    return model.merge_and_unload(), tokenizer


def reference_model(key: WatermarkKey):
    """The base model the key names, as a plain classifier: what a thief copies carriers back from."""
    from securefed.models.registry import load_base, resolve

    return load_base(resolve(key.carrier.model), None)[0]


def int8_round_trip(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            scale = p.abs().max() / 127
            if scale > 0:
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)


def fresh_key_rates(model, tokenizer, carrier, reference, count: int, bits: int) -> dict:
    ps, prepared = [], readings(model, carrier, reference)  # alignment reads no key: one for all
    for i in range(count):
        key = WatermarkKey.generate(f"fresh {i}", carrier, bits=bits)
        ps.append(verify(model, tokenizer, key, reference, prepared=prepared).p_value)
        if i % 200 == 199:
            say(f"fresh keys: {i + 1}/{count}")
    ps = np.array(ps)
    return {"keys": count, "owned": int(np.sum(ps <= 1e-9)), "share_p_at_least_1e-3": float(np.mean(ps >= 1e-3)),
            "min_p": float(ps.min()), "meets_target": bool(np.mean(ps >= TARGET_NON_OWNER_P) >= 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", type=Path, default=ROOT / "examples" / "sst2-lora-private.toml")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--margin", type=float, default=None, help="the hinge's margin (default: the job's)")
    parser.add_argument("--triggers", type=int, default=0, help="trigger inputs per key (default 0: bits only, as "
                        "the private example)")
    parser.add_argument("--trigger-rate", type=float, default=None, help="default: the config's")
    parser.add_argument("--seeds", type=int, default=1, help="pairs of (watermarked, baseline) runs")
    parser.add_argument("--fresh-keys", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    job = load_job(args.job)
    job = job.model_copy(update={"federation": job.federation.model_copy(update={"clients": args.clients})})
    settings = {"bits": args.bits, "blocks": args.blocks, "triggers": args.triggers}
    for name in ("margin", "trigger_rate"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    watermark = WatermarkConfig.model_validate(settings)
    jobs, secrets = [], {}
    for i in range(args.seeds):
        seeded = job.model_copy(update={"federation": job.federation.model_copy(
            update={"seed": job.federation.seed + i})})
        secrets[i] = os.urandom(8).hex()
        jobs += [(i, seeded.model_copy(update={"name": f"watermarked-{i}", "watermark": watermark})),
                 (i, seeded.model_copy(update={"name": f"baseline-{i}", "watermark": None}))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        threads = max(1, (torch.get_num_threads()) // args.workers)
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {j.name: pool.submit(train, j, tmp / j.name, threads, secrets[i]) for i, j in jobs}
            trained = {name: f.result() for name, f in futures.items()}
        run_dir = tmp / "watermarked-0"
        keys = [WatermarkKey.load(p) for p in sorted((run_dir / "keys").iterdir(),
                                                      key=lambda p: int(p.stem.split("-")[1]))]
        reference = Reference.load(keys[0])
        base = reference.scales
        splits = load_splits(job.data)

        results: dict[str, dict] = {}
        model, tokenizer = load_merged(run_dir / "model")
        results["trained"] = {**summary(verdicts(model, tokenizer, keys, reference)),
                              "dev_accuracy": dev_accuracy(model, tokenizer, splits)}
        say(f"trained: worst p {results['trained']['worst_p']:.3g}")
        fpr_marked = fresh_key_rates(model, tokenizer, keys[0].carrier, reference, args.fresh_keys, args.bits)
        baseline_model, baseline_tokenizer = load_merged(tmp / "baseline-0" / "model")
        fpr_plain = fresh_key_rates(baseline_model, baseline_tokenizer, keys[0].carrier, reference, args.fresh_keys,
                                    args.bits)
        results["baseline_with_owner_keys"] = summary(verdicts(baseline_model, baseline_tokenizer, keys, reference))

        merge_adapter(run_dir / "model", tmp / "merged")
        merged, tokenizer = load_merged(tmp / "merged")
        results["merge"] = summary(verdicts(merged, tokenizer, keys, reference))
        say(f"merge: worst p {results['merge']['worst_p']:.3g}")

        model, tokenizer = prune_half(run_dir / "model", keys[0].carrier, base)
        results["prune"] = {**summary(verdicts(model, tokenizer, keys, reference)),
                            "dev_accuracy": dev_accuracy(model, tokenizer, splits)}
        say(f"prune: worst p {results['prune']['worst_p']:.3g}")

        model, tokenizer = load_merged(run_dir / "model")
        int8_round_trip(model)
        results["int8"] = {**summary(verdicts(model, tokenizer, keys, reference)),
                           "dev_accuracy": dev_accuracy(model, tokenizer, splits)}
        say(f"int8: worst p {results['int8']['worst_p']:.3g}")

        for name, moves in (("permute", ("permute",)), ("rescale", ("rescale",)), ("permute_rescale",
                            ("rescale", "permute")), ("reset_scales", ("reset_scales",)), ("reset_all", ("reset",))):
            model, tokenizer = load_merged(run_dir / "model")
            rng = np.random.default_rng(0)
            for move in moves:
                if move == "reset_scales":
                    attacks.reset(model, reference_model(keys[0]), replace(keys[0].carrier, weights=()))
                elif move == "reset":
                    attacks.reset(model, reference_model(keys[0]), keys[0].carrier)
                else:
                    getattr(attacks, move)(model, rng)
            results[name] = {**summary(verdicts(model, tokenizer, keys, reference)),
                             "dev_accuracy": dev_accuracy(model, tokenizer, splits)}
            say(f"{name}: worst p {results[name]['worst_p']:.3g}, accuracy {results[name]['dev_accuracy']}")

        for name, learning_rate in (("finetune", 5e-5), ("finetune_lr_5e-4", 5e-4)):
            model, tokenizer = load_merged(run_dir / "model")
            ag_news = finetune_on_ag_news(model, tokenizer, learning_rate)
            results[name] = {**summary(verdicts(model, tokenizer, keys, reference)), "ag_news_accuracy": ag_news}
            say(f"{name}: worst p {results[name]['worst_p']:.3g}")

        model, tokenizer = load_merged(run_dir / "model")
        overwrite(model, tokenizer, job, splits, keys, job.federation.rounds * job.federation.local_steps)
        results["overwrite"] = {**summary(verdicts(model, tokenizer, keys, reference)),
                                "dev_accuracy": dev_accuracy(model, tokenizer, splits)}
        say(f"overwrite: worst p {results['overwrite']['worst_p']:.3g}")

    costs = [100 * (trained[f"baseline-{i}"]["dev_accuracy"] - trained[f"watermarked-{i}"]["dev_accuracy"])
             for i in range(args.seeds)]
    cost = float(np.mean(costs))
    print(json.dumps({
        "job": {"clients": args.clients, "bits": args.bits, "blocks": args.blocks, "margin": watermark.margin,
                "triggers": args.triggers, "trigger_rate": watermark.trigger_rate,
                "privacy": job.privacy is not None, "secagg": job.secagg.mode},
        "training": trained,
        "accuracy_cost_points": {"pairs": [round(c, 2) for c in costs], "mean": round(cost, 2),
                                 "std_error": round(float(np.std(costs, ddof=1) / np.sqrt(len(costs))), 2)
                                 if len(costs) > 1 else None},
        "accuracy_target_met": cost <= 0.5,
        "owner": results,
        "fresh_keys": {"watermarked_model": fpr_marked, "baseline_model": fpr_plain},
        "targets": {"owner_p": TARGET_OWNER_P, "non_owner_p": TARGET_NON_OWNER_P, "accuracy_cost_points": 0.5},
    }, indent=2))


if __name__ == "__main__":
    main()
