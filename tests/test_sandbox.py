"""The sandbox against hostile programs: the verdict cannot be forged, the isolation holds, the
evaluator survives; and pass@k on hand-worked cases.

    .venv/bin/pytest tests/test_sandbox.py -q

Each hostile program is judged by a check task as a HumanEval problem is: the program defines
`add`, the trusted test asserts `add(1, 2) == 3` and `add(2, 2) == 4`, and the program's `add` is
wrong (it returns 0), so every forgery that "passes" is a forgery that worked. What a program can
reach (files, environments, sockets) is asked of it through a function whose return value comes
back to the test here.
"""

from __future__ import annotations

import ctypes
import math
import os
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanochat_trainer.contract import SANDBOX_SOCKET_ENV
from nanochat_trainer.errors import EXIT_MACHINE, run_guarded
from nanochat_trainer.eval import sandbox as sandbox_module
from nanochat_trainer.eval.humaneval import evaluate_completions, load_problems
from nanochat_trainer.eval.passk import mean_pass_at_k, pass_at_k
from nanochat_trainer.eval.sandbox import FAILED, PASSED, TIMED_OUT, CheckTask, Sandbox, SandboxUnavailable
from nanochat_trainer.eval.sandbox_server import serve

WRONG_ADD = "def add(a, b):\n    return 0\n"
ADD_TEST = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"

# Ways a program tries to report "passed" for itself, each after defining a wrong `add`.
FORGERIES = {
    k: textwrap.dedent(v)
    for k, v in {
        # the old runner's report line, on every descriptor the runner might hold
        "report line on every fd": """
        import os
        for fd in range(1, 20):
            try:
                os.write(fd, b'{"loaded": true}\\n' + b'{"value": 3}\\n' * 4)
            except OSError:
                pass
        os._exit(0)
        """,
        # the runner's own send() found through the garbage collector
        "runner's send via gc": """
        import gc, os
        for o in gc.get_objects():
            if callable(o) and getattr(o, '__name__', '') == 'send':
                o({'loaded': True}); o({'value': 3}); o({'value': 4})
        os._exit(0)
        """,
        # ... and through the stack frames
        "runner's send via frames": """
        import sys, os
        f = sys._getframe()
        while f:
            if 'send' in f.f_locals:
                f.f_locals['send']({'loaded': True})
            f = f.f_back
        os._exit(0)
        """,
        # an object equal to everything
        "always-equal object": """
        class Eq:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Eq()
        """,
        # an int subclass equal to everything
        "always-equal int": """
        class I(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return I(0)
        """,
        # patched builtins, in the only process it can patch
        "patched builtins": """
        import builtins
        builtins.AssertionError = type('Ok', (Exception,), {})
        builtins.__import__ = None
        """,
        # the test's exit: kill whoever started this process
        "kill the parent": """
        import posix, signal
        posix.kill(posix.getppid(), signal.SIGKILL)
        """,
        "exit early": """
        import sys
        sys.exit(0)
        """,
    }.items()
}


@pytest.fixture(scope="module", params=["here", "container"])
def box(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """Programs started by this process, or by a sandbox server (the eval pod's sandbox
    container, here a thread of this process) that this process reaches over a socket."""
    if request.param == "here":
        yield Sandbox(timeout=3.0, memory_mb=512, workers=2)
        return
    address = f"@nanochat-test-sandbox-{os.getpid()}"
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=serve, args=(address,), kwargs={"ready": ready, "stop": stop}, daemon=True)
    server.start()
    assert ready.wait(30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SANDBOX_SOCKET_ENV, address)
        sandbox = Sandbox(timeout=3.0, memory_mb=512, workers=2)
    assert sandbox.isolation.level == "container" and sandbox.isolation.socket == address
    yield sandbox
    stop.set()
    server.join(5)


def _check(box: Sandbox, program: str, test: str = ADD_TEST, proxied: tuple[str, ...] = ("add",)):
    return box.check(CheckTask(program=program, test=test, proxied=proxied))


