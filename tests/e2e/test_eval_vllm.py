"""An EvalRun whose model does not fit one GPU, through the whole stack: the operator renders the
eval pod with its export step and a vLLM sidecar, the API server admits it under Pod Security
"restricted", the scheduler places it on the agent's GPUs, and the pod exports the trained run,
serves it, and scores it through the endpoint path.

What stands in, and only there: vLLM. This machine has no GPU and no vLLM, so the operator's
`--vllm-image` here is `fake_vllm.IMAGE`, which the node agent runs as `e2e/fake_vllm.py` (the
same `vllm serve` arguments, nanochat's own server on the exported Hugging Face directory). The
agent advertises two GPUs it does not have, and the operator is told a GPU holds less than this
tiny model in fp32 (`--gpu-memory-gib`), so the fit check takes the path an 80B model takes on
80 GiB GPUs. The export (`nanochat export`), the eval container, the sandbox, the startupProbe
that holds the eval back until the server answers, and everything around them are real.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import fake_vllm
from e2e.cluster import ControlPlane
from e2e.node_agent import TestNodeAgent
from e2e.operator_local import ChartOperator, events_of, wait_phase
from nanochat_operator.api import EvalRunSpec
from nanochat_operator.checks import EVAL_BYTES_PER_PARAM, GIB, estimate_params, eval_fit
from nanochat_trainer.config import TrainerConfig

TRAINER: dict[str, Any] = {
    "preset": "tiny",
    "steps": 6,
    "batch_size": 8,
    "checkpoint": {"every": 6},
    "tokenizer": {"train_docs": 300},
    "validation": {"tokens": 2048},
    "data": {"source": "synthetic"},
}
GPUS = 2
# Half the tiny model's fp32 size: it does not fit one such GPU; in bf16 over two it does.
GPU_MEMORY_GIB = estimate_params(TrainerConfig.model_validate(TRAINER).model) * EVAL_BYTES_PER_PARAM / 2 / GIB


@pytest.fixture
def small_gpu_operator(operator: ChartOperator) -> Iterator[ChartOperator]:
    """The session's operator, restarted with GPUs smaller than the tiny model (then restored)."""
    operator.stop()
    small = dataclasses.replace(operator, extra_args=[f"--gpu-memory-gib={GPU_MEMORY_GIB!r}"], proc=None)
    try:
        yield small.start()
    finally:
        small.stop()
        operator.start()


def manifests(namespace: str) -> list[dict[str, Any]]:
    meta = {"namespace": namespace}
    return [
        {
            "apiVersion": "nanochat.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "big", **meta},
            "spec": {
                "trainer": TRAINER,
                "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "4Gi"},
                "storage": {"size": "10Gi"},
            },
        },
        {
            "apiVersion": "nanochat.io/v1alpha1",
            "kind": "EvalRun",
            "metadata": {"name": "big-humaneval", **meta},
            "spec": {
                "model": {"trainingRun": "big"},
                "maxProblems": 3,
                "maxNewTokens": 32,
                "resources": {"gpus": GPUS},
            },
        },
    ]


def test_an_eval_too_large_for_one_gpu_is_exported_served_and_scored_in_its_pod(
    control_plane: ControlPlane,
    small_gpu_operator: ChartOperator,
    node_agent: TestNodeAgent,
    volumes: Path,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nanochat.e2e.node_agent")
    cp, op = control_plane, small_gpu_operator
    docs = manifests(namespace)
    run = TrainerConfig.model_validate(TRAINER)
    fit = eval_fit(EvalRunSpec.model_validate(docs[1]["spec"]), run, {}, GPU_MEMORY_GIB)
    assert fit.tensor_parallel == GPUS, fit  # the premise: this model takes the vLLM path here
    cp.apply(docs)
    tr = wait_phase(cp, "trainingrun", "big", {"Succeeded", "Failed"}, 600, namespace, op)
    assert tr["status"]["phase"] == "Succeeded", json.dumps(tr["status"])
    ev = wait_phase(cp, "evalrun", "big-humaneval", {"Succeeded", "Failed"}, 600, namespace, op)
    pod = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=big-humaneval-eval")["items"][0]
    log = node_agent.pod_log(namespace, pod["metadata"]["name"])
    status = ev["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status)}\n{log[-3000:]}"
    assert status["problems"] == 3 and "pass@1" in status["scores"]
    assert status["serving"] == {
        "server": "vllm",
        "tensorParallelSize": GPUS,
        "modelDir": "/data/runs/big/hf",
        "url": "http://127.0.0.1:8000/v1",
        "reason": fit.reason,
    }
    created = [e["message"] for e in events_of(cp, namespace, "big-humaneval") if e["reason"] == "Created"]
    assert created and "served by vLLM with tensor parallelism 2 from /data/runs/big/hf" in created[0], created
    # The pod as rendered: the export, then the (stand-in) server with the GPUs, then the eval.
    spec = pod["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["sandbox", "export", "vllm"]
    assert spec["initContainers"][2]["image"] == fake_vllm.IMAGE
    assert spec["initContainers"][2]["resources"]["limits"]["nvidia.com/gpu"] == str(GPUS)
    # The eval container started only once the server's startupProbe passed (the model loaded).
    name = pod["metadata"]["name"]
    agent = [r.getMessage() for r in caplog.records if f"/{name} " in r.getMessage()]
    started = agent.index(next(m for m in agent if "sidecar vllm started (startupProbe passed)" in m))
    assert any(" container eval: pid " in m for m in agent[started:]), agent
    assert not any(" container eval: pid " in m for m in agent[:started]), agent
    # The stand-in got vLLM's arguments, and served the export `nanochat export` wrote on the PVC.
    served = json.loads(next(line for line in log.splitlines() if line.startswith("fake vllm: "))[11:])
    assert served["tensor_parallel_size"] == GPUS and served["served_model_name"] == "big"
    assert served["max_model_len"] == 256 and served["host"] == "127.0.0.1"
    pv = cp.get("pvc", "big-storage", "-n", namespace)["spec"]["volumeName"]
    run = Path(cp.get("pv", pv)["spec"]["hostPath"]["path"]) / "runs" / "big"
    assert served["model"] == str(run / "hf") and (run / "hf" / "config.json").is_file()
    results = json.loads((run / "eval" / "big-humaneval.json").read_text())
    assert results["generation"]["source"] == "http://127.0.0.1:8000/v1" and results["problems"] == 3
