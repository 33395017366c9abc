"""The nanochat operator: TrainingRun/EvalRun custom resources -> torchrun Jobs (kopf).

Modules: api (pydantic models), crds (CRD generation), render (manifests, pure),
status (status machine, pure), deps (dependencies, pure), checks (feasibility, pure),
progress/results (trainer and eval contracts, pure), reconcile (the logic, on a Cluster),
kube (the Cluster on the kubernetes client), handlers (kopf wiring), metrics, manifests
(dry run), settings, __main__ (`python -m nanochat_operator`).
"""
