"""Rendering a TrainingRun/EvalRun into Kubernetes objects: pure, no cluster.

Every rendered object is validated against the Kubernetes 1.31 OpenAPI schema with
kubernetes-validate (strict: unknown fields are errors)."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
import yaml

from nanochat_operator import render
from nanochat_operator.api import Endpoint, EvalRunSpec, TrainingRunSpec
from nanochat_trainer.config import EvaluationConfig, TrainerConfig
from nanochat_trainer.contract import RunLayout

from operator_support import pinned

K8S = pinned("KUBERNETES_VALIDATE_VERSION")


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


def training(nodes: int = 1, gpus: int = 0, **extra) -> TrainingRunSpec:
    spec = {"trainer": {"preset": "tiny", "steps": 20}, "resources": {"nodes": nodes, "gpusPerNode": gpus}}
    spec.update(extra)
    return TrainingRunSpec.model_validate(spec)


def env_of(job: dict) -> dict:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }


@pytest.mark.parametrize("nodes,gpus", [(1, 0), (1, 1), (4, 8)])
def test_training_job_runs_torchrun_with_pet_env(nodes, gpus):
    objs = render.render_training("demo", "ml", training(nodes, gpus), image="trainer:1")
    for obj in objs:
        validate(obj)
    job = objs[-1]
    assert job["kind"] == "Job" and job["metadata"]["name"] == "demo-train"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == "demo-train"
    c = pod["containers"][0]
    assert c["command"] == ["torchrun", "-m", "nanochat_trainer.train", "--config", "/etc/nanochat/config.yaml"]
    env = env_of(job)
    assert env["PET_NNODES"] == str(nodes)
    assert env["PET_NPROC_PER_NODE"] == str(max(gpus, 1))
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["PET_MASTER_ADDR"] == "demo-train-0.demo-train"
    assert env["PET_MASTER_PORT"] == "29500"
    if gpus:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    else:
        assert "resources" not in c


def test_headless_service_resolves_pods_before_ready():
    svc = render.render_service("demo", "ml", training(4))
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "demo-train"}
    assert {p["port"] for p in svc["spec"]["ports"]} == {29500, 9090}


def test_config_map_holds_resolved_config_with_operator_paths():
    spec = training(storage={"claimName": "runs"})
    cm = render.render_config_map("demo", "ml", spec, init_from="/data/runs/src/final")
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg["checkpoint"]["dir"] == "/data/runs/demo"
    assert cfg["checkpoint"]["init_from"] == "/data/runs/src/final"
    assert "preset" not in cfg and cfg["model"]["dim"] == 128 and cfg["steps"] == 20  # preset applied, user wins
    TrainerConfig.model_validate(cfg)  # the trainer accepts what it is given


def test_volumes_pvc_emptydir_shm_and_source():
    job = render.render_training_job(
        "demo", "ml", training(storage={"claimName": "runs"}), image="i", source_claim="other"
    )
    pod = job["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "runs"
    assert vols["config"]["configMap"]["name"] == "demo-config"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["source"]["persistentVolumeClaim"] == {"claimName": "other", "readOnly": True}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"config": "/etc/nanochat", "data": "/data", "dshm": "/dev/shm", "source": "/source"}
    no_storage = render.render_training_job("demo", "ml", training(), image="i")
    data = next(v for v in no_storage["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "emptyDir": {}}


def test_operator_made_pvc_and_creation_order():
    objs = render.render_training("demo", "ml", training(storage={"size": "20Gi", "storageClass": "fast"}), image="i")
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    pvc = objs[0]
    assert pvc["metadata"]["name"] == "demo-storage"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    for o in objs:
        validate(o)


def test_init_from_same_or_other_claim():
    spec = training(storage={"claimName": "runs"}, init={"fromTrainingRun": "src"})
    objs = render.render_training("next", "ml", spec, image="i", source=("src", "runs"))
    cfg = yaml.safe_load(objs[0]["data"]["config.yaml"])
    assert cfg["checkpoint"]["init_from"] == "/data/runs/src/final"
    assert all(v["name"] != "source" for v in objs[-1]["spec"]["template"]["spec"]["volumes"])
    objs = render.render_training("next", "ml", spec, image="i", source=("src", "src-storage"))
    cfg = yaml.safe_load(objs[0]["data"]["config.yaml"])
    assert cfg["checkpoint"]["init_from"] == "/source/runs/src/final"


def test_user_env_tolerations_node_selector_cpu_memory():
    spec = TrainingRunSpec.model_validate(
        {
            "trainer": {"preset": "tiny"},
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}},
                {"name": "NCCL_DEBUG", "value": "WARN"},
            ],
            "resources": {
                "nodes": 2,
                "gpusPerNode": 8,
                "cpu": 32,
                "memory": "256Gi",
                "nodeSelector": {"pool": "h100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        }
    )
    job = render.render_training_job("demo", "ml", spec, image="i")
    validate(job)
    pod = job["spec"]["template"]["spec"]
    env = env_of(job)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "t"}} and env["NCCL_DEBUG"] == "WARN"
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}


def test_failure_policy_and_backoff():
    job = render.render_training_job("demo", "ml", training(backoffLimit=7), image="i")
    assert job["spec"]["backoffLimit"] == 7
    # On 4 nodes one failure ends all 4 pods: backoffLimit counts pods, the field failures of the run.
    four = render.render_training_job("demo", "ml", training(backoffLimit=2, resources={"nodes": 4}), image="i")
    assert four["spec"]["backoffLimit"] == 8
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 126, 127]},
    }
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    none = render.render_training_job(
        "demo", "ml", training(podFailurePolicy={"failOnExitCodes": [], "ignoreDisruptions": False}), image="i"
    )
    assert "podFailurePolicy" not in none["spec"]


def test_suspend_and_kueue_queue():
    assert render.render_training_job("d", "ml", training(), image="i")["spec"]["suspend"] is False
    assert render.render_training_job("d", "ml", training(suspend=True), image="i")["spec"]["suspend"] is True
    queued = render.render_training_job("d", "ml", training(queueName="gpu"), image="i")
    assert queued["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"


def test_spec_drift_ignores_suspend_and_names_changed_fields():
    spec = training()
    job = render.render_training_job("d", "ml", spec, image="i")
    applied = json.loads(job["metadata"]["annotations"][render.SPEC_ANNOTATION])
    assert render.spec_drift(applied, training(suspend=True)) == []
    changed = TrainingRunSpec.model_validate(
        {"trainer": {"preset": "tiny", "steps": 99}, "resources": {"nodes": 2, "gpusPerNode": 0}}
    )
    assert render.spec_drift(applied, changed) == ["spec.resources.nodes", "spec.trainer.steps"]


def test_eval_job_for_checkpoint_and_endpoint():
    spec = EvalRunSpec.model_validate(
        {
            "model": {"trainingRun": "demo"},
            "samplesPerProblem": 10,
            "temperature": 0.8,
            "k": [10, 1],
            "maxProblems": 20,
            "resources": {"gpus": 1},
        }
    )
    job = render.render_eval_job("ev", "ml", spec, image="i", source=("demo", "runs"))
    validate(job)
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == [
        "nanochat",
        "eval",
        "--checkpoint",
        "/data/runs/demo/final",
        "--samples",
        "10",
        "--temperature",
        "0.8",
        "--k",
        "1,10",
        "--max-new-tokens",
        "512",
        "--max-problems",
        "20",
        "--out",
        "/data/runs/demo/eval/ev.json",
    ]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "NANOCHAT_TERMINATION_LOG", "value": "/dev/termination-log"} in c["env"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["metadata"]["name"] == "ev-eval" and job["spec"]["completions"] == 1

    ep = EvalRunSpec.model_validate(
        {"model": {"endpoint": {"url": "http://t:8000/v1", "model": "qwen", "apiKeySecret": {"name": "s", "key": "k"}}}}
    )
    job = render.render_eval_job("ev", "ml", ep, image="i")
    validate(job)
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:8] == [
        "nanochat",
        "eval",
        "--endpoint",
        "http://t:8000/v1",
        "--model",
        "qwen",
        "--api-key-env",
        "NANOCHAT_EVAL_API_KEY",
    ]
    assert "--out" not in c["command"]
    assert {"name": "NANOCHAT_EVAL_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}} in c["env"]


def test_final_checkpoint_path_matches_trainer_layout():
    # checkpoint.py: <run>/final/ is the finished model; the operator sets checkpoint.dir.
    assert render.final_checkpoint_path("demo") == "/data/runs/demo/final"
    assert render.checkpoint_step_path("demo", 1200) == "/data/runs/demo/checkpoints/step_00001200"
    assert render.run_dir("demo") == "/data/runs/demo"
    assert render.eval_results_path("demo", "ev") == "/data/runs/demo/eval/ev.json"
    assert render.final_checkpoint_path("src", render.SOURCE_MOUNT) == "/source/runs/src/final"
    assert render.pod_layout("demo") == RunLayout(PurePosixPath("/data/runs/demo"))


def test_resolved_trainer_config_with_a_local_runs_directory(tmp_path):
    """`nanochat run` renders a run's config with its own runs directory in place of /data/runs."""
    spec = training(storage={"claimName": "runs"})
    assert render.resolved_trainer_config("demo", spec).checkpoint.dir == "/data/runs/demo"
    local = render.resolved_trainer_config("demo", spec, init_from=str(tmp_path / "src" / "final"), runs_root=tmp_path)
    assert local.checkpoint.dir == str(tmp_path / "demo")
    assert local.checkpoint.init_from == str(tmp_path / "src" / "final")
    assert spec.trainer.checkpoint.dir == "runs/default"  # the spec itself is left alone


