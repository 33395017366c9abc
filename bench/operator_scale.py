"""Operator at scale: N TrainingRuns applied at once on kwok GPU nodes.

    .venv/bin/python bench/operator_scale.py                 # N = 50, 200, 500, 1000
    .venv/bin/python bench/operator_scale.py --runs 500 --interval 15

Starts the e2e control plane (e2e/cluster.py: etcd, kube-apiserver, controller manager,
scheduler, kwok), installs the chart, runs the operator from it as a local process, and
for each N prints the time until every run has been seen Running and until every run
Succeeded, reconciles per second, the operator's API requests per run per minute (counted in
the API server's audit log, watches aside), its peak RSS, and how many runs skipped Running
(no Running event). The operator is restarted
before each N so its peak memory is that N's. All components share this machine's cores,
so the figures are an upper bound on what a real control plane would show.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.cluster import ControlPlane  # noqa: E402
from e2e.operator_local import ChartOperator  # noqa: E402
from e2e.scale import delete_namespace, run_scale  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[50, 200, 500, 1000])
    p.add_argument("--interval", type=float, default=5.0, help="operator reconcile interval (chart: operator.interval)")
    p.add_argument("--max-workers", type=int, default=16, help="operator handler threads (chart: operator.maxWorkers)")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nanochat-scale-"))
    print(f"operator interval {a.interval:g} s, {a.max_workers} workers; control plane logs in {workdir}/logs")
    with ControlPlane(workdir, audit=True) as cp:
        op = ChartOperator(cp, values={"operator": {"interval": a.interval, "maxWorkers": a.max_workers}}).install()
        try:
            for n in a.runs:
                op.restart() if op.proc else op.start()
                result = run_scale(cp, op, n, namespace=f"scale-{n}")
                print(result.line(), flush=True)
                top = sorted(result.requests.items(), key=lambda kv: -kv[1])
                print("  operator requests: " + ", ".join(f"{k} {v}" for k, v in top), flush=True)
                if result.never_running or set(result.phases) != {"Succeeded"}:
                    print(f"  phases {result.phases}; never seen Running: {result.never_running[:10]}")
                delete_namespace(cp, f"scale-{n}")
        finally:
            op.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
