"""The job TOML, as pydantic models.

Every section and field is validated; anything unknown is an error, so a setting for
a feature this version lacks fails loudly instead of being ignored. Relative paths are
resolved against the TOML file's folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .secagg import identity

BUILTIN_DATASETS = ("sst2", "ag_news", "dolly", "alpaca")
GENERATION_DATASETS = ("dolly", "alpaca")


# TOML gives strings for paths; everything else must already have its type ("5" is not a round count).
FilePath = Annotated[Path, Field(strict=False)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = Field("minilm", min_length=1,
                      description="a registered model name, or a path to a local Hugging Face directory")
    dropout: float | None = Field(None, ge=0, lt=1, description="the rate of every dropout layer in the base "
                                  "model while training (default: the model's own)")


class LoraConfig(Section):
    method: Literal["lora"]
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None


class IA3Config(Section):
    method: Literal["ia3"]
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None


class PromptTuningConfig(Section):
    method: Literal["prompt"]
    virtual_tokens: int = Field(20, ge=1, le=512)


class PrefixTuningConfig(Section):
    method: Literal["prefix"]
    virtual_tokens: int = Field(20, ge=1, le=512)


PeftConfig = Annotated[
    LoraConfig | IA3Config | PromptTuningConfig | PrefixTuningConfig, Field(discriminator="method")
]


class ClassificationTask(Section):
    """A label per text: a sequence-classification head, cross-entropy, accuracy."""

    kind: Literal["classification"]


class GenerationTask(Section):
    """Instruction tuning of a causal LM: loss on the response tokens, greedy answers scored with Rouge-L."""

    kind: Literal["generation"]
    template: str = Field("chat", min_length=1, description='"chat": the tokenizer\'s chat template; "plain": an '
                          "Alpaca-style prompt; or your own, with {instruction} and optionally {context}")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="the longest answer generated in evaluation")


TaskConfig = Annotated[ClassificationTask | GenerationTask, Field(discriminator="kind")]


class DataConfig(Section):
    dataset: Literal["sst2", "ag_news", "dolly", "alpaca"] | None = None
    train: FilePath | None = None
    dev: FilePath | None = None
    format: Literal["csv", "tsv", "jsonl", "json"] | None = None
    header: bool = True
    columns: list[str] | None = None
    text_field: str = "text"
    label_field: str = "label"
    instruction_field: str = Field("instruction", description="generation: the field holding the instruction")
    context_field: str | None = Field("context", description="generation: the field holding the context, if any")
    response_field: str = Field("response", description="generation: the field holding the reference response")
    max_length: int = Field(128, ge=8, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        files = self.train is not None or self.dev is not None
        if self.dataset is not None and files:
            raise ValueError("give either dataset or train/dev files, not both")
        if self.dataset is None and (self.train is None or self.dev is None):
            raise ValueError(f"give dataset (one of {', '.join(BUILTIN_DATASETS)}) or both train and dev files")
        if self.columns is not None and self.header:
            raise ValueError("columns names the fields of a file without a header: set header = false")
        return self


class IidPartition(Section):
    method: Literal["iid"]


class DirichletPartition(Section):
    method: Literal["dirichlet"]
    alpha: float = Field(gt=0, le=1e6)
    min_examples: int = Field(8, ge=1, description="every client gets at least this many examples")
    field: str | None = Field(None, description="skew the values of this field (default: the label)")


class ByFieldPartition(Section):
    method: Literal["by_field"]
    field: str


PartitionConfig = Annotated[IidPartition | DirichletPartition | ByFieldPartition, Field(discriminator="method")]


class FederationConfig(Section):
    rounds: int = Field(ge=1, le=100_000)
    clients: int = Field(ge=1, le=100_000)
    clients_per_round: int | None = Field(None, ge=1, description="default: every client, every round")
    local_steps: int = Field(ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    group_by_length: bool = Field(False, description="batch examples of similar length together: less padding")
    learning_rate: float = Field(gt=0, le=10)
    learning_rate_decay: float = Field(1.0, gt=0, le=1, description="round r trains at learning_rate·decay^(r-1)")
    weight_decay: float = Field(0.0, ge=0, le=1)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="each client's local optimizer; a fresh "
                                               "one every round. SGD (with momentum) suits DP-SGD better")
    momentum: float = Field(0.9, ge=0, lt=1, description="for sgd")
    seed: int = Field(0, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _cohort_fits(self) -> FederationConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})")
        return self

    @property
    def cohort_size(self) -> int:
        return self.clients_per_round or self.clients

    def learning_rate_at(self, round: int) -> float:
        return self.learning_rate * self.learning_rate_decay ** (round - 1)


HexKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SignedSumConfig(Section):
    """A secure sum whose clients may sign with Ed25519 identities. A job names the folder `securefed secagg
    identities` wrote; its public keys are read into `public_keys`, which is what a deployed job carries (each
    private key stays with its client)."""

    identities: FilePath | None = Field(None, description="folder of client-<i>.pub (and, for an in-process run, "
                                        "every client-<i>.key) Ed25519 identities")
    public_keys: list[HexKey] | None = Field(None, description="every client's Ed25519 public key (hex), in client "
                                             "order; filled in from `identities` when that is given")

    @property
    def signed(self) -> bool:
        return _signed(self.__dict__)

    def check_identities(self, fed: FederationConfig) -> None:
        if self.public_keys is None:
            return
        if len(self.public_keys) != fed.clients:
            raise ValueError(f"secagg.public_keys: {len(self.public_keys)} keys for {fed.clients} clients")
        if len(set(self.public_keys)) != len(self.public_keys):  # one party holding two client ids
            raise ValueError("secagg.public_keys: a key is listed for two clients")


def _signed(data: dict) -> bool:
    return data.get("identities") is not None or data.get("public_keys") is not None


class SecAggPlusConfig(SignedSumConfig):
    """Pairwise masking over a k-regular neighbour graph, with dropout recovery from t-of-k Shamir shares."""

    mode: Literal["secaggplus"]
    neighbours: int | None = Field(None, ge=1, description="k; default: complete for small jobs, else ~3·log2 n")
    threshold: int | None = Field(None, ge=2, description="t of the k+1 holders; default (k+1)//2 + 1")
    clip: float = Field(65536.0, gt=0, le=2.0**30, description="bound on each entry of n_k·Δ and on n_k")
    hardened: bool = Field(False, description="signed key adverts and a consistency check against a lying server; "
                           "the default whenever the job has identities")

    @model_validator(mode="before")
    @classmethod
    def _hardened_when_signed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hardened" not in data:
            return {**data, "hardened": _signed(data)}
        return data

    @model_validator(mode="after")
    def _identities_for_hardened(self) -> SecAggPlusConfig:
        signed = self.signed
        if self.hardened and not signed:
            raise ValueError("hardened mode needs identities, a folder made by `securefed secagg identities`")
        if signed and not self.hardened:
            raise ValueError("identities sign hardened SecAgg+ only: leave out hardened = false")
        return self

    def degree(self, clients: int) -> int:
        return self.neighbours or default_degree(clients)

    def quorum(self, clients: int) -> int:
        return self.threshold or default_threshold(self.degree(clients), self.hardened)

    def check_federation(self, fed: FederationConfig) -> None:
        _at_least_two(fed)
        self.check_identities(fed)
        if fed.cohort_size != fed.clients:
            raise ValueError("secagg: secaggplus needs every client in every round (clients_per_round = "
                             "clients); sampled cohorts need a graph per cohort, which is not built yet")
        k, t = self.degree(fed.clients), self.quorum(fed.clients)
        if k > fed.clients - 1:
            raise ValueError(f"secagg.neighbours: {k} exceeds the other clients ({fed.clients - 1})")
        if k < fed.clients - 1 and k % 2:
            raise ValueError(f"secagg.neighbours: {k} must be even (a ring graph), or {fed.clients - 1} for "
                             "the complete graph")
        low = default_threshold(k, self.hardened)
        if not low <= t <= k + 1:
            need = "more than 2k/3" if self.hardened else "a majority of the k+1 share holders"
            raise ValueError(f"secagg.threshold: {t} must be {need} and at most k+1 (k = {k}): "
                             f"between {low} and {k + 1}")


class CkksConfig(SignedSumConfig):
    """TenSEAL CKKS: the server adds ciphertexts and never sees a model in clear; clients evaluate. With
    identities the key exchange is signed."""

    mode: Literal["ckks"]

    def check_federation(self, fed: FederationConfig) -> None:
        _at_least_two(fed)
        self.check_identities(fed)
        if fed.clients > 1500:
            raise ValueError("secagg: ckks sends the secret key to every client in one message, which holds at most "
                             "1,500 clients")


class PlainSumConfig(Section):
    """No secure aggregation: the server sees every update. Only with insecure = true."""

    mode: Literal["none"]
    insecure: bool = False

    @model_validator(mode="after")
    def _confirmed(self) -> PlainSumConfig:
        if not self.insecure:
            raise ValueError('mode = "none" shows every client\'s update to the server: '
                             "set insecure = true to confirm")
        return self

    def check_federation(self, fed: FederationConfig) -> None:
        pass


def _at_least_two(fed: FederationConfig) -> None:
    if fed.clients < 2:
        raise ValueError("secagg: secure aggregation needs at least 2 clients")


SecAggConfig = Annotated[SecAggPlusConfig | CkksConfig | PlainSumConfig, Field(discriminator="mode")]


class PrivacyConfig(Section):
    """Differential privacy on every client: (ε, δ) per client over the whole job, examples within the client's
    data."""

    mechanism: Literal["dp-sgd", "dp-zo"] = Field("dp-sgd", description="what makes each client's update "
                                                  "private (securefed/privacy/mechanisms.py): dp-sgd for FedAvg, "
                                                  "dp-zo for FedKSeed (the default there)")
    epsilon: float = Field(gt=0, le=1000, description="each client's budget for the whole job")
    delta: float = Field(1e-5, gt=0, lt=0.1)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="per-example clipping bound (dp-zo: on each "
                                 "example's two-point scalar)")


class FedAvgConfig(Section):
    """FedAvg on the PEFT adapter: the model goes down, each client's update goes up through the secure sum."""

    name: Literal["fedavg"]

    @property
    def name_shown(self) -> str:
        return "FedAvg"


