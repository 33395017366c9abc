"""Training: the run (`run.train`), the trainer object and its step, losses, optimizers, start-up, metrics.

from nanochat_trainer.train import train
record = train(TrainerConfig.model_validate({"preset": "tiny", "steps": 50}))

run.py       a run top to bottom: start up, step, checkpoint, save the finished model
trainer.py   one rank's state and the optimizer step; state_dict()/load_state_dict()
startup.py   tokenizer, model, initial weights, the frozen parent, the batch feed
losses.py    language-modelling and distillation losses
optim.py     Muon, batched Muon for expert stacks, AdamW; the learning-rate schedule
metrics.py   rank 0's gauges and log.jsonl; FLOPs per token for MFU
"""

from .run import train

__all__ = ["train"]
