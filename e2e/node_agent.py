"""TestNodeAgent: a test harness that stands in for a kubelet, for end-to-end tests.

    python e2e/node_agent.py --kubeconfig KC --node-name agent-0 --workdir /tmp/agent

It registers one Node on a real kube-apiserver, keeps it Ready (Lease renewals and
status heartbeats), and really runs the pods bound to it as local processes of this
machine, reporting their status back the way a kubelet does: Running with a pod IP,
then Succeeded or Failed with the exit code and termination message, and deleting
them once their processes are gone. Each pod runs under
`<workdir>/pods/<namespace>_<name>_<uid>/`, with its combined output in `log` there; its
processes carry the pod's uid in their environment, which stands in for a container's
cgroup: killing a pod kills all of them, even those that left its process group.

What it does NOT do, because there is no container runtime here:
  * no images: the container's `command` must name an executable on this machine's
    PATH (the image and any image entrypoint are ignored), except for an image given a
    stand-in (`stand_ins`: image -> program): its container runs that program, with the
    rest of its command and args, in place of its command's first word. This is how a test
    double takes the place of an image that cannot run here (vLLM, which needs GPUs);
  * no filesystem or network namespaces: volumes become host directories, and an arg or
    env value that is a container path (after `$(VAR)` expansion) is rewritten to the host
    path, as are such paths in ConfigMap files; paths inside a shell script are not, so
    pass them through env;
    every pod's IP is 127.0.0.1 and Service / headless-pod DNS names in env and args
    are rewritten to 127.0.0.1 (so two pods must not listen on the same port);
  * no resource limits are enforced (extended resources such as GPUs are only advertised),
    and no probes run (Ready as soon as started) but a native sidecar's startupProbe;
  * only the first container runs (init containers run first, in order); a native sidecar
    (an init container with `restartPolicy: Always`) is started and, as a kubelet does, the
    next container waits for its startupProbe (exec or httpGet) if it has one; it is never
    restarted, and is killed with the pod's other processes when the main container ends. A
    sidecar that exits, or fails its startupProbe failureThreshold times, fails the pod (a
    kubelet would restart it until the Job's deadline).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

LOG = logging.getLogger("nanochat.e2e.node_agent")
LOCAL_IP = "127.0.0.1"
DEFAULT_CAPACITY = {"cpu": "32", "memory": "256Gi", "pods": "110"}
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_EVERY_S, STATUS_EVERY_S, WATCH_TIMEOUT_S, CONFIG_RETRY_S = 10, 60, 5, 5
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


# ---------------------------------------------------------------- pure helpers


def now(micro: bool = False) -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def expand_vars(s: str, env: Mapping[str, str]) -> str:
    """Kubelet's `$(VAR)` expansion: `$$` is a literal `$`, unknown `$(VAR)` stays as written."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "$" and i + 1 < len(s):
            if s[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            end = s.find(")", i + 2) if s[i + 1] == "(" else -1
            if end != -1:
                name = s[i + 2 : end]
                out.append(env[name] if name in env else s[i : end + 1])
                i = end + 1
                continue
        out.append(s[i])
        i += 1
    return "".join(out)


def _by_length(mounts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # The longest mount wins, so /data/runs/x goes to a /data/runs mount before a /data one.
    norm = [(m.rstrip("/") or "/", h) for m, h in mounts]
    return sorted(norm, key=lambda mh: len(mh[0]), reverse=True)


def rewrite_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """A container path (a mountPath or below one) as the host path the process really sees."""
    for mount, host in _by_length(mounts):
        if value == mount or value.startswith(mount + "/"):
            return host + value[len(mount) :]
    return value


def rewrite_paths_in_text(text: str, mounts: list[tuple[str, str]]) -> str:
    """The same rewrite inside a file (a ConfigMap's config.yaml), only where a path starts."""
    ordered = _by_length(mounts)
    if not ordered:
        return text
    hosts = dict(ordered)
    alternatives = "|".join(re.escape(m) for m, _ in ordered)
    # A path starts at the start, after whitespace, a quote, `=`, `:`, `,` or a YAML flow `[`.
    pattern = re.compile(r"""(?<![^\s"'=:,\[])(""" + alternatives + r""")(?=/|$|[\s"',\]}])""", re.MULTILINE)
    # One pass, so a host path that itself contains a mount path is never rewritten twice.
    return pattern.sub(lambda m: hosts[m.group(1)], text)


def _is_service_host(host: str, namespace: str, services: set[str]) -> bool:
    labels = host.lower().split(".")
    for suffix in ([], [namespace], [namespace, "svc"], [namespace, "svc", "cluster", "local"]):
        rest = labels[: len(labels) - len(suffix)] if suffix else labels
        if suffix and labels[len(rest) :] != suffix:
            continue
        # <svc>[.suffix] or <pod hostname>.<headless svc>[.suffix]
        if (len(rest) == 1 and rest[0] in services) or (len(rest) == 2 and rest[0] and rest[1] in services):
            return True
    return False


_URL = re.compile(r"^(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@]*@)?)(?P<host>[^/:?#\[\]]+)(?P<rest>.*)$", re.S)
_HOSTPORT = re.compile(r"^(?P<host>[A-Za-z0-9.-]+)(?P<rest>:\d+)$")


_URL_IN_TEXT = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<host>[A-Za-z0-9.-]+)")


def map_service_urls_in_text(text: str, namespace: str, services: set[str]) -> str:
    """Cluster DNS stand-in inside config files: the host of every URL naming a Service
    (a teacher endpoint in the trainer's config.yaml, say) becomes 127.0.0.1."""
    return _URL_IN_TEXT.sub(
        lambda m: m["pre"] + (LOCAL_IP if _is_service_host(m["host"], namespace, services) else m["host"]), text
    )


def map_service_hosts(value: str, namespace: str, services: set[str]) -> str:
    """Cluster DNS stand-in: a Service or headless-pod name (or a URL / host:port with
    one) becomes 127.0.0.1, since every pod of this node runs on this machine."""
    if _is_service_host(value, namespace, services):
        return LOCAL_IP
    for rx in (_URL, _HOSTPORT):
        m = rx.match(value)
        if m and _is_service_host(m["host"], namespace, services):
            return (m.groupdict().get("pre") or "") + LOCAL_IP + m["rest"]
    return value


def exit_code_of(returncode: int) -> int:
    """Popen's -N for "killed by signal N" as a container runtime reports it: 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def termination_message(term: bytes, log_tail: bytes, policy: str, exit_code: int) -> str:
    if term.strip():
        return term[-4096:].decode("utf-8", "replace")
    if policy == "FallbackToLogsOnError" and exit_code != 0:
        return b"".join(log_tail.splitlines(keepends=True)[-80:])[-2048:].decode("utf-8", "replace")
    return ""


def field_ref_value(pod: dict[str, Any], path: str) -> str:
    meta, spec = pod["metadata"], pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": LOCAL_IP,
        "status.podIPs": LOCAL_IP,
        "status.hostIP": LOCAL_IP,
        "status.hostIPs": LOCAL_IP,
    }
    if path in simple:
        return simple[path] or ""
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.*)'\]", path)
    return (meta.get(m[1]) or {}).get(m[2], "") if m else ""


_SUFFIX = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(q: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q).strip())
    if not m or m[2] not in _SUFFIX:
        raise ValueError(f"unsupported quantity {q!r}")
    return float(m[1]) * _SUFFIX[m[2]]


def resource_field_value(container: dict[str, Any], ref: dict[str, Any], capacity: dict[str, str]) -> str | None:
    """Best effort: limits fall back to the node's capacity, as the kubelet does; rounded up."""
    kind, _, name = ref.get("resource", "").partition(".")
    q = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if q is None and kind == "limits":
        q = capacity.get(name)
    try:
        return str(math.ceil(parse_quantity(q) / parse_quantity(ref.get("divisor") or "1"))) if q else None
    except ValueError:
        return None


# ---------------------------------------------------------------- the agent


class _Gone(Exception):
    """The pod no longer exists on the API server."""


class _ConfigError(Exception):
    """Missing ConfigMap/Secret/claim: the kubelet keeps the pod Pending and retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _StartError(Exception):
    """The container cannot start at all (no command, no executable): the pod fails."""


@dataclass
class _Plan:
    container: dict[str, Any]
    argv: list[str]
    executable: str
    env: dict[str, str]
    cwd: Path
    term_file: Path


@dataclass
class _PodRun:
    namespace: str
    name: str
    uid: str
    dir: Path
    proc: subprocess.Popen | None = None
    deleting: bool = False
    restarts: int = 0
    finished: bool = False  # a terminal status was reported; nothing may overwrite it
    start_time: str = field(default_factory=now)
    status_lock: threading.Lock = field(default_factory=threading.Lock)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


POD_MARKER = "NANOCHAT_E2E_POD_UID"  # set in every pod process's environment


def processes_of_pod(uid: str) -> list[int]:
    """PIDs whose environment carries the pod's marker: this harness's stand-in for a
    container's cgroup. The process group is not enough: torchrun starts its workers in
    sessions of their own, so killing torchrun's group would leave them training."""
    marker = f"{POD_MARKER}={uid}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _signal_pod(run: _PodRun, sig: int) -> None:
    """Signal every process of a pod, as a container runtime signals a container's cgroup."""
    if run.proc is not None:
        _signal_group(run.proc.pid, sig)
    for pid in processes_of_pod(run.uid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class TestNodeAgent:
    """One fake node whose pods run as process groups of this machine (see module docstring)."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        kubeconfig: str,
        node_name: str,
        workdir: Path,
        capacity: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        stand_ins: dict[str, list[str]] | None = None,
    ) -> None:
        self.node_name = node_name
        self.stand_ins = dict(stand_ins or {})  # image -> the argv that replaces its command's first word
        self.workdir = Path(workdir).resolve()
        self.capacity = dict(capacity or DEFAULT_CAPACITY)
        self.labels = dict(labels or {})
        self.base_env = {"PATH": os.environ.get("PATH", os.defpath), **(extra_env or {})}
        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self._pods: dict[str, _PodRun] = {}  # by uid: a recreated pod of the same name is a new run
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ public interface

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        self._renew_lease()
        for target in (self._heartbeat_loop, self._watch_loop):
            t = threading.Thread(target=target, name=f"{self.node_name}-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        LOG.info("node %s registered; running pods under %s", self.node_name, self.workdir)

    def stop(self) -> None:
        with self._lock:
            self._stop.set()  # under the lock: no worker can spawn a process after this
            runs = [r for r in self._pods.values() if r.proc is not None]
            procs = [r.proc for r in runs if r.proc is not None]
        for r in runs:
            _signal_pod(r, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                LOG.warning("pid %d survived SIGKILL", p.pid)
        for t in self._threads:
            t.join(timeout=WATCH_TIMEOUT_S + 5)
        self._threads.clear()

    def pod_pid(self, namespace: str, name: str) -> int | None:
        with self._lock:
            for r in self._pods.values():
                if (r.namespace, r.name) == (namespace, name) and r.proc is not None and r.proc.poll() is None:
                    return r.proc.pid
        return None

    def kill_pod(self, namespace: str, name: str) -> bool:
        """SIGKILL every process of a running pod at once, as the OOM killer or a lost node
        would end a container; the pod then reports exit code 137. False if none runs."""
        with self._lock:
            runs = [
                r
                for r in self._pods.values()
                if (r.namespace, r.name) == (namespace, name) and r.proc is not None and r.proc.poll() is None
            ]
        for r in runs:
            _signal_pod(r, signal.SIGKILL)
        return bool(runs)

    def pod_log(self, namespace: str, name: str) -> str:
        with self._lock:
            dirs = [r.dir for r in self._pods.values() if (r.namespace, r.name) == (namespace, name)]
        dirs = dirs or sorted((self.workdir / "pods").glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime)
        log = dirs[-1] / "log" if dirs else None
        return log.read_text(errors="replace") if log and log.exists() else ""

    # ------------------------------------------------------------ API plumbing

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An API call retried on conflicts, server errors and connection errors; 404 -> _Gone.
        The raw response: plain JSON is all this harness needs, and no model can reject it."""
        for attempt in range(5):
            try:
                return fn(*args, _preload_content=False, **kwargs)
            except ApiException as e:
                if e.status == 404:
                    raise _Gone() from e
                if attempt == 4 or not (e.status in (409, 429) or (e.status or 0) >= 500):
                    raise
            except (urllib3.exceptions.HTTPError, OSError):
                if attempt == 4:
                    raise
            time.sleep(0.2 * 2**attempt)

    def _get(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        try:
            return json.loads(self._call(fn, *args).data)
        except _Gone:
            return None

    def _patch_pod_status(self, run: _PodRun, status: dict[str, Any], final: bool = False) -> None:
        # Serialized per pod, so a late "Running" from the worker can't follow the deletion's final status.
        with run.status_lock:
            if run.finished:
                return
            try:
                self._call(
                    self.core.patch_namespaced_pod_status,
                    run.name,
                    run.namespace,
                    {"status": status},
                    _content_type=SMP,
                )
            except _Gone:
                self._forget(run)
            run.finished = final

    # ------------------------------------------------------------ node and heartbeat

    def _register_node(self) -> None:
        labels = {
            **self.labels,
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "nanochat-e2e-agent",
        }
        for attempt in range(5):
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Node",
                "spec": {},
                "metadata": {"name": self.node_name, "labels": labels},
            }
            try:
                old = self._get(self.core.read_node, self.node_name)
                if old is None:
                    self.core.create_node(body, _preload_content=False)
                else:
                    body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
                    self.core.replace_node(self.node_name, body, _preload_content=False)
                break
            except ApiException as e:
                if e.status != 409 or attempt == 4:  # 409: raced with another writer; read again
                    raise
        self._patch_node_status()

    def _patch_node_status(self) -> None:
        t = now()
        conditions = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "nanochat e2e test node agent is posting ready status",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }
        ]
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure"):
            conditions.append(
                {
                    "type": kind,
                    "status": "False",
                    "reason": f"KubeletHasNo{kind}",
                    "lastHeartbeatTime": t,
                    "lastTransitionTime": t,
                }
            )
        info = {
            "machineID": "nanochat-e2e",
            "systemUUID": "nanochat-e2e",
            "bootID": "nanochat-e2e",
            "kernelVersion": os.uname().release,
            "osImage": "nanochat e2e test node agent",
            "containerRuntimeVersion": "nanochat-e2e://0",
            "kubeletVersion": "v1.36.3",
            "kubeProxyVersion": "v1.36.3",
            "operatingSystem": "linux",
            "architecture": "amd64",
        }
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": LOCAL_IP}, {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": info,
        }
        self._call(self.core.patch_node_status, self.node_name, {"status": status}, _content_type=SMP)

    def _renew_lease(self) -> None:
        patch = {"spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": now(micro=True)}}
        try:
            self._call(self.coord.patch_namespaced_lease, self.node_name, LEASE_NAMESPACE, patch, _content_type=MERGE)
        except _Gone:
            # Created without renewTime (a typed field) and patched, so the MicroTime string goes through as-is.
            lease = {
                "metadata": {"name": self.node_name, "namespace": LEASE_NAMESPACE},
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40},
            }
            self._call(self.coord.create_namespaced_lease, LEASE_NAMESPACE, lease)
            self._call(self.coord.patch_namespaced_lease, self.node_name, LEASE_NAMESPACE, patch, _content_type=MERGE)

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(LEASE_EVERY_S):
            try:
                self._renew_lease()
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    self._patch_node_status()
                    last_status = time.monotonic()
            except Exception:
                LOG.exception("node %s heartbeat failed", self.node_name)

    # ------------------------------------------------------------ pod watch

    def _watch_loop(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                rv = self._watch_once(rv) if rv else self._relist()
            except ApiException as e:
                if e.status != 410:
                    LOG.warning("pod watch of node %s failed (%s); reconnecting", self.node_name, e)
                    self._stop.wait(1)
                rv = None
            except Exception:
                LOG.exception("pod watch of node %s failed; reconnecting", self.node_name)
                self._stop.wait(1)

    def _relist(self) -> str:
        pods = json.loads(
            self._call(self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self.node_name}").data
        )
        seen = {p["metadata"]["uid"] for p in pods["items"]}
        with self._lock:
            missing = [uid for uid in self._pods if uid not in seen]
        for uid in missing:
            self._on_gone(uid)
        for pod in pods["items"]:
            self._on_pod(pod)
        return pods["metadata"]["resourceVersion"]

    def _watch_once(self, rv: str) -> str | None:
        """Events from `rv` until the server's timeout; the new rv, or None to re-list."""
        resp = self.core.list_pod_for_all_namespaces(
            watch=True,
            field_selector=f"spec.nodeName={self.node_name}",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_S,
            _preload_content=False,
        )
        try:
            for line in iter_resp_lines(resp):
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:  # expired: start over with a list
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                rv = obj.get("metadata", {}).get("resourceVersion") or rv
                if event["type"] in ("ADDED", "MODIFIED"):
                    self._on_pod(obj)
                elif event["type"] == "DELETED":
                    self._on_gone(obj["metadata"]["uid"])
                if self._stop.is_set():
                    break
        finally:
            resp.close()
            resp.release_conn()
        return rv

    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            run = self._pods.get(uid)
            if meta.get("deletionTimestamp"):
                if run is not None and run.deleting:
                    return
                run = run or self._new_run(pod)
                run.deleting = True
                target: Callable[..., None] = self._finish_deletion
            elif run is not None or (pod.get("status") or {}).get("phase", "Pending") != "Pending":
                return  # ours already, or settled before this agent saw it
            else:
                run = self._new_run(pod)
                target = self._run_pod
        threading.Thread(target=target, args=(run, pod), name=f"pod-{run.namespace}/{run.name}", daemon=True).start()

    def _new_run(self, pod: dict[str, Any]) -> _PodRun:
        meta = pod["metadata"]
        d = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        run = _PodRun(meta["namespace"], meta["name"], meta["uid"], d)
        self._pods[run.uid] = run
        return run

    def _on_gone(self, uid: str) -> None:
        with self._lock:
            run = self._pods.get(uid)
        if run is not None:
            self._forget(run)

    def _forget(self, run: _PodRun) -> None:
        """The pod object is gone: nothing to report to, so its processes just die."""
        with self._lock:
            run.deleting = True
            proc = run.proc
        if proc is not None and proc.poll() is None:
            LOG.info("pod %s/%s deleted while running; killing pid %d", run.namespace, run.name, proc.pid)
            _signal_pod(run, signal.SIGKILL)

    def _finish_deletion(self, run: _PodRun, pod: dict[str, Any]) -> None:
        """SIGTERM, the grace period, SIGKILL, final status, then the grace-0 delete a kubelet does."""
        try:
            proc = run.proc
            if proc is not None and proc.poll() is None:
                _signal_pod(run, signal.SIGTERM)
                grace = min(int(pod["metadata"].get("deletionGracePeriodSeconds") or 30), 30)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    _signal_pod(run, signal.SIGKILL)
                    proc.wait()
                _signal_pod(run, signal.SIGKILL)  # what the main process left behind
            if proc is not None:
                self._report_exit(run, pod, exit_code_of(proc.returncode), started=run.start_time)
            self.core.delete_namespaced_pod(
                run.name,
                run.namespace,
                _preload_content=False,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": run.uid}},
            )
        except _Gone:
            pass
        except ApiException as e:
            if e.status not in (404, 409):  # 409: the uid precondition failed, the pod is already gone
                LOG.warning("deleting pod %s/%s failed: %s", run.namespace, run.name, e)
        except Exception:
            LOG.exception("finishing the deletion of pod %s/%s failed", run.namespace, run.name)

    # ------------------------------------------------------------ running a pod

    def _abandoned(self, run: _PodRun) -> bool:
        return self._stop.is_set() or run.deleting

    def _run_pod(self, run: _PodRun, pod: dict[str, Any]) -> None:
        try:
            try:
                self._run_pod_inner(run, pod)
            except _StartError as e:
                LOG.info("pod %s/%s cannot start: %s", run.namespace, run.name, e)
                self._report_exit(run, pod, 128, reason="StartError", message=str(e))
        except _Gone:
            self._forget(run)
        except Exception:
            LOG.exception("pod %s/%s: agent error", run.namespace, run.name)

    def _run_pod_inner(self, run: _PodRun, pod: dict[str, Any]) -> None:
        spec = pod["spec"]
        main = spec["containers"][0]
        waited = ""
        while True:
            if self._abandoned(run):
                return
            try:
                plans = self._prepare(pod, run)
                break
            except _ConfigError as e:
                if str(e) != waited:
                    LOG.info("pod %s/%s waits (retrying every %ds): %s", run.namespace, run.name, CONFIG_RETRY_S, e)
                waited = str(e)
                waiting = self._waiting(main, e.reason, str(e))
                self._patch_pod_status(run, self._status(run, "Pending", False, [waiting]))
                self._stop.wait(CONFIG_RETRY_S)
        *inits, plan = plans
        for init in inits:
            proc = self._spawn(run, init)
            if proc is None:
                return
            if init.container.get("restartPolicy") == "Always":
                # A native sidecar: it runs beside the rest, and dies with the pod; what comes next
                # waits for its startupProbe.
                failure = self._wait_started(run, init, proc)
                if self._abandoned(run):
                    return
                if failure is not None:
                    _signal_pod(run, signal.SIGKILL)
                    code = exit_code_of(proc.wait())
                    init_status = self._terminated(init.container, code or 137, run.start_time, failure)
                    status = self._status(run, "Failed", False, [self._waiting(main, "PodInitializing")], [init_status])
                    self._patch_pod_status(run, status, final=True)
                    return
                continue
            code = exit_code_of(proc.wait())
            if self._abandoned(run):
                return
            if code != 0:
                message = self._message(run, init.container, init.term_file, code)
                init_status = self._terminated(init.container, code, run.start_time, message)
                status = self._status(run, "Failed", False, [self._waiting(main, "PodInitializing")], [init_status])
                self._patch_pod_status(run, status, final=True)
                return
        policy = spec.get("restartPolicy", "Always")
        while True:
            started = now()
            proc = self._spawn(run, plan)
            if proc is None:
                return
            running = self._running(main, proc.pid, started, run)
            self._patch_pod_status(run, self._status(run, "Running", True, [running]))
            code = exit_code_of(proc.wait())
            _signal_pod(run, signal.SIGKILL)  # a container ends with its main process: nothing may linger
            if self._abandoned(run):
                return  # the deletion (or stop) reports, if anyone does
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                run.restarts += 1
                LOG.info("pod %s/%s exited %d; restart %d", run.namespace, run.name, code, run.restarts)
                self._stop.wait(1)
                continue
            self._report_exit(run, pod, code, started=started)
            return

    def _spawn(self, run: _PodRun, plan: _Plan) -> subprocess.Popen | None:
        with self._lock:  # the same lock stop() takes, so no process escapes it
            if self._abandoned(run):
                return None
            plan.term_file.write_bytes(b"")
            try:
                with open(run.dir / "log", "ab") as log:
                    run.proc = subprocess.Popen(
                        plan.argv,
                        executable=plan.executable,
                        cwd=plan.cwd,
                        env=plan.env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # the pod is its own process group
            except OSError as e:
                raise _StartError(f"cannot run {plan.executable}: {e}") from e
            LOG.info(
                "pod %s/%s container %s: pid %d: %s",
                run.namespace,
                run.name,
                plan.container["name"],
                run.proc.pid,
                " ".join(plan.argv),
            )
            return run.proc

    def _wait_started(self, run: _PodRun, plan: _Plan, proc: subprocess.Popen) -> str | None:
        """A sidecar's startupProbe, run as a kubelet runs it before the next container starts: None
        once it passes (or when there is none); else why it did not."""
        probe = plan.container.get("startupProbe")
        if not probe:
            return None
        name = plan.container["name"]
        threshold = int(probe.get("failureThreshold", 3))
        self._stop.wait(int(probe.get("initialDelaySeconds", 0)))
        for _ in range(threshold):
            if self._abandoned(run):
                return None
            if proc.poll() is not None:
                return f"sidecar {name} exited {exit_code_of(proc.returncode)} before its startupProbe passed"
            if self._probe(plan, probe):
                LOG.info("pod %s/%s sidecar %s started (startupProbe passed)", run.namespace, run.name, name)
                return None
            self._stop.wait(int(probe.get("periodSeconds", 10)))
        return f"sidecar {name}: startupProbe failed {threshold} times"

    @staticmethod
    def _probe(plan: _Plan, probe: dict[str, Any]) -> bool:
        """One try of an exec or httpGet probe (on this machine: the pod's IP is loopback)."""
        timeout = int(probe.get("timeoutSeconds", 1))
        if "exec" in probe:
            try:
                done = subprocess.run(
                    probe["exec"]["command"],
                    env=plan.env,
                    cwd=plan.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=timeout,
                )
            except (OSError, subprocess.TimeoutExpired):
                return False
            return done.returncode == 0
        get = probe.get("httpGet")
        if get is None:
            return True  # tcpSocket, grpc: not run here
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in plan.container.get("ports") or [] if p.get("name") == port)
        try:
            with urllib.request.urlopen(f"http://{LOCAL_IP}:{port}{get.get('path', '/')}", timeout=timeout) as r:
                return 200 <= r.status < 400
        except OSError:
            return False

    def _message(self, run: _PodRun, container: dict[str, Any], term: Path, code: int) -> str:
        policy = container.get("terminationMessagePolicy", "File")
        term_bytes = term.read_bytes() if term.exists() else b""
        log_tail = b""
        if (run.dir / "log").exists():
            with open(run.dir / "log", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
                log_tail = f.read()
        return termination_message(term_bytes, log_tail, policy, code)

    def _report_exit(
        self,
        run: _PodRun,
        pod: dict[str, Any],
        code: int,
        started: str = "",
        reason: str = "",
        message: str | None = None,
    ) -> None:
        main = pod["spec"]["containers"][0]
        if message is None:
            message = self._message(run, main, self._term_file(run, main, True), code)
        cs = self._terminated(main, code, started or now(), message, reason, run.restarts)
        phase = "Succeeded" if code == 0 else "Failed"
        self._patch_pod_status(run, self._status(run, phase, False, [cs]), final=True)
        LOG.info("pod %s/%s exited %d", run.namespace, run.name, code)

    # ------------------------------------------------------------ status documents

    def _status(
        self,
        run: _PodRun,
        phase: str,
        ready: bool,
        statuses: list[dict[str, Any]],
        init_statuses: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        t = now()
        terminal = phase in ("Succeeded", "Failed")
        not_ready = "PodCompleted" if terminal else "ContainersNotReady"

        def cond(kind: str, ok: bool, reason: str = "") -> dict[str, Any]:
            return {
                "type": kind,
                "status": "True" if ok else "False",
                "lastTransitionTime": t,
                **({"reason": reason} if reason and not ok else {}),
            }

        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": LOCAL_IP,
            "hostIPs": [{"ip": LOCAL_IP}],
            "podIP": LOCAL_IP,
            "podIPs": [{"ip": LOCAL_IP}],
            "startTime": run.start_time,
            "conditions": [
                cond("PodReadyToStartContainers", True),
                cond("PodScheduled", True),
                cond("Initialized", init_statuses is None, "ContainersNotInitialized"),
                cond("ContainersReady", ready, not_ready),
                cond("Ready", ready, not_ready),
            ],
            "containerStatuses": statuses,
        }
        if init_statuses is not None:
            status["initContainerStatuses"] = init_statuses
        return status

    @staticmethod
    def _base(c: dict[str, Any], restarts: int = 0) -> dict[str, Any]:
        return {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": restarts}

    def _waiting(self, c: dict[str, Any], reason: str, message: str = "") -> dict[str, Any]:
        # Explicit nulls: a strategic merge patch merges `state` maps, and only one state may remain.
        return {
            **self._base(c),
            "ready": False,
            "started": False,
            "state": {"waiting": {"reason": reason, "message": message}, "running": None, "terminated": None},
        }

    def _running(self, c: dict[str, Any], pid: int, started: str, run: _PodRun) -> dict[str, Any]:
        return {
            **self._base(c, run.restarts),
            "containerID": f"nanochat-e2e://{pid}",
            "ready": True,
            "started": True,
            "state": {"running": {"startedAt": started}, "waiting": None, "terminated": None},
        }

    def _terminated(
        self, c: dict[str, Any], code: int, started: str, message: str, reason: str = "", restarts: int = 0
    ) -> dict[str, Any]:
        term = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": started,
            "finishedAt": now(),
            "message": message,
        }
        return {
            **self._base(c, restarts),
            "ready": False,
            "started": False,
            "state": {"terminated": term, "running": None, "waiting": None},
        }

    # ------------------------------------------------------------ volumes, env, command

    def _term_file(self, run: _PodRun, container: dict[str, Any], main: bool) -> Path:
        return run.dir / ("termination-log" if main else f"termination-log.{container['name']}")

    def _prepare(self, pod: dict[str, Any], run: _PodRun) -> list[_Plan]:
        """Volumes on disk and one plan per container to run: init containers, then the first one."""
        spec, ns = pod["spec"], run.namespace
        (run.dir / "cwd").mkdir(parents=True, exist_ok=True)
        containers = [(c, False) for c in spec.get("initContainers") or []] + [(spec["containers"][0], True)]
        dirs = self._volume_dirs(pod, run)
        mounts = [self._mounts(run, c, dirs, is_main) for c, is_main in containers]
        services = {
            s["metadata"]["name"] for s in (self._get(self.core.list_namespaced_service, ns) or {}).get("items", [])
        }
        self._fill_volumes(pod, dirs, mounts[-1], services)
        # subPaths exist once the volumes are filled (a subPath may name one of their files);
        # the last mapping of each container is its termination log, a file.
        for host in {h for ms in mounts for _, h in ms[:-1]}:
            if not os.path.exists(host):
                os.makedirs(host, exist_ok=True)
        return [self._plan(pod, run, c, ms, services) for (c, _), ms in zip(containers, mounts)]

    def _mounts(self, run: _PodRun, c: dict[str, Any], dirs: dict[str, Path], main: bool) -> list[tuple[str, str]]:
        mounts = [
            (m["mountPath"], str(dirs[m["name"]] / m.get("subPath", "")).rstrip("/"))
            for m in c.get("volumeMounts") or []
            if m["name"] in dirs
        ]
        term = c.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        return mounts + [(term, str(self._term_file(run, c, main)))]

    def _volume_dirs(self, pod: dict[str, Any], run: _PodRun) -> dict[str, Path]:
        dirs: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            if any(k in vol for k in ("configMap", "secret", "emptyDir")):
                dirs[vol["name"]] = run.dir / "volumes" / vol["name"]
            elif "persistentVolumeClaim" in vol:
                dirs[vol["name"]] = self._claim_dir(run.namespace, vol["persistentVolumeClaim"]["claimName"])
            # projected, downwardAPI, hostPath, ...: not mounted
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        return dirs

    def _claim_dir(self, ns: str, claim: str) -> Path:
        pvc = self._get(self.core.read_namespaced_persistent_volume_claim, claim, ns)
        if pvc is None:
            raise _ConfigError("ContainerCreating", f'persistentvolumeclaim "{claim}" not found')
        pv_name = pvc["spec"].get("volumeName")
        if not pv_name:
            return self.workdir / "claims" / f"{ns}_{claim}"
        pv = self._get(self.core.read_persistent_volume, pv_name) or {}
        host = ((pv.get("spec") or {}).get("hostPath") or {}).get("path")
        return Path(host) if host else self.workdir / "pvs" / pv_name

    def _fill_volumes(
        self, pod: dict[str, Any], dirs: dict[str, Path], mounts: list[tuple[str, str]], services: set[str]
    ) -> None:
        for vol in pod["spec"].get("volumes") or []:
            kind = "configMap" if "configMap" in vol else "secret" if "secret" in vol else None
            if kind is None:
                continue
            src = vol[kind]
            files = self._source_files(kind, pod["metadata"]["namespace"], src, mounts, services)
            for key, data in files.items():
                paths = [i["path"] for i in src.get("items") or [] if i["key"] == key] if src.get("items") else [key]
                for rel in paths:
                    (dirs[vol["name"]] / rel).parent.mkdir(parents=True, exist_ok=True)
                    (dirs[vol["name"]] / rel).write_bytes(data)

    def _source_files(
        self, kind: str, ns: str, src: dict[str, Any], mounts: list[tuple[str, str]], services: set[str]
    ) -> dict[str, bytes]:
        name = src.get("name") or src.get("secretName")
        obj = self._read_ref(kind, ns, name, bool(src.get("optional")), "ContainerCreating")
        if obj is None:
            return {}
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        # ConfigMap text holds container paths and Service URLs too (the trainer's config.yaml:
        # /data/runs/<run>, a teacher's http://teacher:8000/v1).
        files = {
            k: map_service_urls_in_text(rewrite_paths_in_text(v, mounts), ns, services).encode()
            for k, v in (obj.get("data") or {}).items()
        }
        files.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return files

    def _read_ref(self, kind: str, ns: str, name: str, optional: bool, reason: str) -> dict[str, Any] | None:
        """A ConfigMap or Secret; None when it is missing and optional, else a _ConfigError."""
        secret = kind.startswith("secret")
        obj = self._get(self.core.read_namespaced_secret if secret else self.core.read_namespaced_config_map, name, ns)
        if obj is None and not optional:
            raise _ConfigError(reason, f'{"secret" if secret else "configmap"} "{name}" not found')
        return obj

    def _ref_data(self, kind: str, ns: str, ref: dict[str, Any]) -> dict[str, str] | None:
        obj = self._read_ref(kind, ns, ref["name"], bool(ref.get("optional")), "CreateContainerConfigError")
        if obj is None:
            return None
        data = obj.get("data") or {}
        if kind.startswith("secret"):
            return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}
        return dict(data)

    def _declared_env(self, pod: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
        """envFrom, then env in order, as the container sees them (before any path rewriting).
        `$(VAR)` expands against these only, as in a kubelet: it is a container-side mapping."""
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            for kind in ("configMapRef", "secretRef"):
                data = self._ref_data(kind, ns, src[kind]) if src.get(kind) else None
                env.update({src.get("prefix", "") + k: v for k, v in (data or {}).items()})
        for e in c.get("env") or []:
            value = self._env_value(pod, c, e, env)
            if value is not None:
                env[e["name"]] = value
        return env

    def _env_value(self, pod: dict[str, Any], c: dict[str, Any], e: dict[str, Any], env: dict[str, str]) -> str | None:
        vf = e.get("valueFrom")
        if not vf:
            return expand_vars(e.get("value", ""), env)
        if "fieldRef" in vf:
            return field_ref_value(pod, vf["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in vf:
            return resource_field_value(c, vf["resourceFieldRef"], self.capacity)
        for kind in ("secretKeyRef", "configMapKeyRef"):
            ref = vf.get(kind)
            if ref:
                data = self._ref_data(kind, pod["metadata"]["namespace"], ref)
                if data is not None and ref["key"] in data:
                    return data[ref["key"]]
                if data is not None and not ref.get("optional"):
                    raise _ConfigError(
                        "CreateContainerConfigError", f"couldn't find key {ref['key']} in {kind[:-6]} {ref['name']}"
                    )
        return None

    def _plan(
        self, pod: dict[str, Any], run: _PodRun, c: dict[str, Any], mounts: list[tuple[str, str]], services: set[str]
    ) -> _Plan:
        ns = run.namespace

        def localize(value: str) -> str:
            return map_service_hosts(rewrite_path(value, mounts), ns, services)

        declared = self._declared_env(pod, c)
        # Rewritten once, after expansion: a host path must never go through the mapping again.
        env = {
            **self.base_env,
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            POD_MARKER: run.uid,
            **{k: localize(v) for k, v in declared.items()},
        }
        command = c.get("command") or []
        if not command:
            raise _StartError(
                f"container {c['name']!r} has no command: the e2e test node agent runs no images, "
                "so it cannot fall back to an image entrypoint"
            )
        argv = [localize(expand_vars(a, declared)) for a in command + (c.get("args") or [])]
        stand_in = self.stand_ins.get(c.get("image", ""))
        if stand_in:
            argv = [*stand_in, *argv[1:]]
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
        if not exe:
            raise _StartError(f"executable {argv[0]!r} not found in PATH={env.get('PATH')}")
        workdir = c.get("workingDir")
        mapped = rewrite_path(workdir, mounts) if workdir else None
        cwd = Path(mapped) if mapped and mapped != workdir else run.dir / "cwd"
        cwd.mkdir(parents=True, exist_ok=True)
        return _Plan(c, argv, exe, env, cwd, self._term_file(run, c, c is pod["spec"]["containers"][0]))


def main() -> None:
    parser = argparse.ArgumentParser(description="The e2e test node agent: runs one node's pods as local processes.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    agent = TestNodeAgent(args.kubeconfig, args.node_name, args.workdir)
    agent.start()
    try:
        while not done.wait(1):
            pass
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
