"""The run directory: resolved job, per-round metrics, checkpoints, model and report.

A round is committed when its checkpoint is renamed into place. Metrics are written just
before; on resume any metrics line past the last checkpoint is dropped and that round
runs again, so a crash at any point loses at most the round in flight.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import JobConfig, load_job
from .errors import ConfigError, ProtocolError, RunDirError
from .protocol import Message, PlainModel, decode, encode

_CHECKPOINT = re.compile(r"^round-(\d{5,})\.safetensors$")


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    job_file = property(lambda self: self.path / "job.toml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    model_dir = property(lambda self: self.path / "model")
    report_file = property(lambda self: self.path / "report.md")
    ledger_dir = property(lambda self: self.path / "ledger")  # client-<i>.jsonl: each client's privacy ledger
    keys_dir = property(lambda self: self.path / "keys")  # client-<i>.wmkey when the job makes watermark keys

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, job: JobConfig, out: Path | None = None) -> RunDir:
        """A new, empty run directory; never reuses one that holds anything."""
        explicit = out or job.output.dir
        path = explicit or _free_default(Path("runs") / job.name)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirError(f"{path} already exists and is not empty; pass --resume {path} to continue that run, "
                              "or --out to start a new one elsewhere")
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {path}: {exc.strerror}") from None
        run = cls(path)
        write_atomic(run.job_file, job.to_toml().encode())
        return run

    @classmethod
    def resume(cls, path: Path, job: JobConfig) -> RunDir:
        """An existing run of the same job (output location aside)."""
        run = cls(path)
        if not run.job_file.is_file():
            raise RunDirError(f"{path} is not a securefed run directory (no job.toml)")
        try:
            recorded = load_job(run.job_file)
        except ConfigError as exc:
            raise RunDirError(f"cannot resume {path}: {exc}") from None
        if recorded.fingerprint() != job.fingerprint():
            raise RunDirError(f"cannot resume {path}: its job.toml differs from this job "
                              f"({_first_difference(recorded, job)})")
        return run

    @classmethod
    def for_job(cls, job: JobConfig, path: Path) -> RunDir:
        """The folder of `job` at `path`: created on first use, then only ever reopened for the same job."""
        return cls.resume(path, job) if (path / "job.toml").exists() else cls.create(job, path)

    def private_file(self, name: str) -> Path:
        """`secrets/<name>`, in the folder (mode 0700, made on first use) of what the clients keep from the server."""
        folder = self.path / "secrets"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / name

    def sent_rounds_file(self, client: int) -> Path:
        """Where client `client` records the rounds it sent an update for (sent.py)."""
        return self.private_file(f"sent-rounds-client-{client}")

    def replica_file(self, client: int) -> Path:
        """Where client `client` keeps the rounds of a FedKSeed replica it took (algorithms/replica.py)."""
        return self.private_file(f"replica-client-{client}")

    def secret_key(self, name: str) -> bytes:
        """A 256-bit key kept in `secrets/<name>` (made on first use, readable by its owner only).

        In-process, the clients' secrets live in the run directory; across machines each node keeps its own.
        """
        key = self._secret(name, 32)
        if len(key) != 32:
            raise RunDirError(f"{self.private_file(name)}: not a 256-bit key")
        return key

    def _secret(self, name: str, size: int) -> bytes:
        path = self.private_file(name)
        if not path.exists():
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(os.urandom(size).hex() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # never replaces: a process that made it first wins, and everyone reads its secret
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        try:
            return bytes.fromhex(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{path}: unreadable secret ({exc})") from None

    # ------------------------------------------------------------ rounds

    def last_checkpoint(self, size: int, spec: bytes) -> tuple[int, Message] | None:
        """The last committed round and its global model, or None before the first commit."""
        found = sorted(self._checkpoint_rounds(), reverse=True)
        if not found:
            return None
        path = self._checkpoint_path(found[0])
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise RunDirError(f"{path}: unreadable checkpoint ({exc})") from None
        if tensors.get("spec") is None or bytes(tensors["spec"]) != spec:
            raise RunDirError(f"{path}: checkpoint was made for a different model spec")
        if "sealed" in tensors:
            try:
                return found[0], decode(tensors["sealed"].tobytes())
            except ProtocolError as exc:
                raise RunDirError(f"{path}: unreadable sealed model ({exc})") from None
        weights = tensors.get("weights")
        if weights is None or weights.shape != (size,) or weights.dtype != np.float32:
            raise RunDirError(f"{path}: checkpoint does not hold {size} float32 weights")
        return found[0], PlainModel(weights=weights)

    def commit(self, round: int, model: Message, spec: bytes, record: dict) -> None:
        """Append the round's metrics, then write its global model: the checkpoint is the commit point.

        A PlainModel is stored as its weights; a sealed model (which only clients can open) as its encoding."""
        with self.metrics_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp = self.checkpoints / f".round-{round:05d}.tmp"
        content = ({"weights": model.weights} if isinstance(model, PlainModel)
                   else {"sealed": np.frombuffer(encode(model), dtype=np.uint8)})
        save_file({**content, "spec": np.frombuffer(spec, dtype=np.uint8)}, tmp)
        _fsync(tmp)
        os.replace(tmp, self._checkpoint_path(round))
        _fsync(self.checkpoints)

    def records(self) -> list[dict]:
        """The metrics of every round in metrics.jsonl, in order."""
        out = []
        for lineno, line in enumerate(self._metric_lines(), start=1):
            record = _parse_record(line)
            if record is None:
                raise RunDirError(f"{self.metrics_file}:{lineno}: not a metrics record")
            out.append(record)
        return out

    def rollback_metrics(self, upto: int) -> None:
        """Keep the metrics of committed rounds only; a line torn by a crash after them is dropped."""
        kept, damaged = [], 0
        for lineno, line in enumerate(self._metric_lines(), start=1):
            record = _parse_record(line)
            if record is None:
                damaged = damaged or lineno
            elif record["round"] <= upto:
                if damaged:
                    raise RunDirError(f"{self.metrics_file}:{damaged}: damaged line among finished rounds")
                kept.append(record)
        write_atomic(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    def _metric_lines(self) -> list[str]:
        if not self.metrics_file.exists():
            return []
        return self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines()

    def _checkpoint_rounds(self) -> Iterator[int]:
        if self.checkpoints.is_dir():
            for entry in self.checkpoints.iterdir():
                match = _CHECKPOINT.match(entry.name)
                if match:
                    yield int(match.group(1))

    def _checkpoint_path(self, round: int) -> Path:
        return self.checkpoints / f"round-{round:05d}.safetensors"


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("round"), int)
    return record if ok else None


def _free_default(path: Path) -> Path:
    """runs/<name>, or runs/<name>-2, -3, … when taken: a default never collides with an earlier run."""
    candidate, n = path, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _first_difference(a: JobConfig, b: JobConfig) -> str:
    left, right = a.model_dump(mode="json", exclude={"output"}), b.model_dump(mode="json", exclude={"output"})
    for section in sorted(set(left) | set(right)):
        x, y = left.get(section), right.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                if x.get(key) != y.get(key):
                    return f"{section}.{key}: {x.get(key)!r} in the run, {y.get(key)!r} now"
        elif x != y:
            return f"{section}: {x!r} in the run, {y!r} now"
    return "unknown difference"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably: a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def append_durably(path: Path, data: bytes) -> None:
    """Add `data` to the end of `path` and flush it to disk (the folder's entry too, when the file is new)."""
    new = not path.exists()
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