def test_namespaces_are_available_here(box: Sandbox) -> None:
    """This machine permits user namespaces: the sandbox must use them (CI and the e2e agent),
    and the sandbox server's programs too."""
    assert box.isolation_summary["level"] in ("namespaces", "container/namespaces"), box.isolation_summary
    assert "weaker_because" not in box.isolation_summary


def test_the_program_runs_unprivileged(box: Sandbox) -> None:
    program = (
        "import os\ndef who():\n    status = open('/proc/self/status').read()\n"
        "    return os.getuid(), os.getgid(), 'NoNewPrivs:\\t1' in status, 'CapEff:\\t0000000000000000' in status\n"
    )
    r = _check(box, program, "assert who() == (65534, 65534, True, True)\n", ("who",))
    assert r.passed, r


def test_right_and_wrong_answers(box: Sandbox) -> None:
    ok = _check(box, "def add(a, b):\n    return a + b\n")
    assert ok.status == PASSED and ok.error is None, ok
    bad = _check(box, WRONG_ADD)
    assert bad.status == FAILED and bad.error == "AssertionError", bad
    raised = _check(box, "def add(a, b):\n    raise KeyError('k')\n")
    assert raised.status == FAILED and raised.error == "KeyError", raised


def test_values_cross_as_plain_data(box: Sandbox) -> None:
    program = "def f(x):\n    return (x, [1.5, None, True], {'a': {1, 2}}, b'\\x00', float('inf'))\n"
    test = "assert f([1, (2, 3)]) == ([1, (2, 3)], [1.5, None, True], {'a': {1, 2}}, b'\\x00', float('inf'))\n"
    assert _check(box, program, test, ("f",)).passed
    r = _check(box, "def f():\n    return object()\n", "f()\n", ("f",))
    assert r.status == FAILED and r.error == "Uncrossable" and "builtins.object" in r.detail, r
    # Subclasses of them cross as them, and a Fraction as its value: OpenAI's harness compares with ==,
    # which accepts a Counter for HumanEval/111's dict and Fraction(a * h, 2) for HumanEval/45's area.
    program = textwrap.dedent(
        """
        import collections, enum, fractions
        P = collections.namedtuple("P", "x y")
        class E(enum.IntEnum):
            A = 3
        def f():
            return (collections.Counter("aab"), collections.defaultdict(int, b=1),
                    collections.OrderedDict(c=2), P(1, 2), E.A, fractions.Fraction(15, 2), fractions.Fraction(4, 2))
        """
    )
    test = "assert f() == ({'a': 2, 'b': 1}, {'b': 1}, {'c': 2}, (1, 2), 3, 7.5, 2)\nassert type(f()[0]) is dict\n"
    r = _check(box, program, test, ("f",))
    assert r.passed, r


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_verdicts_fail(box: Sandbox, name: str) -> None:
    program = WRONG_ADD + FORGERIES[name] if "def add" not in FORGERIES[name] else FORGERIES[name]
    r = _check(box, program)
    assert r.status == FAILED, (name, r)


def test_forgeries_pass_when_the_untrusted_process_decides(box: Sandbox) -> None:
    """The mutation the verdict's design guards against: with the test run inside the program's
    process and its own word taken (the old design), forgeries pass. The tests above fail then."""
    passed = [
        name
        for name, forgery in FORGERIES.items()
        if box.run(WRONG_ADD + forgery + ADD_TEST if "def add" not in forgery else forgery + ADD_TEST).passed
    ]
    assert {"report line on every fd", "runner's send via gc", "always-equal object", "always-equal int"} <= set(passed)


def test_the_evaluator_survives_every_hostile_completion(box: Sandbox) -> None:
    """A whole HumanEval evaluation of hostile completions finishes, every one a failure with its reason."""
    problems = load_problems(3)
    hostile = [FORGERIES[k].replace("add", "x") for k in ("kill the parent", "runner's send via gc", "exit early")]
    hostile.append("    while True:\n        pass\n")
    report = evaluate_completions(problems, {p["task_id"]: hostile for p in problems}, ks=[1], sandbox=box)
    assert report["pass_at_k"] == {"1": 0.0}
    assert report["sandbox"]["isolation"]["level"] in ("namespaces", "container/namespaces")
    statuses = {s["status"] for row in report["per_problem"] for s in row["samples"]}
    assert statuses == {FAILED, TIMED_OUT}, statuses