def test_eval_command_and_endpoint_source():
    endpoint = Endpoint.model_validate({"url": "http://teacher:8000/v1", "model": "Qwen/Qwen3-8B"})
    assert render.endpoint_source(endpoint) == "http://teacher:8000/v1#Qwen/Qwen3-8B"
    teacher = endpoint.model_dump(by_alias=True, exclude_none=True)
    spec = EvalRunSpec.model_validate(
        {
            "model": {"trainingRun": "tern"},
            "maxProblems": 2,
            "compare": [{"name": "parent", "trainingRun": "base"}, {"name": "teacher", "endpoint": teacher}],
        }
    )
    cmd = render.eval_command(
        "ev",
        spec,
        "runs/tern/final",
        "runs/tern/eval/ev.json",
        {"parent": "runs/base/final", "teacher": render.endpoint_source(endpoint)},
    )
    assert cmd == [
        "nanochat",
        "eval",
        "--checkpoint",
        "runs/tern/final",
        "--samples",
        "1",
        "--temperature",
        "0.0",
        "--k",
        "1",
        "--max-new-tokens",
        "512",
        "--max-problems",
        "2",
        "--out",
        "runs/tern/eval/ev.json",
        "--name",
        "tern",
        "--compare",
        "parent=runs/base/final",
        "--compare",
        "teacher=http://teacher:8000/v1#Qwen/Qwen3-8B",
    ]
    with pytest.raises(ValueError, match="checkpoint"):
        render.eval_command("ev", spec)


