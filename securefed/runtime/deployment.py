"""Setting up a Flower deployment: a test CA and node keys, the App folder, and the Flower commands to run.

Nothing here imports flwr; the commands are Flower's own (`flower-superlink`, `flower-supernode`,
`flwr`), started with telemetry, update checks and per-run dependency installs switched off.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import JobConfig, dump_toml, load_job, parse_job
from ..errors import ConfigError, SecurefedError
from ..rundir import RunDir
from ..secagg import identity
from ..sums import sum_kind

OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "securefed"  # the name of the SuperLink connection in the flwr CLI's config


def flower_env(home: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process: offline, and with this interpreter's scripts first on the PATH,
    since Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name."""
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def flower_command(name: str) -> str:
    """The full path of one of Flower's commands, or a clear error when the extra is not installed."""
    found = shutil.which(name, path=flower_env()["PATH"])
    if found is None:
        raise SecurefedError(f"{name} not found: install Flower with pip install 'securefed[flower]'")
    return found


# ---------------------------------------------------------------- what a run carries in its run config


@dataclass(frozen=True)
class AppConfig:
    """The run config of a securefed Flower App: the job and how long to wait for nodes."""

    job: JobConfig
    labels: list[str]  # the label order, fixed by the server's dev split (clients hold only their own data)
    run_dir: Path  # on the server's machine
    reply_timeout: float  # seconds a node may take to answer one message before it counts as dropped
    join_timeout: float  # seconds to wait for the job's clients to come online

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> AppConfig:
        try:
            text, labels = str(run_config["job"]), json.loads(str(run_config["labels"]))
            run_dir = Path(str(run_config["run-dir"]))
            timeouts = float(run_config["reply-timeout"]), float(run_config["join-timeout"])
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"the Flower run config is not a securefed app's ({exc})") from None
        return cls(parse_toml_job(text), labels, run_dir, *timeouts)

    def run_config(self) -> dict:
        return {"job": self.job.to_toml(), "labels": json.dumps(self.labels), "run-dir": str(self.run_dir),
                "reply-timeout": self.reply_timeout, "join-timeout": self.join_timeout}


def parse_toml_job(text: str) -> JobConfig:
    import tomllib

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the app's job: invalid TOML: {exc}") from None
    return parse_job(raw, source="the app's job", base_dir=Path("/"))


def check_deployable(job: JobConfig) -> None:
    """The job settings that cannot run on Flower yet, refused before anything starts."""
    if why := sum_kind(job).refuses_flower(job):
        raise ConfigError(f"secagg: {why}")
    if job.watermark is not None and job.watermark.keys:
        raise ConfigError("watermark.keys: on Flower each organisation brings its own key (flower join --key); "
                          "leave the keys out of the job")


def deployed_job(job: JobConfig) -> JobConfig:
    """The job as it travels to the nodes: its identities' public keys, not the folder of key files (which stays
    on this machine and is no part of the fingerprint)."""
    if getattr(job.secagg, "identities", None) is None:
        return job
    return job.model_copy(update={"secagg": job.secagg.model_copy(update={"identities": None})})


def node_run_dir(job: JobConfig, folder: Path, client: int) -> RunDir:
    """A node's folder for one job and client: created on first use, then only ever reopened for the same job."""
    return RunDir.for_job(job, folder / f"{job.name}-{job.fingerprint()[:12]}-client-{client}")


def require_empty(folder: Path, what: str) -> None:
    """Refuse a folder that holds anything (or is a file): nothing of the user's is ever overwritten."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} exists and is not an empty folder; give a new folder for {what}")


# ---------------------------------------------------------------- certificates and node keys


@dataclass(frozen=True)
class Certificates:
    """The files `flower certs` writes into one folder."""

    folder: Path
    ca = property(lambda self: self.folder / "ca.crt")
    server_cert = property(lambda self: self.folder / "server.pem")
    server_key = property(lambda self: self.folder / "server.key")

    def node_key(self, i: int) -> Path:
        return self.folder / f"node-{i}.key"

    def node_public(self, i: int) -> Path:
        return self.folder / f"node-{i}.pub"

    def check(self) -> None:
        for path in (self.ca, self.server_cert, self.server_key):
            if not path.is_file():
                raise ConfigError(f"{path}: not found (make a test CA with `securefed flower certs`)")


def make_certificates(folder: Path, nodes: int, hosts: list[str], days: int = 30) -> Certificates:
    """A test CA, a server certificate for `hosts`, and an EC P-384 authentication key pair per node (OpenSSH
    format, which Flower's SuperNode and `flwr supernode register` read). For tests and trials: a real
    deployment takes its server certificate from the organisation's own CA."""
    certs = Certificates(folder)
    require_empty(folder, "the certificates")
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securefed test CA")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), now, days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [_san(h) for h in hosts]
    server = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name,
                       server_key.public_key(), now, days)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    _write(certs.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(certs.server_cert, server.public_bytes(serialization.Encoding.PEM))
    _write(certs.server_key, _pem(server_key), secret=True)
    _write(folder / "ca.key", _pem(ca_key), secret=True)
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(certs.node_key(i), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()), secret=True)
        _write(certs.node_public(i), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH) + b"\n")
    return certs


