"""Run untrusted Python (model completions) isolated, and decide pass or fail outside it.

    box = Sandbox(timeout=5.0, workers=4)
    task = CheckTask(program=prompt + completion, test=problem["test"] + "\\ncheck(f)",
                     helpers=prompt, proxied=("f",))
    box.check(task).status          # "passed" / "failed" / "timed out", with the reason
    box.check_many(tasks)           # `workers` at a time, results in order
    box.run("while True: pass")     # a program alone (see below)

The verdict is never the untrusted process's. The program (prompt plus completion) runs in
its own isolated process (`isolation.py`: bubblewrap's namespaces where the host permits) that
does nothing but define its functions and answer calls to them (`sandbox_runner.py`). The test
runs here, in the trusted process: the benchmark's test code and the prompt's own helpers,
with each `proxied` name bound to a function that sends the call across the process boundary.
Arguments and results cross as plain data (exact built-in types, `sandbox_runner.encode`); a
result that is anything else (an object whose `__eq__` always says True) cannot cross and
fails the test with that reason. A forged "passed" line, a patched builtin, `os._exit(0)` or
a killed parent therefore cannot pass a test: only the test's own asserts, run here, on values
the program returned, decide.

`run(program)` reports whether a program ran through without an exception. That report is
the untrusted process's own word: it serves tools and the isolation tests, never a score.

In the eval pod the program's process is not this one's child: it is started by the sandbox
server of the pod's other container (`sandbox_server.py`, level `container`), over a socket
that carries the same protocol; closing the connection kills it.

What is contained, and what is not (see isolation.py for the levels):
- at level `namespaces`: the filesystem (read-only system, private /tmp of 16 MiB), other
  processes (PID namespace: nothing outside is visible; every process the program starts dies
  with it), the network (none), the evaluator's environment (cleared), privileges (uid 65534, no
  capabilities); rlimits for memory, CPU seconds, file size, open files and processes;
- not contained at any level: CPU and memory use up to those limits for up to the timeout,
  kernel exploits (run the evaluator in a gVisor or Kata pod, `runtimeClassName`, for that);
- below `namespaces` (the host forbids user namespaces) a program can read the files the
  evaluator's user can read and signal (kill) its processes; the evaluator makes itself
  non-dumpable, so its environment and memory stay unreadable; the results file says how the
  programs were isolated (`sandbox.isolation`) and a warning is logged.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import MachineError
from .isolation import CONNECT_WAIT_S, PROCESS_MARGIN, RUNNER, Isolation, Level, connect, detect
from .sandbox_runner import Uncrossable, decode, encode

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
MAX_MESSAGE = 16 * 2**20  # bytes of one answer from the program
PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class CheckTask:
    """One program to judge. `program` is untrusted; `helpers` and `test` are trusted code run in
    this process (helpers first), with each name of `proxied` bound to the program's function of
    that name. The test passes when it runs through without an exception."""

    program: str
    test: str = ""
    helpers: str = ""
    proxied: tuple[str, ...] = ()


@dataclass
class SandboxResult:
    """The outcome of one program: status passed / failed / timed out, and why."""

    status: str
    error: str | None = None  # the exception's name, "Timeout", "Crashed", "Uncrossable"
    detail: str | None = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_dict(self) -> dict:
        return asdict(self)


class CandidateRaised(Exception):
    """The program's function raised: its exception, as the test sees it."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name}: {detail}")
        self.name = name


class SandboxUnavailable(MachineError):
    """The sandbox cannot run programs at all (its container not answering, its runner not
    starting): no verdict on any program. Raised, never scored: a pass@k of 0 from a broken
    sandbox would read as the model's. One line and exit 1 from a command (retried)."""


class _Timeout(Exception):
    pass


class _Crashed(Exception):
    pass


