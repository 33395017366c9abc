"""The pure helpers of the e2e test node agent (e2e/node_agent.py); no API server needed."""

from __future__ import annotations

import http.server
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from e2e import node_agent as na


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$(A)/x", "1/x"),
        ("$(A)$(B)", "12"),
        ("$$(A)", "$(A)"),  # escaped: stays literal
        ("$$$(A)", "$1"),
        ("$(NOPE)-$(A)", "$(NOPE)-1"),  # unknown: left as written
        ("cost $5 and $", "cost $5 and $"),
        ("$(A", "$(A"),
        ("", ""),
    ],
)
def test_expand_vars(text: str, expected: str) -> None:
    assert na.expand_vars(text, {"A": "1", "B": "2"}) == expected


MOUNTS = [
    ("/data", "/h/pv"),
    ("/data/runs", "/h/runs"),
    ("/etc/nanochat", "/h/cfg"),
    ("/dev/termination-log", "/h/pod/termination-log"),
]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("/data", "/h/pv"),
        ("/data/", "/h/pv/"),
        ("/data/x/y", "/h/pv/x/y"),
        ("/data/runs/r1/final", "/h/runs/r1/final"),  # the longest mount wins
        ("/database", "/database"),
        ("/etc/nanochat/config.yaml", "/h/cfg/config.yaml"),
        ("/dev/termination-log", "/h/pod/termination-log"),
        ("data/x", "data/x"),
        ("--out=/data/x", "--out=/data/x"),  # only whole values are paths
    ],
)
def test_rewrite_path(value: str, expected: str) -> None:
    assert na.rewrite_path(value, MOUNTS) == expected


def test_rewrite_paths_in_text() -> None:
    text = (
        "run_dir: /data/runs/x\nother: /data\nlist: [/data/a, '/data/b', \"/etc/nanochat\"]\n"
        "db: /database/x\nurl: http://h/data/x\nrel: data/x\nkv: --out=/data/y,/data/z\n"
    )
    assert na.rewrite_paths_in_text(text, MOUNTS) == (
        "run_dir: /h/runs/x\nother: /h/pv\nlist: [/h/pv/a, '/h/pv/b', \"/h/cfg\"]\n"
        "db: /database/x\nurl: http://h/data/x\nrel: data/x\nkv: --out=/h/pv/y,/h/pv/z\n"
    )
    # A host path that contains a mount path is not rewritten a second time.
    assert na.rewrite_paths_in_text("dir: /data/x", [("/data", "/tmp/data")]) == "dir: /tmp/data/x"
    assert na.rewrite_paths_in_text("dir: /data/x", []) == "dir: /data/x"


SERVICES = {"tr-demo", "api"}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("api", "127.0.0.1"),
        ("api.ns1", "127.0.0.1"),
        ("api.ns1.svc", "127.0.0.1"),
        ("api.ns1.svc.cluster.local", "127.0.0.1"),
        ("tr-0.tr-demo", "127.0.0.1"),  # a pod behind a headless Service
        ("tr-0.tr-demo.ns1", "127.0.0.1"),
        ("tr-0.tr-demo.ns1.svc", "127.0.0.1"),
        ("tr-0.tr-demo.ns1.svc.cluster.local", "127.0.0.1"),
        ("api:8000", "127.0.0.1:8000"),
        ("http://api:8000/v1/chat", "http://127.0.0.1:8000/v1/chat"),
        ("https://user:pw@tr-0.tr-demo.ns1.svc/x?q=1", "https://user:pw@127.0.0.1/x?q=1"),
        ("http://api.ns1.svc.cluster.local", "http://127.0.0.1"),
        ("api.other-ns", "api.other-ns"),  # another namespace's Service is not this one
        ("a.b.tr-demo", "a.b.tr-demo"),
        ("apis", "apis"),
        ("example.com", "example.com"),
        ("http://example.com/api", "http://example.com/api"),
        ("/data/api", "/data/api"),
        ("1", "1"),
        ("", ""),
    ],
)
def test_map_service_hosts(value: str, expected: str) -> None:
    assert na.map_service_hosts(value, "ns1", SERVICES) == expected


