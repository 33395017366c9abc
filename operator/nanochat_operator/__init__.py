"""The nanochat operator: TrainingRun/EvalRun custom resources -> torchrun Jobs (kopf).

Modules: api (pydantic models), crds (CRD generation), render (manifests, pure),
status (status machine, pure), deps (dependencies, pure), checks (feasibility, pure),
progress (the trainer's gauges, pure), reconcile (the logic, on a Cluster),
kube (the Cluster on the kubernetes client), handlers (kopf wiring), metrics, manifests
(dry run), settings, __main__ (`python -m nanochat_operator`).

What the operator shares with the trainer and the `nanochat` command (API group and kinds,
phases, condition types, labels, the run directory, the trainer's gauges, the eval result)
is spelt once, in nanochat_trainer.contract, and imported from there.
"""
