"""`make demo`: the whole pipeline on CPU in a few minutes.

    python -m nanochat_trainer.demo --out runs/demo [--steps 300]

Trains the `tiny` preset on synthetic Python, validating on the standard library and scoring
pass@1 on held-out synthetic problems every 50 steps, checkpoints it, scores the first
DEMO_PROBLEMS HumanEval problems, samples completions of a few function headers, prints the
losses and pass@1 and plots them in `loss.png` beside the run.
A second invocation resumes (and, when already finished, only samples and plots).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .checkpoint import load_model
from .config import TrainerConfig
from .contract import RunLayout
from .eval.generate import generate
from .eval.humaneval import STOP_SEQUENCES, evaluate_completions, load_problems
from .train import train
from .train.metrics import evaluation_line

PROMPTS = [
    'def add_numbers(a, b):\n    """Return the sum of a and b."""\n',
    'def reverse_words(text):\n    """Return the words of text in reverse order."""\n',
    "def count_evens(values):\n",
]
DEMO_PROBLEMS = 40  # held-out synthetic problems scored every 50 steps; HumanEval's first 40 at the end


def plot_curves(log_path: Path, out: Path) -> None:
    """Training loss, validation loss (the standard library) and in-training pass@1, by step."""
    import matplotlib  # noqa: PLC0415 (heavy; needed only for the plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="training loss (synthetic)")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss (stdlib)")
    ax.set(xlabel="step", ylabel="loss", title="nanochat tiny on synthetic Python")
    ax.grid(alpha=0.3)
    scored = [r for r in records if "pass_at_1" in r]
    right = ax.twinx()
    right.plot(
        [r["step"] for r in scored],
        [r["pass_at_1"] for r in scored],
        "s--",
        color="tab:green",
        label="pass@1 (held-out synthetic)",
    )
    right.set(ylabel="pass@1", ylim=(0, max([0.05] + [r["pass_at_1"] * 1.2 for r in scored])))
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = {
        "preset": "tiny",
        "checkpoint": {"dir": args.out},
        "metrics": {"port": 0},
        # pass@1 while it trains on held-out synthetic problems, which a model this small can move.
        "evaluation": {"benchmark": "synthetic", "every": 50, "problems": DEMO_PROBLEMS, "max_new_tokens": 96},
    }
    if args.steps:
        spec["steps"] = args.steps
    cfg = TrainerConfig.model_validate(spec)
    t0 = time.time()
    print(f"training preset tiny ({cfg.steps} steps, batch {cfg.batch_size}x{cfg.resolved_seq_len}) on CPU ...")
    train(cfg, progress=_print_progress)
    run = RunLayout(Path(args.out))
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    print(f"loss: start {records[0]['loss']:.3f} -> end {records[-1]['loss']:.3f} ({time.time() - t0:.0f} s)")
    evals = [r["evaluation"]["seconds"] for r in records if "evaluation" in r]
    if evals:
        print(f"in-training pass@1: {len(evals)} passes of {DEMO_PROBLEMS} problems, {sum(evals):.0f} s in all")
    plot_curves(run.log, run.root / "loss.png")
    print(f"curves: {run.root / 'loss.png'}")

    model, tokenizer, _ = load_model(run.final)
    problems = load_problems(DEMO_PROBLEMS)
    t1 = time.time()
    outs = generate(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens=128, stop=STOP_SEQUENCES)
    report = evaluate_completions(problems, {p["task_id"]: o for p, o in zip(problems, outs)}, workers=2)
    print(
        f"HumanEval pass@1 (first {DEMO_PROBLEMS} problems): {report['pass_at_k']['1']:.3f} ({time.time() - t1:.0f} s)"
    )
    outs = generate(
        model, tokenizer, PROMPTS, max_new_tokens=60, stop=["\ndef", "\nclass", "\nif", "\nprint", "\nassert"]
    )
    for prompt, (completion,) in zip(PROMPTS, outs):
        print("-" * 60 + "\n" + prompt + completion)
    print(f"checkpoint: {run.final}")
    return 0


def _print_progress(record: dict) -> None:
    if "val_loss" in record or "evaluation" in record:
        print("  " + evaluation_line(record), flush=True)
    elif record["step"] % 25 == 0:
        print(
            f"  step {record['step']:4d}  loss {record['loss']:.3f}  {record['tokens_per_second']:,.0f} tok/s",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