class FedKSeedConfig(Section):
    """FedKSeed (Qin et al. 2024): zeroth-order steps along perturbations drawn from K shared seeds; each client
    uploads one accumulated scalar per seed and everyone replays the sum on a replica of the whole model. Its
    SecAgg+ clip defaults to 2^24: an entry is n_k times a seed's summed scalars, far larger than FedAvg's."""

    name: Literal["fedkseed"]
    seeds: int = Field(4096, description="K, the seed pool shared by every party")
    perturbation: float = Field(1e-3, description="ε of the two-point estimate (L(w+εz) − L(w−εz)) / 2ε")
    pro: bool = Field(False, description="FedKSeed-Pro: sample seeds by the magnitude of their past aggregated "
                      "scalars, not uniformly")
    max_scalar: float = Field(100.0, gt=0, le=1e9, description="S: each step's scalar is clipped to ±S, and the "
                              "server refuses a round's sum that clipped steps could not give")
    max_replica_bytes: int = Field(2 * 2**30, ge=1, description="refuse a model whose float32 replica is larger")

    @property
    def name_shown(self) -> str:
        return "FedKSeed-Pro" if self.pro else "FedKSeed"

    @field_validator("seeds")
    @classmethod
    def _pool(cls, seeds: int) -> int:
        if not 1 <= seeds <= MAX_SEEDS:
            raise ValueError(f"{seeds} is outside the seed pool's 1..{MAX_SEEDS:,} (the K-vector travels whole in "
                             "every round)")
        return seeds

    @field_validator("perturbation")
    @classmethod
    def _small_step(cls, epsilon: float) -> float:
        if not epsilon > 0:
            raise ValueError(f"ε must be positive, not {epsilon!r}")
        if epsilon > 1:
            raise ValueError(f"ε = {epsilon!r} is no longer a small step (at most 1)")
        return epsilon


