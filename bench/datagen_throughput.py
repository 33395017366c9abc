"""Generation stage throughput: documents kept per second, requests and completion tokens per
second, the acceptance rate and the rejections by reason of `stage: generate` (`datagen/run.py`'s
`Generator`) at several levels of teacher concurrency, then the diversity of what it kept.

    .venv/bin/python bench/datagen_throughput.py                    # the fake teacher, in-process
    .venv/bin/python bench/datagen_throughput.py --levels 8,64,256 --rows 500 --tokens-per-s 200
    .venv/bin/python bench/datagen_throughput.py --url http://teacher:8000/v1 --model Qwen/Qwen3-30B-A3B-FP8 --json

Without --url it serves e2e/fake_teacher.py's FakeQwen3Teacher on a loopback port in this
process: vLLM's wire format, answers after --latency-ms plus one token per 1/--tokens-per-s
seconds *per request* (as a batched server decodes), so the concurrency level matters as it does
against vLLM. Its content is fake: the synthetic generator's documents, with a fixed share (8 in
20) of the failures a real teacher has. Against it the figures measure the pipeline (HTTP,
parsing, the sandbox running each exercise's tests, dedup, decontamination, Parquet shards) and
its overheads, not a real teacher's speed or the quality of its data. --url points it at a real
OpenAI-compatible server (vLLM) instead.

Each level is a fresh run (its own dataset folder and answer cache) of --rows kept documents with
`teacher.concurrency` = the level. Rates are over the run's wall time. The run stops the moment
it has its rows, so requests still in flight then are sent but never decided: at high levels and
few rows that overshoot weighs on requests/s (compare `decided/s`). Prints figures; it does not
pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from e2e.fake_teacher import FakeQwen3Teacher, serving  # noqa: E402
from nanochat_trainer.config import TrainerConfig  # noqa: E402
from nanochat_trainer.data.shards import iter_rows  # noqa: E402
from nanochat_trainer.datagen.diversity import diversity  # noqa: E402
from nanochat_trainer.datagen.run import Generator  # noqa: E402

FAKE_MODEL = "Qwen/Qwen3-30B-A3B-FP8"  # the name the fake is asked for (it serves any)


def run_level(url: str, model: str, template: str, level: int, rows: int, workers: int, seed: int) -> dict:
    """One fresh generation run of `rows` kept documents with `level` requests in flight."""
    with tempfile.TemporaryDirectory(prefix="datagen-bench-") as tmp:
        cfg = TrainerConfig.model_validate(
            {
                "stage": "generate",
                "checkpoint": {"dir": tmp},
                "metrics": {"port": 0},
                "generate": {
                    "teacher": {"url": url, "model": model, "concurrency": level},
                    "rows": rows,
                    "template": template,
                    "workers": workers,
                    "seed": seed,
                },
            }
        )
        gen = Generator(cfg)
        t0 = time.monotonic()
        gen.run()
        wall = time.monotonic() - t0
        kept = list(iter_rows(gen.folder, ["text", "index"]))
    teacher = gen.teacher
    decided = gen.frontier
    return {
        "in_flight": level,
        "wall_s": wall,
        "kept": gen.counts.accepted,
        "decided": decided,
        "requests": teacher.requests,
        "kept_per_s": gen.counts.accepted / wall,
        "decided_per_s": decided / wall,
        "requests_per_s": teacher.requests / wall,
        "completion_tokens": teacher.completion_tokens,
        "completion_tokens_per_s": teacher.completion_tokens / wall,
        "acceptance": gen.counts.accepted / decided if decided else 0.0,
        "peak_in_flight": teacher.peak_in_flight,
        "teacher_errors": teacher.errors,
        "retries": teacher.retries,
        "rejected": {k: v for k, v in gen.counts.rejected.items() if v},
        "sandbox": gen.sandbox.isolation.level,
        "kept_indices": [r["index"] for r in kept],
        "diversity": diversity(r["text"] for r in kept),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an OpenAI-compatible server (vLLM, e.g. http://host:8000/v1); default: the fake")
    ap.add_argument("--model", help="the model name the --url server serves")
    ap.add_argument("--template", default="qwen3", choices=["qwen3", "chatml", "plain"])
    ap.add_argument("--levels", default="8,64,256", help="teacher concurrency (requests in flight), comma-separated")
    ap.add_argument("--rows", type=int, default=500, help="documents kept per level")
    ap.add_argument("--tokens-per-s", type=float, default=200.0, help="the fake's decode rate per request")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="the fake's latency per request")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="exercises tested in the sandbox at once")
    ap.add_argument("--seed", type=int, default=0, help="generate.seed (the same at every level)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if args.url and not args.model:
        ap.error("--url needs --model")

    def go(url: str, model: str) -> list[dict]:
        return [run_level(url, model, args.template, k, args.rows, args.workers, args.seed) for k in levels]

    if args.url:
        where = f"the teacher at {args.url}, model {args.model!r} (a real server: its own speed and data)"
        rows = go(args.url, args.model)
        fake = None
    else:
        fake = FakeQwen3Teacher(tokens_per_s=args.tokens_per_s, latency_ms=args.latency_ms)
        with serving(fake) as url:
            where = (
                f"FakeQwen3Teacher in-process at {url} ({args.tokens_per_s:g} tokens/s per request, "
                f"{args.latency_ms:g} ms latency): with the fake teacher these figures measure the pipeline "
                "(HTTP, parsing, sandbox, dedup, shards), not a real teacher's quality"
            )
            rows = go(url + "/v1", FAKE_MODEL)
    same = all(r["kept_indices"] == rows[0]["kept_indices"] for r in rows)
    if args.json:
        out = {
            "teacher": where,
            "fake": fake is not None,
            "template": args.template,
            "rows": args.rows,
            "workers": args.workers,
            "same_documents_at_every_level": same,
            "levels": [{k: v for k, v in r.items() if k != "kept_indices"} for r in rows],
        }
        print(json.dumps(out, indent=1))
        return
    print(f"teacher: {where}")
    print(
        f"template {args.template}, {args.rows} documents kept per level, sandbox {rows[0]['sandbox']} "
        f"with {args.workers} workers, {os.cpu_count()} CPUs"
    )
    print(
        f"{'in flight':>9} {'kept/s':>7} {'decided/s':>9} {'requests/s':>10} {'compl tok/s':>11} {'accept':>6} "
        f"{'peak':>5} {'wall s':>6}  rejected"
    )
    for r in rows:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items(), key=lambda kv: -kv[1]))
        errors = f"; teacher errors {r['teacher_errors']}, retries {r['retries']}" if r["teacher_errors"] else ""
        print(
            f"{r['in_flight']:>9} {r['kept_per_s']:>7.1f} {r['decided_per_s']:>9.1f} {r['requests_per_s']:>10.1f} "
            f"{r['completion_tokens_per_s']:>11.0f} {r['acceptance']:>6.2f} {r['peak_in_flight']:>5} "
            f"{r['wall_s']:>6.1f}  {rejected or '-'}{errors}"
        )
    d, level = rows[-1]["diversity"], rows[-1]["in_flight"]
    print(
        f"diversity of the {d['documents']} kept documents (level {level}): {d['with_code']} with code, "
        f"distinct skeletons {d['distinct_skeletons']:.2f}, distinct identifiers {d['distinct_identifiers']}, "
        f"near-duplicate rate {d['near_duplicate_rate']:.3f}"
    )
    print(f"the same documents kept at every level: {same}")
    if fake is not None:
        print(
            "note: the fake's documents come from the synthetic generator, so the diversity is that "
            "generator's, not a teacher's; a real teacher's figures need --url"
        )


if __name__ == "__main__":
    main()
