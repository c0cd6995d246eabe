"""The assembler: turns a JobConfig into a task, clients and a server, choosing each mechanism.

Adding a mechanism (a secure sum, a training wrapper, a loss term) means a new module and
a line here; client.py and server.py stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .algorithms import Algorithm, algorithm
from .client import Client, LocalTraining
from .config import JobConfig
from .data import EncodedDataset, Splits, partition
from .errors import ConfigError
from .interfaces import Grid, LossTerm, Observer, SumClient, TrainingWrapper
from .models import Evaluation, ModelBundle, build_model
from .models.saved import load_adapter, save_adapter
from .privacy.mechanisms import mechanism
from .rundir import RunDir
from .secagg import identity
from .seeding import stream_seed
from .sent import SentRounds
from .server import Schedule, Server
from .sums import SecureSum, secure_sum
from .tasks import TaskKind, task_kind
from .watermark import terms
from .watermark.feature import check_capacity, check_carrier, describe_carrier
from .watermark.keys import SUFFIX, Carrier, WatermarkKey
from .watermark.reference import Reference
from .watermark.verify import Verdict, verify
from .weighting import BY_EXAMPLES, Weighting


@dataclass
class Task:
    """What every party of an in-process job shares: the task kind, data splits, the one model, its tokenized
    data."""

    config: JobConfig
    kind: TaskKind
    splits: Splits
    bundle: ModelBundle
    train: EncodedDataset
    dev: EncodedDataset
    collator: object  # the task kind's, with batch(dataset, indices)
    secagg: SecureSum | None = None
    identity_keys: dict[int, Ed25519PrivateKey] = field(default_factory=dict)  # the clients this process hosts
    wrapper_shared: object | None = None  # what the privacy mechanism made for the model (DP-SGD: Opacus's module)
    carrier: Carrier | None = None  # the watermark's normalization scales, when the job has watermarks
    reference: Reference | None = None  # the carriers' values in the base model
    watermark_keys: list[WatermarkKey] = field(default_factory=list)  # the keys the job file names, if any
    weighting: Weighting = BY_EXAMPLES  # the carrier averages over clients, the rest over examples
    algorithm: Algorithm | None = None  # FedAvg or FedKSeed, holding what its parties in this process share

    def evaluate(self, weights: np.ndarray) -> Evaluation:
        self.bundle.view.set(weights)
        return self.kind.evaluate(self.bundle.model, self.bundle.tokenizer, self.splits.dev, self.dev)


def load_task(config: JobConfig, splits: Splits | None = None) -> Task:
    """Everything a party of the job needs; `splits` replaces the job's data (a deployed party holds only its own
    partition, or only the dev split)."""
    kind = task_kind(config)
    splits = splits or kind.load_splits()
    keys = [WatermarkKey.load(path) for path in config.watermark.keys or ()] if config.watermark else []
    blocks = keys[0].carrier.blocks if keys else config.watermark.blocks if config.watermark else 0
    bundle = build_model(config.model, config.peft, splits.label_names, stream_seed(config.federation.seed, "init"),
                         carrier_blocks=blocks, kind=kind.name)
    kind.check(bundle.tokenizer)
    # a generated answer extends its prompt: both must fit the model's positions
    answer = getattr(config.task, "max_new_tokens", 0)
    max_length = config.data.max_length + answer
    positions = bundle.max_positions - getattr(config.peft, "virtual_tokens", 0)
    if max_length > positions:
        setting = "data.max_length + task.max_new_tokens" if answer else "data.max_length"
        raise ConfigError(f"{setting} is {max_length} but {config.model.name} takes at most {positions} tokens "
                          "per example (its position limit, less any virtual tokens)")
    task = Task(config, kind, splits, bundle, kind.encode(splits.train, bundle.tokenizer),
                kind.encode(splits.dev, bundle.tokenizer), kind.collator(bundle.tokenizer))
    if config.watermark is not None:
        task.carrier = describe_carrier(config.model.name, bundle.model, blocks, bundle.carrier)
        task.reference = Reference.of(bundle.model, task.carrier)
        for path, key in zip(config.watermark.keys or (), keys):
            check_carrier(key, task.carrier, str(path))
        task.watermark_keys = keys
        bits = [key.bits for key in keys] or [config.watermark.bits] * config.federation.clients
        check_capacity(bits, task.carrier)
    if bundle.carrier:
        task.weighting = Weighting(bundle.carrier_mask)
    task.algorithm = algorithm(config, bundle.view.spec.digest, bundle.view.get())
    task.secagg = secure_sum(config, task.weighting)
    task.secagg.check_model(bundle.view.size)
    if (wrapper := mechanism(config)) is not None and len(task.train):  # a deployed server trains nothing
        was_training = bundle.model.training
        bundle.model.train()
        probe = task.collator.batch(task.train, np.arange(min(3, len(task.train))))
        task.wrapper_shared = wrapper.prepare(bundle.model, probe, kind.loss)
        bundle.model.train(was_training)
    return task


def identity_keys(config: JobConfig) -> dict[int, Ed25519PrivateKey]:
    """Every client's identity key, for a runtime that hosts every client (in process); none if the job signs
    nothing."""
    secagg = config.secagg
    if not getattr(secagg, "public_keys", None):
        return {}
    if secagg.identities is None:
        raise ConfigError("secagg.public_keys: an in-process run signs for every client; give secagg.identities, "
                          "the folder that holds each client-<i>.key")
    return {c: identity.load_private(secagg.identities, c, bytes.fromhex(public))
            for c, public in enumerate(secagg.public_keys)}


def client_datasets(task: Task) -> list[EncodedDataset]:
    fed = task.config.federation
    parts = partition(task.splits.train, fed.clients, task.config.partition, fed.seed)
    return [task.train.subset(indices) for indices in parts]


def schedule(config: JobConfig) -> Schedule:
    fed = config.federation
    return Schedule(rounds=fed.rounds, clients=fed.clients, cohort_size=fed.cohort_size, seed=fed.seed)


def training_wrapper(task: Task, cid: int, examples: int, run: RunDir | None) -> TrainingWrapper | None:
    """The job's privacy mechanism for client `cid`, if it has one; its ledger and secrets live in the run
    directory."""
    kind = mechanism(task.config)
    if kind is None:
        return None
    if run is None:
        raise ValueError("a private job's clients keep their ledgers and secrets in a run directory")
    plan = schedule(task.config)
    rounds = sum(cid in plan.cohort(r) for r in range(1, task.config.federation.rounds + 1))
    return kind.for_client(task.config, task.wrapper_shared, cid, examples, rounds, run)


def watermark_keys(task: Task, run: RunDir) -> list[WatermarkKey]:
    return [watermark_key(task, run, cid) for cid in range(task.config.federation.clients)]


def watermark_key(task: Task, run: RunDir, cid: int, path: Path | None = None) -> WatermarkKey:
    """Client `cid`'s key: the file given (a deployed client's own), the one the job file names, else the run's
    keys/client-<cid>.wmkey, made on first use."""
    config = task.config
    if path is None and task.watermark_keys:
        return task.watermark_keys[cid]
    path = path or run.keys_dir / f"client-{cid}{SUFFIX}"
    if not path.exists() and path.parent == run.keys_dir:
        key = WatermarkKey.generate(f"client {cid} of {config.name}", task.carrier, bits=config.watermark.bits,
                                    triggers=config.watermark.triggers)
        key.save(path)
        return key
    key = WatermarkKey.load(path)
    check_carrier(key, task.carrier, str(path))
    return key


def watermark_terms(task: Task, key: WatermarkKey) -> list[LossTerm]:
    """The loss terms that write a client's watermark (watermark/terms.py): the hinge on its bits, and its
    trigger set if any."""
    classes = len(task.splits.label_names) if task.kind.name == "classification" else None
    return terms.watermark_terms(key, terms.Embedding(
        task.bundle.model, task.bundle.tokenizer, task.config.watermark, task.reference,
        clients=task.config.federation.cohort_size, classes=classes, max_length=task.config.data.max_length,
        batch=lambda data: task.collator.batch(data, range(len(data))), loss=task.kind.loss))


def verify_key(task: Task, weights: np.ndarray, key: WatermarkKey) -> Verdict:
    task.bundle.view.set(weights)
    return verify(task.bundle.model, task.bundle.tokenizer, key, task.reference)


def make_client(task: Task, cid: int, data: EncodedDataset, observer: Observer | None = None,
                run: RunDir | None = None, key: WatermarkKey | None = None,
                sum_client: SumClient | None = None, keep: Callable[[np.ndarray], None] | None = None) -> Client:
    """Client `cid`; its secure-sum state machine is `sum_client` (a node's, restored from its state) or new;
    `keep` stores a final model only clients can open (a node's)."""
    fed = task.config.federation
    loss_terms = watermark_terms(task, key) if key is not None else []
    training = LocalTraining(steps=fed.local_steps, batch_size=fed.batch_size, learning_rate=fed.learning_rate,
                             learning_rate_decay=fed.learning_rate_decay, weight_decay=fed.weight_decay,
                             seed=fed.seed, group_by_length=fed.group_by_length, optimizer=fed.optimizer,
                             momentum=fed.momentum)
    sum_client = sum_client or task.secagg.client(cid, task.identity_keys.get(cid))
    return task.algorithm.client(
        cid, task.bundle.model, task.bundle.view, data, task.collator, training, sum_client, loss_terms,
        observer=observer, evaluate=task.evaluate if len(task.dev) else None,  # a node holds no dev split
        wrapper=training_wrapper(task, cid, len(data), run), weighting=task.weighting, loss=task.kind.loss,
        sent=SentRounds(run.sent_rounds_file(cid) if run is not None else None), keep=keep,
        example_losses=task.kind.example_losses, run=run)


def make_server(task: Task, grid: Grid, run: RunDir, observer: Observer | None = None) -> Server:
    view = task.bundle.view
    return task.algorithm.server(schedule(task.config), view.spec.digest, view.size, task.secagg.server(), grid, run,
                                 task.evaluate, observer, task.weighting, metrics=task.kind.metrics)


def save_model(task: Task, weights: np.ndarray, directory: Path) -> None:
    task.bundle.view.set(weights)
    save_adapter(task.bundle.model, task.bundle.tokenizer, directory, model_name=task.config.model.name,
                 base_path=task.bundle.base_path, labels=task.splits.label_names, spec=task.bundle.view.spec.digest,
                 kind=task.kind.name)


def evaluate_saved(run: RunDir, config: JobConfig) -> Evaluation:
    """Dev metrics of the run's saved model, loaded the way a user would: base + PeftModel.from_pretrained."""
    kind = task_kind(config)
    splits = kind.load_splits()
    model, tokenizer, _ = load_adapter(run.model_dir)
    return kind.evaluate(model, tokenizer, splits.dev, kind.encode(splits.dev, tokenizer))


def answer_saved(run: RunDir, config: JobConfig, instructions: list[str], contexts: list[str],
                 max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of a generation run's saved model (its adapter on its base) to instructions, in the job's
    prompt template."""
    from .data.instructions import Instructions
    from .models.generation import greedy_answers

    kind = task_kind(config)
    if kind.name != "generation":
        raise ConfigError(f"{run.path} is a {kind.name} run; only a generation run answers prompts")
    model, tokenizer, _ = load_adapter(run.model_dir)
    new_tokens = max_new_tokens or config.task.max_new_tokens
    positions = getattr(model.config, "max_position_embeddings", None) or 2**31
    if config.data.max_length + new_tokens > positions:
        raise ConfigError(f"{config.data.max_length} prompt tokens (data.max_length) and {new_tokens} new ones exceed "
                          f"the {positions} positions of {config.model.name}")
    split = Instructions(instructions, contexts, [""] * len(instructions), {}, run.path)
    prompts = kind.template.prompt_ids(tokenizer, split, config.data.max_length)
    answers = greedy_answers(model, prompts, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             max_new_tokens=new_tokens, batch_size=8)
    return tokenizer.batch_decode(answers, skip_special_tokens=True)
