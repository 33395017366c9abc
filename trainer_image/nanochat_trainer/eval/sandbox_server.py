"""The sandbox as a separate container of the eval pod: programs started on request, over a socket.

    nanochat sandbox-serve --socket @nanochat-sandbox-<pod uid>      # the sidecar container
    NANOCHAT_SANDBOX_SOCKET=@nanochat-sandbox-<pod uid> nanochat eval ...   # the eval container

Where the pod's runtime forbids user namespaces (seccomp RuntimeDefault refuses
`unshare(CLONE_NEWUSER)` in most clusters), bubblewrap cannot run in the eval container. The
operator then puts the programs in a container of their own (`render.render_eval_job`): it
has its own PID namespace, runs as uid 65534 with a read-only root, no capabilities, no
service-account token, no Secrets and no environment of the evaluator's, and shares nothing
with the evaluator but the pod's network namespace. The evaluator connects to this server;
for each connection the server starts one `sandbox_runner.py` under the strongest isolation
its own container permits (`isolation.detect`), with the connection as its stdin and stdout,
after one line that names that isolation:

    -> {"isolation": "namespaces"}          then sandbox_runner.py's protocol, unchanged

When the evaluator closes the connection (its test ended, or its timeout) the program's whole
process group is killed. The socket is an abstract Unix socket (`@name`): containers of a pod
share a network namespace, so no volume is needed, and programs inside a network namespace of
their own (bubblewrap) cannot reach it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import threading

from .isolation import RUNNER, Isolation, detect, unix_address

LOG = logging.getLogger(__name__)


def serve(
    address: str,
    isolation: Isolation | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Accept connections on `address` until `stop` is set, one isolated program each."""
    iso = isolation or detect("namespaces")  # never itself a client of another server
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(unix_address(address))
    server.listen(64)
    server.settimeout(0.5)
    LOG.info("sandbox server on %s, programs isolated by %s", address, iso.description)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_program, args=(conn, iso), daemon=True).start()
    finally:
        server.close()


def _program(conn: socket.socket, iso: Isolation) -> None:
    """One program: say the isolation, hand the connection to a runner, kill it when the
    connection closes (the evaluator is done with it) or it ends."""
    with conn:
        conn.settimeout(None)
        try:
            conn.sendall(json.dumps({"isolation": iso.level}).encode() + b"\n")
        except OSError:
            return
        proc = subprocess.Popen(
            iso.command(RUNNER),
            stdin=conn.fileno(),
            stdout=conn.fileno(),
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while proc.poll() is None:
            if poller.poll(200):  # the evaluator hung up
                break
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
