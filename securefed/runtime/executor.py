"""A node's long-lived ClientApp executor: it takes each of its SuperNode's tasks and answers it in this process.

Left to itself, a SuperNode starts a fresh `flwr-clientapp` process for every message: seven to ten seconds
of imports and start-up per message on a busy 2-core machine, twice a round, before our handler runs. With
`--isolation process` the SuperNode leaves the launching to an outside executor. `securefed flower join` is
that executor: it asks the SuperNode's Runtime API (on 127.0.0.1, signed with a secret only this node holds)
for a task, pulls its message and context, runs securefed's ClientApp here, where the model and the tokenized
data stay loaded between messages (node._loaded), and pushes the reply and the context back.

It never installs or runs the Flower App (FAB) the SuperLink ships: the node answers with the securefed it
installed itself, so whoever runs the SuperLink cannot put code on the organisation's machine.
"""

from __future__ import annotations

import importlib
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.interceptors.http.runtime_token import RuntimeTokenHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from .node import keep_loaded

SECRET_FILE = "superexec.secret"
POLL_SECONDS = 0.1  # how often an idle executor asks the SuperNode for a task (a local HTTP call)
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the one call the secret signs


def make_secret(node_dir: Path) -> Path:
    """A fresh secret for this node's SuperNode and executor, readable by this user only: another local process
    cannot take the node's tasks (and with them its sealed state) off the Runtime API."""
    path = node_dir / SECRET_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path


class Executor:
    """Answers one SuperNode's ClientApp tasks, one at a time, with `app` (securefed's ClientApp)."""

    def __init__(self, address: str, secret_file: Path, app):
        self.address = address
        self.app = app
        self.secret = load_superexec_auth_secret(str(secret_file))
        self.answered = 0  # tasks run to a reply
        keep_loaded()
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve, name="securefed-executor", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug here would leave the node joined but deaf: stop it instead, loudly
            traceback.print_exc(file=sys.stderr)
            print(f"securefed: this node's executor failed ({type(exc).__name__}: {exc}); stopping the node",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    def _serve(self) -> None:
        runtime = self._client(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={_ACQUIRE}))
        try:
            while not self._stop.is_set():
                try:
                    got = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.HTTPError:  # the SuperNode is starting, or restarting: ask again
                    self._stop.wait(1.0)
                    continue
                if got.HasField("task") and got.token:
                    self.run_task(got.token)
                else:
                    self._stop.wait(POLL_SECONDS)
        finally:
            runtime.close()

    def run_task(self, token: str) -> None:
        """What `flwr-clientapp` does with one task, in this process and without installing the FAB."""
        client = self._client(RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(lambda: _beat(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "securefed's ClientApp failed"
        started = time.perf_counter()
        try:
            message, context, _run, _fab = pull_task_input(client)
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - the reason goes to the server as Flower's error reply
            print(f"securefed: a task failed on this node: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if message is not None:
                reason = f"{type(exc)}:<'{exc}'>"  # as flwr-clientapp words it
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                    self.answered += 1
                push_task_output(client, context, status, details)
            except httpx.HTTPError as exc:
                print(f"securefed: could not hand a reply to the SuperNode: {exc}", file=sys.stderr, flush=True)
            heartbeat.stop()
            client.close()
        print(f"securefed: answered a {message.metadata.message_type if message else 'task'} in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    def _client(self, interceptor) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), interceptor])


def prepare_training() -> None:
    """Import the training code in a thread while the SuperNode waits for its first message: torch, transformers,
    peft and opacus take seconds (peft alone 12 CPU-seconds here), which a first training message would wait for."""
    def load() -> None:
        started = time.perf_counter()
        importlib.import_module("securefed.job")
        print(f"securefed: training code imported in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)

    threading.Thread(target=load, name="securefed-import", daemon=True).start()


def _beat(client: RuntimeHttpClient) -> bool:
    """Keep the task's token alive during long training. Unlike Flower's own, never signals the process: a task
    the SuperNode has given up on fails at its next call, and this executor takes the next."""
    try:
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except httpx.HTTPError:
        return False
    return True
