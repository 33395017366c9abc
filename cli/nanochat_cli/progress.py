"""A progress bar for local training runs (`nanochat train`, `nanochat run`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def progress_bar(total: int) -> Callable[[dict[str, Any]], None]:
    """A tqdm bar fed by the trainer's step records."""
    from tqdm import tqdm  # noqa: PLC0415 (the trainer extra)

    from nanochat_trainer.train.metrics import evaluation_line  # noqa: PLC0415 (torch, too)

    bar = tqdm(total=total, unit="step", dynamic_ncols=True)
    seen: dict[str, str] = {}  # the last validation and evaluation stay on the bar

    def update(record: dict[str, Any]) -> None:
        bar.n = record["step"]
        if "val_loss" in record:
            seen["val"] = f"{record['val_loss']:.3f}"
        if "pass_at_1" in record:
            seen["pass@1"] = f"{record['pass_at_1']:.3f}"
        bar.set_postfix(loss=f"{record['loss']:.3f}", **seen, tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
        if "val_loss" in record or "evaluation" in record:
            bar.write(evaluation_line(record))
        bar.refresh()
        if record["step"] >= total:
            bar.close()

    return update
