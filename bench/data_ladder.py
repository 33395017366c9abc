"""Data ladder: what each kind of training data buys, at equal tokens. Three rungs of the tiny
preset, trained from the same seed, with the same tokenizer, on the same number of tokens, each
scored by validation loss on held-out real code that none of them trains on:

    (a) synthetic        the synthetic generator only
    (b) + stdlib         synthetic plus real code: the training share of the Python standard library
    (c) + teacher        synthetic plus teacher-made data: a dataset that stage generate (`Generator`)
                         makes first, against the fake teacher, read as a mixture source

    .venv/bin/python bench/data_ladder.py                # ~4.5 min on 2 idle CPU cores, more when shared
    .venv/bin/python bench/data_ladder.py --steps 100 --every 25 --teacher-rows 600 --json

Held-out code: the standard library's modules of 0.5 to --max-file-kb KB (short enough that the
loader's 64 lanes each go through several documents in a short run), split by
`data.holdout_repos` (--holdout): a hash of each first-level folder or top-level module decides
whether it is held out. Rung (b) trains on the training share (a local source over that folder
with `holdout_repos`); every rung validates on the held-out share, a folder of only those files
as `validation.data`, the same documents for every rung whatever it trains on. Before training,
every held-out document is compared with every training document any rung can read (the
standard library's training share, the teacher's dataset, the synthetic documents of the token
budget twice over): the run stops if one is shared.

The mixtures weigh documents so that each source would give about half the tokens (weights are
shares of documents, so they are set from the mean tokens per document of each source); what each
rung actually trained on is log.jsonl's `data_tokens`, printed. One byte-level BPE, trained once on
all three training sources, is shared by the rungs, so their losses are in the same units.

Honest limits. The teacher of rung (c) is e2e/fake_teacher.py's FakeQwen3Teacher: its documents
are the synthetic generator's (another seed than the synthetic source's), dressed as exercises
and textbook sections, through the real pipeline (HTTP, sandbox, dedup, decontamination, shards).
Rung (c) therefore measures the plumbing and the mixture, not the value of Qwen3's data. The
training loss is on each rung's own data, so only the validation loss compares rungs. A tiny
model, about a million tokens, one seed: differences of a few hundredths are noise.
Prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from e2e.fake_teacher import FakeQwen3Teacher, serving  # noqa: E402
from nanochat_trainer.config import DataConfig, TrainerConfig  # noqa: E402
from nanochat_trainer.data.shards import iter_rows  # noqa: E402
from nanochat_trainer.data.sources import is_heldout, iter_indexed  # noqa: E402
from nanochat_trainer.data.stdlib import stdlib_files, stdlib_root  # noqa: E402
from nanochat_trainer.data.synthetic import document  # noqa: E402
from nanochat_trainer.datagen.run import Generator  # noqa: E402
from nanochat_trainer.tokenizer import train_bpe  # noqa: E402
from nanochat_trainer.train.run import train  # noqa: E402

SYNTHETIC_SEED = 1  # the synthetic source's seed; the fake teacher's documents are seed 0's
MIN_FILE_BYTES = 500


def stdlib_split(tmp: Path, holdout: float, max_bytes: int) -> dict[str, Any]:
    """Copies of the standard library's modules of MIN_FILE_BYTES..max_bytes: all of them (the
    training source, read with holdout_repos) and the held-out ones alone (the validation source)."""
    root = stdlib_root()
    every, held = tmp / "stdlib", tmp / "stdlib-heldout"
    names: set[str] = set()
    n_all = n_held = 0
    for path in stdlib_files():
        if not MIN_FILE_BYTES <= path.stat().st_size <= max_bytes:
            continue
        rel = path.relative_to(root)
        targets = [every / rel]
        if is_heldout(rel.parts[0], holdout):
            targets.append(held / rel)
            names.add(rel.parts[0])
            n_held += 1
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        n_all += 1
    if not n_held or n_held == n_all:
        raise SystemExit(f"--holdout {holdout} holds out {n_held} of {n_all} modules: choose another share")
    return {"train_dir": every, "heldout_dir": held, "files": n_all, "heldout_files": n_held, "heldout": sorted(names)}


def teacher_dataset(tmp: Path, rows: int) -> dict[str, Any]:
    """Stage generate against the fake teacher: a dataset folder of `rows` kept documents."""
    run_dir = tmp / "generate"
    with serving(FakeQwen3Teacher()) as url:
        cfg = TrainerConfig.model_validate(
            {
                "stage": "generate",
                "checkpoint": {"dir": str(run_dir)},
                "metrics": {"port": 0},
                "generate": {
                    "teacher": {"url": url + "/v1", "model": "Qwen/Qwen3-30B-A3B-FP8", "concurrency": 64},
                    "rows": rows,
                    "workers": 2,
                },
            }
        )
        gen = Generator(cfg)
        t0 = time.monotonic()
        gen.run()
        wall = time.monotonic() - t0
    return {
        "folder": gen.folder,
        "kept": gen.counts.accepted,
        "decided": gen.frontier,
        "rejected": {k: v for k, v in gen.counts.rejected.items() if v},
        "seconds": wall,
    }


def _fingerprint(text: str) -> bytes:
    """As the trainer's overlap check compares documents: whitespace normalised, hashed."""
    return hashlib.blake2b(re.sub(r"\s+", " ", text).strip().encode(), digest_size=16).digest()


