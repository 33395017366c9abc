"""The operator installed by its Helm chart, but run as a local process: e2e harness.

There is no container runtime here, so the chart is installed with `replicaCount: 0`
and the operator runs on this machine exactly as the chart's Deployment would run it:
the container's args and env come from the manifest Helm rendered and installed, and
it authenticates with a token of the chart's ServiceAccount, so every API call it makes
is checked against the chart's RBAC.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from .cluster import ROOT, ControlPlane, free_port, tool, write_kubeconfig

CHART = ROOT / "helm" / "nanochat-operator"


@dataclass
class ChartOperator:
    cp: ControlPlane
    namespace: str = "nanochat-system"
    release: str = "nanochat"
    values: dict[str, Any] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)  # after the chart's: a later flag wins
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0

    @property
    def log_path(self) -> Path:
        return self.cp.workdir / "logs" / "operator.log"

    def install(self) -> ChartOperator:
        self.metrics_port = free_port()
        values = {
            "replicaCount": 0,  # the operator runs as a local process (see the module doc)
            "metrics": {"port": self.metrics_port},
            "livenessPort": free_port(),
            "operator": {"logFormat": "plain"},
        }
        _merge(values, self.values)
        values_file = self.cp.workdir / "operator-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        helm = tool("helm")
        subprocess.run(
            [
                str(helm),
                "install",
                self.release,
                str(CHART),
                "--namespace",
                self.namespace,
                "--create-namespace",
                "--values",
                str(values_file),
                "--wait",
                "--timeout",
                "2m",
            ],
            env=self.cp.env(),
            check=True,
            capture_output=True,
            text=True,
        )
        self.cp.wait_for(self._crds_established, 60, "the CRDs Established")
        return self

    def _crds_established(self) -> bool:
        crds = self.cp.get("crd", "trainingruns.nanochat.io", "evalruns.nanochat.io")["items"]
        return len(crds) == 2 and all(
            any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"].get("conditions", []))
            for crd in crds
        )

    def deployment(self) -> dict[str, Any]:
        """The operator Deployment Helm installed (the source of the command line)."""
        out = subprocess.run(
            [str(tool("helm")), "get", "manifest", self.release, "--namespace", self.namespace],
            env=self.cp.env(),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for doc in yaml.safe_load_all(out):
            if doc and doc.get("kind") == "Deployment":
                return doc
        raise RuntimeError("the chart installed no Deployment")

    def service_account_kubeconfig(self) -> Path:
        pod = self.deployment()["spec"]["template"]["spec"]
        sa = pod["serviceAccountName"]
        token = self.cp.kubectl(
            "create", "token", sa, "--namespace", self.namespace, "--duration", "24h"
        ).stdout.strip()
        return write_kubeconfig(
            self.cp.workdir / "operator-kubeconfig", self.cp.server, self.cp.workdir / "pki" / "ca.crt", token, user=sa
        )

    def command(self) -> tuple[list[str], dict[str, str]]:
        container = self.deployment()["spec"]["template"]["spec"]["containers"][0]
        # The image's entrypoint is `python -m nanochat_operator` (operator/Dockerfile).
        argv = [sys.executable, "-m", "nanochat_operator", *container.get("args", []), *self.extra_args]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        return argv, env

    def start(self) -> ChartOperator:
        argv, chart_env = self.command()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(chart_env)
        env["KUBECONFIG"] = str(self.service_account_kubeconfig())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.cp.workdir),
            start_new_session=True,
        )
        log.close()
        self.cp.wait_for(self._ready, 60, "the operator's /readyz")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers run, as when a node dies or the OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def peak_rss_mib(self) -> float:
        """The operator process's peak resident memory (VmHWM) so far."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def wait_phase(
    cp: ControlPlane,
    kind: str,
    name: str,
    phases: set[str],
    timeout: float,
    namespace: str = "default",
    operator: ChartOperator | None = None,
) -> dict[str, Any]:
    """Poll a run until its phase is one of `phases`; the error says where it got stuck."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        out = cp.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if out.returncode == 0:
            last = json.loads(out.stdout)
        return (last.get("status") or {}).get("phase") in phases

    try:
        cp.wait_for(reached, timeout, f"{kind} {name} in {sorted(phases)}", interval=1.0)
    except TimeoutError as err:
        tail = operator.log_tail(30) if operator else ""
        raise TimeoutError(f"{err}; last status: {json.dumps(last.get('status'))}\n{tail}") from None
    return last


def wait_until(deadline_s: float, cond: Any, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {deadline_s:.0f}s waiting for {what}")


def events_of(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """Events about one object, oldest first."""
    items = cp.get("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")["items"]
    # eventTime (microseconds) first: the operator's phase events can share a second.
    return sorted(items, key=lambda e: (e.get("eventTime") or e.get("firstTimestamp") or "", e["metadata"]["name"]))
