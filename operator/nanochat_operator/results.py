"""The eval result contract: how `nanochat eval` hands its scores to the operator (pure).

The operator cannot read the PVC, so an eval pod reports its result twice:

1. It writes one compact JSON object (at most 4096 bytes, Kubernetes' limit) to the file
   named by $NANOCHAT_TERMINATION_LOG (the operator sets it to /dev/termination-log, the
   container's terminationMessagePath). Kubernetes copies it into the pod status at
   `status.containerStatuses[].state.terminated.message`, where the operator reads it.
2. It prints the same object as its last stdout line, prefixed `NANOCHAT_RESULT `. With
   terminationMessagePolicy FallbackToLogsOnError the log tail becomes the message when
   the file is empty and the container failed, and a person reading `kubectl logs` sees it.

The object (nanochat_trainer/eval/humaneval.py, compact_result):

    {"pass_at_k": {"1": 0.134, "10": 0.29}, "problems": 164, "samples": 10}

and, for an EvalRun with spec.compare, the other models' scores by name:

    {..., "compare": {"parent": {"1": 0.2}, "teacher": {"1": 0.61}}}

The full per-problem results go to `--out`, on the PVC at
/data/runs/<training run>/eval/<evalrun>.json (nanochat_operator.render.eval_results_path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

RESULT_PREFIX = "NANOCHAT_RESULT "


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, float] = field(default_factory=dict)  # {"pass@1": 0.13, ...}
    problems: Optional[int] = None
    samples: Optional[int] = None
    compare: dict[str, dict[str, float]] = field(default_factory=dict)  # {"parent": {"pass@1": 0.2}}


def parse_result(message: Optional[str]) -> Optional[EvalResult]:
    """The result in a termination message (the JSON alone, or the last NANOCHAT_RESULT line)."""
    if not message:
        return None
    candidates = [message.strip()]
    candidates += [line[len(RESULT_PREFIX):] for line in reversed(message.splitlines())
                   if line.startswith(RESULT_PREFIX)]
    for text in candidates:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("pass_at_k"), dict):
            return _from_dict(data)
    return None


def _scores(pass_at_k: dict[str, Any]) -> dict[str, float]:
    scores = {}
    for k, v in pass_at_k.items():
        try:
            scores[f"pass@{int(k)}"] = float(v)
        except (TypeError, ValueError):
            continue
    return dict(sorted(scores.items(), key=lambda kv: int(kv[0][5:])))


def _from_dict(data: dict[str, Any]) -> EvalResult:
    problems = data.get("problems")
    samples = data.get("samples")
    compare = data.get("compare") if isinstance(data.get("compare"), dict) else {}
    return EvalResult(scores=_scores(data["pass_at_k"]),
                      problems=problems if isinstance(problems, int) else None,
                      samples=samples if isinstance(samples, int) else None,
                      compare={str(n): _scores(v) for n, v in compare.items() if isinstance(v, dict)})


def terminated_message(pod: dict[str, Any], container: str) -> Optional[str]:
    """The termination message of `container` in a pod (as the API returns it)."""
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term:
                return term.get("message")
    return None