def test_labels_and_annotations_as_the_cluster_sees_them():
    """The names other tools select on (kubectl -l, Kueue, the Job controller): fixed strings."""
    job = render.render_training_job("demo", "ml", training(queueName="gpu"), image="i")
    assert job["metadata"]["labels"]["nanochat.io/training-run"] == "demo"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert set(job["metadata"]["annotations"]) == {"nanochat.io/spec-hash", "nanochat.io/applied-spec"}
    assert job["spec"]["template"]["metadata"]["labels"]["nanochat.io/training-run"] == "demo"
    ev = render.render_eval_job(
        "ev", "ml", EvalRunSpec.model_validate({"model": {"trainingRun": "demo"}}), image="i", source=("demo", "runs")
    )
    assert ev["spec"]["template"]["metadata"]["labels"]["nanochat.io/eval-run"] == "ev"
    teacher = {"url": "http://t/v1", "model": "m", "apiKeySecret": {"name": "s", "key": "k"}}
    compare = EvalRunSpec.model_validate(
        {"model": {"trainingRun": "demo"}, "compare": [{"name": "my-teacher", "endpoint": teacher}]}
    )
    env = env_of(render.render_eval_job("ev", "ml", compare, image="i", source=("demo", "runs")))
    assert env["NANOCHAT_COMPARE_API_KEY_MY_TEACHER"] == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert env["NANOCHAT_TERMINATION_LOG"] == "/dev/termination-log"


