"""Real training through the whole stack: the operator's Job, the scheduler, and the
trainer under torchrun, run by the test node agent as processes of this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import ControlPlane
from e2e.node_agent import TestNodeAgent
from e2e.operator_local import ChartOperator, events_of, wait_phase, wait_until
from nanochat_trainer.checkpoint import ModelTensors, is_sharded, save_weights
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[2]
PHASES = ["Pending", "Starting", "Running", "Succeeded"]


def tiny(trainer: dict[str, Any], steps: int, every: int) -> None:
    """A few dozen CPU steps of the tiny preset instead of the example's GPU-sized run."""
    trainer.update(preset="tiny", steps=steps, batch_size=8, checkpoint={"every": every})
    trainer["tokenizer"] = {"train_docs": 300}
    trainer["validation"] = {"tokens": 2048}
    if "evaluation" in trainer:  # three problems, short completions: seconds on a CPU
        trainer["evaluation"].update(problems=3, max_new_tokens=16)
    # The example distils from a remote teacher, which this machine does not have.
    trainer["stage"] = "pretrain"
    trainer.pop("distill", None)


def phase1_docs(namespace: str) -> dict[str, dict[str, Any]]:
    """The phase-1 example's documents by name, in `namespace`."""
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "phase1-quick-demo.yaml").read_text()) if d]
    for d in docs:
        d["metadata"]["namespace"] = namespace
    return {d["metadata"]["name"]: d for d in docs}


def standalone(train: dict[str, Any]) -> None:
    """phase1-demo without the generation run before it (that chain has a test of its own): its
    own PVC, and synthetic data (The Stack is out of reach here)."""
    spec = train["spec"]
    spec.pop("after")
    spec["storage"] = {"size": "10Gi"}
    no_stack(train)
    spec["trainer"]["data"] = {"source": "synthetic"}


def no_stack(train: dict[str, Any]) -> None:
    """Without The Stack (out of reach here) the run needs no Hugging Face token Secret."""
    train["spec"]["env"] = [e for e in train["spec"]["env"] if e["name"] != "HF_TOKEN"]


def phase1_example(namespace: str) -> list[dict[str, Any]]:
    docs = phase1_docs(namespace)
    train, evalrun = docs["phase1-demo"], docs["phase1-demo-humaneval"]
    standalone(train)
    tiny(train["spec"]["trainer"], steps=30, every=10)
    train["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 0, "cpu": "1", "memory": "4Gi"}
    evalrun["spec"].update(maxProblems=3, maxNewTokens=48)
    evalrun["spec"]["resources"] = {"gpus": 0}
    return [train, evalrun]


def run_dir(volumes: Path, cp: ControlPlane, namespace: str, claim: str) -> Path:
    pv = cp.get("pvc", claim, "-n", namespace)["spec"]["volumeName"]
    return Path(cp.get("pv", pv)["spec"]["hostPath"]["path"])


def phases_in_events(cp: ControlPlane, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events_of(cp, namespace, name) if e["reason"] in PHASES]


def test_phase1_example_trains_on_two_pods_then_evaluates(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, volumes: Path, namespace: str
) -> None:
    cp = control_plane
    cp.apply(phase1_example(namespace))
    tr = wait_phase(cp, "trainingrun", "phase1-demo", {"Running", "Succeeded", "Failed"}, 240, namespace, operator)
    pods = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=phase1-demo-train")["items"]
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {"e2e-agent"}
    tr = wait_phase(cp, "trainingrun", "phase1-demo", {"Succeeded", "Failed"}, 600, namespace, operator)
    logs = "\n".join(node_agent.pod_log(namespace, p["metadata"]["name"])[-1500:] for p in pods)
    status = tr["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status)}\n{logs}"
    assert status["step"] == 30 and status["totalSteps"] == 30 and status["loss"] > 0
    order = phases_in_events(cp, namespace, "phase1-demo")
    assert order == sorted(order, key=PHASES.index) and order[-3:] == PHASES[1:], order
    # Both torchrun nodes took part: the trainer reports world size 2 from rank 0.
    root = run_dir(volumes, cp, namespace, "phase1-demo-storage")
    final = root / "runs" / "phase1-demo" / "final"
    assert (final / "model.safetensors").is_file()
    assert status["finalCheckpoint"] == "/data/runs/phase1-demo/final"

    ev = wait_phase(cp, "evalrun", "phase1-demo-humaneval", {"Succeeded", "Failed"}, 400, namespace, operator)
    assert ev["status"]["phase"] == "Succeeded", json.dumps(ev["status"])
    assert ev["status"]["problems"] == 3 and "pass@1" in ev["status"]["scores"]
    results = json.loads((root / "runs" / "phase1-demo" / "eval" / "phase1-demo-humaneval.json").read_text())
    assert results["problems"] == 3 and results["pass_at_k"]["1"] == ev["status"]["scores"]["pass@1"]


def _resumable_run(name: str, namespace: str, steps: int) -> dict[str, Any]:
    trainer: dict[str, Any] = {"data": {"source": "synthetic"}, "metrics": {"log_every": 1}}
    tiny(trainer, steps=steps, every=5)
    return {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"trainer": trainer, "resources": {"nodes": 1, "gpusPerNode": 0}, "storage": {"size": "10Gi"}},
    }


def _steps_logged(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"step"' in line]


def test_killed_pod_is_retried_and_resumes_from_its_checkpoint(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, volumes: Path, namespace: str
) -> None:
    cp = control_plane
    cp.apply(_resumable_run("resume", namespace, steps=60))
    wait_phase(cp, "trainingrun", "resume", {"Running"}, 240, namespace, operator)
    ckpt = wait_until(
        300,
        lambda: (
            (cp.get("trainingrun", "resume", "-n", namespace)["status"].get("latestCheckpointStep") or 0) >= 10
            and cp.get("trainingrun", "resume", "-n", namespace)["status"]["latestCheckpointStep"]
        ),
        "a checkpoint at step 10 or later",
    )
    pod = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=resume-train")["items"][0]
    # The whole pod at once (torchrun and its worker), as the OOM killer or a lost node would.
    assert node_agent.kill_pod(namespace, pod["metadata"]["name"])

    done = wait_phase(cp, "trainingrun", "resume", {"Succeeded", "Failed"}, 600, namespace, operator)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])
    assert done["status"]["restarts"] == 1
    pods = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=resume-train")["items"]
    killed = [p for p in pods if p["status"]["phase"] == "Failed"]
    assert [p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in killed] == [137]
    root = run_dir(volumes, cp, namespace, "resume-storage") / "runs" / "resume"
    steps = _steps_logged(root / "log.jsonl")
    # Every step is logged. The retried pod starts after the newest checkpoint, which is no
    # older than the one the operator reported before the kill: the step never goes back past it.
    restarts = [steps[i] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) <= 1 and all(step > ckpt for step in restarts), (ckpt, steps)
    assert sorted(set(steps)) == list(range(1, 61))
    assert steps[-1] == 60 and (root / "final" / "model.safetensors").is_file()


