"""The operator's own Prometheus metrics, and the small HTTP server that exposes them.

    GET :8000/metrics   Prometheus text format
    GET :8000/readyz    200 once the operator has started its handlers, else 503
    GET :8000/healthz   200 while the process serves HTTP

(Liveness proper is kopf's probe endpoint, --liveness=http://0.0.0.0:8080/healthz, which
fails when kopf's watch loops are stuck.)

Metric names are part of the product: the chart's dashboard and alerts read them. `nanochat_runs`
is computed at scrape time from the last phase seen per run, so a deleted run disappears instead
of leaving a stale series. `nanochat_training_last_progress_timestamp_seconds` is a time taken
from the run's status, not from this process: "no progress for N minutes" stays right when the
operator restarts and its series start anew (the chart's NanochatTrainingNoProgress alert). A run
whose trainer serves no /metrics (spec.trainer.metrics.port: 0) has no such series: its step is never read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import attrgetter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from nanochat_trainer.contract import EVAL_KIND, PHASES, TRAINING_KIND, ConditionType, Phase, score_k

from .api import EvalRunStatus, TrainingRunStatus

RECONCILE_RESULTS = ("ok", "retry", "error")  # nanochat_reconcile_total's `result` label

RunKey = tuple[str, str, str]  # kind, namespace, name


class RunsCollector(Collector):
    """nanochat_runs{kind, phase, namespace}: how many runs are in each phase."""

    def __init__(self) -> None:
        self._phases: dict[RunKey, str] = {}
        self._lock = threading.Lock()

    def set_phase(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase:
                self._phases[(kind, namespace, name)] = phase
            else:
                self._phases.pop((kind, namespace, name), None)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.set_phase(kind, namespace, name, None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "nanochat_runs", "Runs by kind, phase and namespace.", labels=["kind", "phase", "namespace"]
        )
        with self._lock:
            counts: dict[tuple[str, str, str], int] = {}
            kinds_ns = set()
            for (kind, ns, _), phase in self._phases.items():
                counts[(kind, phase, ns)] = counts.get((kind, phase, ns), 0) + 1
                kinds_ns.add((kind, ns))
        # Every phase of every seen (kind, namespace), zeros included, so rate() and
        # alert expressions see series drop to 0 instead of vanishing.
        for kind, ns in sorted(kinds_ns):
            for phase in PHASES:
                family.add_metric([kind, phase, ns], counts.get((kind, phase, ns), 0))
        yield family


class OperatorMetrics:
    """All of the operator's metrics, on their own registry (tests make fresh ones)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.runs = RunsCollector()
        self.registry.register(self.runs)
        self.reconcile_total = Counter(
            "nanochat_reconcile_total", "Reconciles by kind and result.", ["kind", "result"], registry=self.registry
        )
        # Every series from 0, so the first failure after a start is an increase that rate() sees
        # (a counter that appears at 1 is not), which NanochatReconcileErrors depends on.
        for kind in (TRAINING_KIND, EVAL_KIND):
            for result in RECONCILE_RESULTS:
                self.reconcile_total.labels(kind, result)
        self.reconcile_duration = Histogram(
            "nanochat_reconcile_duration_seconds",
            "Time one reconcile takes, API calls included.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        labels = ["namespace", "name"]
        self.training_step = Gauge(
            "nanochat_training_step", "Optimizer steps done by a TrainingRun.", labels, registry=self.registry
        )
        self.training_loss = Gauge(
            "nanochat_training_loss", "Last training loss of a TrainingRun.", labels, registry=self.registry
        )
        self.training_val_loss = Gauge(
            "nanochat_training_val_loss",
            "Held-out loss of a TrainingRun at its last validation.",
            labels,
            registry=self.registry,
        )
        self.training_pass_at_1 = Gauge(
            "nanochat_training_pass_at_1",
            "Greedy HumanEval pass@1 of a TrainingRun at its last in-training evaluation.",
            labels,
            registry=self.registry,
        )
        self.training_tps = Gauge(
            "nanochat_training_tokens_per_second", "Throughput of a TrainingRun.", labels, registry=self.registry
        )
        self.training_last_progress = Gauge(
            "nanochat_training_last_progress_timestamp_seconds",
            "Unix time a Running TrainingRun's step last changed, or it last started Running if later.",
            labels,
            registry=self.registry,
        )
        # Each TrainingRun series and what of the status it shows.
        self._training_series: dict[Gauge, Callable[[TrainingRunStatus], float | None]] = {
            self.training_step: attrgetter("step"),
            self.training_loss: attrgetter("loss"),
            self.training_val_loss: attrgetter("val_loss"),
            self.training_pass_at_1: attrgetter("pass_at_1"),
            self.training_tps: attrgetter("tokens_per_second"),
            self.training_last_progress: last_progress_timestamp,
        }
        self.eval_pass_at_k = Gauge(
            "nanochat_eval_pass_at_k", "pass@k of an EvalRun.", labels + ["k"], registry=self.registry
        )

    def observe_training(self, namespace: str, name: str, status: TrainingRunStatus, steps_read: bool = True) -> None:
        """Progress series exist only while a run is Running: a suspended, restarting or
        finished run has no series, so "step did not change for N minutes" alerts mean a
        stuck run (the final values stay in the run's status). `steps_read` False: the trainer
        serves no /metrics (spec.trainer.metrics.port 0), so its step is never read and a progress
        time would only age until NanochatTrainingNoProgress fired on a healthy run: none is kept."""
        self.runs.set_phase(TRAINING_KIND, namespace, name, status.phase)
        for gauge, value_of in self._training_series.items():
            value = value_of(status) if steps_read or gauge is not self.training_last_progress else None
            if status.phase == Phase.RUNNING and value is not None:
                gauge.labels(namespace, name).set(value)
            else:
                _remove(gauge, namespace, name)

    def observe_eval(self, namespace: str, name: str, status: EvalRunStatus) -> None:
        self.runs.set_phase(EVAL_KIND, namespace, name, status.phase)
        for key, value in status.scores.items():
            self.eval_pass_at_k.labels(namespace, name, str(score_k(key))).set(value)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """Drop a deleted run's series."""
        self.runs.forget(kind, namespace, name)
        if kind == TRAINING_KIND:
            for gauge in self._training_series:
                _remove(gauge, namespace, name)
        else:
            with self.eval_pass_at_k._lock:  # no public way to list a gauge's label sets
                keys = [k for k in self.eval_pass_at_k._metrics if k[:2] == (namespace, name)]
            for k in keys:
                self.eval_pass_at_k.remove(*k)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def last_progress_timestamp(status: TrainingRunStatus) -> float | None:
    """Unix time the run last made progress: when its step last changed, or when it last started
    Running if that is later. A fresh run counts from its start (its first step may take a while);
    a run that resumed or whose pods were replaced counts from then, not from its last step
    before the break. None when the status tells no time."""
    times = [status.last_progress_time, status.start_time]
    times += [
        c.last_transition_time for c in status.conditions if c.type == ConditionType.RUNNING and c.status == "True"
    ]
    known = [datetime.fromisoformat(t).timestamp() for t in times if t]  # RFC 3339, as status.rfc3339 writes
    return max(known) if known else None


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


METRICS = OperatorMetrics()


class _Handler(BaseHTTPRequestHandler):
    metrics: OperatorMetrics = METRICS
    ready: threading.Event = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/readyz":
            ok = self.ready.is_set()
            self._send(200 if ok else 503, b"ok\n" if ok else b"starting\n", "text/plain")
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes every 30 s would flood the log
        pass


READY = _Handler.ready


def serve(port: int, host: str = "0.0.0.0", metrics: OperatorMetrics = METRICS) -> ThreadingHTTPServer:
    """Start the metrics/readiness server in one daemon thread; returns the server."""
    handler = type("Handler", (_Handler,), {"metrics": metrics})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