@pytest.mark.parametrize(
    "returncode, expected",
    [(0, 0), (1, 1), (137, 137), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143), (-signal.SIGINT, 130)],
)
def test_exit_code_of(returncode: int, expected: int) -> None:
    assert na.exit_code_of(returncode) == expected


def test_termination_message() -> None:
    log = b"".join(b"line %d\n" % i for i in range(200))
    assert na.termination_message(b'{"ok": 1}', log, "FallbackToLogsOnError", 1) == '{"ok": 1}'
    assert na.termination_message(b"x" * 5000 + b"END", b"", "File", 0).endswith("END")
    assert len(na.termination_message(b"x" * 5000, b"", "File", 0)) == 4096
    fallback = na.termination_message(b"", log, "FallbackToLogsOnError", 2)
    assert fallback.endswith("line 199\n") and len(fallback.splitlines()) == 80
    assert na.termination_message(b"", log, "FallbackToLogsOnError", 0) == ""
    assert na.termination_message(b"  \n", log, "File", 1) == ""


def test_field_ref_value() -> None:
    pod = {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u",
            "labels": {"a": "b"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
        },
        "spec": {"nodeName": "n", "serviceAccountName": "sa"},
    }
    get = na.field_ref_value
    assert [
        get(pod, f)
        for f in (
            "metadata.name",
            "metadata.namespace",
            "metadata.uid",
            "spec.nodeName",
            "spec.serviceAccountName",
            "status.podIP",
            "status.hostIP",
        )
    ] == ["p", "ns", "u", "n", "sa", "127.0.0.1", "127.0.0.1"]
    assert get(pod, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "1"
    assert get(pod, "metadata.labels['a']") == "b"
    assert get(pod, "metadata.labels['missing']") == ""


def test_resource_field_value() -> None:
    c = {"resources": {"limits": {"cpu": "1500m", "memory": "4Gi"}, "requests": {"cpu": "1"}}}
    cap = {"cpu": "32", "memory": "256Gi"}
    assert na.resource_field_value(c, {"resource": "limits.cpu"}, cap) == "2"
    assert na.resource_field_value(c, {"resource": "limits.memory", "divisor": "1Mi"}, cap) == "4096"
    assert na.resource_field_value({}, {"resource": "limits.cpu"}, cap) == "32"  # the node's, as a kubelet
    assert na.resource_field_value({}, {"resource": "requests.cpu"}, cap) is None


def test_service_urls_in_config_files_map_to_loopback():
    text = "teacher:\n  url: http://teacher:8000/v1\nother: https://example.com/x\nlocal: http://teacher.ml.svc:9/\n"
    out = na.map_service_urls_in_text(text, "ml", {"teacher"})
    assert "url: http://127.0.0.1:8000/v1" in out and "https://example.com/x" in out
    assert "local: http://127.0.0.1:9/" in out


def test_startup_probe_exec_and_http(tmp_path) -> None:
    """A native sidecar's startupProbe, one try: exec by exit status (in the container's env), httpGet by
    status code on loopback (a named port through the container's ports)."""

    def plan(container: dict) -> na._Plan:
        return na._Plan(container, [], "", {"PATH": os.environ["PATH"], "X": "7"}, Path(tmp_path), Path(tmp_path))

    ok = {"exec": {"command": [sys.executable, "-c", "import os, sys; sys.exit(os.environ['X'] != '7')"]}}
    bad = {"exec": {"command": [sys.executable, "-c", "raise SystemExit(1)"]}}
    slow = {"exec": {"command": [sys.executable, "-c", "import time; time.sleep(5)"]}, "timeoutSeconds": 1}
    assert na.TestNodeAgent._probe(plan({}), ok) and not na.TestNodeAgent._probe(plan({}), bad)
    assert not na.TestNodeAgent._probe(plan({}), slow)
    assert not na.TestNodeAgent._probe(plan({}), {"exec": {"command": ["/no/such/probe"]}})

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        named = plan({"ports": [{"name": "http", "containerPort": port}]})
        assert na.TestNodeAgent._probe(named, {"httpGet": {"port": "http", "path": "/health"}})
        assert not na.TestNodeAgent._probe(named, {"httpGet": {"port": port, "path": "/loading"}})
    finally:
        server.shutdown()