def test_operator_killed_mid_run_picks_up_where_it_was(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, volumes: Path, namespace: str
) -> None:
    cp = control_plane
    cp.apply(_resumable_run("survivor", namespace, steps=40))
    running = wait_phase(cp, "trainingrun", "survivor", {"Running"}, 240, namespace, operator)
    job_uid = cp.get("job", "survivor-train", "-n", namespace)["metadata"]["uid"]
    operator.kill()
    time.sleep(3)  # the run keeps going without the operator
    operator.start()
    done = wait_phase(cp, "trainingrun", "survivor", {"Succeeded", "Failed"}, 600, namespace, operator)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])
    assert done["status"]["startTime"] == running["status"]["startTime"]  # the status was kept, not rebuilt
    assert cp.get("job", "survivor-train", "-n", namespace)["metadata"]["uid"] == job_uid  # no second Job
    assert done["status"]["step"] == 40


def test_moe_run_splits_its_experts_over_two_pods(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, volumes: Path, namespace: str
) -> None:
    """A TrainingRun of a small MoE with expert_parallel 2 and FSDP2 on 2 pods: each pod's rank
    holds half of every layer's experts, the run succeeds, and final/ holds all of them."""
    cp = control_plane
    trainer: dict[str, Any] = {
        "preset": "tiny-moe",
        "steps": 8,
        "batch_size": 4,
        "seq_len": 64,
        "tokenizer": {"train_docs": 300},
        "checkpoint": {"every": 4},
        "metrics": {"log_every": 1},
        "expert_parallel": 2,
        "parallel": "fsdp",
        "model": {"n_layers": 2, "max_seq_len": 64},
    }
    cp.apply(
        [
            {
                "apiVersion": "nanochat.io/v1alpha1",
                "kind": "TrainingRun",
                "metadata": {"name": "moe-ep", "namespace": namespace},
                "spec": {
                    "trainer": trainer,
                    "resources": {"nodes": 2, "gpusPerNode": 0, "cpu": "1", "memory": "4Gi"},
                    "storage": {"size": "10Gi"},
                },
            }
        ]
    )
    done = wait_phase(cp, "trainingrun", "moe-ep", {"Succeeded", "Failed"}, 600, namespace, operator)
    pods = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=moe-ep-train")["items"]
    logs = "\n".join(node_agent.pod_log(namespace, p["metadata"]["name"])[-1500:] for p in pods)
    assert done["status"]["phase"] == "Succeeded", f"{json.dumps(done['status'])}\n{logs}"
    assert len(pods) == 2 and done["status"]["step"] == 8
    root = run_dir(volumes, cp, namespace, "moe-ep-storage") / "runs" / "moe-ep"

    assert is_sharded(root / "final")  # each pod's rank wrote its own experts
    with ModelTensors(root / "final") as final:
        experts = [final[k] for k in final if ".experts." in k]
    assert len(experts) == 3 * 2 and all(v.shape[0] == 8 for v in experts)
    record = json.loads((root / "log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 8 and record["moe"]["load_imbalance"] >= 1.0


def _teacher(namespace: str, claim: str) -> list[dict[str, Any]]:
    """`nanochat serve` of the model on `claim`, as a Deployment behind Service `teacher`."""
    serve = {
        "name": "serve",
        "image": "nanochat-trainer:e2e",
        "command": ["nanochat", "serve", "--checkpoint", "/models/final", "--host", "0.0.0.0", "--port", "8000"]
        + ["--model-name", "teacher"],
        "ports": [{"containerPort": 8000}],
        "volumeMounts": [{"name": "model", "mountPath": "/models"}],
    }
    return _teacher_service(namespace, serve, [{"name": "model", "persistentVolumeClaim": {"claimName": claim}}])


def _teacher_service(
    namespace: str, container: dict[str, Any], volumes: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """`container` as a Deployment behind Service `teacher` on port 8000."""
    labels = {"app": "teacher"}
    # The test namespaces enforce Pod Security "restricted".
    container = {**container, "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    security = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    pod = {
        "metadata": {"labels": labels},
        "spec": {"securityContext": security, "containers": [container], "volumes": volumes or []},
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "teacher", "namespace": namespace},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": pod},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "teacher", "namespace": namespace},
            "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]},
        },
    ]


def test_phase1_generation_run_feeds_the_training_run_that_waits_for_it(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, volumes: Path, namespace: str
) -> None:
    """The phase-1 chain as written, scaled down: phase1-data asks the teacher Service (the fake
    Qwen3 server of e2e/fake_teacher.py: real HTTP, vLLM's JSON) for documents, judges the
    exercises in its pod's sandbox container and writes shards to the shared claim; phase1-demo,
    applied at the same time, waits for it (`after`) and then trains on a mixture that reads them."""
    cp = control_plane
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "nanochat-runs", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    fake = {
        "name": "fake-qwen3",
        "image": "nanochat-trainer:e2e",
        "command": ["python", "-m", "e2e.fake_teacher", "--port", "8000", "--latency-ms", "20"],
        "env": [{"name": "PYTHONPATH", "value": str(ROOT)}],
        "ports": [{"containerPort": 8000}],
    }
    cp.apply([pvc, *_teacher_service(namespace, fake)])
    docs = phase1_docs(namespace)
    data, train = docs["phase1-data"], docs["phase1-demo"]
    gen = data["spec"]["trainer"]["generate"]
    assert gen["teacher"]["url"] == train["spec"]["trainer"]["distill"]["teacher"]["url"]  # one teacher
    gen["teacher"].update(url=f"http://teacher.{namespace}.svc:8000/v1", concurrency=16)
    gen.update(rows=40, shard_rows=16, workers=1)
    data["spec"]["resources"].update(cpu="1", memory="2Gi")
    trainer = train["spec"]["trainer"]
    mixture = trainer["data"]["mixture"]
    assert mixture[0]["path"] == "/data/runs/phase1-data/dataset" and train["spec"]["after"] == ["phase1-data"]
    trainer["data"]["mixture"] = [mixture[0], {"name": "synthetic", "weight": 1, "source": "synthetic"}]
    no_stack(train)
    tiny(trainer, steps=12, every=6)
    trainer.pop("evaluation")
    train["spec"]["resources"] = {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "4Gi"}
    cp.apply([data, train])

    made = wait_phase(cp, "trainingrun", "phase1-data", {"Succeeded", "Failed"}, 300, namespace, operator)
    pods = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=phase1-data-train")["items"]
    logs = "\n".join(node_agent.pod_log(namespace, p["metadata"]["name"])[-1500:] for p in pods)
    status = made["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status)}\n{logs}"
    assert status["step"] == 40 and status["totalSteps"] == 40
    assert status["finalCheckpoint"] == "/data/runs/phase1-data/dataset"
    assert sum(status["generation"]["rejected"].values()) > 0  # the fake's failures, counted by reason
    assert [c["name"] for c in pods[0]["spec"]["initContainers"]] == ["sandbox"]  # exercises tested apart
    root = run_dir(volumes, cp, namespace, "nanochat-runs") / "runs"
    manifest = json.loads((root / "phase1-data" / "dataset" / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == 40

    done = wait_phase(cp, "trainingrun", "phase1-demo", {"Succeeded", "Failed"}, 600, namespace, operator)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])
    assert done["status"]["startTime"] >= status["completionTime"]  # it waited for the dataset
    records = [json.loads(line) for line in (root / "phase1-demo" / "log.jsonl").read_text().splitlines()]
    tokens = records[-1]["data_tokens"]
    assert tokens["teacher-made"] > 0 and tokens["synthetic"] > 0, tokens
    print(f"\ngeneration in the cluster: {status['generation']}; training tokens by source {tokens}")


def test_phase1_distills_from_a_teacher_served_in_the_cluster(
    control_plane: ControlPlane, operator: ChartOperator, node_agent: TestNodeAgent, volumes: Path, namespace: str
) -> None:
    """The phase-1 example as written (sequence-level distillation from the `teacher` Service), with a
    tiny teacher served by a Deployment in the cluster: the trainer pod reaches it by its Service
    name, every request is answered, and the run succeeds."""

    cp = control_plane
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "teacher-model", "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }
        ]
    )
    wait_until(
        60,
        lambda: cp.get("pvc", "teacher-model", "-n", namespace)["status"].get("phase") == "Bound",
        "the teacher's claim bound",
    )
    tcfg = TrainerConfig.model_validate({"preset": "tiny"})
    teacher = GPT(tcfg.model)
    teacher.init_weights(0)
    save_weights(
        run_dir(volumes, cp, namespace, "teacher-model") / "final",
        teacher,
        tcfg,
        train_bpe(synthetic_docs(0, 300), 1024),
    )
    cp.apply(_teacher(namespace, "teacher-model"))

    train = phase1_docs(namespace)["phase1-demo"]
    standalone(train)
    trainer = train["spec"]["trainer"]
    distill = trainer["distill"]
    assert distill["teacher"]["url"].startswith("http://teacher.")  # the example's own Service name
    distill["teacher"].update(url=f"http://teacher.{namespace}.svc:8000/v1", model="teacher")
    # An untrained teacher's completions are mostly rejected: wait a second per micro-batch, not a minute.
    distill.update(max_new_tokens=16, row_wait_s=1.0)
    # The preset's shape scaled down; its tokenizer (GPT-2's BPE) and validation source as written.
    assert trainer["preset"] == "nano-125M" and "tokenizer" not in trainer
    trainer["model"] = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
    trainer.update(steps=20, batch_size=4, seq_len=64, checkpoint={"every": 10}, metrics={"log_every": 1})
    trainer["validation"] = {"every": 4, "tokens": 2048}
    trainer["evaluation"].update(every=4, problems=3, max_new_tokens=16)
    train["spec"]["resources"] = {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "4Gi"}
    cp.apply([train])

    def scored_while_running() -> bool:
        status = cp.get("trainingrun", "phase1-demo", "-n", namespace).get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"the run ended before its status showed valLoss and passAt1: {status}")
        return status.get("phase") == "Running" and "valLoss" in status and "passAt1" in status

    wait_until(600, scored_while_running, "validation loss and pass@1 on the running TrainingRun's status")
    done = wait_phase(cp, "trainingrun", "phase1-demo", {"Succeeded", "Failed"}, 600, namespace, operator)
    pods = cp.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=phase1-demo-train")["items"]
    logs = "\n".join(node_agent.pod_log(namespace, p["metadata"]["name"])[-1500:] for p in pods)
    assert done["status"]["phase"] == "Succeeded", f"{json.dumps(done['status'])}\n{logs}"
    root = run_dir(volumes, cp, namespace, "phase1-demo-storage") / "runs" / "phase1-demo"
    records = [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 20 and last["teacher"]["requests"] > 0 and last["teacher"]["errors"] == 0, last
    assert last["evaluation"]["isolation"] == "container/namespaces"  # the pod's sandbox container
    assert json.loads((root / "tokenizer.json").read_text())["name"] == "gpt2"  # GPT-2's BPE, offline
    assert {"valLoss", "passAt1", "bestPassAt1"} <= set(done["status"])
    seq = last["sequences"]
    assert seq["accepted"] + sum(seq["rejected"].values()) > 0, seq  # answers came back and were judged
    print(f"\nteacher in the cluster: {last['teacher']}; sequences {seq}")
