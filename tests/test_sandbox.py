"""The sandbox contains hostile completions, and pass@k matches hand-worked cases.

.venv/bin/pytest tests/test_sandbox.py -q
"""

from __future__ import annotations

import math
import os
import socket

import pytest

from nanochat_trainer.eval.passk import mean_pass_at_k, pass_at_k
from nanochat_trainer.eval.sandbox import FAILED, PASSED, TIMED_OUT, Sandbox


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(timeout=3.0, memory_mb=512, workers=2)


def _snapshot(path) -> dict:
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in map(str, path.rglob("*")) if os.path.isfile(p)}


def test_good_and_wrong(box: Sandbox) -> None:
    ok, bad, exc = box.run_many(["assert sum([1, 2]) == 3", "assert 1 == 2, 'nope'", "raise KeyError('k')"])
    assert ok.status == PASSED and ok.error is None
    assert bad.status == FAILED and bad.error == "AssertionError" and "nope" in bad.detail
    assert exc.status == FAILED and exc.error == "KeyError"


def test_runs_in_fresh_process_and_tmp_cwd(box: Sandbox, tmp_path) -> None:
    marker = tmp_path / "evaluator-pid"
    r = box.run(
        f"import os, sys\nassert os.getpid() != {os.getpid()}\nassert 'nanochat-sandbox-' in os.environ['HOME']\n"
        f"assert not os.path.exists({str(marker)!r})"
    )
    assert r.passed, r


def test_infinite_loop_times_out(box: Sandbox) -> None:
    r = box.run("while True:\n    pass")
    assert r.status == TIMED_OUT and r.error == "Timeout"
    assert r.duration_s < 10


def test_unbounded_allocation(box: Sandbox) -> None:
    r = box.run("x = []\nwhile True:\n    x.append(bytearray(64 * 2**20))")
    assert r.status == FAILED and r.error in ("MemoryError", "Crashed"), r


def test_fork_bomb(box: Sandbox) -> None:
    r = box.run("import os\nwhile True:\n    os.fork()")
    assert r.status == FAILED and r.error == "TypeError", r
    r = box.run("import subprocess\nsubprocess.Popen(['sleep', '100'])")
    assert r.status == FAILED, r
    r = box.run(
        "import multiprocessing as mp\nps = [mp.Process(target=print) for _ in range(3)]\n[p.start() for p in ps]"
    )
    assert r.status == FAILED, r


@pytest.mark.parametrize(
    "how",
    [
        "import os; os.remove(P)",
        "import os; os.unlink(P)",
        "import pathlib; pathlib.Path(P).unlink()",
        "import shutil; shutil.rmtree(os.path.dirname(P))",
        "import os; os.rename(P, P + '.x')",
        "import os; os.system('rm -f ' + P)",
    ],
)
def test_cannot_delete_outside_tmp(box: Sandbox, tmp_path, how: str) -> None:
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    before = _snapshot(tmp_path)
    r = box.run(f"import os\nP = {str(sentinel)!r}\n{how}")
    assert r.status == FAILED and r.error in ("TypeError", "NameError"), r
    assert _snapshot(tmp_path) == before


def test_no_network_to_local_server(box: Sandbox) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # a connection would complete in the backlog even before accept()
    port = srv.getsockname()[1]
    try:
        r = box.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')")
        srv.settimeout(0.3)
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing reached the host's server
    finally:
        srv.close()
    assert r.status == FAILED and r.error in ("OSError", "ConnectionRefusedError", "PermissionError", "TimeoutError"), r
    if box.netns:
        assert "unreachable" in r.detail.lower()


def test_control_socket_server_is_reachable_unsandboxed() -> None:
    """The check above can fail: an ordinary process does reach the server."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        socket.create_connection(srv.getsockname(), timeout=2).close()
        srv.settimeout(2)
        srv.accept()[0].close()
    finally:
        srv.close()


def test_python_socket_fallback(tmp_path) -> None:
    r = Sandbox(timeout=3.0, use_netns=False).run("import socket\nsocket.socket()")
    assert r.status == FAILED and r.error == "PermissionError" and "network disabled" in r.detail


def test_exit_tricks_fail(box: Sandbox) -> None:
    a, b = box.run_many(["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)"])
    assert a.status == FAILED and a.error == "SystemExit"
    assert b.status == FAILED and b.error == "Crashed"


def test_pass_at_k_hand_worked() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    n, c, k = 200, 13, 100
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    assert mean_pass_at_k([(2, 1), (2, 0)], [1, 2]) == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError):
        mean_pass_at_k([(1, 1)], [2])
