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
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from ..errors import SecurefedError
from .node import keep_loaded, loading

POLL_SECONDS = 0.2  # how often an idle executor asks the SuperNode for a task (a local HTTP call)
REFUSALS = 20  # task requests the SuperNode may refuse in a row before this node stops (a wrong secret)
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the one call the secret signs


def make_secret(node_dir: Path, port: int) -> Path:
    """A fresh secret for this node's SuperNode and executor, readable by this user only: another local process
    cannot take the node's tasks off the Runtime API. One file per Runtime API port, so that nodes sharing a
    folder never read each other's."""
    path = node_dir / f"superexec-{port}.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path


class Executor:
    """Answers one SuperNode's ClientApp tasks, one at a time, with `app` (securefed's ClientApp).

    Every task gets this node's own `node_config` (what `flower join` was told), whatever the Runtime API says:
    a process that took the port before the SuperNode could otherwise pick the job, the data and the key paths."""

    def __init__(self, address: str, secret_file: Path, app, node_config: dict):
        self.address = address
        self.app = app
        self.node_config = dict(node_config)
        self.secret = load_superexec_auth_secret(str(secret_file))
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
        except BaseException as exc:  # a node joined but deaf would stall every round: stop it instead, loudly
            if not isinstance(exc, SecurefedError):
                traceback.print_exc(file=sys.stderr)
            print(f"securefed: this node's executor failed ({type(exc).__name__}: {exc}); stopping the node",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    def _serve(self) -> None:
        runtime = self._client(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={_ACQUIRE}),
                               retrying=False)  # this loop asks again itself
        refused = 0
        try:
            while not self._stop.is_set():
                try:
                    got = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.HTTPStatusError as exc:  # the SuperNode answered, and said no
                    refused += 1
                    if refused >= REFUSALS:
                        status = exc.response.status_code
                        raise SecurefedError(f"the SuperNode refused {refused} task requests in a row (HTTP "
                                             f"{status}): it does not hold this node's secret") from None
                    self._stop.wait(1.0)
                    continue
                except httpx.TransportError:  # the SuperNode is starting: ask again
                    self._stop.wait(1.0)
                    continue
                refused = 0
                if got.HasField("task") and got.token:
                    self.run_task(got.token)
                else:
                    self._stop.wait(POLL_SECONDS)
        finally:
            runtime.close()

    def run_task(self, token: str) -> None:
        """What `flwr-clientapp` does with one task, in this process and without installing the FAB. Whatever
        fails, this process goes on to the next task; a task left without a reply is answered by the SuperNode
        itself with an error once its token expires (the server then counts the node out of that message)."""
        client = self._client(RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(lambda: _beat(client))
        heartbeat.start()
        started = time.perf_counter()
        try:
            try:
                message, context, _run, _fab = pull_task_input(client)
            except Exception as exc:  # noqa: BLE001 - nothing to reply to: leave it to the token's expiry
                _say(f"could not take a task from the SuperNode ({type(exc).__name__}: {exc})")
                return
            context.node_config = dict(self.node_config)
            kind = message.metadata.message_type
            try:
                reply, status, details = self.app(message=message, context=context), SubStatus.COMPLETED, ""
            except Exception as exc:  # noqa: BLE001 - the reason goes to the server as Flower's error reply
                if not isinstance(exc, SecurefedError):  # a bug, not bad input: keep its traceback
                    traceback.print_exc(file=sys.stderr)
                reason = f"{type(exc)}:<'{exc}'>"  # as flwr-clientapp words it
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                status, details = SubStatus.FAILED, reason
            try:
                push_message(client, reply, context)
                push_task_output(client, context, status, details)
            except Exception as exc:  # noqa: BLE001 - the token's expiry turns it into an error reply
                _say(f"could not hand a {kind} reply to the SuperNode ({type(exc).__name__}: {exc})")
                return
            _say(f"{'answered' if status == SubStatus.COMPLETED else 'refused'} a {kind} in "
                 f"{time.perf_counter() - started:.1f} s")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _client(self, interceptor, retrying: bool = True) -> RuntimeHttpClient:
        # A task's connection that breaks (the SuperNode closed a kept-alive one while the task trained) is tried
        # again on a new one, as flwr-clientapp's own client does; any answer the SuperNode gives is final.
        retry = RetryInvoker(lambda: exponential(base_delay=0.2, max_delay=2), httpx.TransportError, max_tries=5,
                             max_time=30.0) if retrying else None
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), interceptor],
            retry_invoker=retry)


def prepare_training() -> None:
    """Import the training code in a thread while the SuperNode waits for its first message: torch, transformers,
    peft and opacus take seconds (peft alone 12 CPU-seconds here), which a first training message would wait for.
    It holds the node's loading lock, so that a model loading ahead (node.warm) waits rather than importing the
    same modules from a second thread."""
    def load() -> None:
        started = time.perf_counter()
        with loading:
            importlib.import_module("securefed.job")
        _say(f"training code imported in {time.perf_counter() - started:.1f} s")

    threading.Thread(target=load, name="securefed-import", daemon=True).start()


def _say(text: str) -> None:
    print(f"securefed: {text}", file=sys.stderr, flush=True)


def _beat(client: RuntimeHttpClient) -> bool:
    """Keep the task's token alive during long training. Unlike Flower's own, never signals the process: a task
    the SuperNode has given up on fails at its push, and this executor takes the next."""
    try:
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except Exception:  # noqa: BLE001 - a dead heartbeat thread would end the token; retried with backoff
        return False
    return True
