"""A real Kubernetes control plane on loopback, built from source, for tests and benchmarks.

    python e2e/cluster.py up      # start it and wait (Ctrl-C tears it down)

`ControlPlane` starts etcd, kube-apiserver, kube-controller-manager (the Job, garbage
collector, PV binder and service-account controllers are all on by default) and
kube-scheduler, each from binaries `e2e/tools.sh` builds into a cache outside the repo at
the versions pinned in `e2e/versions.env`. Everything listens on 127.0.0.1 on free
ports; certificates, the service-account key pair and an admin token are generated per
cluster, so several clusters can run at once and nothing outlives `stop()`.

Optionally it starts kwok, which manages the nodes annotated `kwok.x-k8s.io/node: fake`
with the Stages of `e2e/kwok-stages.yaml`: thousands of pods can be scheduled and carried
through Running to Succeeded or Failed with no process behind them. Pods that must really
run go to `e2e/node_agent.py`'s node instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

E2E = Path(__file__).resolve().parent
ROOT = E2E.parent
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_TAINT = {"key": KWOK_ANNOTATION, "value": "fake", "effect": "NoSchedule"}
ADMIN_TOKEN_USER = "e2e-admin"


def tool(name: str) -> Path:
    """Path of a pinned tool (`helm`, `kube` bin dir, `kwok`), built on first use."""
    out = subprocess.run([str(E2E / "tools.sh"), name], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(pki: Path) -> None:
    """A CA, the API server's serving certificate for 127.0.0.1, and the SA signing key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3",
        "-subj",
        "/CN=nanochat-e2e-ca",
        cwd=pki,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
        cwd=pki,
    )
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "3",
        "-extfile",
        "san.ext",
        cwd=pki,
    )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str, user: str = "admin") -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    workdir: Path
    with_kwok: bool = True
    # Log every request a ServiceAccount makes (the operator is the only client that uses one) to
    # `audit_log`, one JSON line each: what bench/operator_scale.py counts.
    audit: bool = False
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server: str = ""
    kubeconfig: Path = Path()
    bin_dir: Path = Path()

    @property
    def audit_log(self) -> Path:
        return self.workdir / "logs" / "audit.jsonl"

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],  # one line per request
            "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}],
        }
        path = self.workdir / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        return ["--audit-policy-file", str(path), "--audit-log-path", str(self.audit_log), "--audit-log-format", "json"]

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 180.0) -> ControlPlane:
        self.bin_dir = tool("kube")
        kwok = tool("kwok") if self.with_kwok else None
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        pki = self.workdir / "pki"
        make_certs(pki)
        token = os.urandom(16).hex()
        # Static token of a system:masters user: the controllers and tests act as cluster admin.
        (pki / "tokens.csv").write_text(f'{token},{ADMIN_TOKEN_USER},e2e-admin-uid,"system:masters"\n')
        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.server, pki / "ca.crt", token)
        try:
            self._spawn(
                "etcd",
                [
                    str(self.bin_dir / "etcd"),
                    "--data-dir",
                    str(self.workdir / "etcd"),
                    "--name",
                    "e2e",
                    "--listen-client-urls",
                    f"http://127.0.0.1:{etcd_port}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{etcd_port}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{etcd_peer}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{etcd_peer}",
                    "--initial-cluster",
                    f"e2e=http://127.0.0.1:{etcd_peer}",
                    # A throwaway test cluster: durability is not worth an fsync per write.
                    "--unsafe-no-fsync",
                    "--log-level",
                    "warn",
                ],
            )
            self._spawn(
                "kube-apiserver",
                [
                    str(self.bin_dir / "kube-apiserver"),
                    "--etcd-servers",
                    f"http://127.0.0.1:{etcd_port}",
                    "--bind-address",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                    "--secure-port",
                    str(api_port),
                    "--tls-cert-file",
                    str(pki / "apiserver.crt"),
                    "--tls-private-key-file",
                    str(pki / "apiserver.key"),
                    "--client-ca-file",
                    str(pki / "ca.crt"),
                    "--token-auth-file",
                    str(pki / "tokens.csv"),
                    "--authorization-mode",
                    "RBAC",
                    # OpenShift's default: setting blockOwnerDeletion on a child needs `update` on the
                    # owner's finalizers, which the chart must grant the operator.
                    "--enable-admission-plugins",
                    "OwnerReferencesPermissionEnforcement",
                    "--service-account-issuer",
                    "https://kubernetes.default.svc.cluster.local",
                    "--service-account-key-file",
                    str(pki / "sa.pub"),
                    "--service-account-signing-key-file",
                    str(pki / "sa.key"),
                    "--service-cluster-ip-range",
                    "10.96.0.0/16",
                    "--allow-privileged=true",
                    "--profiling=false",
                    "--cert-dir",
                    str(pki / "generated"),
                    *self._audit_flags(),
                ],
            )
            self._wait_ready(timeout)
            common = [
                "--kubeconfig",
                str(self.kubeconfig),
                "--authentication-kubeconfig",
                str(self.kubeconfig),
                "--authorization-kubeconfig",
                str(self.kubeconfig),
                "--bind-address",
                "127.0.0.1",
                "--leader-elect=false",
                "--profiling=false",
            ]
            self._spawn(
                "kube-controller-manager",
                [
                    str(self.bin_dir / "kube-controller-manager"),
                    *common,
                    "--secure-port",
                    str(free_port()),
                    "--service-account-private-key-file",
                    str(pki / "sa.key"),
                    "--root-ca-file",
                    str(pki / "ca.crt"),
                    "--use-service-account-credentials=false",
                    # The scale tests create hundreds of Jobs at once: let the controllers keep up.
                    "--kube-api-qps",
                    "200",
                    "--kube-api-burst",
                    "400",
                    "--concurrent-job-syncs",
                    "20",
                ],
            )
            self._spawn(
                "kube-scheduler", [str(self.bin_dir / "kube-scheduler"), *common, "--secure-port", str(free_port())]
            )
            if kwok is not None:
                self._spawn(
                    "kwok",
                    [
                        str(kwok),
                        "--kubeconfig",
                        str(self.kubeconfig),
                        "-c",
                        str(E2E / "kwok-stages.yaml"),
                        "--manage-nodes-with-annotation-selector",
                        f"{KWOK_ANNOTATION}=fake",
                        # Pod IPs on loopback: a scrape of a fake pod is refused at once instead
                        # of hanging until its timeout on an unroutable address.
                        "--cidr",
                        "127.1.0.0/16",
                        "--node-ip",
                        "127.0.0.1",
                        "--node-lease-duration-seconds",
                        "40",
                        "--server-address",
                        f"127.0.0.1:{free_port()}",
                    ],
                )
            # The service-account controller makes `default` in each namespace; pods need it.
            self.wait_for(
                lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                timeout,
                "the default ServiceAccount",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self) -> None:
        """Raise with the log tail of any component that has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    # ------------------------------------------------------------------ helpers

    def _wait_ready(self, timeout: float) -> None:
        token = yaml.safe_load(self.kubeconfig.read_text())["users"][0]["user"]["token"]
        ca = ssl.create_default_context(cafile=str(self.workdir / "pki" / "ca.crt"))

        def ready() -> bool:
            try:
                r = httpx.get(
                    f"{self.server}/readyz", verify=ca, headers={"Authorization": f"Bearer {token}"}, timeout=5
                )
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for(ready, timeout, "kube-apiserver /readyz")

    def wait_for(self, cond: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            value = cond()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm/the operator pointing at this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def apply(self, docs: list[dict[str, Any]] | dict[str, Any], **kw: Any) -> subprocess.CompletedProcess[str]:
        docs = docs if isinstance(docs, list) else [docs]
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), **kw)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def add_kwok_nodes(self, count: int, gpus: int = 8, prefix: str = "kwok-gpu") -> list[str]:
        """Fake GPU nodes that kwok runs: capacity and allocatable advertise nvidia.com/gpu."""
        names = [f"{prefix}-{i}" for i in range(count)]
        capacity = {"cpu": "96", "memory": "1Ti", "pods": "110", "nvidia.com/gpu": str(gpus)}
        nodes = [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": n,
                    "annotations": {KWOK_ANNOTATION: "fake"},
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": n,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "nvidia.com/gpu.present": "true",
                    },
                },
                "spec": {"taints": [KWOK_TAINT]},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
            for n in names
        ]
        self.apply(nodes)

        def all_ready() -> bool:
            items = self.get("nodes", "-l", "type=kwok")["items"]
            ready = {
                i["metadata"]["name"]
                for i in items
                for c in i.get("status", {}).get("conditions", [])
                if c["type"] == "Ready" and c["status"] == "True"
            }
            return set(names) <= ready

        self.wait_for(all_ready, 120, f"{count} kwok nodes Ready")
        return names


def main(argv: list[str]) -> int:
    if argv[1:2] != ["up"]:
        print("usage: python e2e/cluster.py up", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-e2e-"))
    with ControlPlane(workdir) as cp:
        print(f"control plane up; export KUBECONFIG={cp.kubeconfig}\nlogs in {workdir}/logs; Ctrl-C stops it")
        try:
            while True:
                time.sleep(5)
                cp.check_alive()
        except KeyboardInterrupt:
            pass
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
