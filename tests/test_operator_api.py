"""API models, manifests/dry run, feasibility and operator metrics (no cluster)."""

from __future__ import annotations

import urllib.request

import pytest
import torch
import yaml
from pydantic import ValidationError

from nanochat_operator import api
from nanochat_operator.api import EvalRunStatus, TrainingRunSpec, TrainingRunStatus
from nanochat_operator.checks import (
    GIB,
    estimate_params,
    eval_fit,
    feasibility,
    kv_cache_bytes,
    linear_modules,
    packed_eval_bytes,
    serving_bytes_per_gpu,
    tensor_parallel_problem,
    ternary_modules,
)
from nanochat_operator.manifests import ManifestError, dry_run, parse_documents, validate_documents
from nanochat_operator.metrics import OperatorMetrics, serve
from nanochat_operator.settings import parse_args
from nanochat_trainer.config import PRESETS, TernaryConfig, TrainerConfig, format_validation_error
from nanochat_trainer.models.gpt import GPT, count_params
from nanochat_trainer.models.ternary import select_ternary

TR = """apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {name: demo}
spec:
  trainer: {preset: tiny}
"""


def spec(**kw):
    return api.TrainingRunSpec.model_validate({"trainer": {"preset": "tiny"}, **kw})


@pytest.mark.parametrize("name", ["PET_NNODES", "PET_ANYTHING", "MASTER_ADDR", "RANK", "WORLD_SIZE"])
def test_reserved_env_refused(name):
    with pytest.raises(ValidationError, match="reserved"):
        spec(env=[{"name": name, "value": "1"}])


def test_operator_fields_are_camel_case_and_checked():
    s = spec(resources={"gpusPerNode": 2, "nodeSelector": {"a": "b"}}, queueName="q", backoffLimit=1)
    assert s.resources.gpus_per_node == 2 and s.queue_name == "q"
    for bad in [
        {"resources": {"gpus_per_node": 2}},  # snake_case is not the wire format
        {"storage": {"claimName": "a", "size": "1Gi"}},
        {"storage": {}},
        {"resources": {"memory": "8 GB"}},
        {"init": {"fromTrainingRun": "x"}},  # init needs storage
        {"trainer": {"device": "cuda"}},
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
    ]:
        with pytest.raises(ValidationError):
            api.TrainingRunSpec.model_validate({"trainer": {"preset": "tiny"}, **bad})


def test_eval_spec_rules():
    sampled = {"model": {"trainingRun": "a"}, "samplesPerProblem": 10, "temperature": 0.8, "k": [1, 10]}
    api.EvalRunSpec.model_validate(sampled)
    with pytest.raises(ValidationError, match="greedy completions are identical"):  # pass@10 would be pass@1
        api.EvalRunSpec.model_validate({**sampled, "temperature": 0})
    for bad in [
        {"model": {}},
        {"model": {"trainingRun": "a", "endpoint": {"url": "http://x", "model": "m"}}},
        {"model": {"trainingRun": "a"}, "k": [5]},
        {"model": {"endpoint": {"url": "ftp://x", "model": "m"}}},
        {"model": {"trainingRun": "a"}, "maxProblems": 500},
    ]:
        with pytest.raises(ValidationError):
            api.EvalRunSpec.model_validate(bad)


def test_quantities():
    assert api.parse_quantity("16Gi") == 16 * 2**30
    assert api.parse_quantity("500m") == 0.5 and api.parse_quantity(4) == 4 and api.parse_quantity("1e3") == 1000


