"""Watermark strength, robustness, false positives and cost, against the same job without watermarks.

The default job is the private example's (MiniLM + LoRA, SST-2, Dirichlet α = 0.5, DP-SGD at ε = 8, SecAgg+) with
10 clients, each embedding 64 bits (and, with --triggers, a trigger set) with a key made into the run. The baseline,
run in the same invocation, is that job without [watermark]. A generation job (examples/dolly-smollm2-private.toml)
runs the same way and is scored by Rouge-L instead of accuracy.

Accuracy cost: each of --seeds pairs runs the watermarked job and the baseline with the same job seed and the
same DP secret, so both draw the same batches and the same noise; the pair's difference is then the watermark's
doing, not the noise's (unpaired, two runs of one job differed by 1.1 points). Then, on the first pair's
watermarked model:

  - every client's verdict after training, and after each attack by a third party holding the model:
      finetune  1 epoch of full fine-tuning on other data: AG News for a classifier (the shipped 10,000-example
                subset, a new 4-class head, batch 32), Alpaca for a causal LM (--finetune-examples of the shipped
                2,000, batch 8); AdamW at 5e-5, and at 5e-4, ten times BERT's usual rate
      prune     50% magnitude pruning of each LoRA matrix and of the carrier's shift from the base scales
      int8      every float tensor of the merged model rounded to int8 (per tensor, symmetric) and back
      merge     the adapter merged into the base, saved and loaded again
      refactor  every LoRA layer's B·A rewritten as (B·R)(R⁻¹·A), R random
      permute, rescale, permute_rescale, and for RMSNorm families rotate and rescale_rotate
                function-preserving reparameterizations (securefed/watermark/attacks.py), undone by alignment;
                the largest change of any logit on 8 dev inputs says the function was kept
      reset_scales, reset_all
                the norms' scales, then also the adapted weights, copied back from the base model; the score then
                says what the reset cost the thief, against the job's initial model (before any training)
      overwrite the thief embeds its own key with the job's task loss, for as many steps as each owner trained
  - the false-positive rate of 1,000 fresh keys on the watermarked model and on the baseline's.

    python benchmarks/watermark.py [JOB] [--clients 10] [--bits 64] [--blocks 2] [--triggers 0] [--trigger-rate R]
                                   [--seeds 1] [--fresh-keys 1000] [--workers 2] [--run DIR]
                                   [--finetune-examples 256]

--run DIR attacks a finished watermarked run (its model, keys and job.toml) instead of training: no baseline, so
no cost figure, and the fresh keys' second model is the job's initial one. JSON on stdout; progress on stderr.
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

from securefed.config import DataConfig, WatermarkConfig, load_job
from securefed.data import PadCollator, encode, load_splits
from securefed.models import build_model, evaluate
from securefed.models.saved import load_adapter, load_merged, merge_adapter
from securefed.runtime.local import execute, prepare
from securefed.seeding import stream_seed
from securefed.tasks import task_kind
from securefed.watermark import attacks
from securefed.watermark.feature import scale_parameters
from securefed.watermark.keys import WatermarkKey
from securefed.watermark.reference import Reference
from securefed.watermark.verify import readings, verify

ROOT = Path(__file__).resolve().parents[1]
TARGET_OWNER_P, TARGET_NON_OWNER_P = 1e-12, 1e-3
REPARAMETERIZATIONS = {"permute": ("permute",), "rescale": ("rescale",), "permute_rescale": ("rescale", "permute"),
                       "rotate": ("rotate",), "rescale_rotate": ("rescale", "rotate")}
ROTATABLE = ("llama", "mistral", "qwen2")


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
    headline = task_kind(job).headline
    row = {"score": result.records[-1][f"dev_{headline}"], "metric": headline,
           "seconds": round(time.perf_counter() - started, 1), "seed": job.federation.seed}
    if result.watermarks:
        row["worst_p"] = max(v["p_value"] for v in result.watermarks)
        row["triggers_matched"] = [v["matched_triggers"] for v in result.watermarks]
    say(f"{job.name}: {row}")
    return row


class Scorer:
    """The job's headline metric on its dev split (accuracy, or Rouge-L over greedy answers)."""

    def __init__(self, job, tokenizer):
        self.task = task_kind(job)
        self.splits = self.task.load_splits()
        self.dev = self.task.encode(self.splits.dev, tokenizer)
        self.tokenizer = tokenizer

    def __call__(self, model) -> float:
        started = time.perf_counter()
        value = self.task.evaluate(model, self.tokenizer, self.splits.dev, self.dev)[self.task.headline]
        say(f"  scored {self.task.headline} {value:.4f} in {time.perf_counter() - started:.0f} s")
        return round(value, 4)

    def logits(self, model) -> torch.Tensor:
        """The logits of the first 8 dev inputs: what a function-preserving move must keep."""
        batch = self.task.collator(self.tokenizer).batch(self.dev, np.arange(min(8, len(self.dev))))
        with torch.no_grad():
            return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def verdicts(model, tokenizer, keys, reference) -> list[dict]:
    prepared = readings(model, keys[0].carrier, reference)  # every key of the run shares the carrier
    rows = []
    for key in keys:
        v = verify(model, tokenizer, key, reference, prepared=prepared)
        rows.append({"bits": v.matched_bits, "bits_p": v.bits_p, "adapter_bits": v.adapter_bits,
                     "adapter_p": v.adapter_p, "aligned": v.aligned, "triggers": v.matched_triggers,
                     "triggers_p": v.triggers_p, "p": v.p_value, "owned": v.owned})
    return rows


