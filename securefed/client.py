"""One client's work in a round: local training from the global weights, then its update into the secure sum."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .data import EncodedDataset, PadCollator
from .errors import ProtocolError, UpdateRefused
from .interfaces import LossTerm, Observer, SumClient, TrainingWrapper
from .models import Evaluation, FlatView
from .protocol import EvaluateIns, EvaluateRes, FinalIns, FinalRes, Message, TrainIns, TrainRes, encode
from .seeding import stream, stream_seed
from .sent import SentRounds
from .weighting import BY_EXAMPLES, Weighting

_LENGTH_GROUP = 50  # batches re-cut together when grouping by length
_STEP_TOKENS = 4096  # a step's batch padded past this runs as micro-batches of similar length


@dataclass(frozen=True)
class LocalTraining:
    steps: int
    batch_size: int
    learning_rate: float
    learning_rate_decay: float
    weight_decay: float
    seed: int
    group_by_length: bool = False
    optimizer: str = "adamw"
    momentum: float = 0.9

    def learning_rate_at(self, round: int) -> float:
        return self.learning_rate * self.learning_rate_decay ** (round - 1)


class Client:
    def __init__(
        self,
        cid: int,
        model: torch.nn.Module,
        view: FlatView,
        data: EncodedDataset,
        collator: PadCollator,
        training: LocalTraining,
        secure_sum: SumClient,
        loss_terms: Sequence[LossTerm] = (),
        observer: Observer | None = None,
        evaluate: Callable[[np.ndarray], Evaluation] | None = None,
        wrapper: TrainingWrapper | None = None,
        weighting: Weighting = BY_EXAMPLES,
        loss: Callable[[torch.nn.Module, dict], torch.Tensor] = lambda module, batch: module(**batch).loss,
        sent: SentRounds | None = None,
        keep: Callable[[np.ndarray], None] | None = None,
    ):
        self.cid = cid
        self.model = model
        self.view = view
        self.data = data
        self.collator = collator
        self.training = training
        self.secure_sum = secure_sum
        self.loss_terms = tuple(loss_terms)
        self.observer = observer or Observer()
        self.evaluate = evaluate
        self.wrapper = wrapper
        self.weighting = weighting
        self.loss = loss  # the task's: the mean of the batch's per-example losses
        self.sent = sent or SentRounds()  # the rounds this client sent an update for: never one twice
        self.keep = keep  # stores the final model, where only clients can open it

    @property
    def examples(self) -> int:
        return len(self.data)

    def handle(self, msg: Message) -> Message:
        if isinstance(msg, TrainIns):
            return self.train(msg)
        if isinstance(msg, EvaluateIns):
            return self.evaluate_global(msg)
        if isinstance(msg, FinalIns):
            return self.keep_final(msg)
        return self.secure_sum.reply(msg)

    def open(self, model: Message, spec: bytes, round: int) -> np.ndarray:
        """The global weights in a server's message, checked against this client's model."""
        self._check(spec, round)
        return self.secure_sum.open_model(model, self.view.size)

    def _check(self, spec: bytes, round: int) -> None:
        """A server's message names a real round and this client's model."""
        if round < 1:
            raise ProtocolError(f"the server names round {round}")
        if spec != self.view.spec.digest:
            raise ProtocolError("the server's model is for a different spec (model, PEFT method or settings differ)")

    def train(self, ins: TrainIns) -> TrainRes:
        """Train from the global weights; the update n_k·(θ_local − θ_global) (per-client entries unweighted) and
        n_k go into the secure sum."""
        started = time.perf_counter()
        start = self._start(ins)
        # before training: a round that would be refused costs nothing, not even privacy
        self.sent.check(ins.round)
        self.secure_sum.admit(ins.round, float(self.examples))
        metrics: dict[str, float] = {}
        vector = self.wrapper.replay(ins.round, start) if self.wrapper else None
        if vector is None:
            metrics["loss"] = float(np.mean(self._train_locally(ins.round, self._share(ins.examples))))
            vector = self._contribution()
            if not np.isfinite(vector).all():  # nothing is released, so nothing is spent
                raise UpdateRefused(f"round {ins.round}: the update holds NaN or inf (local training diverged, or "
                                    "the global model was not finite); nothing was sent")
            if self.wrapper:
                metrics.update(self.wrapper.commit(ins.round, start, vector))
        metrics["seconds"] = time.perf_counter() - started
        told = hashlib.sha256(encode(ins)).digest()  # what this client was told: hardened SecAgg+ signs it
        upload = self.secure_sum.upload(ins.round, vector, ins.bound, told)
        self.sent.claim(ins.round)  # durably, before the update leaves
        return TrainRes(round=ins.round, metrics=metrics, upload=upload)

    def _start(self, ins: TrainIns) -> bytes:
        """Put the round's starting weights in the model; their digest names them in a privacy release."""
        self._global = self.open(ins.model, ins.spec, ins.round)
        self.view.set(self._global)
        return hashlib.sha256(np.ascontiguousarray(self._global).tobytes()).digest()

    def _contribution(self) -> np.ndarray:
        """What goes into the secure sum after local training: FedAvg's [c ⊙ Δ_k, n_k]."""
        return self.weighting.contribution(self.view.get() - self._global, self.examples)

    def evaluate_global(self, ins: EvaluateIns) -> EvaluateRes:
        """Score the global model on the dev split, for a server that cannot read it. A client without a dev split
        (a deployed node) only opens it: the server learns that the sum opens, and no score."""
        weights = self.open(ins.model, ins.spec, ins.round)
        if self.evaluate is None:
            return EvaluateRes(round=ins.round, metrics={"examples": 0.0})
        result = self.evaluate(weights)
        return EvaluateRes(round=ins.round, metrics={**result.metrics, "examples": float(result.examples)})

    def keep_final(self, ins: FinalIns) -> FinalRes:
        """Open the final model and store it; the server gets its digest, to see that every client kept the same."""
        if self.keep is None:
            raise ProtocolError("this client keeps no final model")
        weights = self.open(ins.model, ins.spec, ins.round)
        self.keep(weights)
        return FinalRes(round=ins.round, digest=hashlib.sha256(np.ascontiguousarray(weights).tobytes()).digest())

    def _share(self, examples: float) -> float | None:
        """This client's share of the example-weighted mean, from the last round's Σ n_k (None: not known)."""
        if not (math.isfinite(examples) and examples >= 0):
            raise ProtocolError(f"the server's count of last round's examples is {examples!r}, not a count")
        return min(1.0, self.examples / examples) if examples > 0 else None

    def _train_locally(self, round: int, share: float | None = None) -> list[float]:
        cfg = self.training
        optimizer = self._optimizer(round)
        module, batches = self.model, self._batches(round)
        if self.wrapper:
            self.wrapper.admit(round)
            batches = self.wrapper.batches(round, self.examples, cfg.steps)
            module, optimizer = self.wrapper.wrap(self.model, optimizer, round)
        losses = []
        for term in self.loss_terms:
            term.begin_round(share)
        self.model.train()
        # Dropout draws from torch's global generator: seed it per (round, client), then restore it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(cfg.seed, "dropout", round, self.cid))
            for step, indices in enumerate(batches, start=1):
                if len(indices) == 0:
                    self.wrapper.empty_step(optimizer)
                    continue
                loss_sum = 0.0
                for part in self._micro_batches(indices):
                    batch = self.collator.batch(self.data, part)
                    loss = self.loss(module, batch)
                    scale = (self.wrapper.loss_scale(len(part), len(indices)) if self.wrapper
                             else len(part) / len(indices))
                    (loss * scale).backward()
                    loss_sum += loss.item() * len(part)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_sum / len(indices))
                self.observer.local_progress(self.cid, step, cfg.steps)
        return losses

    def _optimizer(self, round: int) -> torch.optim.Optimizer:
        """A fresh optimizer each round. Under DP noise, AdamW's first steps move every value by the full
        learning rate whatever its gradient's sign-to-noise; SGD moves it in proportion, so noise averages out."""
        cfg, lr = self.training, self.training.learning_rate_at(round)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.view.parameters, lr=lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.view.parameters, lr=lr, weight_decay=cfg.weight_decay)
        if self.loss_terms:
            # DP-SGD's optimizer steps this one after clipping and noising: the terms join the gradient there.
            optimizer.register_step_pre_hook(lambda *_: self._add_loss_terms())
        return optimizer

    def _add_loss_terms(self) -> None:
        """Add the gradient of the loss terms, which read no client example; so they cost no privacy, and
        clipping and noise do not dilute them."""
        frozen = [p for p in self.view.parameters if not p.requires_grad]  # the carrier: the terms' alone
        try:
            with torch.enable_grad(), self.wrapper.unrecorded() if self.wrapper else nullcontext():
                for p in frozen:
                    p.requires_grad_(True)
                total = sum(term() for term in self.loss_terms)
                grads = torch.autograd.grad(total, self.view.parameters, allow_unused=True)
        finally:
            for p in frozen:
                p.requires_grad_(False)
        for p, grad in zip(self.view.parameters, grads):
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad + grad

    def _micro_batches(self, indices: np.ndarray, tokens: int | None = None) -> list[np.ndarray]:
        """The batch as is if it pads to at most `tokens` (default: a training step's), else cut by length so that
        little compute goes on padding.

        DP-SGD's Poisson batches are large and mix lengths: padded together, SST-2 costs about 4x.
        """
        tokens = tokens or _STEP_TOKENS
        lengths = self.data.lengths[indices]
        if len(indices) * lengths.max() <= tokens:
            return [indices]
        order = np.argsort(lengths, kind="stable")
        parts, start = [], 0
        for end in range(1, len(order) + 1):
            # sorted ascending: the part's padded width is the length of its last example
            if end == len(order) or (end - start + 1) * lengths[order[end]] > tokens:
                parts.append(indices[order[start:end]])
                start = end
        return parts

    def _batches(self, round: int) -> np.ndarray:
        """`steps` batches of indices from shuffled passes over the client's data."""
        cfg = self.training
        rng = stream(cfg.seed, "batches", round, self.cid)
        size = min(cfg.batch_size, self.examples)
        passes = -(-cfg.steps * size // self.examples)
        order = np.concatenate([rng.permutation(self.examples) for _ in range(passes)])[: cfg.steps * size]
        if cfg.group_by_length:
            order = self._group_by_length(order, size, rng)
        return order.reshape(cfg.steps, size)

    def _group_by_length(self, order: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """Re-cut each run of batches so that a batch holds examples of similar length.

        The same examples are seen, with far less padding and so far less compute.
        """
        lengths = self.data.lengths[order]
        span = size * _LENGTH_GROUP
        runs = []
        for start in range(0, len(order), span):
            by_length = order[start : start + span][np.argsort(lengths[start : start + span], kind="stable")]
            batches = by_length.reshape(-1, size)
            runs.append(batches[rng.permutation(len(batches))])
        return np.concatenate(runs).reshape(-1)
