"""Parallelism, applied to the models from outside (the models know none of it).

distributed.py      the process group: rank, world, device, and the trainer's few collectives
expert_parallel.py  experts split over ranks: the all-to-all token dispatch, gradients, state
apply.py            balancing groups, activation checkpointing, FSDP2, compile, DDP: one order
state.py            whole model and optimizer state from any layout (checkpoints)
"""