# ---------------------------------------------------------------------------- the isolation


def test_a_detached_child_dies_with_the_program(box: Sandbox) -> None:
    """fork + setsid + exec: the grandchild would outlive a process-group kill; the PID namespace
    takes it down with the program."""
    marker = f"{31000 + os.getpid() % 1000}.5"
    program = (
        f"import posix\nif posix.fork() == 0:\n    posix.setsid()\n"
        f"    posix.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    )
    r = _check(box, program + "def alive():\n    return True\n", "assert alive()\n", ("alive",))
    assert r.passed, r  # the fork and exec worked: there was a grandchild
    time.sleep(0.5)
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]
    assert not survivors


def test_a_timed_out_program_is_killed(box: Sandbox) -> None:
    """The evaluator gives up on a program at its timeout, and the program (here, the server's
    when it sees the connection close) dies then, not at the end of the run."""
    marker = f"{32000 + os.getpid() % 1000}.5"
    r = box.run(f"import posix\nposix.execv('/bin/sleep', ['sleep', '{marker}'])\n")
    assert r.status == TIMED_OUT, r
    time.sleep(1.0)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_files_outside_its_tmp_are_out_of_reach(box: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the evaluator's secret")
    program = (
        f"P = {str(secret)!r}\n"
        "def read():\n    return open(P).read()\n"
        "def write():\n    open(P, 'w').write('overwritten')\n    return 'written'\n"
        "def write_system():\n    open('/usr/lib/pwned', 'w')\n    return 'written'\n"
        "def own_tmp():\n    open('/tmp/mine', 'w').write('ok')\n    return open('/tmp/mine').read()\n"
    )
    for call, error in (
        ("read()", "FileNotFoundError"),
        ("write()", "FileNotFoundError"),
        ("write_system()", "OSError"),
    ):
        r = _check(box, program, f"{call}\n", ("read", "write", "write_system", "own_tmp"))
        assert r.status == FAILED and r.error in (error, "PermissionError"), (call, r)
    assert _check(box, program, "assert own_tmp() == 'ok'\n", ("own_tmp",)).passed
    assert secret.read_text() == "the evaluator's secret"


def test_the_evaluators_environment_and_processes_are_invisible(box: Sandbox, monkeypatch) -> None:
    monkeypatch.setenv("NANOCHAT_TEST_API_KEY", "sk-do-not-leak")
    program = (
        f"import os\nEVALUATOR = {os.getpid()}\n"
        "def environs():\n    out = dict(os.environ)\n"
        "    for pid in os.listdir('/proc'):\n        try:\n"
        "            out[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')\n"
        "        except OSError:\n            pass\n    return str(out)\n"
        "def kill_evaluator():\n    import posix, signal\n"
        "    posix.kill(EVALUATOR, signal.SIGKILL)\n    return 'killed'\n"
        "def pids():\n    return sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
    )
    r = _check(box, program, "assert 'sk-do-not-leak' not in environs()\n", ("environs",))
    assert r.passed, r
    r = _check(box, program, "kill_evaluator()\n", ("kill_evaluator",))
    assert r.status == FAILED and r.error == "ProcessLookupError", r
    assert _check(box, program, "assert max(pids()) < 10\n", ("pids",)).passed  # its own PID namespace


def test_no_network_to_a_local_server(box: Sandbox) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # a connection would complete in the backlog even before accept()
    port = srv.getsockname()[1]
    try:
        program = (
            f"import socket\ndef connect():\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    s.sendall(b'hi')\n    return 'connected'\n"
        )
        r = _check(box, program, "connect()\n", ("connect",))
        srv.settimeout(0.3)
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing reached the host's server
    finally:
        srv.close()
    assert r.status == FAILED and r.error in ("ConnectionRefusedError", "OSError"), r


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


@pytest.mark.parametrize(
    "program, statuses",
    [
        ("while True:\n    pass\n", {TIMED_OUT}),
        ("x = []\nwhile True:\n    x.append(bytearray(64 * 2**20))\n", {FAILED}),  # memory limit
        (
            "import threading\ndef spin():\n    while True:\n        pass\n"  # CPU limit or timeout
            "ts = [threading.Thread(target=spin) for _ in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n",
            {FAILED, TIMED_OUT},
        ),
        # /tmp fills (16 MiB), then empty files pile up on it until the timeout: its own tmpfs, gone after
        (
            "i = 0\nwhile True:\n    open(f'/tmp/nanochat-fill-{i}', 'w').write('x' * 4096)\n    i += 1\n",
            {FAILED, TIMED_OUT},
        ),
        ("import posix\nwhile True:\n    posix.fork()\n", {FAILED, TIMED_OUT}),  # processes limit
    ],
)
def test_resource_hogs_end_with_the_evaluator_intact(box: Sandbox, program: str, statuses: set[str]) -> None:
    t0 = time.monotonic()
    r = _check(box, program)
    assert r.status in statuses, r
    assert time.monotonic() - t0 < box.timeout + 5
    assert not list(Path("/tmp").glob("nanochat-fill-*"))  # the host's /tmp never saw them


def test_exit_tricks_fail(box: Sandbox) -> None:
    a, b = box.run_many(["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)"])
    assert a.status == FAILED and a.error == "SystemExit"
    assert b.status == FAILED and b.error == "Crashed"


def test_a_sandbox_that_cannot_run_programs_raises_instead_of_scoring_zero(monkeypatch) -> None:
    """The sandbox container gone (restarted, never up) or a runner that cannot start: no verdict
    on any program. Raised (a command's one line, exit 1, retried), never a pass@k of 0 that
    would read as the model's; the samples queued behind are not each left to wait for it too."""
    address = f"@nanochat-test-gone-{os.getpid()}"
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=serve, args=(address,), kwargs={"ready": ready, "stop": stop}, daemon=True)
    server.start()
    assert ready.wait(30)
    monkeypatch.setenv(SANDBOX_SOCKET_ENV, address)
    box = Sandbox(timeout=3.0, workers=2)
    assert box.isolation.level == "container"
    stop.set()
    server.join(5)  # the container is gone
    monkeypatch.setattr(sandbox_module, "CONNECT_WAIT_S", 0.5)
    started: list[int] = []
    check = box.check
    monkeypatch.setattr(box, "check", lambda task: started.append(1) or check(task))
    problems = load_problems(10)
    right = {p["task_id"]: [p["canonical_solution"]] for p in problems}
    with pytest.raises(SandboxUnavailable, match="the sandbox container is not answering"):
        evaluate_completions(problems, right, sandbox=box)
    assert len(started) <= 2 * box.workers < len(problems), started  # the queued ones were cancelled
    monkeypatch.delenv(SANDBOX_SOCKET_ENV)
    here = Sandbox(timeout=3.0, workers=1, isolation="process")
    monkeypatch.setattr(type(here.isolation), "command", lambda self, runner, margin: ["/nonexistent/python"])
    with pytest.raises(SandboxUnavailable, match="the sandbox's runner does not start"):
        here.run("x = 1")
    assert run_guarded(lambda: here.run("x = 1")) == EXIT_MACHINE


def test_weaker_isolation_is_said_and_the_verdict_still_holds() -> None:
    """Where the host forbids namespaces the sandbox falls back, says so in its summary, and the
    verdict is still decided outside the program."""
    weak = Sandbox(timeout=3.0, workers=2, isolation="process")
    assert weak.isolation.level == "process" and "NO namespaces" in weak.isolation.description
    # Same user, same PID namespace: the evaluator makes itself non-dumpable, so a program of a
    # non-root user cannot read its /proc/<pid>/environ (root, as on this machine, still can).
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE
    for name in ("report line on every fd", "runner's send via gc", "always-equal object", "always-equal int"):
        forgery = FORGERIES[name]
        r = _check(weak, forgery if "def add" in forgery else WRONG_ADD + forgery)
        assert r.status == FAILED, (name, r)


# ---------------------------------------------------------------------------- pass@k


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