def summary(rows: list[dict]) -> dict:
    return {"clients": rows, "worst_p": max(r["p"] for r in rows), "worst_bits_p": max(r["bits_p"] for r in rows),
            "owned": sum(r["owned"] for r in rows),
            "meets_target": all(r["p"] <= TARGET_OWNER_P for r in rows)}


def overwrite(model, scorer: Scorer, job, keys, steps: int) -> None:
    """The thief's own watermark, embedded as an owner embeds its: LoRA on the job's targets and the carrier's scales,
    the job's optimizer and rate, batches of the job's size with the task's loss plus the hinges of one fresh key
    (one party: nothing averages its move), for as many local steps as each owner trained; merged back into
    `model`."""
    from securefed.config import LoraConfig
    from securefed.models.adapters import attach
    from securefed.models.norms import last_block_norms
    from securefed.watermark.delta import DeltaWatermark
    from securefed.watermark.feature import FeatureWatermark, describe_carrier

    norms = last_block_norms(model, keys[0].carrier.blocks)
    lora = LoraConfig(method="lora", r=job.peft.r, alpha=job.peft.alpha, target_modules=job.peft.target_modules)
    thief = attach(model, lora, norms, scorer.task.name)
    carrier = describe_carrier("stolen", thief, keys[0].carrier.blocks, norms)
    key = WatermarkKey.generate("thief", carrier, bits=keys[0].bits, triggers=0)
    stolen = Reference.of(thief, carrier)  # the thief's bits are read against the model he stole
    terms = [FeatureWatermark(key, thief, stolen.scales, weight=1.0, margin=0.05, clients=1),
             DeltaWatermark(key, thief, weight=1.0, margin=0.05, clients=1)]
    train_set = scorer.task.encode(scorer.splits.train, scorer.tokenizer)
    collator = scorer.task.collator(scorer.tokenizer)
    trainable = [p for p in thief.parameters() if p.requires_grad]
    settings = job.federation
    optimizer = (torch.optim.SGD(trainable, lr=settings.learning_rate, momentum=settings.momentum)
                 if settings.optimizer == "sgd" else torch.optim.AdamW(trainable, lr=settings.learning_rate))
    rng = np.random.default_rng(1)
    thief.train()
    for step in range(steps):
        if step % settings.local_steps == 0:
            for term in terms:
                term.begin_round()
        batch = collator.batch(train_set, rng.choice(len(train_set), settings.batch_size, replace=False))
        loss = scorer.task.loss(thief, batch) + sum(term() for term in terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    thief.eval()
    thief.merge_and_unload()
    say(f"overwrite: the thief's own key against the stolen model: {verify(model, None, key, stolen).as_dict()}")


def finetune_elsewhere(model, scorer: Scorer, job, learning_rate: float, examples: int) -> dict:
    """A thief's 1 epoch of full fine-tuning on other data (AdamW): AG News with a new 4-class head for a classifier,
    returning its AG News test accuracy; `examples` Alpaca records for a causal LM, returning its dev Rouge-L."""
    tokenizer = scorer.tokenizer
    if scorer.task.name == "classification":
        splits = load_splits(DataConfig(dataset="ag_news"))
        model.classifier = torch.nn.Linear(model.classifier.in_features, 4)
        model.config.num_labels = model.num_labels = 4
        train_set, collator = encode(splits.train.texts, tokenizer, 64, splits.train.labels), \
            PadCollator(tokenizer.pad_token_id)
        loss_of, batch_size, order = (lambda batch: model(**batch).loss), 32, np.arange(len(splits.train.texts))
    else:
        elsewhere = task_kind(job.model_copy(update={"data": DataConfig(dataset="alpaca",
                                                                        max_length=job.data.max_length)}))
        train_set = elsewhere.encode(elsewhere.load_splits().train, tokenizer)
        collator = elsewhere.collator(tokenizer)
        loss_of, batch_size, order = (lambda batch: elsewhere.loss(model, batch)), 8, np.arange(min(examples,
                                                                                                   len(train_set)))
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order = np.random.default_rng(0).permutation(order)
    model.train()
    for step, start in enumerate(range(0, len(order), batch_size)):
        loss = loss_of(collator.batch(train_set, order[start : start + batch_size]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            say(f"finetune at {learning_rate:g}: step {step}, loss {loss.item():.3f}")
    model.eval()
    if scorer.task.name == "classification":
        test = encode(splits.dev.texts[:2000], tokenizer, 64, splits.dev.labels[:2000])
        return {"ag_news_accuracy": round(evaluate(model, test, collator, 64)["accuracy"], 4)}
    return {"score": scorer(model), "examples": len(order)}


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
    """The base model the key names, as a plain model: what a thief copies carriers back from."""
    from securefed.models.registry import load_base, resolve

    return load_base(resolve(key.carrier.model), None)[0]


def int8_round_trip(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            scale = p.abs().max() / 127
            if scale > 0:
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)


def initial_model(job, scorer: Scorer):
    """The job's model before any training: the base, with the head a classifier starts from."""
    return build_model(job.model, job.peft, scorer.splits.label_names, stream_seed(job.federation.seed, "init"),
                       kind=scorer.task.name).model


def fresh_key_rates(model, tokenizer, like: WatermarkKey, reference, count: int) -> dict:
    """p-values of `count` fresh keys made like the owners' (carrier, bits, triggers)."""
    ps, prepared = [], readings(model, like.carrier, reference)  # alignment reads no key: one for all
    for i in range(count):
        key = WatermarkKey.generate(f"fresh {i}", like.carrier, bits=like.bits, triggers=like.triggers,
                                    trigger_length=like.trigger_length)
        ps.append(verify(model, tokenizer, key, reference, prepared=prepared).p_value)
        if i % 200 == 199:
            say(f"fresh keys: {i + 1}/{count}")
    ps = np.array(ps)
    return {"keys": count, "owned": int(np.sum(ps <= 1e-9)), "share_p_at_least_1e-3": float(np.mean(ps >= 1e-3)),
            "min_p": float(ps.min()), "meets_target": bool(np.mean(ps >= TARGET_NON_OWNER_P) >= 0.99)}


def train_pairs(job, watermark: WatermarkConfig, seeds: int, workers: int, tmp: Path) -> dict:
    """Each seed's watermarked job and its baseline, with the same DP secret."""
    jobs, secrets = [], {}
    for i in range(seeds):
        seeded = job.model_copy(update={"federation": job.federation.model_copy(
            update={"seed": job.federation.seed + i})})
        secrets[i] = os.urandom(32).hex()
        jobs += [(i, seeded.model_copy(update={"name": f"watermarked-{i}", "watermark": watermark})),
                 (i, seeded.model_copy(update={"name": f"baseline-{i}", "watermark": None}))]
    threads = max(1, (torch.get_num_threads()) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {j.name: pool.submit(train, j, tmp / j.name, threads, secrets[i]) for i, j in jobs}
        return {name: f.result() for name, f in futures.items()}


def attack(run_dir: Path, job, keys, reference, scorer: Scorer, initial_model, args) -> dict:
    """Every attack on the run's model, each from a fresh copy; `initial_model` is the job's before training."""
    results: dict[str, dict] = {}

    def record(name: str, model, **extra) -> None:
        results[name] = {**summary(verdicts(model, scorer.tokenizer, keys, reference)), **extra}
        say(f"{name}: {results[name]['owned']}/{len(keys)} owned, worst p {results[name]['worst_p']:.3g}, {extra}")

    model, _ = load_merged(run_dir / "model")
    trained = scorer(model)
    before = scorer.logits(model)
    record("trained", model, score=trained)

    with tempfile.TemporaryDirectory() as tmp:
        merge_adapter(run_dir / "model", Path(tmp) / "merged")
        record("merge", load_merged(Path(tmp) / "merged")[0])

    model, _ = prune_half(run_dir / "model", keys[0].carrier, reference.scales)
    record("prune", model, score=scorer(model))

    model, _ = load_merged(run_dir / "model")
    int8_round_trip(model)
    record("int8", model, score=scorer(model))

    model, _, _ = load_adapter(run_dir / "model")
    attacks.refactor(model, np.random.default_rng(0))
    record("refactor", model.merge_and_unload())

    for name, moves in REPARAMETERIZATIONS.items():
        if "rotate" in moves and keys[0].carrier.model_type not in ROTATABLE:
            continue
        model, _ = load_merged(run_dir / "model")
        rng = np.random.default_rng(0)
        for move in moves:
            getattr(attacks, move)(model, rng)
        record(name, model, max_logit_change=float((scorer.logits(model) - before).abs().max()))

    initial, base = scorer(initial_model), reference_model(keys[0])
    for name, carrier in (("reset_scales", replace(keys[0].carrier, weights=())), ("reset_all", keys[0].carrier)):
        model, _ = load_merged(run_dir / "model")
        attacks.reset(model, base, carrier)
        score = scorer(model)
        gain = trained - initial
        record(name, model, score=score, initial_score=initial,
               share_of_gain_lost=round((trained - score) / gain, 3) if gain > 0 else None)

    for name, learning_rate in (("finetune", 5e-5), ("finetune_lr_5e-4", 5e-4)):
        model, _ = load_merged(run_dir / "model")
        outcome = finetune_elsewhere(model, scorer, job, learning_rate, args.finetune_examples)
        record(name, model, **outcome)

    model, _ = load_merged(run_dir / "model")
    overwrite(model, scorer, job, keys, job.federation.rounds * job.federation.local_steps)
    record("overwrite", model, score=scorer(model))
    return results


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
    parser.add_argument("--run", type=Path, default=None, help="attack this finished watermarked run instead")
    parser.add_argument("--finetune-examples", type=int, default=256, help="a causal LM's Alpaca records")
    parser.add_argument("--cost-only", action="store_true", help="train the pairs and report the cost; no attacks")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trained = None
        if args.run is not None:
            run_dir = args.run
            job = load_job(run_dir / "job.toml")
        else:
            job = load_job(args.job)
            job = job.model_copy(update={"federation": job.federation.model_copy(update={"clients": args.clients})})
            settings = {"bits": args.bits, "blocks": args.blocks, "triggers": args.triggers}
            for name in ("margin", "trigger_rate"):
                if getattr(args, name) is not None:
                    settings[name] = getattr(args, name)
            trained = train_pairs(job, WatermarkConfig.model_validate(settings), args.seeds, args.workers, tmp)
            run_dir = tmp / "watermarked-0"
            if args.cost_only:
                print(json.dumps({"job": job.name, "clients": job.federation.clients, **cost(trained, args.seeds)},
                                 indent=2))
                return
        keys = [WatermarkKey.load(p) for p in sorted((run_dir / "keys").iterdir(),
                                                      key=lambda p: int(p.stem.split("-")[1]))]
        reference = Reference.load(keys[0])
        model, tokenizer = load_merged(run_dir / "model")
        scorer = Scorer(job, tokenizer)
        fpr_marked = fresh_key_rates(model, tokenizer, keys[0], reference, args.fresh_keys)
        other = "baseline" if trained else "initial"
        initial = initial_model(job, scorer)
        other_model = load_merged(tmp / "baseline-0" / "model")[0] if trained else initial
        fpr_other = fresh_key_rates(other_model, tokenizer, keys[0], reference, args.fresh_keys)
        owners_on_other = summary(verdicts(other_model, tokenizer, keys, reference))
        results = attack(run_dir, job, keys, reference, scorer, initial, args)

    output = {"job": {"name": job.name, "clients": job.federation.clients, "bits": keys[0].bits,
                      "blocks": keys[0].carrier.blocks, "metric": scorer.task.headline,
                      "privacy": job.privacy is not None, "secagg": job.secagg.mode, "run": str(args.run or "")},
              "owner": results, f"{other}_with_owner_keys": owners_on_other,
              "fresh_keys": {"watermarked_model": fpr_marked, f"{other}_model": fpr_other},
              "targets": {"owner_p": TARGET_OWNER_P, "non_owner_p": TARGET_NON_OWNER_P, "cost_points": 0.5}}
    if trained:
        output.update(cost(trained, args.seeds))
    print(json.dumps(output, indent=2))


def cost(trained: dict, seeds: int) -> dict:
    """The watermark's cost in points of the headline metric, per pair and on average."""
    costs = [100 * (trained[f"baseline-{i}"]["score"] - trained[f"watermarked-{i}"]["score"]) for i in range(seeds)]
    mean = float(np.mean(costs))
    spread = round(float(np.std(costs, ddof=1) / np.sqrt(seeds)), 2) if seeds > 1 else None
    return {"training": trained,
            "cost_points": {"pairs": [round(c, 2) for c in costs], "mean": round(mean, 2), "std_error": spread},
            "cost_target_met": mean <= 0.5}


if __name__ == "__main__":
    main()
