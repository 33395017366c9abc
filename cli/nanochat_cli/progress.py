"""A progress bar for local training runs (`nanochat train`, `nanochat run`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def progress_bar(total: int) -> Callable[[dict[str, Any]], None]:
    """A tqdm bar fed by the trainer's step records."""
    from tqdm import tqdm  # noqa: PLC0415 (the trainer extra)

    bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(record: dict[str, Any]) -> None:
        bar.n = record["step"]
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
        bar.refresh()
        if record["step"] >= total:
            bar.close()

    return update
