"""`make demo`: the whole pipeline on CPU in a few minutes.

    python -m nanochat_trainer.demo --out runs/demo [--steps 300]

Trains the `tiny` preset on synthetic Python, checkpoints it, samples completions of a
few function headers, prints the start and end loss and writes `loss.png` beside the run.
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
from .train import train

PROMPTS = [
    'def add_numbers(a, b):\n    """Return the sum of a and b."""\n',
    'def reverse_words(text):\n    """Return the words of text in reverse order."""\n',
    "def count_evens(values):\n",
]


def plot_loss(log_path: Path, out: Path) -> None:
    import matplotlib  # noqa: PLC0415 (heavy; needed only for the plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="training loss", title="nanochat tiny on synthetic Python")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = {"preset": "tiny", "checkpoint": {"dir": args.out}, "metrics": {"port": 0}}
    if args.steps:
        spec["steps"] = args.steps
    cfg = TrainerConfig.model_validate(spec)
    t0 = time.time()
    print(f"training preset tiny ({cfg.steps} steps, batch {cfg.batch_size}x{cfg.resolved_seq_len}) on CPU ...")
    train(
        cfg,
        progress=lambda r: (
            print(f"  step {r['step']:4d}  loss {r['loss']:.3f}  {r['tokens_per_second']:,.0f} tok/s", flush=True)
            if r["step"] % 25 == 0
            else None
        ),
    )
    run = RunLayout(Path(args.out))
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    print(f"loss: start {records[0]['loss']:.3f} -> end {records[-1]['loss']:.3f} ({time.time() - t0:.0f} s)")
    plot_loss(run.log, run.root / "loss.png")
    print(f"loss curve: {run.root / 'loss.png'}")

    model, tokenizer, _ = load_model(run.final)
    outs = generate(
        model, tokenizer, PROMPTS, max_new_tokens=60, temperature=0.0, stop=["\ndef", "\nclass", "\nif", "\nprint"]
    )
    for prompt, (completion,) in zip(PROMPTS, outs):
        print("-" * 60 + "\n" + prompt + completion)
    print(f"checkpoint: {run.final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