MAX_SEEDS = 1 << 20
FEDKSEED_CLIP = 2.0**24  # SecAgg+'s default bound on an entry for FedKSeed: n_k times a seed's summed scalars
AlgorithmConfig = Annotated[FedAvgConfig | FedKSeedConfig, Field(discriminator="name")]


class WatermarkConfig(Section):
    """Every client embeds its own watermark: FedIPR bits in the normalization scales of the last blocks, and a
    trigger set. Keys stay apart from the model."""

    keys: list[FilePath] | None = Field(None, description="one key file per client, in client order (made by "
                                        "`securefed watermark keygen`); default: keys made into the run's keys/")
    blocks: int | None = Field(None, ge=1, le=10_000, description="made keys: the carrier is the normalization "
                               "scales of this many last blocks (default 2)")
    bits: int | None = Field(None, ge=16, le=65_536, description="made keys: bits per client (default 64)")
    triggers: int | None = Field(None, ge=0, le=100_000, description="made keys: trigger inputs per client "
                                 "(default 32; 0: none)")
    trigger_rate: float = Field(0.05, ge=0, lt=0.5, description="r: each client's trigger loss weighs "
                                "K·r/(1 − r) against the task's mean loss, K the clients averaged per round")
    weight: float = Field(1.0, gt=0, le=1e4, description="α, the weight of the bits' hinge loss")
    margin: float = Field(0.05, gt=0, le=100, description="m: the hinge pushes each projection this far past zero")

    @model_validator(mode="before")
    @classmethod
    def _keys_or_settings(cls, data: Any) -> Any:
        """Key files carry their own carrier, bits and triggers; only made keys take them from here."""
        if not isinstance(data, dict):
            return data
        if data.get("keys") is None:
            return {"blocks": 2, "bits": 64, "triggers": 32, **data}
        fixed = sorted({"blocks", "bits", "triggers"} & set(data))
        if fixed:
            raise ValueError(f"{fixed[0]} is a property of the key files: leave it out when keys are given")
        return data