def _texts(data: dict, limit: int | None = None) -> list[str]:
    """One pass of a source's training share (of at most `limit` documents)."""
    docs = iter_indexed(DataConfig.model_validate(data), repeat=False)
    return [t for _, t in itertools.islice(docs, limit)]


# ---------------------------------------------------------------------------- the ladder


def run_rung(name: str, data: dict, common: dict, run_dir: Path, seq_len: int) -> dict[str, Any]:
    checkpoint = {"dir": str(run_dir), "resume": False, "every": common["steps"]}
    cfg = TrainerConfig.model_validate({**common, "data": data, "checkpoint": checkpoint})
    t0 = time.monotonic()

    def progress(record: dict) -> None:
        if "val_loss" in record:
            print(
                f"  {name}: step {record['step']}, loss {record['loss']:.3f}, validation loss "
                f"{record['val_loss']:.3f}, {time.monotonic() - t0:.0f} s",
                flush=True,
            )

    train(cfg, progress=progress)
    seconds = time.monotonic() - t0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in log}
    last = log[-1]
    tail = [steps[s]["loss"] for s in sorted(steps)[-10:]]
    return {
        "rung": name,
        "seconds": seconds,
        "tokens": last["step"] * common["batch_size"] * seq_len,
        "data_tokens": last["data_tokens"],
        "final_loss": last["loss"],
        "final_loss_mean10": sum(tail) / len(tail),
        "val_loss": {s: r["val_loss"] for s, r in sorted(steps.items()) if "val_loss" in r},
        "tokens_per_second": sum(r["tokens_per_second"] for r in log) / len(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="steps per rung (equal tokens: the same for all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--every", type=int, default=60, help="steps between validations")
    ap.add_argument("--val-tokens", type=int, default=32768, help="held-out tokens per validation")
    ap.add_argument("--teacher-rows", type=int, default=2000, help="documents the generate stage keeps for rung (c)")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of stdlib packages/modules held out")
    ap.add_argument("--max-file-kb", type=float, default=16.0, help="largest stdlib module used")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON after the table")
    args = ap.parse_args()
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="data-ladder-") as tmp_name:
        tmp = Path(tmp_name)
        split = stdlib_split(tmp, args.holdout, int(args.max_file_kb * 1024))
        print(
            f"stdlib: {split['files']} modules of {MIN_FILE_BYTES} B..{args.max_file_kb:g} KB; held out "
            f"(holdout_repos={args.holdout:g}): {split['heldout_files']} files of {len(split['heldout'])} "
            f"packages/modules: {', '.join(split['heldout'])}",
            flush=True,
        )
        made = teacher_dataset(tmp, args.teacher_rows)
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(made["rejected"].items(), key=lambda kv: -kv[1]))
        print(
            f"teacher data: stage generate against FakeQwen3Teacher kept {made['kept']} of {made['decided']} "
            f"answers in {made['seconds']:.1f} s (rejected: {rejected})",
            flush=True,
        )

        synthetic = {"source": "synthetic", "seed": SYNTHETIC_SEED}
        stdlib = {"source": "local", "path": str(split["train_dir"]), "holdout_repos": args.holdout}
        teacher = {"source": "local", "path": str(made["folder"])}
        heldout = {"source": "local", "path": str(split["heldout_dir"])}

        tiny = TrainerConfig.model_validate({"preset": "tiny"})
        seq_len = tiny.resolved_seq_len
        budget = args.steps * args.batch_size * seq_len

        # The texts every rung can train on, and the held-out ones.
        texts = {
            "stdlib": _texts(stdlib),
            "teacher": [r["text"] for r in iter_rows(made["folder"], ["text"])],
            "synthetic": [document(SYNTHETIC_SEED, i) for i in range(2000)],
        }
        held = _texts(heldout)

        # One tokenizer for every rung, trained on all three training sources.
        vocab = tiny.model.vocab_size
        t0 = time.monotonic()
        tok = train_bpe([*texts["synthetic"][:1000], *texts["teacher"], *texts["stdlib"]], vocab)
        tok_path = tok.save(tmp / "tokenizer.json")
        mean = {k: sum(len(tok.encode(t)) + 1 for t in v) / len(v) for k, v in texts.items()}
        print(
            f"tokenizer: one BPE of {vocab} tokens for every rung ({time.monotonic() - t0:.0f} s); mean tokens per "
            f"document: " + ", ".join(f"{k} {v:.0f}" for k, v in mean.items()),
            flush=True,
        )

        # None of the held-out documents is a training document of any rung.
        need = int(2 * budget / mean["synthetic"])
        texts["synthetic"] += [document(SYNTHETIC_SEED, i) for i in range(len(texts["synthetic"]), need)]
        training = {_fingerprint(t) for v in texts.values() for t in v}
        shared = sum(_fingerprint(t) in training for t in held)
        print(
            f"held-out check: {len(held)} held-out documents against {len(training)} distinct training documents "
            f"(stdlib training share {len(texts['stdlib'])}, teacher {len(texts['teacher'])}, synthetic "
            f"{len(texts['synthetic'])}): {shared} shared",
            flush=True,
        )
        if shared:
            raise SystemExit("held-out documents are also training documents: the validation loss would be wrong")

        common = {
            "preset": "tiny",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": 0,
            "tokenizer": {"kind": "bpe", "path": str(tok_path)},
            "metrics": {"port": 0, "log_every": 1},
            "validation": {"data": heldout, "every": args.every, "tokens": args.val_tokens},
        }

        def mix(other: str, source: dict) -> dict:
            weights = {"synthetic": 1 / mean["synthetic"], other: 1 / mean[other]}  # ~equal tokens
            total = sum(weights.values())
            return {
                "source": "mixture",
                "mixture": [
                    {"name": "synthetic", "weight": weights["synthetic"] / total, **synthetic},
                    {"name": other, "weight": weights[other] / total, **source},
                ],
            }

        rungs = [
            ("(a) synthetic", synthetic),
            ("(b) + stdlib", mix("stdlib", stdlib)),
            ("(c) + teacher", mix("teacher", teacher)),
        ]
        print(
            f"training: preset tiny, seed 0, {args.steps} steps x {args.batch_size} x {seq_len} = {budget} tokens "
            f"per rung; validation every {args.every} steps on {args.val_tokens} held-out tokens",
            flush=True,
        )
        results = [run_rung(name, data, common, tmp / f"rung{n}", seq_len) for n, (name, data) in enumerate(rungs)]
        teacher_tokens = sum(len(tok.encode(t)) + 1 for t in texts["teacher"])

    total = time.monotonic() - started
    val_steps = sorted({s for r in results for s in r["val_loss"]})
    print()
    head = f"{'rung':<14} {'tokens':>7}  {'from':<28} {'train loss':>10} " + " ".join(
        f"{f'val@{s}':>7}" for s in val_steps
    )
    print(head + f" {'time s':>7}")
    for r in results:
        got = sum(r["data_tokens"].values())
        shares = ", ".join(f"{k} {v / got:.0%}" for k, v in r["data_tokens"].items())
        vals = " ".join(f"{r['val_loss'][s]:>7.3f}" if s in r["val_loss"] else f"{'-':>7}" for s in val_steps)
        print(
            f"{r['rung']:<14} {r['tokens']:>7}  {shares:<28} {r['final_loss_mean10']:>10.3f} {vals} "
            f"{r['seconds']:>7.0f}"
        )
    teacher_share = results[2]["data_tokens"].get("teacher", 0) / sum(results[2]["data_tokens"].values())
    epochs = teacher_share * results[2]["tokens"] / teacher_tokens
    print(
        "train loss: the mean of the last 10 steps, on each rung's own data (not comparable across rungs); "
        "val: loss on held-out standard library modules no rung trains on (checked), the same rows for all."
    )
    print(
        f"rung (c)'s teacher is FakeQwen3Teacher, not Qwen3: synthetic-generator documents through the real "
        f"generate pipeline ({made['kept']} kept, read {epochs:.1f} times over), so it measures the plumbing and "
        "the mixture, not the value of a real teacher's data."
    )
    print(f"wall time: {total:.0f} s")
    if args.json:
        print(
            json.dumps(
                {
                    "steps": args.steps,
                    "tokens_per_rung": budget,
                    "stdlib": {k: v for k, v in split.items() if not k.endswith("_dir")},
                    "teacher_data": {k: v for k, v in made.items() if k != "folder"},
                    "mean_tokens_per_document": mean,
                    "heldout_shared_with_training": shared,
                    "rungs": results,
                    "wall_s": total,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