class Untrusted:
    """The isolated process of one program: starts it, calls its functions, kills it.

    The process is this one's child (pipes), or at level `container` the sandbox container's,
    reached over a connection to its server (`sandbox_server.py`), which kills the program when
    the connection closes."""

    def __init__(self, program: str, isolation: Isolation, limits: dict[str, int], margin: int, timeout: float):
        self._buf = b""
        self._calls = 0
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        if isolation.level == "container":
            assert isolation.socket is not None
            # Not part of the program's time: the server may be restarting (kubelet restarts it).
            try:
                self.sock = connect(isolation.socket, CONNECT_WAIT_S)
            except OSError as exc:
                raise SandboxUnavailable(
                    f"the sandbox container is not answering at {isolation.socket} ({exc}): no program can be judged"
                ) from None
            self._read_fd = self._write_fd = self.sock.fileno()
            self.deadline = time.monotonic() + timeout
            try:
                self._receive()  # the server's hello: its isolation, known since `detect`
            except BaseException:
                self.sock.close()
                raise
        else:
            try:
                self.proc = subprocess.Popen(
                    isolation.command(RUNNER, margin),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    bufsize=0,
                )
            except OSError as exc:
                why = f"the sandbox's runner does not start ({exc}): no program can be judged"
                raise SandboxUnavailable(why) from None
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self._read_fd, self._write_fd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
            self.deadline = time.monotonic() + timeout
        try:
            self._send({"program": program, "limits": limits})
            self.loaded = self._receive()
        except BaseException:  # a program that never loads (a timeout) is killed all the same
            self.kill()
            raise

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._calls += 1
        try:
            request = {
                "id": self._calls,
                "call": name,
                "args": [encode(a) for a in args],
                "kwargs": {k: encode(v) for k, v in kwargs.items()},
            }
        except Uncrossable as exc:
            raise Uncrossable(f"the test passed {exc} to {name}(), which cannot cross the boundary") from None
        self._send(request)
        answer = self._receive()
        if answer.get("id") != self._calls:  # an answer sent ahead of its question
            raise _Crashed(f"an answer to call {str(answer.get('id'))[:20]}, not to call {self._calls}")
        if "value" in answer:
            return decode(answer["value"])
        if "raised" in answer:
            raise CandidateRaised(str(answer["raised"])[:100], str(answer.get("detail", ""))[:300])
        if "uncrossable" in answer:
            raise Uncrossable(f"{name}() returned {str(answer['uncrossable'])[:200]}, not plain data")
        raise _Crashed(f"an answer that is not one: {str(answer)[:200]}")

    def _send(self, message: dict[str, Any]) -> None:
        data = memoryview(json.dumps(message).encode() + b"\n")
        try:
            while data:
                data = data[os.write(self._write_fd, data) :]
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise _Crashed("the program's process ended") from None

    def _receive(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            ready, _, _ = select.select([self._read_fd], [], [], left)
            if not ready:
                raise _Timeout()
            try:
                chunk = os.read(self._read_fd, 1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise _Crashed(self._exit_reason())
            self._buf += chunk
            if len(self._buf) > MAX_MESSAGE:
                raise _Crashed(f"an answer over {MAX_MESSAGE} bytes")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise _Crashed("an answer that is not JSON") from None
        if not isinstance(message, dict):
            raise _Crashed("an answer that is not a JSON object")
        return message

    def _exit_reason(self) -> str:
        if self.proc is None:
            return "the program's process ended (the sandbox container closed the connection)"
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "the program closed its output"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"  # SIGKILL / SIGSEGV: often the memory limit
        return f"exit code {code} without an answer"

    def kill(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the server kills the program's process group
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Sandbox:
    """Judges programs each in its own isolated process, `workers` at a time (threads here)."""

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        file_mb: int = 16,
        workers: int = 4,
        nproc: int = PROCESS_MARGIN,
        isolation: Level = "container",
    ):
        self.timeout = timeout
        self.memory_bytes = memory_mb * 2**20
        self.file_bytes = file_mb * 2**20
        self.workers = max(1, workers)
        self.nproc = nproc
        self.isolation = detect(isolation)
        if self.isolation.level in ("network-namespace", "process"):
            _not_dumpable()

    @property
    def isolation_summary(self) -> dict[str, str]:
        """What the results file says about the isolation: its level, what it is, and why it is not
        stronger."""
        out = {"level": self.isolation.name, "description": self.isolation.description}
        if self.isolation.why:
            out["weaker_because"] = self.isolation.why
        return out

    def check(self, task: CheckTask) -> SandboxResult:
        start = time.monotonic()
        untrusted = None
        try:
            untrusted = Untrusted(task.program, self.isolation, self._limits(), self.nproc, self.timeout)
            if not untrusted.loaded.get("loaded"):
                return _result(
                    FAILED, str(untrusted.loaded.get("error"))[:100], str(untrusted.loaded.get("detail"))[:500], start
                )
            namespace: dict[str, Any] = {"__name__": "__check__"}
            exec(compile(task.helpers, "<helpers>", "exec"), namespace)
            for name in task.proxied:
                namespace[name] = _proxy(untrusted, name)
            exec(compile(task.test, "<test>", "exec"), namespace)
        except SandboxUnavailable:
            raise
        except _Timeout:
            return _result(TIMED_OUT, "Timeout", f"no answer within {self.timeout:g} s", start)
        except _Crashed as exc:
            return _result(FAILED, "Crashed", str(exc), start)
        except CandidateRaised as exc:
            return _result(FAILED, exc.name, str(exc), start)
        except Uncrossable as exc:
            return _result(FAILED, "Uncrossable", str(exc), start)
        except Exception as exc:  # the test failed: an assert, or an error on the values it got back
            return _result(FAILED, type(exc).__name__, str(exc)[:500], start)
        finally:
            if untrusted is not None:
                untrusted.kill()
        return _result(PASSED, None, None, start)

    def check_many(self, tasks: Sequence[CheckTask]) -> list[SandboxResult]:
        """Judge all tasks, `workers` at a time; results in the same order."""
        if not tasks:
            return []
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(self.check, t) for t in tasks]
            try:
                return [f.result() for f in futures]
            except SandboxUnavailable:
                for f in futures:  # the rest would wait for it too, each in turn
                    f.cancel()
                raise

    def run(self, program: str) -> SandboxResult:
        """Whether `program` runs through without an exception, in its own word (no test)."""
        return self.check(CheckTask(program))

    def run_many(self, programs: Sequence[str]) -> list[SandboxResult]:
        return self.check_many([CheckTask(p) for p in programs])

    def _limits(self) -> dict[str, int]:
        return {
            "memory_bytes": self.memory_bytes,
            "file_bytes": self.file_bytes,
            "cpu_seconds": int(self.timeout) + 1,
        }


def _proxy(untrusted: Untrusted, name: str):
    def call(*args: Any, **kwargs: Any) -> Any:
        return untrusted.call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _result(status: str, error: str | None, detail: str | None, start: float) -> SandboxResult:
    return SandboxResult(status, error, detail, time.monotonic() - start)


def _not_dumpable() -> None:
    """Without a PID namespace a program runs as the evaluator's user and could read its
    /proc/<pid>/environ (API keys) or memory: a non-dumpable process's /proc files belong to
    root, and it cannot be traced."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