def test_eval_pod_is_a_boundary_too():
    """The eval pod runs model-written code: non-root, read-only root, no capabilities, RuntimeDefault
    seccomp, no API token; a RuntimeClass when asked (the spec's over the operator's default)."""
    spec = EvalRunSpec.model_validate({"model": {"trainingRun": "demo"}})
    pod = render.render_eval_job("ev", "ml", spec, image="i", source=("demo", "runs"))["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False and "runtimeClassName" not in pod
    sc = pod["containers"][0]["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert {"name": "scratch", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]  # the one writable place
    assert {"name": "HOME", "value": "/tmp"} in pod["containers"][0]["env"]
    pod = render.render_eval_job("ev", "ml", spec, image="i", source=("demo", "runs"), runtime_class="gvisor")["spec"][
        "template"
    ]["spec"]
    assert pod["runtimeClassName"] == "gvisor"
    mine = EvalRunSpec.model_validate({"model": {"trainingRun": "demo"}, "runtimeClassName": "kata"})
    job = render.render_eval_job("ev", "ml", mine, image="i", source=("demo", "runs"), runtime_class="gvisor")
    validate(job)
    assert job["spec"]["template"]["spec"]["runtimeClassName"] == "kata"
    with_sa = EvalRunSpec.model_validate({"model": {"trainingRun": "demo"}, "serviceAccountName": "scorer"})
    pod = render.render_eval_job("ev", "ml", with_sa, image="i", source=("demo", "runs"))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "scorer" and "automountServiceAccountToken" not in pod


def test_eval_pod_runs_completions_in_a_sandbox_container():
    """The completions run in a native sidecar of their own: another uid, nothing of the
    evaluator's (no volume, Secret or env of its), reached at a socket both containers name."""
    teacher = {"url": "http://t/v1", "model": "m", "apiKeySecret": {"name": "s", "key": "k"}}
    spec = EvalRunSpec.model_validate({"model": {"endpoint": teacher}, "env": [{"name": "X", "value": "1"}]})
    job = render.render_eval_job("ev", "ml", spec, image="img")
    validate(job)
    pod = job["spec"]["template"]["spec"]
    (sandbox,) = pod["initContainers"]
    assert sandbox["restartPolicy"] == "Always" and sandbox["image"] == "img"
    assert sandbox["command"] == ["nanochat", "sandbox-serve"]
    assert sandbox["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "runAsUser": 65534,
        "runAsGroup": 65534,
    }
    assert sandbox["volumeMounts"] == [{"name": "sandbox-scratch", "mountPath": "/tmp"}]
    names = {v["name"] for v in sandbox["env"]}
    assert names == {"POD_UID", "NANOCHAT_SANDBOX_SOCKET", "HOME", "PYTHONUNBUFFERED"}
    assert "envFrom" not in sandbox
    evaluator = env_of(job)
    assert evaluator["NANOCHAT_EVAL_API_KEY"] == {"secretKeyRef": {"name": "s", "key": "k"}} and evaluator["X"] == "1"
    socket_env = {"name": "NANOCHAT_SANDBOX_SOCKET", "value": "@nanochat-sandbox-$(POD_UID)"}
    for c in (sandbox, pod["containers"][0]):
        names = [e["name"] for e in c["env"]]
        assert socket_env in c["env"] and names.index("POD_UID") < names.index("NANOCHAT_SANDBOX_SOCKET")


VLLM = render.VllmServing("vllm/vllm-openai:test", tensor_parallel=8, max_model_len=4096, gpu_memory_utilization=0.9)


def served_eval_job(**extra) -> dict:
    spec = EvalRunSpec.model_validate(
        {
            "model": {"trainingRun": "big"},
            "samplesPerProblem": 10,
            "temperature": 0.8,
            "k": [1, 10],
            "resources": {"gpus": 8, "cpu": "32", "memory": "400Gi"},
            **extra,
        }
    )
    return render.render_eval_job("ev", "ml", spec, image="trainer:1", source=("big", "runs"), vllm=VLLM)


def test_eval_pod_of_a_model_too_large_for_one_gpu_serves_it_with_vllm():
    """sandbox, export and vLLM (a native sidecar with the GPUs, started once its startupProbe sees
    the model loaded) before the eval container, which scores http://127.0.0.1:8000/v1 by the
    endpoint path; still one pod, still fenced."""
    job = served_eval_job()
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["sandbox", "export", "vllm"]
    sandbox, export, vllm = pod["initContainers"]
    (evaluator,) = pod["containers"]
    assert export["image"] == "trainer:1" and "restartPolicy" not in export  # runs to completion first
    assert export["command"] == ["nanochat", "export", "/data/runs/big/final", "--hf", "/data/runs/big/hf"]
    assert export["volumeMounts"] == [{"name": "data", "mountPath": "/data"}, {"name": "scratch", "mountPath": "/tmp"}]
    assert export["resources"]["limits"] == {"cpu": "32", "memory": "400Gi"}  # no GPU: it reads and writes files
    assert vllm["image"] == "vllm/vllm-openai:test" and vllm["restartPolicy"] == "Always"
    assert vllm["command"] == ["vllm", "serve"]
    assert vllm["args"] == [
        "/data/runs/big/hf",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--served-model-name",
        "big",
        "--tensor-parallel-size",
        "8",
        "--max-model-len",
        "4096",
        "--dtype",
        "bfloat16",
        "--gpu-memory-utilization",
        "0.9",
        "--generation-config",
        "vllm",
    ]
    probe = vllm["startupProbe"]
    assert (
        probe["exec"]["command"][:2] == ["python3", "-c"]
        and "'http://127.0.0.1:8000/health'" in probe["exec"]["command"][2]
    )
    assert probe["periodSeconds"] * probe["failureThreshold"] == 3600
    assert vllm["resources"]["limits"] == {"cpu": "32", "memory": "400Gi", "nvidia.com/gpu": "8"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in vllm["volumeMounts"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in vllm["volumeMounts"]
    env = {e["name"]: e["value"] for e in vllm["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["USER"] and env["HOME"] == "/tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}} and "vllm-scratch" in volumes
    # The eval container scores the served model as it scores any endpoint, and keeps no GPU.
    assert evaluator["command"] == [
        "nanochat",
        "eval",
        "--endpoint",
        "http://127.0.0.1:8000/v1",
        "--model",
        "big",
        "--api-key-env",
        "NANOCHAT_EVAL_API_KEY",
        "--samples",
        "10",
        "--temperature",
        "0.8",
        "--k",
        "1,10",
        "--max-new-tokens",
        "512",
        "--out",
        "/data/runs/big/eval/ev.json",
    ]
    assert "nvidia.com/gpu" not in evaluator["resources"]["limits"]
    assert evaluator["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False and sandbox["securityContext"]["runAsUser"] == 65534
    # A bad export (exit code 2) fails the run at once, as a bad eval does.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [r["onExitCodes"]["containerName"] for r in rules if "onExitCodes" in r] == ["eval", "export"]
    # The server listens on loopback: the pod's NetworkPolicy still lets nothing in, and nothing out.
    spec = EvalRunSpec.model_validate({"model": {"trainingRun": "big"}, "resources": {"gpus": 8}})
    policy = render.render_eval_network_policy("ev", "ml", spec)
    assert policy["spec"]["ingress"] == [] and policy["spec"]["egress"] == []


def test_served_eval_pods_carry_the_platform_settings_to_the_gpu_container():
    """spec.pod's devices (extraResources) and container security context go where the GPUs are."""
    job = served_eval_job(
        pod=POD_TEMPLATE, compare=[{"name": "t", "endpoint": {"url": "http://t:8000/v1", "model": "q"}}]
    )
    validate(job)
    pod = job["spec"]["template"]["spec"]
    vllm = pod["initContainers"][2]
    assert vllm["resources"]["limits"]["rdma/ib"] == "1" and vllm["securityContext"]["capabilities"]["add"] == [
        "IPC_LOCK"
    ]
    assert vllm["securityContext"]["allowPrivilegeEscalation"] is False
    assert "rdma/ib" not in pod["containers"][0]["resources"]["limits"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--name") + 1] == "big" and cmd[cmd.index("--compare") + 1] == "t=http://t:8000/v1#q"


def test_eval_network_policy_opens_only_the_scored_endpoints():
    ckpt = EvalRunSpec.model_validate({"model": {"trainingRun": "demo"}})
    policy = render.render_eval_network_policy("ev", "ml", ckpt)
    validate(policy)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"nanochat.io/eval-run": "ev"}}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == [] and policy["spec"]["egress"] == []  # a checkpoint needs no network
    endpoints = EvalRunSpec.model_validate(
        {
            "model": {"endpoint": {"url": "http://teacher:8000/v1", "model": "q"}},
            "compare": [{"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "m"}}],
        }
    )
    egress = render.render_eval_network_policy("ev", "ml", endpoints)["spec"]["egress"]
    assert egress == [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8000}]},
    ]


def test_training_pods_that_score_humaneval_get_the_sandbox_container():
    plain = render.render_training("demo", "ml", training(1, 0), image="trainer:1")[-1]
    assert "initContainers" not in plain["spec"]["template"]["spec"]
    spec = training(1, 0)
    spec.trainer.evaluation = EvaluationConfig(every=500)
    job = render.render_training("demo", "ml", spec, image="trainer:1")[-1]
    validate(job)
    pod = job["spec"]["template"]["spec"]
    (sandbox,) = pod["initContainers"]
    assert sandbox["restartPolicy"] == "Always" and sandbox["securityContext"]["runAsUser"] == 65534
    env = env_of(job)
    assert env["NANOCHAT_SANDBOX_SOCKET"] == "@nanochat-sandbox-$(POD_UID)" and "PET_NNODES" in env


POD_TEMPLATE = {
    "labels": {"team": "search", "cost-center": "ml-42"},
    "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net"},
    "imagePullSecrets": ["registry"],
    "priorityClassName": "training-high",
    "schedulerName": "volcano",
    "securityContext": {"runAsUser": 2000, "supplementalGroups": [5000]},
    "containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]
            }
        }
    },
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    ],
    "extraResources": {"rdma/ib": 1, "vpc.amazonaws.com/efa": "4"},
    "volumes": [{"name": "datasets", "nfs": {"server": "nfs.local", "path": "/datasets", "readOnly": True}}],
    "volumeMounts": [{"name": "datasets", "mountPath": "/datasets", "readOnly": True}],
}


