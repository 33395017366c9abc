"""HumanEval evaluation: generation, a subprocess sandbox, pass@k, an OpenAI-compatible client.

from nanochat_trainer.eval.humaneval import load_problems, evaluate_completions
from nanochat_trainer.eval.generate import generate
nanochat eval --checkpoint runs/tiny --samples 1 --k 1      # the CLI (nanochat_cli/eval.py)
"""