class OutputConfig(Section):
    dir: FilePath | None = Field(None, description="default: runs/<name> in the current directory")


class JobConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    task: TaskConfig = ClassificationTask(kind="classification")
    model: ModelConfig = ModelConfig()
    peft: PeftConfig | None = LoraConfig(method="lora")  # None: full-parameter (FedKSeed)
    algorithm: AlgorithmConfig = FedAvgConfig(name="fedavg")
    data: DataConfig
    partition: PartitionConfig = IidPartition(method="iid")
    federation: FederationConfig
    secagg: SecAggConfig = SecAggPlusConfig(mode="secaggplus")
    privacy: PrivacyConfig | None = None
    watermark: WatermarkConfig | None = None
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data: Any) -> Any:
        """FedKSeed tunes every parameter (no [peft]) and is private by DP-ZO."""
        if not isinstance(data, dict) or not isinstance(data.get("algorithm"), dict) \
                or data["algorithm"].get("name") != "fedkseed":
            return data
        if data.get("peft") is not None:
            raise ValueError("peft: fedkseed tunes every parameter of the model; leave out the [peft] section")
        changed = {"peft": None}
        privacy = data.get("privacy")
        if isinstance(privacy, dict) and "mechanism" not in privacy:
            changed["privacy"] = {**privacy, "mechanism": "dp-zo"}
        secagg = data.get("secagg", {"mode": "secaggplus"})
        if isinstance(secagg, dict) and secagg.get("mode") == "secaggplus" and "clip" not in secagg:
            changed["secagg"] = {**secagg, "clip": FEDKSEED_CLIP}
        return {**data, **changed}

    @model_validator(mode="after")
    def _secagg_fits(self) -> JobConfig:
        fed = self.federation
        dataset = self.data.dataset
        kind = "generation" if dataset in GENERATION_DATASETS else "classification"
        self._algorithm_fits()
        if self.task.kind == "generation" and self.peft is not None and self.peft.method in ("prompt", "prefix"):
            raise ValueError(f"peft.method: {self.peft.method} tuning cannot generate through peft 0.21 (its generate "
                             "refuses the inputs); use lora or ia3 for generation")
        if dataset is not None and kind != self.task.kind:
            raise ValueError(f'data.dataset: {dataset} is a {kind} dataset, and this job\'s task is {self.task.kind} '
                             f'(set [task] kind = "{kind}")')
        if self.privacy is not None and fed.group_by_length:
            raise ValueError("federation.group_by_length: DP-SGD samples each batch at random (Poisson sampling), "
                             "which grouping by length would undo; set it to false")
        if self.watermark is not None and self.watermark.keys is not None \
                and len(self.watermark.keys) != fed.clients:
            raise ValueError(f"watermark.keys: {len(self.watermark.keys)} key files for {fed.clients} clients; "
                             "name one per client")
        self.secagg.check_federation(fed)
        return self

    def _algorithm_fits(self) -> None:
        zeroth_order = self.algorithm.name == "fedkseed"
        if self.peft is None and not zeroth_order:
            raise ValueError("peft: fedavg trains a PEFT adapter; give a [peft] section")
        if self.privacy is not None and (self.privacy.mechanism == "dp-zo") != zeroth_order:
            want = "dp-zo" if zeroth_order else "dp-sgd"
            raise ValueError(f"privacy.mechanism: {self.privacy.mechanism} does not fit the {self.algorithm.name} "
                             f"algorithm; use {want}")
        fed = self.federation
        unused = [name for name, default in (("optimizer", "adamw"), ("momentum", 0.9), ("weight_decay", 0.0),
                                             ("group_by_length", False)) if getattr(fed, name) != default]
        if zeroth_order and unused:
            raise ValueError(f"federation.{unused[0]}: fedkseed takes plain zeroth-order steps (no optimizer, "
                             "decay or batching by length); leave it out")
        if zeroth_order and self.watermark is not None:
            raise ValueError("watermark: fedkseed cannot write a watermark yet (its update is one scalar per seed)")
        if zeroth_order and self.secagg.mode == "ckks":
            raise ValueError("secagg: fedkseed runs through secaggplus (or none); a CKKS ciphertext of the K-vector "
                             "alone is about 130 KB, past FedKSeed's point")

    @property
    def secagg_degree(self) -> int:
        return self.secagg.degree(self.federation.clients)

    @property
    def secagg_threshold(self) -> int:
        return self.secagg.quorum(self.federation.clients)

    def to_toml(self) -> str:
        """The resolved job: every default filled in, every path absolute."""
        return dump_toml(self.model_dump(mode="json", exclude_none=True))

    @property
    def job_id(self) -> bytes:
        """The fingerprint as 32 bytes: what keys, ciphertexts and ledgers are bound to."""
        return bytes.fromhex(self.fingerprint())

    def fingerprint(self) -> str:
        """A hash of everything that determines the run's result: all but the output location. Settings added
        since jobs were first run count only when they differ from their defaults, so an older job keeps its
        fingerprint, and its run directory its ledgers (chained from it) and its resume."""
        content = self.model_dump(mode="json", exclude={"output"})
        if content["secagg"].get("public_keys") is not None:  # the keys count, not where their files lie
            content["secagg"].pop("identities", None)
        for path, default in _LATER_SETTINGS:
            *sections, name = path
            holder = content
            for section in sections:
                holder = holder.get(section) or {}  # an absent section: None
            if holder.get(name, default) == default:
                holder.pop(name, None)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