@pytest.mark.parametrize("kind", ["training", "eval"])
def test_pod_template_overrides_reach_every_pod(kind):
    """spec.pod: the platform's labels, identity, placement, security and devices, on the pods of
    both kinds; the operator's own labels and mounts stay; security contexts merge key by key."""
    if kind == "training":
        job = render.render_training_job("demo", "ml", training(gpus=8, pod=POD_TEMPLATE), image="i")
        main, gpus = "trainer", "8"
    else:
        spec = EvalRunSpec.model_validate(
            {"model": {"trainingRun": "demo"}, "resources": {"gpus": 1}, "pod": POD_TEMPLATE}
        )
        job = render.render_eval_job("ev", "ml", spec, image="i", source=("demo", "runs"))
        main, gpus = "eval", "1"
    validate(job)
    template = job["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "nanochat-operator"
    assert template["metadata"]["annotations"] == {"k8s.v1.cni.cncf.io/networks": "rdma-net"}
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["priorityClassName"] == "training-high" and pod["schedulerName"] == "volcano"
    assert pod["affinity"] == POD_TEMPLATE["affinity"]
    assert pod["topologySpreadConstraints"] == POD_TEMPLATE["topologySpreadConstraints"]
    sc = pod["securityContext"]
    assert sc["runAsUser"] == 2000 and sc["supplementalGroups"] == [5000]  # the user's keys
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}  # ours kept
    container = next(c for c in pod["containers"] if c["name"] == main)
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    limits = container["resources"]["limits"]
    assert limits == container["resources"]["requests"]
    assert limits["rdma/ib"] == "1" and limits["vpc.amazonaws.com/efa"] == "4" and limits["nvidia.com/gpu"] == gpus
    assert {"name": "datasets", "mountPath": "/datasets", "readOnly": True} in container["volumeMounts"]
    assert any(v["name"] == "datasets" and v["nfs"]["server"] == "nfs.local" for v in pod["volumes"])
    assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])  # the operator's mounts stay