def _builder(subject: x509.Name, issuer: x509.Name, public, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


# ---------------------------------------------------------------- the App


def write_app(job: JobConfig, labels: list[str], folder: Path, run_dir: Path, *, reply_timeout: float,
              join_timeout: float) -> Path:
    """A Flower App folder whose components are securefed's and whose run config carries the job."""
    check_deployable(job)
    require_empty(folder, "the App")
    folder.mkdir(parents=True, exist_ok=True)
    job = deployed_job(job)
    app = AppConfig(job, labels, run_dir.resolve(), reply_timeout, join_timeout)
    document = {
        "project": {"name": f"securefed-{job.name}".lower().replace("_", "-").replace(".", "-")[:60],
                    "version": "1.0.0", "dependencies": []},
        "tool.flwr.app": {"publisher": "securefed"},
        "tool.flwr.app.components": {"serverapp": "securefed.runtime.flower:server_app",
                                     "clientapp": "securefed.runtime.flower:client_app"},
        "tool.flwr.app.config": app.run_config(),
    }
    (folder / "pyproject.toml").write_text(dump_toml(document), encoding="utf-8")
    (folder / "job.toml").write_text(job.to_toml(), encoding="utf-8")  # what each organisation agrees to
    return folder / "pyproject.toml"


# ---------------------------------------------------------------- Flower's commands


def superlink_command(certs: Certificates | None, host: str, port: int, database: Path | None) -> list[str]:
    """TLS and node authentication unless `certs` is None (then plain HTTP and no authentication)."""
    command = [flower_command("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        certs.check()
        command += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert),
                    "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        command += ["--database", str(database)]
    return command


def supernode_command(superlink: str, ca: Path | None, auth_key: Path | None, node_config: dict, port: int,
                      executor_secret: Path | None = None) -> list[str]:
    """`ca` None: plain HTTP (no TLS, and so no node authentication). `port` is the node's Runtime API, on
    127.0.0.1. With `executor_secret` the SuperNode starts no ClientApp process: an outside executor holding the
    secret takes its tasks (executor.py). The SuperNode is Flower's, run through supernode.py for a shorter idle
    poll."""
    flower_command("flower-supernode")  # installed with the extra, or a clear error
    command = [sys.executable, "-m", "securefed.runtime.supernode", "--superlink", superlink, "--host", "127.0.0.1",
               "--port", str(port),
               "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())]
    if executor_secret is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(executor_secret)]
    if ca is None:
        return [*command, "--insecure"]
    for path in (ca, auth_key):
        if path is None or not path.is_file():
            raise ConfigError(f"{path}: not found")
    return [*command, "--root-certificates", str(ca), "--auth-supernode-private-key", str(auth_key)]


class FlowerCli:
    """The `flwr` command against one SuperLink, with a private FLWR_HOME naming that connection."""

    def __init__(self, superlink: str, ca: Path | None):
        self.home = Path(tempfile.mkdtemp(prefix="securefed-flwr-"))
        connection = {"address": superlink}
        if ca is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(ca.resolve())
        (self.home / "config.toml").write_text(dump_toml({"superlink": {"default": CONNECTION},
                                                          f"superlink.{CONNECTION}": connection}), encoding="utf-8")

    def __call__(self, *args: str, timeout: float = 120.0) -> str:
        try:
            done = subprocess.run([flower_command("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                                  env=flower_env(self.home))
        except subprocess.TimeoutExpired:
            raise SecurefedError(f"flwr {args[0]} did not finish within {timeout:g} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise SecurefedError(f"flwr {' '.join(args[:2])} failed: {last[-1] if last else done.returncode}")
        return done.stdout

    def register(self, public_key: Path) -> str:
        if not public_key.is_file():
            raise ConfigError(f"{public_key}: not found")
        return self("supernode", "register", str(public_key), CONNECTION).strip()

    def start(self, app: Path) -> int:
        out = self._json(self("run", str(app), CONNECTION, "--format", "json"))
        if not out.get("success", True) or "run-id" not in out:
            raise SecurefedError(f"Flower did not start the run: {out.get('error-message', out)}")
        return int(out["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        """The run's status ("pending", "running", "finished:completed", "finished:failed", ...) and details."""
        runs = self._json(self("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")).get("runs", [])
        if not runs:
            raise SecurefedError(f"the SuperLink knows no run {run_id}")
        return str(runs[0].get("status")), str(runs[0].get("status-details", ""))

    def watch(self, run_id: int, timeout: float, on_line: Callable[[str], None]) -> str:
        """Wait for the run to finish, passing each securefed progress line of its ServerApp log to `on_line`;
        return its status, or raise unless it completed.

        The log stream (`flwr log RUN`) ends by itself with the run, so the status is asked when the stream ends
        and otherwise every 30 s: every `flwr` command costs about 1.5 CPU-seconds of imports, which polling every
        few seconds would take from the nodes on a small machine."""
        stream = subprocess.Popen([flower_command("flwr"), "log", str(run_id), CONNECTION], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                                  env=flower_env(self.home))
        reader = threading.Thread(target=_progress_lines, args=(stream.stdout, on_line), daemon=True)
        reader.start()
        deadline, ended = time.monotonic() + timeout, None
        try:
            while not (status := self.status(run_id))[0].startswith("finished"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SecurefedError(f"run {run_id} did not finish within {timeout:g} s")
                if stream.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        stream.wait(timeout=min(30.0, left))
                    continue
                ended = ended or time.monotonic()  # the status follows the stream's end shortly, unless it failed
                time.sleep(min(2.0 if time.monotonic() - ended < 60 else 30.0, left))
            with contextlib.suppress(subprocess.TimeoutExpired):
                stream.wait(timeout=5.0)  # its last lines
        finally:
            stream.terminate()
            try:
                stream.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                stream.kill()
                stream.wait()
            reader.join(timeout=5.0)
            if not reader.is_alive():
                stream.stdout.close()
        if status[0] != "finished:completed":
            raise SecurefedError(f"run {run_id} {status[0]}: {status[1]}")
        return status[0]

    def log(self, run_id: int) -> str:
        return self("log", str(run_id), CONNECTION, "--show", timeout=60.0)

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    @staticmethod
    def _json(text: str) -> dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise SecurefedError(f"flwr printed no JSON: {text.strip()[:200]}") from None


# ---------------------------------------------------------------- a whole deployment on this machine


class Loopback:
    """A SuperLink and SuperNodes on 127.0.0.1, each `securefed flower` process in its own process group with its
    own FLWR_HOME and log; every wait is bounded, and `stop_all` kills every group it started. For tests and
    benchmarks."""

    def __init__(self, root: Path, securefed: Path | None = None):
        self.root = root
        self.securefed = str(securefed or Path(sys.executable).parent / "securefed")
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.certs = Certificates(root / "certs")
        self.processes: dict[str, subprocess.Popen] = {}
        self.registered: set[int] = set()
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def env(self, name: str) -> dict[str, str]:
        home = self.root / "homes" / name  # each process its own: SuperLink and SuperNodes unpack the App there
        home.mkdir(parents=True, exist_ok=True)
        return {**flower_env(home), "PYTHONDONTWRITEBYTECODE": "1"}

    def securefed_cli(self, *args: str, timeout: float = 300.0) -> str:
        try:
            done = subprocess.run([self.securefed, *args], capture_output=True, text=True, timeout=timeout,
                                  env=self.env("cli"))
        except subprocess.TimeoutExpired:
            raise SecurefedError(f"securefed {' '.join(args[:2])} did not finish within {timeout:g} s") from None
        if done.returncode != 0:
            raise SecurefedError(f"securefed {' '.join(args[:2])} failed: {_last_line(done.stderr)}")
        return done.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with (self.root / "logs" / f"{name}.log").open("w") as log:
            process = subprocess.Popen([self.securefed, *args], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=self.env(name), start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.processes[name].poll() is not None:
                raise SecurefedError(f"{name} exited: {_last_line(self.log(name))} (log: {self.root / 'logs'})")
            if time.monotonic() > deadline:
                raise SecurefedError(f"{name}: no {text!r} within {timeout:g} s (log: {self.root / 'logs'})")
            time.sleep(0.5)

    def serve(self, nodes: int) -> None:
        """Make a test CA with `nodes` node keys and start the SuperLink; no key is registered yet."""
        make_certificates(self.certs.folder, nodes, ["127.0.0.1", "localhost"])
        self.start("superlink", "flower", "serve", "--certs", str(self.certs.folder), "--port", str(self.port))
        self.wait_for("superlink", "Uvicorn running", 90)

    def register(self, i: int) -> None:
        """Allow node key i on the SuperLink (once)."""
        if i not in self.registered:
            self.securefed_cli("flower", "register", str(self.certs.node_public(i)), "--superlink", self.superlink,
                               "--ca", str(self.certs.ca))
            self.registered.add(i)

    def join(self, name: str, job: Path, key: int, client: int, data: Path, folder: Path,
             watermark_key: Path | None = None, threads: int | None = None,
             identity_key: Path | None = None) -> subprocess.Popen:
        marks = ["--key", str(watermark_key)] if watermark_key else []
        marks += ["--threads", str(threads)] if threads else []
        marks += ["--identity", str(identity_key)] if identity_key else []
        return self.start(name, "flower", "join", "--superlink", self.superlink, "--ca", str(self.certs.ca),
                          "--job", str(job),
                          "--auth-key", str(self.certs.node_key(key)), "--client", str(client), "--data", str(data),
                          "--dir", str(folder), "--port", str(free_port()), *marks)

    def run(self, app: Path, timeout: float) -> subprocess.Popen:
        """`securefed flower run` in the background; `finish` waits for it."""
        process = subprocess.Popen([self.securefed, "flower", "run", str(app), "--superlink", self.superlink, "--ca",
                                    str(self.certs.ca), "--timeout", str(timeout)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=self.env("cli"), start_new_session=True)
        self.processes[f"run-{process.pid}"] = process
        return process

    def run_job(self, job: Path, timeout: float, secrets: Mapping[str, str] | None = None,
                watermark_keys: Mapping[int, Path] | None = None,
                on_line: Callable[[str], None] | None = None, late: Collection[int] = ()) -> Path:
        """The whole job on this machine: its data partitioned, a registered node per client, the App run to the
        end; the nodes are stopped after. `secrets` (by name: "dp", "fedkseed") and `watermark_keys` replace what
        each node would make (to match an in-process run); `on_line` receives the run's progress. The nodes of the
        `late` clients start only once round 1 has started (the others' wait for them ends after 60 s). Returns
        the run directory."""
        config = load_job(job)
        self.securefed_cli("partition", str(job), "--out", str(self.root / "parts"))
        if "superlink" not in self.processes:
            self.serve(config.federation.clients)
        nodes = []
        threads = node_threads(config.federation.clients)
        identities = getattr(config.secagg, "identities", None)  # each node gets its own client-<i>.key

        def start_node(cid: int) -> None:
            self.register(cid)
            folder = self.root / "nodes" / f"client-{cid}"
            for name, secret in (secrets or {}).items():
                node_run_dir(config, folder, cid).private_file(name).write_text(secret + "\n", encoding="ascii")
            data = next((self.root / "parts").glob(f"client-{cid}.*"))
            nodes.append(f"node-{cid}")
            self.join(nodes[-1], job, cid, cid, data, folder, (watermark_keys or {}).get(cid), threads,
                      identity.private_file(identities, cid) if identities else None)

        def line(text: str) -> None:
            if "round 1/" in text and not any(f"node-{cid}" in nodes for cid in late):
                for cid in late:
                    start_node(cid)
            if on_line is not None:
                on_line(text)

        try:
            for cid in range(config.federation.clients):
                if cid not in late:
                    start_node(cid)
            run_dir = self.root / "run"
            self.securefed_cli("flower", "app", str(job), "--out", str(self.root / "app"), "--run-dir", str(run_dir),
                               "--reply-timeout", str(timeout), *(["--join-timeout", "60"] if late else []))
            self.finish(self.run(self.root / "app", timeout), timeout + 60, line)
        finally:
            for name in nodes:
                self.stop(name)
        return run_dir

    @staticmethod
    def finish(process: subprocess.Popen, timeout: float, on_line: Callable[[str], None] | None = None) -> str:
        """Wait for a `run` and return its output; each line goes to `on_line` as it comes."""
        lines: list[str] = []

        def read() -> None:
            for line in process.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line.rstrip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise SecurefedError(f"the run did not finish within {timeout:g} s") from None
        finally:
            reader.join(timeout=10)
        out = "".join(lines)
        if process.returncode != 0:
            raise SecurefedError(f"the run failed: {_last_line(out)}")
        return out

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop a process group: `sig` to its leader first (a SuperNode then leaves the SuperLink at once), SIGKILL
        for whatever of the group is left after 20 s or once its leader has gone. Only the leader: `flower join`
        passes the signal on to its SuperNode, and a second SIGTERM that reaches a SuperNode already exiting kills
        it before it has left the SuperLink (Flower's handler restores the default one first), which then refuses
        the node's key for a while."""
        process = self.processes.pop(name)
        try:
            os.kill(process.pid, sig)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=20)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


PROGRESS = "securefed: "  # how the ServerApp's progress lines start


def _progress_lines(stream, on_line: Callable[[str], None]) -> None:
    for line in stream:
        if PROGRESS in line:
            on_line(line[line.index(PROGRESS) + len(PROGRESS):].rstrip())


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def node_threads(nodes: int) -> int:
    """Each node's share of this machine's cores, when `nodes` nodes train side by side on it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nodes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