def test_dry_run_one_line_errors_name_the_field(tmp_path):
    cases = {
        TR.replace("{preset: tiny}", "{preset: tiny, model: {dim: 4}}"): "spec.trainer.model.dim=4",
        TR.replace("{preset: tiny}", "{preset: tiny, stepz: 3}"): "spec.trainer.stepz: unknown field",
        TR.replace("kind: TrainingRun", "kind: Pod"): "kind must be one of",
        TR.replace("v1alpha1", "v1"): "apiVersion",
        TR + "  resources: {nodes: 0}\n": "spec.resources.nodes=0",
        TR + "---\n" + TR: "TrainingRun demo appears more than once",
        "a: [": "not valid YAML",
        TR.replace("{preset: tiny}", "{preset: qwen3-hybrid}") + "  resources: {gpusPerNode: 1}\n": "more GPUs",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"m{i}.yaml"
        path.write_text(text)
        with pytest.raises(ManifestError) as err:
            dry_run(str(path))
        assert needle in str(err.value) and "\n" not in str(err.value), (needle, str(err.value))
    with pytest.raises(ManifestError, match="No such file"):
        dry_run(str(tmp_path / "missing.yaml"))


def test_multi_document_parse():
    objs = parse_documents(
        TR
        + "---\n"
        + """apiVersion: nanochat.io/v1alpha1
kind: EvalRun
metadata: {name: ev}
spec: {model: {trainingRun: demo}}
"""
    )
    assert [o.kind for o in objs] == ["TrainingRun", "EvalRun"]
    assert objs[0].spec.trainer.model.dim == 128  # preset applied


def test_validate_documents_already_read():
    """What `nanochat run` does after laying its --set overrides over the documents."""
    doc = yaml.safe_load(TR)
    doc["spec"]["trainer"]["steps"] = 7
    assert validate_documents([doc], "m.yaml")[0].spec.trainer.steps == 7
    with pytest.raises(ManifestError, match=r"^m.yaml: document 2 \(TrainingRun demo\): spec.trainer.steps=0"):
        validate_documents([doc, {**doc, "spec": {"trainer": {"preset": "tiny", "steps": 0}}}], "m.yaml")
    with pytest.raises(ManifestError, match="m.yaml: no documents"):
        validate_documents([], "m.yaml")


def test_feasibility_gpu_cpu_and_memory():
    assert feasibility(spec(trainer={"preset": "tiny", "device": "cpu"})) == []
    assert (
        "no GPUs"
        in feasibility(
            api.TrainingRunSpec.model_construct(
                trainer=api.TrainerConfig.model_validate({"preset": "tiny", "device": "cuda"}),
                resources=api.Resources(),
            )
        )[0]
    )
    # A resource with a field of its own, in extraResources, would override that field behind the checks.
    extra = {"extraResources": {"nvidia.com/gpu": "8", "rdma/ib": "1"}}
    gpus = feasibility(spec(trainer={"preset": "tiny"}, pod=extra))
    assert gpus == ["pod.extraResources.nvidia.com/gpu: set resources.gpusPerNode instead"]
    fit = eval_fit(evalrun(pod={"extraResources": {"memory": "1Ti"}}), None, {})
    assert fit.problems == ["pod.extraResources.memory: set resources.memory instead"]
    # GPUs a run would not use: asked with device cpu, or for stage generate (the teacher has them).
    idle = feasibility(spec(trainer={"preset": "tiny", "device": "cpu"}, resources={"gpusPerNode": 2}))
    assert idle and "trainer.device=cpu but resources ask for 2 GPUs" in idle[0]
    teacher = {"url": "http://teacher:8000/v1", "model": "q"}
    generate = {"preset": "tiny", "stage": "generate", "generate": {"teacher": teacher, "rows": 10}}
    assert feasibility(spec(trainer=generate, resources={"gpusPerNode": 0})) == []
    assert "stage generate runs as one process" in feasibility(spec(trainer=generate, resources={"gpusPerNode": 1}))[0]
    big = {"preset": "qwen3-hybrid"}
    assert feasibility(spec(trainer=big, resources={"nodes": 2, "gpusPerNode": 8})) == []
    assert feasibility(spec(trainer=big, resources={"nodes": 1, "gpusPerNode": 8}))


def evalrun(gpus: int = 0, **spec) -> api.EvalRunSpec:
    return api.EvalRunSpec.model_validate({"model": {"trainingRun": "r"}, "resources": {"gpus": gpus}, **spec})


def trainer(preset: str, **over) -> TrainerConfig:
    return TrainerConfig.model_validate({"preset": preset, "model": over})


def model(preset: str, **over):
    return trainer(preset, **over).model


def test_eval_fit_one_gpu_then_vllm_over_the_gpus_asked_then_refused():
    """The fit decision: whole in fp32 on one GPU (nanochat eval, as before); else in bf16 over
    resources.gpus GPUs with tensor parallelism (vLLM); else refused, naming the memory it needs and
    the GPUs that would do."""
    big = trainer("qwen3-hybrid")  # ~79.7B: 297 GiB in fp32, 148 GiB in bf16
    assert eval_fit(evalrun(8), trainer("nano-1B"), {}) == eval_fit(evalrun(8), None, {})  # fits: nothing to do
    assert eval_fit(evalrun(1), trainer("nano-1B"), {}).tensor_parallel is None
    fit = eval_fit(evalrun(8), big, {})
    assert fit.problems == [] and fit.tensor_parallel == 8 and fit.max_model_len == 4096
    assert "needs 297 GiB in fp32, more than one GPU's 80 GiB" in fit.reason
    assert eval_fit(evalrun(4), big, {}).tensor_parallel == 4  # 37 GiB of weights per GPU: fits 60
    (too_big,) = eval_fit(evalrun(2), big, {}).problems
    assert "needs 74.3 GiB per GPU (148 GiB of weights in all" in too_big and "60 GiB of a 80 GiB GPU" in too_big
    assert too_big.endswith("ask for resources.gpus=4"), too_big
    (odd,) = eval_fit(evalrun(3), big, {}).problems  # memory would do, the heads do not split in 3
    assert "vLLM cannot split it over 3 GPUs (n_heads=16" in odd and odd.endswith("ask for resources.gpus=4"), odd
    # A smaller GPU needs more of them; past one node's 16, the answer is an endpoint that spans nodes.
    assert eval_fit(evalrun(8), big, {}, gpu_memory_gib=24).problems[0].endswith("ask for resources.gpus=16")
    (none,) = eval_fit(evalrun(16), big, {}, gpu_memory_gib=12).problems
    assert "no 16 GPUs of one node hold it: score it through spec.model.endpoint" in none, none
    # On CPU (gpus 0) nothing changes: the pod's memory must hold the model in fp32.
    (cpu,) = eval_fit(evalrun(0, resources={"memory": "64Gi"}), big, {}).problems
    assert cpu.endswith("in the eval pod; resources.memory=64Gi is not enough") and "297 GiB" in cpu


EXPERTS_ONLY = TernaryConfig(include=["layers.*.mlp.experts.*"])  # phase 3's choice


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-hybrid", "nano-125M", "qwen3-hybrid"])
@pytest.mark.parametrize("ternary", [TernaryConfig(), EXPERTS_ONLY], ids=["default", "experts"])
def test_the_operators_ternary_modules_are_the_trainers(preset, ternary):
    """The operator (no torch) names and sizes the modules a TernaryConfig makes ternary as the
    trainer's select_ternary does on the model itself (on the meta device)."""
    cfg = model(preset)
    with torch.device("meta"):
        gpt = GPT(cfg)
    linear = {n: m.weight.numel() for n, m in gpt.named_modules() if n in linear_modules(cfg)}
    assert linear == linear_modules(cfg)
    assert ternary_modules(cfg, ternary) == {n: linear[n] for n in select_ternary(gpt, ternary)}


def test_a_ternary_runs_final_model_is_scored_packed_on_one_gpu():
    """Phase 3's student (qwen3-hybrid, experts ternary): its packed export fits one 80 GiB GPU, so the
    eval loads it there (not vLLM, which would serve neither its ternary weights nor its 8-bit
    activations); its best/ checkpoint is a full-precision model and takes the vLLM path."""
    student = trainer("qwen3-hybrid").model_copy(update={"stage": "ternary", "ternary": EXPERTS_ONLY})
    need = packed_eval_bytes(student.model, EXPERTS_ONLY)
    # bench/ternary_memory.py: 16,354 MiB packed with every layer ternary; here attention and shared experts stay
    # bf16, and three expert stacks unpack at a time (3 GiB): ~22 GiB.
    assert 16 * GIB < need < 24 * GIB, need / GIB
    fit = eval_fit(evalrun(8), student, {})
    assert fit.problems == [] and fit.tensor_parallel is None and fit.packed == {"r"}
    # best/ holds its latent weights (BitLinear): too large for one GPU, and not for vLLM either.
    (best,) = eval_fit(evalrun(8, model={"trainingRun": "r", "checkpoint": "best"}), student, {}).problems
    assert "vLLM serves neither ternary weights" in best and best.endswith("instead of checkpoint: best"), best
    (small,) = eval_fit(evalrun(8), student, {}, gpu_memory_gib=12).problems
    assert "its packed ternary export" in small and "vLLM serves neither" in small, small
    # A full-precision MoE whose routers learnt an aux-free bias has no Hugging Face form to serve.
    aux_free = trainer("qwen3-hybrid").model_copy(deep=True)
    aux_free.model.moe.balance = "aux_free"
    (bias,) = eval_fit(evalrun(8), aux_free, {}).problems
    assert "moe.balance=aux_free" in bias, bias


def test_serving_arithmetic_and_what_tensor_parallelism_can_split():
    big = model("qwen3-hybrid")
    params = estimate_params(big)
    # 12 full-attention layers x K and V x 2 KV heads x 256 x 2 bytes per token; the KV heads split over 2 GPUs.
    assert kv_cache_bytes(big, 1) - kv_cache_bytes(big, 0) == 12 * 2 * 2 * 256 * 2
    assert kv_cache_bytes(big, 4096, 8) - kv_cache_bytes(big, 0, 8) == 12 * 2 * 256 * 2 * 4096  # 2 heads: at most 2
    per_gpu = serving_bytes_per_gpu(big, params, 8)
    assert params * 2 / 8 < per_gpu < params * 2 / 8 + 0.2 * GIB  # the weights' share, plus one sequence
    assert tensor_parallel_problem(big, 8) is None and tensor_parallel_problem(big, 16) is None
    assert tensor_parallel_problem(model("tiny"), 2) is None
    assert tensor_parallel_problem(model("tiny", n_heads=6, n_kv_heads=3, dim=192), 4) == (
        "n_heads=6 must be divisible by 4; n_kv_heads=3 must divide 4 or be divisible by it"
    )
    assert tensor_parallel_problem(model("tiny", n_heads=6, n_kv_heads=3, dim=192, ffn_dim=384), 6) is None  # KV x2


def test_eval_fit_of_compared_runs():
    big, small = trainer("qwen3-hybrid"), trainer("nano-125M")
    (one,) = eval_fit(
        evalrun(1, compare=[{"name": "parent", "trainingRun": "p"}]), small, {"parent": big}
    ).problems  # compared runs are never served
    assert one.startswith("parent: a model of ~79.67B parameters needs 297 GiB in fp32 on one GPU"), one
    assert (
        eval_fit(evalrun(1, compare=[{"name": "parent", "trainingRun": "p"}]), small, {"parent": small}).problems == []
    )
    beside_spec = evalrun(8, compare=[{"name": "parent", "trainingRun": "p"}])
    (beside,) = eval_fit(beside_spec, big, {"parent": small}).problems  # vLLM holds every GPU
    assert beside.startswith("compare parent: nanochat eval would load this TrainingRun beside vLLM"), beside


def test_feasibility_of_expert_parallel_layouts():
    two_nodes = {"nodes": 2, "gpusPerNode": 8}
    # DDP keeps the dense part on every GPU and 1/ep of the 77B of experts: 8 GPUs' worth is too much.
    ddp = feasibility(
        spec(trainer={"preset": "qwen3-hybrid", "parallel": "ddp", "expert_parallel": 8}, resources=two_nodes)
    )
    assert len(ddp) == 1 and "expert_parallel=8" in ddp[0] and "1/8 of the experts" in ddp[0], ddp
    assert feasibility(spec(trainer={"preset": "qwen3-hybrid", "expert_parallel": 8}, resources=two_nodes)) == []
    odd = feasibility(
        spec(trainer={"preset": "tiny-moe", "expert_parallel": 4}, resources={"nodes": 3, "gpusPerNode": 2})
    )
    assert odd == [
        "trainer.expert_parallel=4 does not divide the run's 6 workers (resources.nodes=3 x "
        "gpusPerNode=2): use a divisor of 6"
    ]
    assert (
        feasibility(spec(trainer={"preset": "tiny-moe", "expert_parallel": 2, "device": "cpu"}, resources={"nodes": 2}))
        == []
    )
    # Sharded, nothing is gathered: 80B parameters train with 500Gi per pod. A replicated model's final/
    # is written whole from pod 0: nano-1B's fp32 weights (~4 GiB) do not fit 2Gi.
    big = {"preset": "qwen3-hybrid"}
    assert feasibility(spec(trainer=big, resources={"nodes": 4, "gpusPerNode": 8, "memory": "500Gi"})) == []
    ddp = {"preset": "nano-1B", "parallel": "ddp"}
    small_host = feasibility(spec(trainer=ddp, resources={"nodes": 1, "gpusPerNode": 8, "memory": "2Gi"}))
    assert len(small_host) == 1 and "its final/ is written whole on pod 0's host" in small_host[0], small_host
    # Each rank writes its part, but asynchronously (the default when sharded) from a host copy of
    # it: 8 x 124M parameters x 12 bytes. Synchronous saves need no copy: 2Gi will do.
    fsdp = {"preset": "nano-1B", "parallel": "fsdp"}
    (staged,) = feasibility(spec(trainer=fsdp, resources={"nodes": 1, "gpusPerNode": 8, "memory": "2Gi"}))
    assert "copied to host memory before it is written" in staged and "11.1 GiB per pod" in staged, staged
    assert "trainer.checkpoint.async_save=false" in staged
    assert feasibility(spec(trainer=fsdp, resources={"nodes": 1, "gpusPerNode": 8, "memory": "12Gi"})) == []
    fsdp = {**fsdp, "checkpoint": {"async_save": False}}
    assert feasibility(spec(trainer=fsdp, resources={"nodes": 1, "gpusPerNode": 8, "memory": "2Gi"})) == []
    scored = {**fsdp, "evaluation": {"every": 100}}  # but in-training evaluation gathers the model on pod 0
    (gathered,) = feasibility(spec(trainer=scored, resources={"nodes": 1, "gpusPerNode": 8, "memory": "2Gi"}))
    assert "in-training evaluation gathers it whole on pod 0's host" in gathered, gathered


def test_param_estimate_matches_the_model():

    for name in PRESETS:
        m = TrainerConfig.model_validate({"preset": name}).model
        assert abs(estimate_params(m) / count_params(m)["total"] - 1) < 0.02, name


def test_metrics_exposition_and_http():
    m = OperatorMetrics()
    m.observe_training("ml", "a", TrainingRunStatus(phase="Running", step=10, loss=2.5, tokens_per_second=100.0))
    m.observe_training("ml", "b", TrainingRunStatus(phase="Pending"))
    m.observe_eval("ml", "e", EvalRunStatus(phase="Succeeded", scores={"pass@1": 0.2, "pass@10": 0.4}))
    m.reconcile_total.labels("TrainingRun", "ok").inc()
    m.reconcile_duration.labels("TrainingRun").observe(0.02)
    text = m.exposition().decode()
    for line in [
        'nanochat_runs{kind="TrainingRun",namespace="ml",phase="Running"} 1.0',
        'nanochat_runs{kind="TrainingRun",namespace="ml",phase="Pending"} 1.0',
        'nanochat_runs{kind="TrainingRun",namespace="ml",phase="Failed"} 0.0',
        'nanochat_training_step{name="a",namespace="ml"} 10.0',
        'nanochat_training_loss{name="a",namespace="ml"} 2.5',
        'nanochat_training_tokens_per_second{name="a",namespace="ml"} 100.0',
        'nanochat_eval_pass_at_k{k="10",name="e",namespace="ml"} 0.4',
        'nanochat_reconcile_total{kind="TrainingRun",result="ok"} 1.0',
        'nanochat_reconcile_duration_seconds_bucket{kind="TrainingRun",le="0.025"} 1.0',
    ]:
        assert line in text, line
    m.observe_training("ml", "a", TrainingRunStatus(phase="Succeeded", step=10))  # only live runs have progress series
    assert 'nanochat_training_step{name="a"' not in m.exposition().decode()
    m.forget("TrainingRun", "ml", "a")
    m.forget("EvalRun", "ml", "e")
    text = m.exposition().decode()
    assert 'name="a"' not in text and 'name="e"' not in text
    assert 'nanochat_runs{kind="TrainingRun",namespace="ml",phase="Running"} 0.0' in text

    server = serve(0, "127.0.0.1", metrics=m)
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "nanochat_runs" in body
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
    finally:
        server.shutdown()


def test_settings_flags_and_env(monkeypatch):
    monkeypatch.setenv("NANOCHAT_NAMESPACES", "a,b")
    monkeypatch.setenv("NANOCHAT_TRAINER_IMAGE", "img:2")
    cfg = parse_args(["--interval", "5"])
    assert cfg.namespaces == ["a", "b"] and cfg.trainer_image == "img:2" and cfg.interval == 5
    assert parse_args(["--namespace", "x"]).namespaces == ["x"]
    with pytest.raises(SystemExit):
        parse_args(["--interval", "0"])


def test_ternary_distilled_from_parent_needs_a_parent():
    spec = {"trainer": {"preset": "tiny", "stage": "ternary", "ternary": {"distill_from_parent": True}}}
    with pytest.raises(ValueError, match="distill_from_parent needs a parent"):
        TrainingRunSpec.model_validate(spec)
    ok = TrainingRunSpec.model_validate({**spec, "init": {"fromTrainingRun": "base"}, "storage": {"size": "1Gi"}})
    assert ok.trainer.ternary.distill_from_parent


@pytest.mark.parametrize(
    "pod,needle",
    [
        ({"labels": {"nanochat.io/training-run": "x"}}, "labels: nanochat.io/training-run"),
        ({"annotations": {"batch.kubernetes.io/job-completion-index": "0"}}, "annotations: batch.kubernetes.io/"),
        ({"labels": {"team": "not a label value"}}, "pod.labels.team"),
        ({"volumes": [{"name": "data", "emptyDir": {}}]}, "volumes: data"),
        ({"volumes": [{"name": "model-1", "emptyDir": {}}]}, "volumes: model-1"),
        ({"volumes": [{"emptyDir": {}}]}, "pod.volumes.0.name"),
        ({"volumeMounts": [{"name": "x", "mountPath": "/dev/shm"}]}, "volumeMounts: /dev/shm"),
        ({"volumeMounts": [{"name": "x"}]}, "pod.volumeMounts.0.mountPath"),
        ({"extraResources": {"rdma/ib": "lots"}}, "extraResources.rdma/ib"),
        ({"imagePullSecrets": ["Not_A_Name"]}, "pod.imagePullSecrets.0"),
    ],
)
def test_pod_template_refuses_what_is_the_operators(pod, needle):
    """The operator's labels, volumes and mounts cannot be overridden; each refusal names the field."""
    with pytest.raises(ValidationError) as err:
        TrainingRunSpec.model_validate({"trainer": {"preset": "tiny"}, "pod": pod})
    assert needle in format_validation_error(err.value, "spec."), format_validation_error(err.value, "spec.")


def test_reconcile_counters_start_at_zero_for_every_kind_and_result():
    """A counter series that first appears at 1 has no increase for rate() to see: the first failed
    reconcile after an operator start would not count toward NanochatReconcileErrors."""
    text = OperatorMetrics().exposition().decode()
    for kind in ("TrainingRun", "EvalRun"):
        for result in ("ok", "retry", "error"):
            assert f'nanochat_reconcile_total{{kind="{kind}",result="{result}"}} 0.0' in text, (kind, result)