def test_default_pods_meet_pod_security_restricted():
    """What the "restricted" Pod Security level asks of every container, on every pod the operator
    renders (the e2e namespaces enforce it, so the API server checks the same for real)."""
    jobs = [
        render.render_training_job("demo", "ml", training(), image="i"),
        render.render_training_job("demo", "ml", training(trainer={"preset": "tiny", "evaluation": {}}), image="i"),
        render.render_eval_job(
            "ev", "ml", EvalRunSpec.model_validate({"model": {"trainingRun": "d"}}), image="i", source=("d", "runs")
        ),
        served_eval_job(),
    ]
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert not sc.get("privileged") and not c.get("ports", [{}])[0].get("hostPort"), c["name"]


def test_deadline_on_the_job_and_no_ttl_before_the_outcome_is_read():
    job = render.render_training_job(
        "demo", "ml", training(activeDeadlineSeconds=3600, ttlSecondsAfterFinished=60), image="i"
    )
    validate(job)
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert "ttlSecondsAfterFinished" not in job["spec"]  # set by the operator once the run has finished


@pytest.mark.parametrize("scheduler", ["coscheduling", "volcano"])
def test_gang_makes_a_pod_group_the_pods_join(scheduler):
    spec = training(nodes=4, gpus=8, gang={"scheduler": scheduler, "queue": "research"}, storage={"claimName": "runs"})
    objs = render.render_training("big", "ml", spec, image="img")
    kinds = [o["kind"] for o in objs]
    assert kinds.index("PodGroup") < kinds.index("Job")  # the group exists before any member
    group, job = objs[kinds.index("PodGroup")], objs[-1]
    assert group["metadata"]["name"] == job["metadata"]["name"] == "big-train"
    assert group["spec"]["minMember"] == 4 and group["spec"]["minResources"] == {"nvidia.com/gpu": "32"}
    pod = job["spec"]["template"]
    if scheduler == "coscheduling":
        assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1" and group["spec"]["scheduleTimeoutSeconds"] == 300
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "big-train"
        assert "schedulerName" not in pod["spec"] and "queue" not in group["spec"]
    else:
        assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1" and group["spec"]["queue"] == "research"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "big-train"
        assert pod["spec"]["schedulerName"] == "volcano"
    validate(job)
    custom = training(nodes=2, gang={"scheduler": "volcano"}, pod={"schedulerName": "volcano-gpu"})
    assert render.render_training_job("c", "ml", custom, image="img")["spec"]["template"]["spec"]["schedulerName"] == (
        "volcano-gpu"
    )
    assert "PodGroup" not in [o["kind"] for o in render.render_training("solo", "ml", training(), image="img")]


def test_pod_group_keys_are_the_operators():
    with pytest.raises(ValueError, match="scheduling.x-k8s.io/pod-group are the operator's"):
        training(pod={"labels": {"scheduling.x-k8s.io/pod-group": "other"}})