_LATER_SETTINGS: list[tuple[tuple[str, ...], Any]] = [
    (("task",), {"kind": "classification"}),
    (("data", "instruction_field"), "instruction"),
    (("data", "context_field"), "context"),
    (("data", "response_field"), "response"),
    (("partition", "field"), None),
    (("privacy", "mechanism"), "dp-sgd"),
    (("secagg", "public_keys"), None),
    (("algorithm",), {"name": "fedavg"}),
]


def default_degree(clients: int) -> int:
    """SecAgg+'s k: the complete graph up to about 25 clients, else an even k of about 6·log2(n) (Bell et al.:
    O(log n)), wide enough that 30% dropouts leave a majority of survivors in every neighbourhood."""
    return min(clients - 1, 2 * math.ceil(3 * math.log2(max(clients, 2))))


def default_threshold(degree: int, hardened: bool = False) -> int:
    """SecAgg+'s t, also its least allowed value: a strict majority of the k+1 share holders, so no two disjoint
    sets of holders both reach t; in hardened mode more than 2k/3 (Bell et al.), against a lying server."""
    majority = (degree + 1) // 2 + 1
    return max(majority, 2 * degree // 3 + 1) if hardened else majority


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a job TOML; raise ConfigError naming the file and the field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_job(raw, source=str(path), base_dir=path.resolve().parent)


def parse_job(raw: dict[str, Any], *, source: str, base_dir: Path) -> JobConfig:
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    return _resolve_paths(job, base_dir, source)


def _resolve_paths(job: JobConfig, base_dir: Path, source: str) -> JobConfig:
    def absolute(p: Path | None, setting: str) -> Path | None:
        try:
            return None if p is None else (base_dir / p.expanduser()).resolve()
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f"{source}: {setting}: not a usable path ({exc})") from None

    data = job.data.model_copy(update={"train": absolute(job.data.train, "data.train"),
                                       "dev": absolute(job.data.dev, "data.dev")})
    output = job.output.model_copy(update={"dir": absolute(job.output.dir, "output.dir")})
    secagg = job.secagg
    if getattr(secagg, "identities", None) is not None:
        folder = absolute(secagg.identities, "secagg.identities")
        publics = [key.hex() for key in identity.load_publics(folder, job.federation.clients)]
        if secagg.public_keys not in (None, publics):
            raise ConfigError(f"{source}: secagg.public_keys: not the public keys in {folder}")
        secagg = secagg.model_copy(update={"identities": folder, "public_keys": publics})
        try:  # the keys read from the folder, checked as the keys a job lists are
            secagg.check_identities(job.federation)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc} (read from {folder})") from None
    watermark = job.watermark
    if watermark is not None and watermark.keys is not None:
        keys = [absolute(k, f"watermark.keys[{i}]") for i, k in enumerate(watermark.keys)]
        watermark = watermark.model_copy(update={"keys": keys})
    model = job.model
    if _is_path(model.name):
        model = model.model_copy(update={"name": str(absolute(Path(model.name), "model.name"))})
    return job.model_copy(update={"data": data, "output": output, "model": model, "secagg": secagg,
                                  "watermark": watermark})


def _is_path(name: str) -> bool:
    """Registered model names are bare words; anything with a path separator or a leading . or ~ is a folder."""
    return "/" in name or "\\" in name or name.startswith((".", "~"))


_TAGS = {"lora", "ia3", "prompt", "prefix", "iid", "dirichlet", "by_field", "secaggplus", "ckks", "none",
         "classification", "generation", "fedavg", "fedkseed"}


def _describe(exc: ValidationError) -> str:
    """One line: the first problem with its dotted field path, and how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    # Discriminated unions put the tag into the location; users never wrote it.
    loc = ".".join(str(part) for i, part in enumerate(first["loc"]) if not (i == 1 and part in _TAGS))
    if first["type"] == "extra_forbidden":
        msg = "unknown setting (not supported by this version of securefed)"
    elif first["type"] == "missing":
        msg = "required setting is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{loc or 'job'}: {msg}{more}"


def dump_toml(doc: dict[str, Any]) -> str:
    """TOML writer for the flat two-level documents a JobConfig produces."""
    top = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    lines = top + [""] if top else []
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # TOML has no surrogate-pair escapes, and wants DEL escaped, which JSON leaves raw
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
